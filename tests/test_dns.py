"""
The caching resolver (:mod:`octoplex.dns`): its cache, TTL clamps, negative
caching, coalescing, rotation, CNAMEs, hosts file and ``IHostnameResolver``
face against a fake ``twisted.names`` resolver and a fake clock; then, over
real sockets, Octoplex resolving through a ``twisted.names`` DNS server on
127.0.0.1 and spreading connections across three upstreams.

No test here resolves a name through the system's resolver or name servers:
every query goes to a fake or to the test's own DNS server on 127.0.0.1, and
every name is under the reserved ``.test`` domain.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IHostResolution, IResolutionReceiver
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.names import client as names_client
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import (
    DNSNameError,
    DNSQueryTimeoutError,
    DNSServerError,
    DomainError,
)
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.client import URI, Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from octoplex import endpoints
from octoplex.dns import CachingResolver, DNSSettings, NameNotResolved
from octoplex.tap import Options, makeService

from .schema import check_answer
from .servers import (
    Octoplex,
    Upstream,
    _CountingSite,
    _QuietPool,
    _Upstream,
    serve_dns,
    start_octoplex,
)

NXDOMAIN = "NXDOMAIN (the name does not exist)"
SERVFAIL = "SERVFAIL (the name server failed)"
TIMEOUT = "timeout (no name server answered)"

# ---------------------------------------------------------------------------
# Unit tests: a fake twisted.names resolver and a fake clock.
# ---------------------------------------------------------------------------


def rr_a(name: str, address: str, ttl: int) -> dns.RRHeader:
    return dns.RRHeader(name, dns.A, dns.IN, ttl, dns.Record_A(address, ttl))


def rr_aaaa(name: str, address: str, ttl: int) -> dns.RRHeader:
    return dns.RRHeader(name, dns.AAAA, dns.IN, ttl, dns.Record_AAAA(address, ttl))


def rr_cname(name: str, target: str, ttl: int) -> dns.RRHeader:
    return dns.RRHeader(name, dns.CNAME, dns.IN, ttl, dns.Record_CNAME(target, ttl))


class FakeNames:
    """
    A ``twisted.names`` resolver whose answers the test gives: programmed
    ones fire at once; otherwise the query waits until :meth:`respond`.

    :ivar asked: every query, as ``(name, "A" | "AAAA")``.
    """

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []
        self._programmed: dict[tuple[str, str], Any] = {}
        self._pending: list[tuple[str, str, Deferred[Any]]] = []

    def program(self, name: str, kind: str, outcome: Any) -> None:
        """
        Answer every later ``kind`` query of ``name`` with ``outcome``: a list
        of records, or an exception to fail with.
        """
        self._programmed[(name, kind)] = outcome

    def respond(self, name: str, kind: str, outcome: Any) -> None:
        """
        Answer the waiting ``kind`` queries of ``name`` with ``outcome``.
        """
        waiting = [d for n, k, d in self._pending if (n, k) == (name, kind)]
        self._pending = [p for p in self._pending if (p[0], p[1]) != (name, kind)]
        for d in waiting:
            _fire(d, outcome)

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._ask(name, "A")

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred[Any]:
        return self._ask(name, "AAAA")

    def _ask(self, name: str, kind: str) -> Deferred[Any]:
        self.asked.append((name, kind))
        if (name, kind) in self._programmed:
            outcome = self._programmed[(name, kind)]
            return fail(outcome) if isinstance(outcome, Exception) else succeed((outcome, [], []))
        d: Deferred[Any] = Deferred()
        self._pending.append((name, kind, d))
        return d


def _fire(d: Deferred[Any], outcome: Any) -> None:
    if isinstance(outcome, Exception):
        d.errback(outcome)
    else:
        d.callback((outcome, [], []))


def result_of(d: Deferred[Any]) -> Any:
    """
    The result ``d`` has already fired with; fail if it has not, or failed.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d: Deferred[Any]) -> Failure:
    """
    The failure ``d`` has already failed with; fail if it has not.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    assert isinstance(box[0], Failure), f"expected a failure, got {box[0]!r}"
    return box[0]


def caching(
    names: FakeNames, clock: Clock, hosts: FilePath[Any] | None = None, **settings: Any
) -> CachingResolver:
    return CachingResolver(clock, names, DNSSettings(**settings), hosts=hosts)


def test_answers_are_cached_for_their_ttl() -> None:
    """A second lookup within the TTL sends no query; one after the TTL queries again."""
    clock, names = Clock(), FakeNames()
    names.program("cached.test", "A", [rr_a("cached.test", "127.0.0.2", 30)])
    names.program("cached.test", "AAAA", [])
    resolver = caching(names, clock, min_ttl=1, max_ttl=300)

    assert result_of(resolver.lookup("cached.test")) == ["127.0.0.2"]
    assert resolver.queries == {"cached.test": 1}
    clock.advance(29.9)
    assert result_of(resolver.lookup("Cached.TEST")) == ["127.0.0.2"]
    assert resolver.queries == {"cached.test": 1}
    assert names.asked == [("cached.test", "A"), ("cached.test", "AAAA")]
    clock.advance(0.2)
    assert result_of(resolver.lookup("cached.test")) == ["127.0.0.2"]
    assert resolver.queries == {"cached.test": 2}
    assert len(names.asked) == 4


def test_known_reads_the_cache_without_a_query_and_refusing_expires() -> None:
    """
    ``known`` gives a cached answer's addresses, stale ones too, and
    nothing for a name not looked up, asking no
    name server and counting no lookup; ``refusing`` holds for refused_for.
    """
    clock, names = Clock(), FakeNames()
    names.program("two.test", "A", [rr_a("two.test", "127.0.0.2", 30)])
    names.program("two.test", "AAAA", [])
    resolver = caching(names, clock, min_ttl=1, max_ttl=300, refused_for=5)
    assert resolver.known("two.test") == []
    result_of(resolver.lookup("two.test"))
    clock.advance(31)
    assert resolver.known("TWO.test.") == ["127.0.0.2"]
    assert resolver.queries == {"two.test": 1}
    assert resolver.known("unknown.test") == []

    assert not resolver.refusing("127.0.0.2")
    resolver.refused("127.0.0.2")
    assert resolver.refusing("127.0.0.2")
    clock.advance(5)
    assert not resolver.refusing("127.0.0.2")


@pytest.mark.parametrize(("ttl", "kept"), [(0, 2.0), (10 * 24 * 3600, 60.0)])
def test_ttl_is_clamped(ttl: int, kept: float) -> None:
    """A TTL of 0 is cached for min_ttl, a TTL of ten days for max_ttl."""
    clock, names = Clock(), FakeNames()
    names.program("clamp.test", "A", [rr_a("clamp.test", "127.0.0.2", ttl)])
    names.program("clamp.test", "AAAA", [])
    resolver = caching(names, clock, min_ttl=2, max_ttl=60)

    result_of(resolver.lookup("clamp.test"))
    clock.advance(kept - 0.1)
    result_of(resolver.lookup("clamp.test"))
    assert resolver.queries == {"clamp.test": 1}
    clock.advance(0.2)
    result_of(resolver.lookup("clamp.test"))
    assert resolver.queries == {"clamp.test": 2}


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (DNSNameError("nope.test"), NXDOMAIN),
        (DNSServerError("nope.test"), SERVFAIL),
        (DNSQueryTimeoutError("nope.test"), TIMEOUT),
    ],
)
def test_failures_are_explained_and_cached(error: Exception, reason: str) -> None:
    """A failed name fails with why, is remembered for negative_ttl, then asked again."""
    clock, names = Clock(), FakeNames()
    names.program("nope.test", "A", error)
    names.program("nope.test", "AAAA", error)
    resolver = caching(names, clock, negative_ttl=5)
    message = f"DNS lookup for nope.test failed: {reason}"

    failure = failure_of(resolver.lookup("nope.test"))
    assert failure.check(NameNotResolved)
    assert failure.value.args == (message,)
    # Names are cached without regard to case.
    assert failure_of(resolver.lookup("NOPE.test")).value.args == (message,)

    clock.advance(4.9)
    again = failure_of(resolver.lookup("nope.test"))
    assert again.value.args == (message,)
    assert resolver.queries == {"nope.test": 1}

    clock.advance(0.2)
    failure_of(resolver.lookup("nope.test"))
    assert resolver.queries == {"nope.test": 2}
    assert names.asked == [("nope.test", "A"), ("nope.test", "AAAA")] * 2


def test_failure_reads_as_its_message_alone() -> None:
    """A NameNotResolved reads as its message, without DNSLookupError's prefix and period."""
    clock, names = Clock(), FakeNames()
    names.program("nope.test", "A", DNSNameError("nope.test"))
    names.program("nope.test", "AAAA", DNSNameError("nope.test"))
    resolver = caching(names, clock)

    failure = failure_of(resolver.lookup("nope.test"))
    assert str(failure.value) == f"DNS lookup for nope.test failed: {NXDOMAIN}"
    assert failure.getErrorMessage() == f"DNS lookup for nope.test failed: {NXDOMAIN}"


def test_name_without_address_records_is_explained() -> None:
    """A name whose A and AAAA answers are both empty fails as having no records."""
    clock, names = Clock(), FakeNames()
    names.program("empty.test", "A", [])
    names.program("empty.test", "AAAA", [])
    resolver = caching(names, clock)

    failure = failure_of(resolver.lookup("empty.test"))
    assert failure.value.args == ("DNS lookup for empty.test failed: no A or AAAA records",)


def test_one_failed_family_does_not_fail_the_name() -> None:
    """A name with A records resolves even when its AAAA query fails."""
    clock, names = Clock(), FakeNames()
    names.program("half.test", "A", [rr_a("half.test", "127.0.0.2", 30)])
    names.program("half.test", "AAAA", DNSServerError("half.test"))
    resolver = caching(names, clock)

    assert result_of(resolver.lookup("half.test")) == ["127.0.0.2"]


def test_concurrent_lookups_share_one_query() -> None:
    """Ten lookups of one name in flight send one A and one AAAA query, and all get addresses."""
    clock, names = Clock(), FakeNames()
    resolver = caching(names, clock)

    lookups = [resolver.lookup("shared.test") for _ in range(10)]
    assert names.asked == [("shared.test", "A"), ("shared.test", "AAAA")]
    assert not any(d.called for d in lookups)

    names.respond("shared.test", "A", [rr_a("shared.test", "127.0.0.2", 30)])
    names.respond("shared.test", "AAAA", [rr_aaaa("shared.test", "::2", 30)])
    assert [sorted(result_of(d)) for d in lookups] == [["127.0.0.2", "::2"]] * 10
    assert names.asked == [("shared.test", "A"), ("shared.test", "AAAA")]
    assert resolver.queries == {"shared.test": 1}


def test_addresses_rotate_ipv4_first() -> None:
    """Each lookup rotates each family one step, and IPv4 addresses come before IPv6 ones."""
    clock, names = Clock(), FakeNames()
    resolver = caching(names, clock)
    first = resolver.lookup("multi.test")
    # The AAAA answer arrives first; the order still puts IPv4 first.
    names.respond("multi.test", "AAAA", [rr_aaaa("multi.test", a, 30) for a in ("::2", "::3")])
    names.respond("multi.test", "A", [rr_a("multi.test", f"127.0.0.{n}", 30) for n in (2, 3, 4)])

    orders = [result_of(first)] + [result_of(resolver.lookup("multi.test")) for _ in range(3)]
    assert orders == [
        ["127.0.0.2", "127.0.0.3", "127.0.0.4", "::2", "::3"],
        ["127.0.0.3", "127.0.0.4", "127.0.0.2", "::3", "::2"],
        ["127.0.0.4", "127.0.0.2", "127.0.0.3", "::2", "::3"],
        ["127.0.0.2", "127.0.0.3", "127.0.0.4", "::3", "::2"],
    ]
    assert resolver.queries == {"multi.test": 1}


def test_cname_chain_gives_the_target_addresses() -> None:
    """Answers that hold a CNAME chain resolve to the addresses at its end."""
    clock, names = Clock(), FakeNames()
    names.program(
        "alias.test",
        "A",
        [
            rr_cname("alias.test", "middle.test", 300),
            rr_cname("middle.test", "real.test", 300),
            rr_a("real.test", "127.0.0.5", 30),
            rr_a("real.test", "127.0.0.6", 30),
        ],
    )
    names.program("alias.test", "AAAA", [rr_cname("alias.test", "middle.test", 300)])
    resolver = caching(names, clock)

    assert result_of(resolver.lookup("alias.test")) == ["127.0.0.5", "127.0.0.6"]
    # The A records' TTL (30 s) counts, not the CNAMEs' (300 s).
    clock.advance(30.1)
    result_of(resolver.lookup("alias.test"))
    assert resolver.queries == {"alias.test": 2}


def test_hosts_file_answers_without_a_query(tmp_path: Any) -> None:
    """A name in the hosts file is answered from it, without any query."""
    path = tmp_path / "hosts"
    path.write_text(
        "# a comment\n"
        "127.0.0.9\tlocal.test alias-local.test\n"
        "::9 local.test\n"
        "127.0.0.8 other.test\n"
    )
    clock, names = Clock(), FakeNames()
    for name in ("local.test", "alias-local.test"):
        for kind in ("A", "AAAA"):
            names.program(name, kind, DNSNameError(name))
    resolver = caching(names, clock, hosts=FilePath(str(path)))

    assert result_of(resolver.lookup("local.test")) == ["127.0.0.9", "::9"]
    assert result_of(resolver.lookup("ALIAS-local.test")) == ["127.0.0.9"]
    assert names.asked == []
    assert resolver.queries == {}


def test_a_trailing_dot_names_the_same_host(tmp_path: Any) -> None:
    """
    ``name.`` is ``name``: answered from the hosts file like it, from the
    same cache entry, and asked of DNS as the same name.
    """
    path = tmp_path / "hosts"
    path.write_text("127.0.0.9 local.test\n")
    clock, names = Clock(), FakeNames()
    names.program("remote.test", "A", [rr_a("remote.test", "127.0.0.7", 60)])
    names.program("remote.test", "AAAA", [])
    resolver = caching(names, clock, hosts=FilePath(str(path)))

    assert result_of(resolver.lookup("local.test.")) == ["127.0.0.9"]
    assert result_of(resolver.lookup("LOCAL.test.")) == ["127.0.0.9"]
    assert result_of(resolver.lookup("remote.test.")) == ["127.0.0.7"]
    assert result_of(resolver.lookup("remote.test")) == ["127.0.0.7"]
    assert names.asked == [("remote.test", "A"), ("remote.test", "AAAA")]
    assert resolver.queries == {"remote.test": 1}


def test_ip_literal_is_answered_without_a_query() -> None:
    """An IP address given as a host name resolves to itself without any query."""
    clock, names = Clock(), FakeNames()
    for name in ("127.0.0.1", "::1"):
        for kind in ("A", "AAAA"):
            names.program(name, kind, DNSNameError(name))
    resolver = caching(names, clock)

    assert result_of(resolver.lookup("127.0.0.1")) == ["127.0.0.1"]
    assert result_of(resolver.lookup("::1")) == ["::1"]
    assert names.asked == []


@implementer(IResolutionReceiver)
class Receiver:
    """
    An ``IResolutionReceiver`` that records what it is told.
    """

    def __init__(self) -> None:
        self.resolution: IHostResolution | None = None
        self.addresses: list[Any] = []
        self.completed = 0

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self.resolution = resolutionInProgress

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.completed += 1


def test_resolve_host_name_delivers_addresses_with_the_port() -> None:
    """resolveHostName gives the receiver each address with the port, then completes it."""
    clock, names = Clock(), FakeNames()
    names.program("both.test", "A", [rr_a("both.test", "127.0.0.2", 30)])
    names.program("both.test", "AAAA", [rr_aaaa("both.test", "::2", 30)])
    resolver = caching(names, clock)

    receiver = Receiver()
    resolution = resolver.resolveHostName(receiver, "both.test", 8080)
    assert receiver.resolution is resolution
    assert IHostResolution.providedBy(resolution)
    assert receiver.addresses == [
        IPv4Address("TCP", "127.0.0.2", 8080),
        IPv6Address("TCP", "::2", 8080),
    ]
    assert receiver.completed == 1

    only_v4 = Receiver()
    resolver.resolveHostName(only_v4, "both.test", 443, addressTypes=[IPv4Address])
    assert only_v4.addresses == [IPv4Address("TCP", "127.0.0.2", 443)]
    assert only_v4.completed == 1


def test_resolve_host_name_of_a_failed_name_completes_empty() -> None:
    """For a name that does not resolve, the receiver gets no address but is completed."""
    clock, names = Clock(), FakeNames()
    names.program("nope.test", "A", DNSNameError("nope.test"))
    names.program("nope.test", "AAAA", DNSNameError("nope.test"))
    resolver = caching(names, clock)

    receiver = Receiver()
    resolver.resolveHostName(receiver, "nope.test", 80)
    assert receiver.resolution is not None
    assert receiver.addresses == []
    assert receiver.completed == 1


# ---------------------------------------------------------------------------
# Over real sockets: a DNS server and three upstreams on 127.0.0.0/8.
# ---------------------------------------------------------------------------


class MultiZone(ResolverBase):
    """
    The test DNS server's data: ``multi.test`` has three A records
    (127.0.0.2-4) with a TTL of 1 s and no AAAA record; every other name
    does not exist.

    :ivar asked: queries received, per ``(name, type)``.
    """

    TTL = 1

    def __init__(self) -> None:
        super().__init__()
        self.asked: dict[tuple[str, int], int] = {}

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        key = (name.decode("ascii").lower(), type)
        self.asked[key] = self.asked.get(key, 0) + 1
        if key[0] != "multi.test":
            return fail(DomainError(name))
        if type == dns.A:
            answers = [rr_a("multi.test", f"127.0.0.{n}", self.TTL) for n in (2, 3, 4)]
            return succeed((answers, [], []))
        return succeed(([], [], []))


class _Quiet(DatagramProtocol):
    """
    A UDP port that reads queries and never answers: a name server that
    does not respond.
    """

    noisy = False

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        pass


def start_dns_server() -> tuple[MultiZone, Any]:
    """
    Start the ``MultiZone`` DNS server on a UDP port of 127.0.0.1.
    """
    zone = MultiZone()
    return zone, serve_dns(zone)


def start_three_upstreams() -> list[Upstream]:
    """
    Start an upstream on each of 127.0.0.2, .3 and .4, all on one port.
    """
    for _ in range(20):
        started: list[Upstream] = []
        port = 0
        try:
            for n in (2, 3, 4):
                resource = _Upstream()
                site = _CountingSite(resource)
                listening = reactor.listenTCP(port, site, interface=f"127.0.0.{n}")
                port = listening.getHost().port
                url = f"http://127.0.0.{n}:{port}"
                started.append(Upstream(url, site, resource, listening))
        except CannotListenError:
            for upstream in started:
                upstream.port.stopListening()
            continue
        return started
    raise AssertionError("found no port free on all of 127.0.0.2, .3 and .4")


@implementer(IAgentEndpointFactory)
class _Direct:
    """
    Dial an IP literal directly: while the caching resolver is installed on
    the reactor, the test's own client must not ask it about 127.0.0.1.
    """

    def endpointForURI(self, uri: URI) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, uri.host.decode("ascii"), uri.port)


async def post_batch(octoplex: Octoplex, uris: list[str]) -> list[dict[str, Any]]:
    """
    POST a batch of ``uris`` to Octoplex and return its outcomes.
    """
    http = HTTPClient(Agent.usingEndpointFactory(reactor, _Direct(), pool=_QuietPool(reactor)))
    document = {"timeout_msec": 5000, "requests": [{"uri": uri} for uri in uris]}
    response = await http.post(
        octoplex.url + "/multiplex",
        data=json.dumps(document).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.code == 200
    answer = json.loads(await treq.content(response))
    check_answer(200, answer)
    return answer["responses"]


class _World:
    """
    What an integration test starts, and stops in :meth:`stop`: the DNS
    server, the upstreams, the caching resolver installed on the reactor and
    every Octoplex started.
    """

    def __init__(self) -> None:
        self._dns_port: Any = None
        self._previous: Any = None
        self.octoplexes: list[Octoplex] = []
        self.upstreams: list[Upstream] = []

    def start(self, **settings: Any) -> None:
        self.zone, self._dns_port = start_dns_server()
        self.upstreams = start_three_upstreams()
        self.port = self.upstreams[0].port.getHost().port
        names = names_client.Resolver(
            servers=[("127.0.0.1", self._dns_port.getHost().port)], reactor=reactor
        )
        self.resolver = CachingResolver(reactor, names, DNSSettings(**settings), hosts=None)
        self._previous = reactor.installNameResolver(self.resolver)

    def octoplex(self) -> Octoplex:
        """
        A fresh Octoplex, whose pool has no idle connection yet.
        """
        octoplex = start_octoplex(resolver=self.resolver)
        self.octoplexes.append(octoplex)
        return octoplex

    def spread(self) -> list[int]:
        return [len(upstream.site.connections) for upstream in self.upstreams]

    async def stop(self) -> None:
        if self._previous is not None:
            reactor.installNameResolver(self._previous)
            self._previous = None
        for octoplex in self.octoplexes:
            await octoplex.stop()
        for upstream in self.upstreams:
            stopping = upstream.stop()
            # None when a test already stopped it listening.
            if stopping is not None:
                await stopping
        if self._dns_port is not None:
            await self._dns_port.stopListening()


async def _in_world(test: Callable[[_World], Any], **settings: Any) -> None:
    world = _World()
    try:
        world.start(**settings)
        await test(world)
    finally:
        await world.stop()


@pytest_twisted.ensureDeferred
async def test_batch_spreads_connections_across_a_names_addresses(
    log_events: list[dict[str, Any]],
) -> None:
    """30 requests to one name open 30 connections, spread evenly and reported per address."""

    async def test(world: _World) -> None:
        uris = [f"http://multi.test:{world.port}/hello?n={n}" for n in range(30)]
        octoplex = world.octoplex()
        outcomes = await post_batch(octoplex, uris)
        assert [o["Success"]["content"] for o in outcomes] == ["Hello world!"] * 30
        spread = world.spread()
        assert sum(spread) == 30, spread
        assert all(8 <= count <= 12 for count in spread), spread
        # The client's periodic report counts them by the address reached.
        octoplex.client._report_connections()
        [report] = [e for e in log_events if "opened_by_address" in e]
        expected = {
            f"127.0.0.{n}:{world.port}": count for n, count in zip((2, 3, 4), spread, strict=True)
        }
        assert report["opened_by_address"] == expected
        octoplex.client._report_connections()
        assert len([e for e in log_events if "opened_by_address" in e]) == 1

    await _in_world(test, min_ttl=1)


@pytest_twisted.ensureDeferred
async def test_name_is_queried_once_per_ttl() -> None:
    """A batch queries the name once; within its TTL no query is sent, after it one is."""

    async def test(world: _World) -> None:
        uris = [f"http://multi.test:{world.port}/hello?n={n}" for n in range(10)]
        first = await post_batch(world.octoplex(), uris)
        assert all("Success" in o for o in first), first
        assert world.zone.asked == {("multi.test", dns.A): 1, ("multi.test", dns.AAAA): 1}

        # A fresh pool must dial again, but the answer is still cached.
        await post_batch(world.octoplex(), uris[:3])
        assert world.zone.asked[("multi.test", dns.A)] == 1
        assert world.resolver.queries == {"multi.test": 1}

        await deferLater(reactor, MultiZone.TTL + 0.2, lambda: None)
        after = await post_batch(world.octoplex(), uris)
        assert all("Success" in o for o in after), after
        assert world.zone.asked == {("multi.test", dns.A): 2, ("multi.test", dns.AAAA): 2}
        assert world.resolver.queries == {"multi.test": 2}
        assert sum(world.spread()) == 23

    await _in_world(test, min_ttl=0.5)


@pytest_twisted.ensureDeferred
async def test_unknown_name_fails_alone_with_the_reason() -> None:
    """A name that does not exist fails its own item with NXDOMAIN; the others succeed."""

    async def test(world: _World) -> None:
        uris = [
            f"http://multi.test:{world.port}/hello?n=0",
            f"http://nope.test:{world.port}/",
            f"http://multi.test:{world.port}/hello?n=2",
        ]
        outcomes = await post_batch(world.octoplex(), uris)
        assert outcomes[0]["Success"]["content"] == "Hello world!"
        assert outcomes[2]["Success"]["content"] == "Hello world!"
        failed = outcomes[1]["Failure"]
        assert failed["error"] == f"DNS lookup for nope.test failed: {NXDOMAIN}"
        assert isinstance(failed["duration_msec"], int)
        assert world.zone.asked[("nope.test", dns.A)] == 1
        assert sum(world.spread()) == 2

    await _in_world(test, min_ttl=1)


@pytest_twisted.ensureDeferred
async def test_silent_name_server_is_reported_as_a_timeout() -> None:
    """With twisted.names' real client, a name server that never answers reads as a timeout."""
    quiet = reactor.listenUDP(0, _Quiet(), interface="127.0.0.1")
    try:
        names = names_client.Resolver(
            servers=[("127.0.0.1", quiet.getHost().port)], reactor=reactor
        )
        resolver = CachingResolver(reactor, names, DNSSettings(timeouts=(0.1,)), hosts=None)
        with pytest.raises(NameNotResolved) as raised:
            await resolver.lookup("silent.test")
        assert raised.value.args == (f"DNS lookup for silent.test failed: {TIMEOUT}",)
    finally:
        await quiet.stopListening()


# ---------------------------------------------------------------------------
# The daemon's wiring.
# ---------------------------------------------------------------------------


class _Tripwire:
    """
    A ``twisted.names`` resolver that records and refuses every query, so
    that the daemon's resolver can never reach the system's name servers.
    """

    def __init__(self) -> None:
        self.asked: list[str] = []

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.asked.append(name)
        return fail(DNSServerError(name))

    lookupIPV6Address = lookupAddress


@pytest_twisted.ensureDeferred
async def test_daemon_installs_and_restores_its_resolver() -> None:
    """The tap's root service installs its CachingResolver on start and restores the old one."""
    options = Options()
    options.parseOptions(
        ["--workers", "1", "--listen", "tcp:0:interface=127.0.0.1", "--dns-min-ttl", "2"]
    )
    root = makeService(options)
    resolver = root._resolver  # type: ignore[attr-defined]
    assert isinstance(resolver, CachingResolver)
    tripwire = _Tripwire()
    resolver._resolver = tripwire

    before = reactor.nameResolver
    assert not isinstance(before, CachingResolver)
    try:
        root.privilegedStartService()
        root.startService()
        assert reactor.nameResolver is resolver
        assert resolver._settings.min_ttl == 2
    finally:
        await root.stopService()
    assert reactor.nameResolver is before
    assert tripwire.asked == []
    assert resolver.queries == {}


@pytest_twisted.ensureDeferred
async def test_refusing_address_is_skipped_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """An address that refuses fails over at once to the next, and is then left out."""
    # A long attempt delay tells "at once" from "at the next attempt" with
    # slack to spare on a loaded machine.
    monkeypatch.setattr(endpoints, "ATTEMPT_DELAY", 2.0)

    async def test(world: _World) -> None:
        # 127.0.0.3 stops listening: its connections are refused.
        await world.upstreams[1].port.stopListening()
        octoplex = world.octoplex()
        uris = [f"http://multi.test:{world.port}/hello?n={n}" for n in range(12)]
        started = reactor.seconds()
        outcomes = await post_batch(octoplex, uris)
        elapsed = reactor.seconds() - started
        assert [o["Success"]["content"] for o in outcomes] == ["Hello world!"] * 12
        # A refusal moves on to the next address at once, not after the delay.
        assert elapsed < 1.0, elapsed
        refusing = "127.0.0.3"
        assert world.resolver.usable(["127.0.0.2", refusing, "127.0.0.4"]) == [
            "127.0.0.2",
            "127.0.0.4",
        ]
        # The next lookups leave it out: every new connection goes elsewhere.
        before = [len(u.site.connections) for u in world.upstreams]
        fresh = world.octoplex()
        outcomes = await post_batch(fresh, uris)
        assert [o["Success"]["content"] for o in outcomes] == ["Hello world!"] * 12
        after = [len(u.site.connections) for u in world.upstreams]
        assert after[1] == before[1] == 0
        assert after[0] - before[0] + after[2] - before[2] == 12

    await _in_world(test, min_ttl=60, refused_for=60.0)


def test_every_address_refusing_leaves_all_usable() -> None:
    """When every address of a name refused lately, all are tried again."""
    resolver = CachingResolver(Clock(), object(), DNSSettings(refused_for=5.0), hosts=None)
    resolver.refused("127.0.0.2")
    resolver.refused("127.0.0.3")
    assert resolver.usable(["127.0.0.2", "127.0.0.3"]) == ["127.0.0.2", "127.0.0.3"]
    assert resolver.usable(["127.0.0.2", "127.0.0.4"]) == ["127.0.0.4"]


def test_refusal_is_forgotten_after_a_while() -> None:
    """An address is usable again refused_for seconds after it refused."""
    clock = Clock()
    resolver = CachingResolver(clock, object(), DNSSettings(refused_for=5.0), hosts=None)
    resolver.refused("127.0.0.2")
    assert resolver.usable(["127.0.0.2", "127.0.0.3"]) == ["127.0.0.3"]
    clock.advance(5.0)
    assert resolver.usable(["127.0.0.2", "127.0.0.3"]) == ["127.0.0.2", "127.0.0.3"]


def test_stale_answer_is_served_while_one_refresh_runs() -> None:
    """Just past its TTL an answer is served at once while a single refresh is in flight."""
    clock, names = Clock(), FakeNames()
    resolver = caching(names, clock, min_ttl=1, stale_grace=5)
    first = resolver.lookup("stale.test")
    names.respond("stale.test", "A", [rr_a("stale.test", "127.0.0.2", 10)])
    names.respond("stale.test", "AAAA", [])
    assert result_of(first) == ["127.0.0.2"]
    clock.advance(11)
    # Expired, within the grace: answered from the cache, refreshed once.
    assert result_of(resolver.lookup("stale.test")) == ["127.0.0.2"]
    assert result_of(resolver.lookup("stale.test")) == ["127.0.0.2"]
    assert resolver.queries == {"stale.test": 2}
    names.respond("stale.test", "A", [rr_a("stale.test", "127.0.0.3", 10)])
    names.respond("stale.test", "AAAA", [])
    assert result_of(resolver.lookup("stale.test")) == ["127.0.0.3"]


def test_failed_refresh_keeps_the_stale_answer_within_the_grace() -> None:
    """A refresh that fails does not take away an answer still within its grace."""
    clock, names = Clock(), FakeNames()
    names.program("flaky.test", "A", [rr_a("flaky.test", "127.0.0.2", 10)])
    names.program("flaky.test", "AAAA", [])
    resolver = caching(names, clock, min_ttl=1, stale_grace=5)
    assert result_of(resolver.lookup("flaky.test")) == ["127.0.0.2"]
    names.program("flaky.test", "A", DNSServerError("flaky.test"))
    names.program("flaky.test", "AAAA", DNSServerError("flaky.test"))
    clock.advance(12)
    assert result_of(resolver.lookup("flaky.test")) == ["127.0.0.2"]
    clock.advance(4)
    # Past TTL + grace: the lookup waits for the name servers, which fail.
    failure = failure_of(resolver.lookup("flaky.test"))
    assert failure.check(NameNotResolved)


def test_no_stale_answer_without_a_grace() -> None:
    """With stale_grace 0, a lookup past the TTL waits for the fresh answer."""
    clock, names = Clock(), FakeNames()
    resolver = caching(names, clock, min_ttl=1, stale_grace=0)
    first = resolver.lookup("fresh.test")
    names.respond("fresh.test", "A", [rr_a("fresh.test", "127.0.0.2", 10)])
    names.respond("fresh.test", "AAAA", [])
    result_of(first)
    clock.advance(11)
    waiting = resolver.lookup("fresh.test")
    assert not waiting.called
    names.respond("fresh.test", "A", [rr_a("fresh.test", "127.0.0.4", 10)])
    names.respond("fresh.test", "AAAA", [])
    assert result_of(waiting) == ["127.0.0.4"]
