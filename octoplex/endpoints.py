"""
How the pool dials an upstream: the endpoint built for each new connection.

The Agent asks :class:`UpstreamEndpointFactory` for an endpoint whenever the
pool has no idle connection for a ``(scheme, host, port)``.  This is the one
place every outbound connection passes through, so it is where connection
policy lives: TCP_NODELAY, quiet factories, TLS, and (later) the egress
policy and the DNS cache.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorCore,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from octoplex.dns import CachingResolver, NameNotResolved

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

    def __init__(self, wrapped: IStreamClientEndpoint, opened: Callable[[str], None]) -> None:
        self._wrapped = wrapped
        self._opened = opened

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        protocolFactory.noisy = False  # type: ignore[attr-defined]
        return self._wrapped.connect(protocolFactory).addCallback(self._connected)

    def _connected(self, protocol: IProtocol) -> IProtocol:
        transport = protocol.transport  # type: ignore[attr-defined]
        set_tcp_nodelay(transport)
        peer = transport.getPeer()
        self._opened(f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}")
        return protocol


@implementer(IStreamClientEndpoint)
class _ExplainedName:
    """
    Wrap a ``HostnameEndpoint`` so that a failed lookup says why (NXDOMAIN,
    SERVFAIL, timeout): an ``IHostnameResolver`` can only report "no
    addresses", so the reason is asked of the resolver afterwards.
    """

    def __init__(
        self, wrapped: IStreamClientEndpoint, host: str, resolver: CachingResolver
    ) -> None:
        self._wrapped = wrapped
        self._host = host
        self._resolver = resolver

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._wrapped.connect(protocolFactory).addErrback(self._explain)

    def _explain(self, failure: Failure) -> Failure:
        if failure.check(DNSLookupError) and not failure.check(NameNotResolved):
            reason = self._resolver.explain(self._host)
            if reason is not None:
                return Failure(NameNotResolved(f"DNS lookup for {self._host} failed: {reason}"))
        return failure


@implementer(IAgentEndpointFactory)
class UpstreamEndpointFactory:
    """
    Build the endpoint for a new upstream connection.

    :param reactor: the reactor to connect with.
    :param tls_policy: chooses the TLS settings for an ``https`` upstream.
    :param connect_timeout: seconds a TCP connect may take.
    :param resolver: the resolver installed on ``reactor``, if it is
        Octoplex's; it explains failed lookups.
    """

    def __init__(
        self,
        reactor: IReactorCore,
        tls_policy: IPolicyForHTTPS,
        connect_timeout: float,
        resolver: CachingResolver | None = None,
    ) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout
        self._resolver = resolver
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

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host
        if host.startswith(b"[") and host.endswith(b"]"):
            host = host[1:-1]
        tcp = self._tcp_endpoint(host, uri.port)
        if uri.scheme == b"http":
            return _TunedEndpoint(tcp, self._count)
        if uri.scheme == b"https":
            creator = self._tls_policy.creatorForNetloc(host, uri.port)
            return _TunedEndpoint(wrapClientTLS(creator, tcp), self._count)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")

    def _tcp_endpoint(self, host: bytes, port: int) -> IStreamClientEndpoint:
        # An IP literal is dialled directly: HostnameEndpoint would send it
        # through the resolver's thread pool, and it reports a refused
        # connection only on its next 0.3 s attempt tick, which under a
        # 100 ms deadline turns "connection refused" into a timeout.
        text = host.decode("ascii")
        timeout = self._connect_timeout
        if isIPAddress(text):
            return TCP4ClientEndpoint(self._reactor, text, port, timeout=timeout)
        if isIPv6Address(text):
            return TCP6ClientEndpoint(self._reactor, text, port, timeout=timeout)
        endpoint = HostnameEndpoint(self._reactor, host, port, timeout=timeout)
        if self._resolver is None:
            return endpoint
        return _ExplainedName(endpoint, text, self._resolver)
