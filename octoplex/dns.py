"""
Name resolution for upstream connections: asynchronous, cached for each
answer's TTL, and spread across a name's addresses.

Twisted's default resolver runs a blocking ``getaddrinfo`` in a thread pool
for every new connection, and caches nothing.  :class:`CachingResolver` is
installed on the reactor instead (``reactor.installNameResolver``), so every
``HostnameEndpoint`` in the process uses it, and Octoplex's own dialler
(:mod:`octoplex.endpoints`) asks it directly.  It:

- answers from ``/etc/hosts`` first (so ``localhost`` works);
- queries A and AAAA records at once with ``twisted.names``;
- caches an answer for its TTL, clamped to a floor and a ceiling, and a
  failure for a short negative TTL;
- lets concurrent lookups of one name share a single query;
- rotates the order of a name's addresses on every lookup, so new
  connections spread across them;
- serves an answer just past its TTL while one refresh runs;
- leaves out, for a while, an address that refused a connection;
- fails a lookup with why the name failed (NXDOMAIN, SERVFAIL, timeout),
  which is the error a caller reads.
"""

from __future__ import annotations

import socket
from typing import Any

import attr
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    TimeoutError,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import (
    DNSNameError,
    DNSQueryRefusedError,
    DNSQueryTimeoutError,
    DNSServerError,
)
from twisted.names.hosts import searchFileForAll
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from zope.interface import implementer

from octoplex.metrics import Metrics

__all__ = ["CachingResolver", "DNSSettings", "NameNotResolved", "nameservers", "parse_nameserver"]

RESOLV_CONF: FilePath[Any] = FilePath(b"/etc/resolv.conf")

#: The most names the cache holds.
MAX_NAMES = 10_000
HOSTS: FilePath[Any] = FilePath(b"/etc/hosts")


def nameservers(
    resolv_conf: FilePath[Any] = RESOLV_CONF,
) -> list[tuple[str, int]]:
    """
    The name servers in a resolv.conf(5) file, read once; the local host's
    port 53 when the file names none, as the C library does.
    """
    servers = []
    try:
        lines = resolv_conf.getContent().decode("utf-8", "replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            servers.append((fields[1], 53))
    return servers or [("127.0.0.1", 53)]


def parse_nameserver(text: str) -> tuple[str, int]:
    """
    Read a name server given as ``IP``, ``IP:PORT`` or ``[IPv6]:PORT``
    (port 53 by default).

    :raises ValueError: naming the bad value.
    """
    host, port = text.strip(), "53"
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"--dns-server {text!r}: expected [IPv6]:PORT")
            port = rest[1:]
    elif host.count(":") == 1:
        host, port = host.split(":")
    if not (isIPAddress(host) or isIPv6Address(host)):
        raise ValueError(f"--dns-server {text!r}: {host!r} is not an IP address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--dns-server {text!r}: {port!r} is not a port")
    return host, int(port)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class DNSSettings:
    """
    How long answers are kept, and how long a query may take.

    :ivar min_ttl: the shortest time, in seconds, an answer is cached, even
        if its TTL is shorter (a TTL of 0 would mean a query per connection).
    :ivar max_ttl: the longest time an answer is cached, even if its TTL is
        longer, so that traffic follows DNS changes.
    :ivar negative_ttl: how long a failed lookup is remembered.
    :ivar timeouts: the seconds each query attempt waits, in turn.
    :ivar refused_for: seconds an address that refused a connection is left
        out of a name's addresses.
    :ivar stale_grace: seconds past its TTL an answer may still be served
        while a refresh is in flight; 0 serves nothing stale.
    """

    min_ttl: float = 1.0
    max_ttl: float = 300.0
    negative_ttl: float = 5.0
    timeouts: tuple[float, ...] = (1.0, 2.0)
    refused_for: float = 10.0
    stale_grace: float = 5.0


class NameNotResolved(DNSLookupError):
    """
    A host name could not be resolved; the message says why and names it.
    """

    def __str__(self) -> str:
        # DNSLookupError would prefix "DNS lookup failed: " a second time.
        return str(self.args[0])


@attr.s(slots=True, auto_attribs=True)
class _Entry:
    """
    A cached answer: the IPv4 and the IPv6 addresses of a name, or why it
    has none.
    """

    ipv4: list[str]
    ipv6: list[str]
    expires: float
    error: str | None = None
    turn: int = 0

    def next_order(self) -> list[str]:
        """
        The addresses, each family rotated one step further than last time.
        IPv4 comes first: HostnameEndpoint tries addresses in order, 0.3 s
        apart, and many hosts have no working IPv6 route.
        """
        turn = self.turn
        self.turn += 1
        return _rotate(self.ipv4, turn) + _rotate(self.ipv6, turn)


def _cache_key(name: str) -> str:
    """
    The cache's key of host ``name``: lower case, and "name." is "name" as
    an absolute name (no search list is applied to either): one cache
    entry, /etc/hosts for both, and the same query.
    """
    key = name.lower()
    if key.endswith(".") and len(key) > 1:
        key = key[:-1]
    return key


def _rotate(addresses: list[str], turn: int) -> list[str]:
    if not addresses:
        return []
    turn %= len(addresses)
    return addresses[turn:] + addresses[:turn]


@implementer(IHostResolution)
@attr.s(slots=True, auto_attribs=True)
class _Resolution:
    name: str

    def cancel(self) -> None:
        # The shared query goes on: another lookup of the name may want it,
        # and its answer fills the cache.
        pass


def _reason(failure: Failure) -> str:
    if failure.check(DNSNameError):
        return "NXDOMAIN (the name does not exist)"
    if failure.check(DNSServerError):
        return "SERVFAIL (the name server failed)"
    if failure.check(DNSQueryRefusedError):
        return "REFUSED (the name server refused the query)"
    # twisted.names' client ends a query nobody answered with the base
    # class, defer.TimeoutError.
    if failure.check(DNSQueryTimeoutError, TimeoutError):
        return "timeout (no name server answered)"
    return failure.getErrorMessage()


@implementer(IHostnameResolver)
class CachingResolver:
    """
    A caching, address-rotating host name resolver.

    :param clock: the time source for TTLs.
    :param resolver: the ``twisted.names`` resolver that queries name
        servers (``client.Resolver(resolv="/etc/resolv.conf")`` in the
        daemon).
    :param settings: the TTL clamps and query timeouts.
    :param hosts: the hosts(5) file read before any query, or ``None``.
    :param metrics: counts lookups (hit, stale or miss) and the queries
        sent to name servers; a fresh one by default.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        resolver: Any,
        settings: DNSSettings,
        hosts: FilePath[Any] | None = HOSTS,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = Metrics() if metrics is None else metrics
        self._clock = clock
        self._resolver = resolver
        self._settings = settings
        self._hosts = hosts
        self._cache: dict[str, _Entry] = {}
        self._refusing: dict[str, float] = {}
        self._waiting: dict[str, list[Deferred[list[str]]]] = {}
        #: Queries sent to name servers, per name: for tests and operators.
        self.queries: dict[str, int] = {}

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """
        Resolve ``hostName`` for ``HostnameEndpoint``; see
        ``IHostnameResolver``.  A failed lookup resolves to no addresses,
        which the endpoint reports as a ``DNSLookupError``.
        """
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)

        def deliver(addresses: list[str]) -> None:
            for address in addresses:
                if ":" in address:
                    if addressTypes is None or IPv6Address in addressTypes:
                        resolutionReceiver.addressResolved(IPv6Address("TCP", address, portNumber))
                elif addressTypes is None or IPv4Address in addressTypes:
                    resolutionReceiver.addressResolved(IPv4Address("TCP", address, portNumber))
            resolutionReceiver.resolutionComplete()

        def failed(_: Failure) -> None:
            resolutionReceiver.resolutionComplete()

        self.lookup(hostName).addCallbacks(deliver, failed)
        return resolution

    def refused(self, address: str) -> None:
        """
        ``address`` refused a connection: leave it out of lookups for
        :attr:`DNSSettings.refused_for` seconds.
        """
        self._refusing[address] = self._clock.seconds() + self._settings.refused_for

    def usable(self, addresses: list[str]) -> list[str]:
        """
        ``addresses`` without those that refused a connection lately; all of
        them if every one did, since one may have come back.
        """
        now = self._clock.seconds()
        for address, until in list(self._refusing.items()):
            if until <= now:
                del self._refusing[address]
        return [a for a in addresses if a not in self._refusing] or addresses

    def known(self, name: str) -> list[str]:
        """
        The addresses of ``name`` the cache holds now, current or stale, in
        no particular order; none if it holds no answer (nothing is asked,
        nothing counted): a hedge asks whether another address is there to
        dial (:meth:`octoplex.endpoints.UpstreamEndpointFactory.elsewhere`).
        """
        entry = self._cache.get(_cache_key(name))
        if entry is None or entry.error is not None:
            return []
        return entry.ipv4 + entry.ipv6

    def refusing(self, address: str) -> bool:
        """Whether ``address`` refused a connection lately (see :meth:`refused`)."""
        until = self._refusing.get(address)
        return until is not None and until > self._clock.seconds()

    def lookup(self, name: str) -> Deferred[list[str]]:
        """
        The addresses of ``name``, in this lookup's turn of rotation.

        :return: a Deferred that fires with the addresses, or fails with
            :class:`NameNotResolved`.
        """
        key = _cache_key(name)
        if isIPAddress(key) or isIPv6Address(key):
            # HostnameEndpoint hands IP literals to the resolver too.
            return succeed([key])
        entry = self._cache.get(key)
        now = self._clock.seconds()
        if entry is not None and entry.expires > now:
            self._metrics.dns_hit.inc()
            return self._answer(key, entry)
        if (
            entry is not None
            and entry.error is None
            and now < entry.expires + self._settings.stale_grace
        ):
            # Serve the answer that just expired while one refresh, shared
            # by every lookup, is in flight: no caller waits on DNS for a
            # name it had a moment ago.
            if key not in self._waiting:
                self._waiting[key] = []
                maybeDeferred(self._query, key).addBoth(self._settle, key)
            self._metrics.dns_stale.inc()
            return self._answer(key, entry)

        self._metrics.dns_miss.inc()

        def give_up(d: Deferred[list[str]]) -> None:
            # The shared query goes on for the others and fills the cache.
            others = self._waiting.get(key, [])
            if d in others:
                others.remove(d)

        waiting: Deferred[list[str]] = Deferred(give_up)
        if key in self._waiting:
            self._waiting[key].append(waiting)
            return waiting
        self._waiting[key] = [waiting]
        # maybeDeferred: a resolver that raises (no socket left, say) must
        # fail this lookup, not leave the name waiting for ever.
        maybeDeferred(self._query, key).addBoth(self._settle, key)
        return waiting

    def _answer(self, key: str, entry: _Entry) -> Deferred[list[str]]:
        if entry.error is not None:
            return fail(NameNotResolved(f"DNS lookup for {key} failed: {entry.error}"))
        return succeed(entry.next_order())

    def _settle(self, result: _Entry | Failure, key: str) -> None:
        if isinstance(result, Failure):
            self.log.failure("DNS lookup for {name} broke", result, name=key)
            now = self._clock.seconds()
            result = _Entry([], [], now + self._settings.negative_ttl, result.getErrorMessage())
        entry = result
        previous = self._cache.get(key)
        if (
            entry.error is not None
            and previous is not None
            and previous.error is None
            and self._clock.seconds() < previous.expires + self._settings.stale_grace
        ):
            # A failed refresh does not take away an answer still within its
            # stale grace; the next lookup after the grace asks again.
            entry = previous
        else:
            self._store(key, entry)
        for waiting in self._waiting.pop(key):
            self._answer(key, entry).chainDeferred(waiting)

    def _store(self, key: str, entry: _Entry) -> None:
        """
        Cache ``entry``; past :data:`MAX_NAMES` names, drop the expired ones,
        then the oldest, so made-up names cannot grow the cache for ever.
        """
        self._cache.pop(key, None)
        self._cache[key] = entry
        if len(self._cache) > MAX_NAMES:
            now = self._clock.seconds()
            for name in [n for n, e in self._cache.items() if e.expires <= now]:
                del self._cache[name]
            while len(self._cache) > MAX_NAMES:
                del self._cache[next(iter(self._cache))]

    def _query(self, key: str) -> Deferred[_Entry]:
        now = self._clock.seconds()
        if self._hosts is not None:
            # hosts.searchFileForAll compares bytes with the file's fields.
            local = searchFileForAll(self._hosts, key.encode("idna"))
            if local:
                ipv4 = [a for a in local if ":" not in a]
                ipv6 = [a for a in local if ":" in a]
                return succeed(_Entry(ipv4, ipv6, now + self._settings.max_ttl))
        self.queries[key] = self.queries.get(key, 0) + 1
        self._metrics.dns_queries.inc()
        timeouts = self._settings.timeouts
        queries = DeferredList(
            [
                self._resolver.lookupAddress(key, timeouts),
                self._resolver.lookupIPV6Address(key, timeouts),
            ],
            consumeErrors=True,
        )
        return queries.addCallback(self._entry, key)

    def _entry(self, results: list[tuple[bool, Any]], key: str) -> _Entry:
        now = self._clock.seconds()
        ipv4: list[str] = []
        ipv6: list[str] = []
        ttls: list[int] = []
        failures: list[Failure] = []
        for ok, result in results:
            if not ok:
                failures.append(result)
                continue
            answers, _, _ = result
            # The answers may hold a CNAME chain; only address records count.
            for record in answers:
                if record.type == dns.A:
                    ipv4.append(record.payload.dottedQuad())
                elif record.type == dns.AAAA:
                    ipv6.append(socket.inet_ntop(socket.AF_INET6, record.payload.address))
                else:
                    continue
                ttls.append(record.ttl)
        if ipv4 or ipv6:
            ttl = min(max(min(ttls), self._settings.min_ttl), self._settings.max_ttl)
            return _Entry(ipv4, ipv6, now + ttl)
        # Both queries failed, or the name has no address records.
        error = _reason(failures[0]) if failures else "no A or AAAA records"
        self.log.info("DNS lookup for {name} failed: {error}", name=key, error=error)
        return _Entry([], [], now + self._settings.negative_ttl, error)
