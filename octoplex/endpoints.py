"""
How the pool dials an upstream: the endpoint built for each new connection.

The Agent asks :class:`UpstreamEndpointFactory` for an endpoint whenever the
pool has no idle connection for a ``(scheme, host, port)``.  This is the one
place every outbound connection passes through, so it is where connection
policy lives: TCP_NODELAY, quiet factories, TLS, the DNS cache, and the
egress policy, which is asked about every address just before it is dialled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from octoplex.dns import CachingResolver
from octoplex.egress import EgressPolicy, EgressRefused
from octoplex.hedging import Route
from octoplex.metrics import Metrics
from octoplex.outliers import ACTIVE, Outliers
from octoplex.timings import Timings

__all__ = ["UpstreamEndpointFactory", "set_tcp_nodelay"]


def set_tcp_nodelay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on ``transport`` if it is a TCP transport (a
    TLS transport passes the call down to its TCP transport).

    Twisted writes a request's headers and body in separate writes; with
    Nagle on, a small exchange can stall on a delayed ACK for tens of
    milliseconds.
    """
    set_nodelay = getattr(transport, "setTcpNoDelay", None)
    if set_nodelay is not None:
        set_nodelay(True)


@implementer(IStreamClientEndpoint)
class _TunedEndpoint:
    """
    Wrap an endpoint so each connection it makes has TCP_NODELAY, is counted
    by the address it reached, and its factory does not log "Starting
    factory" for every connection.
    """

    def __init__(
        self,
        wrapped: IStreamClientEndpoint,
        opened: Callable[[str], None],
        timings: Timings | None = None,
    ) -> None:
        self._wrapped = wrapped
        self._opened = opened
        self._timings = timings

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        protocolFactory.noisy = False  # type: ignore[attr-defined]
        return self._wrapped.connect(protocolFactory).addCallback(self._connected)

    def _connected(self, protocol: IProtocol) -> IProtocol:
        if self._timings is not None:
            self._timings.connected = self._timings.now()
        transport = protocol.transport  # type: ignore[attr-defined]
        set_tcp_nodelay(transport)
        peer = transport.getPeer()
        host = getattr(peer, "host", None)
        if isinstance(host, str):
            # A hedge prefers a connection to another address (octoplex.pool).
            protocol.address = host  # type: ignore[attr-defined]
        self._opened(f"{peer if host is None else host}:{getattr(peer, 'port', '')}")
        return protocol


#: Seconds between connection attempts to a name's successive addresses,
#: as HostnameEndpoint (and RFC 8305's "Connection Attempt Delay") uses.
ATTEMPT_DELAY = 0.3


@implementer(IStreamClientEndpoint)
class _NameEndpoint:
    """
    Dial a host (a name or an IP literal) through the caching resolver: its
    addresses the egress policy allows, in the resolver's rotated order,
    less those that refused a connection lately, one attempt every
    :data:`ATTEMPT_DELAY` seconds (or at once when the previous attempt
    fails), the first to connect winning.  An address that refuses is
    reported to the resolver, which leaves it out for a while.

    With outlier ejection on (``outliers``), the addresses ejected are left
    out too, an address due a probe is tried first, and every failed
    attempt is reported to the outliers, which then stand in for the
    resolver's leaving out of refusing addresses.

    If the policy allows none of the addresses, the connection fails with
    :class:`~octoplex.egress.EgressRefused` and nothing is sent.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        resolver: CachingResolver,
        egress: EgressPolicy,
        host: str,
        port: int,
        timeout: float,
        metrics: Metrics,
        timings: Timings | None = None,
        key: Any = None,
        outliers: Outliers | None = None,
        route: Route | None = None,
    ) -> None:
        self._timings = timings
        #: The route of the hedged request's attempt it dials for, if any.
        self.route = route
        #: The pool's key of the upstream, under which outliers track it.
        self.key = key
        self.outliers = outliers
        self._metrics = metrics
        self._reactor = reactor
        self._resolver = resolver
        self.egress = egress
        self._host = host
        self._port = port
        self._timeout = timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        try:
            self.egress.check_name(self._host, self._port)
        except EgressRefused as e:
            return self._refused(e)
        timings = self._timings
        if timings is not None:
            timings.dns_start = timings.now()
        d = self._resolver.lookup(self._host)
        if timings is not None:
            d.addCallback(self._resolved, timings)
        return d.addCallback(self._race, protocolFactory)

    @staticmethod
    def _resolved(addresses: list[str], timings: Timings) -> list[str]:
        timings.dns_done = timings.now()
        return addresses

    def _race(self, addresses: list[str], factory: IProtocolFactory) -> Deferred[IProtocol]:
        allowed = []
        refusal = None
        for address in addresses:
            try:
                self.egress.check_address(self._host, address, self._port)
            except EgressRefused as e:
                refusal = refusal or e
            else:
                allowed.append(address)
        if not allowed:
            assert refusal is not None
            return self._refused(refusal)
        usable = self._resolver.usable(allowed)
        probe = None
        if self.outliers is not None:
            usable, probe = self.outliers.choose(self.key, usable)
        route = self.route
        if route is not None and route.avoid in usable and len(usable) > 1:
            # A hedge: its first attempt's address last.
            usable = [a for a in usable if a != route.avoid] + [route.avoid]
        return _Race(self, usable, factory, probe).winner

    def _refused(self, refusal: EgressRefused) -> Deferred[IProtocol]:
        self._metrics.egress_refused.inc()
        self.log.info(
            "egress refused: {reason}",
            reason=str(refusal),
            host=refusal.host,
            port=refusal.port,
            egress_refused=True,
        )
        return fail(refusal)

    def _endpoint(self, address: str) -> IStreamClientEndpoint:
        endpoint = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
        return endpoint(self._reactor, address, self._port, timeout=self._timeout)


class _Race:
    """
    One connection race over a name's addresses.
    """

    def __init__(
        self,
        endpoint: _NameEndpoint,
        addresses: list[str],
        factory: IProtocolFactory,
        probe: str | None = None,
    ) -> None:
        self._endpoint = endpoint
        #: The address due a probe (octoplex.outliers), tried first.
        self._probe = probe
        self._waiting = list(addresses)
        self._factory = factory
        self._attempts: dict[str, Deferred[IProtocol]] = {}
        self._next: Any = None
        self._failure: Failure | None = None
        self.winner: Deferred[IProtocol] = Deferred(self._cancel)
        self._start_next()

    def _start_next(self) -> None:
        self._next = None
        if not self._waiting:
            self._maybe_lost()
            return
        address = self._waiting.pop(0)
        route = self._endpoint.route
        if route is not None:
            route.address = address
        attempt = self._endpoint._endpoint(address).connect(self._factory)
        self._attempts[address] = attempt
        attempt.addCallbacks(
            self._won, self._failed, callbackArgs=(address,), errbackArgs=(address,)
        )
        if self._waiting and not self.winner.called and self._next is None:
            self._next = self._endpoint._reactor.callLater(ATTEMPT_DELAY, self._start_next)

    def _won(self, protocol: IProtocol, address: str) -> None:
        del self._attempts[address]
        if self.winner.called:
            # Another address won first: this connection is not needed.
            protocol.transport.loseConnection()  # type: ignore[attr-defined]
            return
        route = self._endpoint.route
        if route is not None:
            route.address = address
        self.winner.callback(protocol)
        self._stop_others()

    def _failed(self, failure: Failure, address: str) -> None:
        del self._attempts[address]
        outliers = self._endpoint.outliers
        if failure.check(CancelledError, ConnectingCancelledError):
            if address == self._probe and outliers is not None:
                outliers.probe_dropped(self._endpoint.key, address)
            return
        if outliers is not None:
            outliers.connect_failed(self._endpoint.key, address, failure)
        elif failure.check(ConnectionRefusedError):
            self._endpoint._resolver.refused(address)
        self._failure = failure
        if self.winner.called:
            return
        if self._waiting:
            # Do not wait out the attempt delay behind a failure.
            if self._next is not None:
                self._next.cancel()
            self._start_next()
        else:
            self._maybe_lost()

    def _maybe_lost(self) -> None:
        if not self._attempts and not self.winner.called:
            assert self._failure is not None
            self.winner.errback(self._failure)

    def _stop_others(self) -> None:
        self._waiting = []
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        for attempt in list(self._attempts.values()):
            attempt.cancel()

    def _cancel(self, _: Deferred[IProtocol]) -> None:
        self._stop_others()


def _host_of(uri: URI) -> bytes:
    """``uri``'s host as dialled: an IPv6 literal without its brackets."""
    host = uri.host
    if host.startswith(b"[") and host.endswith(b"]"):
        host = host[1:-1]
    return host


@implementer(IAgentEndpointFactory)
class UpstreamEndpointFactory:
    """
    Build the endpoint for a new upstream connection.

    :param reactor: the reactor to connect with.
    :param tls_policy: chooses the TLS settings for an ``https`` upstream.
    :param connect_timeout: seconds a TCP connect may take.
    :param resolver: resolves host names (and explains failed lookups).
    :param egress: decides which addresses may be dialled.
    :param metrics: counts egress refusals.
    """

    def __init__(
        self,
        reactor: IReactorCore,
        tls_policy: IPolicyForHTTPS,
        connect_timeout: float,
        resolver: CachingResolver,
        egress: EgressPolicy,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = Metrics() if metrics is None else metrics
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout
        self._resolver = resolver
        self.egress = egress
        #: The addresses' states, while outlier ejection is on.
        self.outliers: Outliers | None = None
        #: Connections opened per upstream address ("ip:port") since the
        #: last :meth:`take_opened`, so the spread across a name's
        #: addresses can be seen.
        self._opened: Counter[str] = Counter()

    def _count(self, address: str) -> None:
        self._opened[address] += 1

    def take_opened(self) -> Counter[str]:
        """
        The connections opened per address since the last call, resetting
        the count.
        """
        opened, self._opened = self._opened, Counter()
        return opened

    def endpointForURI(
        self, uri: URI, timings: Timings | None = None, route: Route | None = None
    ) -> IStreamClientEndpoint:
        """
        The endpoint for a new connection to ``uri``'s host and port; with
        ``timings``, it marks the DNS lookup and the connect in them; with a
        hedged request's ``route``, it notes there the address it dials, and
        dials the address the route avoids last.
        """
        host = _host_of(uri)
        tcp = self._tcp_endpoint(host, uri.port, timings, (uri.scheme, uri.host, uri.port), route)
        if uri.scheme == b"http":
            return _TunedEndpoint(tcp, self._count, timings)
        if uri.scheme == b"https":
            creator = self._tls_policy.creatorForNetloc(host, uri.port)
            return _TunedEndpoint(wrapClientTLS(creator, tcp), self._count, timings)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")

    def elsewhere(self, uri: URI, avoid: str) -> bool:
        """
        Whether a new connection to ``uri``'s host could go to another
        address than ``avoid``, as far as is known now without a lookup:
        the DNS cache holds one the egress policy allows, that has not
        refused a connection lately and is not ejected (octoplex.outliers).
        """
        name = _host_of(uri).decode("ascii")
        outliers = self.outliers
        key = (uri.scheme, uri.host, uri.port)
        for address in self._resolver.known(name):
            if address == avoid or self._resolver.refusing(address):
                continue
            if outliers is not None and outliers.state(key, address) != ACTIVE:
                continue
            try:
                self.egress.check_address(name, address, uri.port)
            except EgressRefused:
                continue
            return True
        return False

    def _tcp_endpoint(
        self,
        host: bytes,
        port: int,
        timings: Timings | None = None,
        key: Any = None,
        route: Route | None = None,
    ) -> IStreamClientEndpoint:
        # IP literals take the same path as names: the resolver hands a
        # literal back at once, and the egress policy must see it.
        return _NameEndpoint(
            self._reactor,
            self._resolver,
            self.egress,
            host.decode("ascii"),
            port,
            self._connect_timeout,
            self._metrics,
            timings,
            key,
            self.outliers,
            route,
        )
