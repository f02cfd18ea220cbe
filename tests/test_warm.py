"""
The pool's handling of work a deadline cuts short, over real sockets: a
connection still opening (here, waiting on a slow DNS answer) is finished in
the background within ``connect_grace`` and pooled warm for the next batch;
a request still queued is never sent; a response already streaming is cut
off with its connection; a request on a pooled connection the upstream
closed is retried once when its method is idempotent, body included; and
stopping the pool gives up the connections still opening.

No name is resolved through the system's resolver: ``slow.test`` is
answered by the test's own DNS server on 127.0.0.1, late on purpose.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.names import client as names_client
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DomainError
from twisted.names.server import DNSServerFactory
from twisted.web.client import Agent

from octoplex.client import PoolSettings
from octoplex.dns import CachingResolver, DNSSettings
from octoplex.pool import OctoplexPool

from .schema import check_answer
from .servers import Octoplex, Upstream, _QuietPool, start_octoplex, start_upstream, wait_until
from .test_dns import _Direct, rr_a
from .test_pool import _serve, _Tracking

#: How late the test DNS server answers ``slow.test``.
# Long enough that a deadline answered late on a loaded 2-core machine (CI
# saw the reactor stall for 190 ms) is still answered before the DNS answer.
DNS_DELAY = 0.5
TIMEOUT_ELAPSED = "timeout elapsed"
CLOSED_EARLY = "upstream closed the connection before sending a response"


async def _sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class SlowZone(ResolverBase):
    """
    The test DNS server's data: ``slow.test`` has one A record, 127.0.0.1
    with a TTL of 60 s, and no AAAA record, both answered only ``delay``
    seconds after the query; every other name does not exist.

    :ivar asked: queries received, per ``(name, type)``.
    """

    TTL = 60

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.asked: dict[tuple[str, int], int] = {}
        self._late: list[IDelayedCall] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        key = (name.decode("ascii").lower(), type)
        self.asked[key] = self.asked.get(key, 0) + 1
        if key[0] != "slow.test":
            return fail(DomainError(name))
        answers = [rr_a("slow.test", "127.0.0.1", self.TTL)] if type == dns.A else []
        answer: Deferred[Any] = Deferred()
        self._late.append(reactor.callLater(self.delay, answer.callback, (answers, [], [])))
        return answer

    def a_queries(self) -> int:
        return self.asked.get(("slow.test", dns.A), 0)

    def stop(self) -> None:
        for call in self._late:
            if call.active():
                call.cancel()


class SlowDNS:
    """
    A :class:`SlowZone` DNS server on a UDP port of 127.0.0.1, and a fresh
    ``CachingResolver`` that asks it, installed on the reactor until
    :meth:`stop` puts the previous resolver back.
    """

    def __init__(self, delay: float = DNS_DELAY) -> None:
        self.zone = SlowZone(delay)
        self._port: Any = None
        self._previous: Any = None

    def start(self) -> None:
        factory = DNSServerFactory(clients=[self.zone])
        factory.noisy = False
        protocol = dns.DNSDatagramProtocol(controller=factory)
        protocol.noisy = False
        self._port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        names = names_client.Resolver(
            servers=[("127.0.0.1", self._port.getHost().port)], reactor=reactor
        )
        self.resolver = CachingResolver(reactor, names, DNSSettings(), hosts=None)
        self._previous = reactor.installNameResolver(self.resolver)

    async def stop(self) -> None:
        if self._previous is not None:
            reactor.installNameResolver(self._previous)
            self._previous = None
        self.zone.stop()
        if self._port is not None:
            await self._port.stopListening()
            self._port = None


def pool_of(octoplex: Octoplex) -> OctoplexPool:
    return octoplex.client._pool


def idle_connections(pool: OctoplexPool) -> int:
    return sum(len(connections) for connections in pool._connections.values())


def settled(pool: OctoplexPool, upstream: Upstream, dns: SlowDNS | None = None) -> bool:
    """
    Whether the work a deadline cut short has come to rest: the DNS answer
    (if any) is in, no connection is still opening, and every connection
    the pool opened has reached the upstream and is either pooled idle or
    lost on both sides.
    """
    connections = len(upstream.site.connections)
    return (
        (dns is None or "slow.test" in dns.resolver._cache)
        and not pool._warming
        and pool.opened == connections
        and len(upstream.site.lost) + idle_connections(pool) == connections
    )


async def post(
    octoplex: Octoplex, timeout_msec: int, requests: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], float]:
    """
    POST a batch to Octoplex, dialling 127.0.0.1 directly (never through
    the resolver on the reactor), on a connection used once; return the
    outcomes and the seconds the round trip took.
    """
    pool = _QuietPool(reactor, persistent=False)
    http = HTTPClient(Agent.usingEndpointFactory(reactor, _Direct(), pool=pool))
    document = {"timeout_msec": timeout_msec, "requests": requests}
    started = time.monotonic()
    response = await http.post(
        octoplex.url + "/multiplex",
        data=json.dumps(document).encode(),
        headers={"content-type": "application/json"},
    )
    content = await treq.content(response)
    elapsed = time.monotonic() - started
    assert response.code == 200, content
    answer = json.loads(content)
    check_answer(200, answer)
    return answer["responses"], elapsed


async def _deadline_during_dns(connect_grace: float) -> dict[str, Any]:
    """
    Cut a batch to ``slow.test`` off at 100 ms, while its DNS answer is
    still 400 ms away; wait for the answer; send the same request again.
    Everything is fresh: DNS server, resolver (and so its cache), upstream
    and Octoplex.
    """
    slow = SlowDNS()
    upstream = start_upstream()
    octoplex: Octoplex | None = None
    seen: dict[str, Any] = {}
    try:
        slow.start()
        octoplex = start_octoplex(
            pool=PoolSettings(connect_grace=connect_grace), resolver=slow.resolver
        )
        pool = pool_of(octoplex)
        port = upstream.port.getHost().port
        request = {"uri": f"http://slow.test:{port}/hello"}

        seen["first"], seen["first_s"] = await post(octoplex, 100, [request])
        await wait_until(
            lambda: settled(pool, upstream, slow),
            "the DNS answer and the cut-off connection to settle",
        )
        seen["connections_between"] = len(upstream.site.connections)
        seen["warmed_between"] = pool.warmed
        seen["opened_between"] = pool.opened
        seen["idle_between"] = idle_connections(pool)
        seen["warming_between"] = len(pool._warming)

        seen["second"], seen["second_s"] = await post(octoplex, 1000, [request])
        seen["connections_after"] = len(upstream.site.connections)
        seen["opened_after"] = pool.opened
        seen["warmed_after"] = pool.warmed
        seen["a_queries"] = slow.zone.a_queries()
        seen["queries"] = dict(slow.resolver.queries)
    finally:
        await slow.stop()
        if octoplex is not None:
            await octoplex.stop()
        await upstream.stop()
    return seen


def _check_first_batch(seen: dict[str, Any]) -> None:
    [outcome] = seen["first"]
    assert outcome["Failure"]["error"] == TIMEOUT_ELAPSED
    # Answered at the deadline, well before the DNS answer came.
    assert 100 <= outcome["Failure"]["duration_msec"] < DNS_DELAY * 1000 - 100, outcome
    assert 0.1 <= seen["first_s"] < DNS_DELAY - 0.1, seen["first_s"]


@pytest_twisted.ensureDeferred
async def test_connection_cut_off_during_dns_is_finished_and_reused() -> None:
    """A connect the deadline cuts off during DNS is pooled for the next batch, unless given up."""
    warm = await _deadline_during_dns(connect_grace=2.0)
    _check_first_batch(warm)
    # The DNS answer came at DNS_DELAY; the connection opened then, unused.
    assert warm["connections_between"] == 1
    assert (warm["opened_between"], warm["warmed_between"]) == (1, 1)
    assert (warm["idle_between"], warm["warming_between"]) == (1, 0)
    [outcome] = warm["second"]
    assert outcome["Success"]["content"] == "Hello world!"
    # Neither the DNS delay nor a new connection.
    assert warm["second_s"] < DNS_DELAY - 0.1, warm["second_s"]
    assert warm["connections_after"] == 1
    assert (warm["opened_after"], warm["warmed_after"]) == (1, 1)
    assert warm["a_queries"] == 1
    assert warm["queries"] == {"slow.test": 1}

    cold = await _deadline_during_dns(connect_grace=0.01)
    _check_first_batch(cold)
    # Given up at 0.11 s, before the answer: nothing was opened, but the
    # resolver's shared query went on and cached the answer.
    assert cold["connections_between"] == 0
    assert (cold["opened_between"], cold["warmed_between"]) == (0, 0)
    assert (cold["idle_between"], cold["warming_between"]) == (0, 0)
    [outcome] = cold["second"]
    assert outcome["Success"]["content"] == "Hello world!"
    # No DNS delay (the answer is cached), but a new connection.
    assert cold["second_s"] < DNS_DELAY - 0.1, cold["second_s"]
    assert cold["connections_after"] == 1
    assert (cold["opened_after"], cold["warmed_after"]) == (1, 0)
    assert cold["a_queries"] == 1
    assert cold["queries"] == {"slow.test": 1}

    for name, seen in (("warm (grace 2 s)", warm), ("cold (grace 0.01 s)", cold)):
        [outcome] = seen["second"]
        print(
            f"batch 2 after a cut-off connect, {name}: round trip "
            f"{seen['second_s'] * 1000:.1f} ms, duration_msec "
            f"{outcome['Success']['duration_msec']}"
        )


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("slow", ["response", "dns"])
async def test_queued_request_is_never_sent(slow: str) -> None:
    """A request queued behind a slow one at the deadline is never sent and gets no connection."""
    resource = _Tracking()
    upstream = _serve(resource)
    port = upstream.port.getHost().port
    pool_settings = PoolSettings(max_per_host=1, connect_grace=2.0)
    dns_server = SlowDNS()
    octoplex: Octoplex | None = None
    try:
        if slow == "dns":
            # The first is still waiting for its address at the deadline;
            # its connection is finished in the background.
            dns_server.start()
            octoplex = start_octoplex(pool=pool_settings, resolver=dns_server.resolver)
            host, first_path = "slow.test", "/hello"
        else:
            # The first is waiting for its response at the deadline.
            octoplex = start_octoplex(pool=pool_settings)
            host, first_path = "127.0.0.1", "/delay/500"
        pool = pool_of(octoplex)
        uris = [f"http://{host}:{port}{first_path}", f"http://{host}:{port}/hello?queued"]
        outcomes, _ = await post(octoplex, 200, [{"uri": uri} for uri in uris])
        # Past the DNS answer and the cut-off request: whatever was to
        # reach the upstream has.
        await wait_until(
            lambda: settled(pool, upstream, dns_server if slow == "dns" else None),
            "the cut-off request's connection to settle",
        )
        seen = resource.in_flight.seen
        connections = len(upstream.site.connections)
        opened, warmed = pool.opened, pool.warmed
    finally:
        await dns_server.stop()
        if octoplex is not None:
            await octoplex.stop()
        await upstream.stop()
    sent, queued = outcomes
    assert sent["Failure"]["error"] == TIMEOUT_ELAPSED
    assert (sent["Failure"]["kind"], queued["Failure"]["kind"]) == ("timeout", "queue_timeout")
    assert queued["Failure"]["error"] == (
        f"timeout elapsed before a connection to {host}:{port} was free "
        "(all 1 in use); the request was never sent"
    )
    assert 200 <= queued["Failure"]["duration_msec"] < 400
    assert connections == 1
    assert opened == 1
    if slow == "dns":
        # The first's connection opened after the deadline, idle: nothing
        # was sent on it.
        assert (seen, warmed) == (0, 1)
    else:
        assert (seen, warmed) == (1, 0)
        assert len(upstream.site.lost) == 1


@pytest_twisted.ensureDeferred
async def test_response_streaming_at_the_deadline_is_cut_off_with_its_connection() -> None:
    """A response half received at the deadline is abandoned, its connection closed, not pooled."""
    upstream = start_upstream()
    octoplex = start_octoplex(pool=PoolSettings(connect_grace=2.0))
    pool = pool_of(octoplex)
    try:
        outcomes, elapsed = await post(octoplex, 200, [{"uri": upstream.url + "/stall"}])
        await wait_until(
            lambda: upstream.resource.finished_early and settled(pool, upstream),
            "the upstream to see /stall cut off",
        )
        lost = len(upstream.site.lost)
        finished_early = list(upstream.resource.finished_early)
        idle = idle_connections(pool)
        opened, warmed = pool.opened, pool.warmed
        # The next request cannot have the cut-off connection.
        after, _ = await post(octoplex, 1000, [{"uri": upstream.url + "/hello"}])
        connections = len(upstream.site.connections)
    finally:
        await octoplex.stop()
        await upstream.stop()
    [outcome] = outcomes
    assert outcome["Failure"]["error"] == TIMEOUT_ELAPSED
    assert 0.2 <= elapsed < 0.35, elapsed
    assert lost == 1
    assert finished_early == ["/stall"]
    assert (idle, opened, warmed) == (0, 1, 0)
    assert after[0]["Success"]["content"] == "Hello world!"
    assert connections == 2


class _AnswerOnceWholeRequests(Protocol):
    """
    Read whole requests (headers and Content-Length body); answer the first
    on a connection with a keep-alive 200 whose body is the method and the
    body length received; on the next one, close the connection without a
    word (a FIN, the request read to its end).
    """

    def connectionMade(self) -> None:
        factory = self.factory
        factory.connections += 1  # type: ignore[attr-defined]
        self.number = factory.connections  # type: ignore[attr-defined]
        self.answered = False
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, blank, rest = self.buffer.partition(b"\r\n\r\n")
            if not blank:
                return
            lines = head.split(b"\r\n")
            method = lines[0].split(b" ", 1)[0].decode()
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            body, self.buffer = rest[:length], rest[length:]
            self.factory.requests.append(  # type: ignore[attr-defined]
                (self.number, method, len(body), not self.answered)
            )
            assert self.transport is not None
            if self.answered:
                self.transport.loseConnection()
                return
            self.answered = True
            content = f"{method} {len(body)}".encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(content), content)
            )


@pytest_twisted.ensureDeferred
async def test_idempotent_methods_with_a_body_are_retried_on_a_stale_connection() -> None:
    """PUT, DELETE and a POST with an Idempotency-Key are retried whole; a plain POST is not."""
    factory = Factory.forProtocol(_AnswerOnceWholeRequests)
    factory.noisy = False
    factory.connections = 0  # type: ignore[attr-defined]
    factory.requests = []  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}/"
    octoplex = start_octoplex()
    pool = pool_of(octoplex)
    requests = [
        {"uri": base},
        {"uri": base, "method": "PUT", "body": "p" * 1000},
        {"uri": base, "method": "DELETE", "body": "d" * 500},
        {
            "uri": base,
            "method": "POST",
            "body": "k" * 200,
            "headers": {"Idempotency-Key": "bid-42"},
        },
        {"uri": base, "method": "POST", "body": "x" * 300},
    ]
    outcomes = []
    try:
        for request in requests:
            [outcome], _ = await post(octoplex, 2000, [request])
            outcomes.append(outcome)
        opened = pool.opened
    finally:
        await octoplex.stop()
        await port.stopListening()
    get, put, delete, keyed, posted = outcomes
    assert get["Success"]["content"] == "GET 0"
    assert put["Success"]["content"] == "PUT 1000"
    assert delete["Success"]["content"] == "DELETE 500"
    assert keyed["Success"]["content"] == "POST 200"
    assert posted["Failure"]["error"] == CLOSED_EARLY
    # (connection, method, body bytes received, answered)
    assert factory.requests == [  # type: ignore[attr-defined]
        (1, "GET", 0, True),
        (1, "PUT", 1000, False),
        (2, "PUT", 1000, True),
        (2, "DELETE", 500, False),
        (3, "DELETE", 500, True),
        (3, "POST", 200, False),
        (4, "POST", 200, True),
        (4, "POST", 300, False),
    ]
    assert factory.connections == opened == 4  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_stopping_gives_up_connections_still_opening() -> None:
    """Stopping Octoplex gives up a connect the deadline cut off during DNS: none is ever opened."""
    slow = SlowDNS()
    upstream = start_upstream()
    octoplex: Octoplex | None = None
    try:
        slow.start()
        octoplex = start_octoplex(pool=PoolSettings(connect_grace=2.0), resolver=slow.resolver)
        pool = pool_of(octoplex)
        port = upstream.port.getHost().port
        [outcome], _ = await post(octoplex, 100, [{"uri": f"http://slow.test:{port}/hello"}])
        warming_at_deadline = len(pool._warming)
        stopping, octoplex = octoplex, None
        await stopping.stop()
        warming_after_stop = len(pool._warming)
        # Past the DNS answer, which the resolver still receives and caches.
        await wait_until(lambda: "slow.test" in slow.resolver._cache, "the DNS answer to be cached")
        # No event marks a connection never opened: a short look past the
        # answer, which on a slow machine can only miss a late connect (a
        # false pass), never fail.
        await _sleep(0.1)
        connections = len(upstream.site.connections)
        opened, warmed = pool.opened, pool.warmed
        queries = dict(slow.resolver.queries)
        cached = await slow.resolver.lookup("slow.test")
    finally:
        await slow.stop()
        if octoplex is not None:
            await octoplex.stop()
        await upstream.stop()
    assert outcome["Failure"]["error"] == TIMEOUT_ELAPSED
    assert (warming_at_deadline, warming_after_stop) == (1, 0)
    assert connections == 0
    assert (opened, warmed) == (0, 0)
    assert queries == {"slow.test": 1}
    assert cached == ["127.0.0.1"]
