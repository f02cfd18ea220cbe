"""
The connection pool over real sockets: the caps on requests in flight (per
upstream and in total), a request still queued at its batch's deadline, LIFO
reuse that lets idle connections time out, retirement by request count and
by age, and upstreams that close idle keep-alive connections.

Concurrency and connection identity are measured on the upstream side: the
test upstream below counts the requests it is serving and records which
connection (server-side channel) carried each request.
"""

from __future__ import annotations

import time
from typing import Any

import attr
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from octoplex.client import PoolSettings, UpstreamClient
from octoplex.limits import Limits
from octoplex.metrics import Metrics
from octoplex.pool import OctoplexPool
from octoplex.wire import UpstreamRequest, build_request

from .servers import Caller, Upstream, _CountingSite, start_octoplex, wait_until


def _batch(timeout_msec: int, uris: list[str]) -> dict[str, Any]:
    return {"timeout_msec": timeout_msec, "requests": [{"uri": uri} for uri in uris]}


async def _sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@attr.s(auto_attribs=True)
class _InFlight:
    """
    Requests being served right now, the most ever at once, and the total.
    """

    now: int = 0
    peak: int = 0
    seen: int = 0

    def enter(self) -> None:
        self.now += 1
        self.seen += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        self.now -= 1


class _Tracking(Resource):
    """
    An upstream that counts requests in flight (``/delay/<ms>``, ``/hello``,
    ``/echo``) and records the server-side channel of every request, so that
    a test can tell connections apart.  With ``close_after`` set, it closes
    each connection that many seconds after answering on it.
    """

    isLeaf = True

    def __init__(self, in_flight: _InFlight | None = None, close_after: float | None = None):
        super().__init__()
        self.in_flight = in_flight or _InFlight()
        self.close_after = close_after
        # The channel objects themselves, kept alive so that ids stay unique.
        self.channels: list[Any] = []
        self.methods: list[str] = []

    def connections_used(self, start: int = 0) -> int:
        """
        How many distinct connections carried the requests from ``start`` on.
        """
        return len({id(channel) for channel in self.channels[start:]})

    def render(self, request: Request) -> Any:
        self.channels.append(request.channel)
        self.methods.append(request.method.decode())
        self.in_flight.enter()
        if self.close_after is not None:
            transport = request.channel.transport
            request.notifyFinish().addBoth(
                lambda _: reactor.callLater(self.close_after, transport.loseConnection)
            )
        parts = request.path.decode().strip("/").split("/")
        if parts[0] == "delay":
            return self._delay(request, int(parts[1]))
        self.in_flight.leave()
        if parts[0] == "echo":
            assert request.content is not None
            return request.method + b" " + request.content.read()
        return b"Hello world!"

    def _delay(self, request: Request, msec: int) -> Any:
        def late() -> None:
            self.in_flight.leave()
            request.write(f"delayed {msec}".encode())
            request.finish()

        call = reactor.callLater(msec / 1000.0, late)

        def gone(_: Any) -> None:
            if call.active():
                call.cancel()
                self.in_flight.leave()

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET


def _serve(resource: _Tracking) -> Upstream:
    site = _CountingSite(resource)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return Upstream(f"http://127.0.0.1:{port.getHost().port}", site, resource, port)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_per_host_cap_limits_requests_in_flight(caller: Caller) -> None:
    """With max_per_host=2, six 200 ms requests to one upstream run two at a time."""
    resource = _Tracking()
    upstream = _serve(resource)
    octoplex = start_octoplex(pool=PoolSettings(max_per_host=2))
    try:
        uris = [f"{upstream.url}/delay/200?n={n}" for n in range(6)]
        started = time.monotonic()
        status, _, body = await caller.post(octoplex.url + "/multiplex", _batch(5000, uris))
        elapsed = time.monotonic() - started
    finally:
        await octoplex.stop()
        await upstream.stop()
    assert status == 200
    assert [o["Success"]["content"] for o in body["responses"]] == ["delayed 200"] * 6
    assert resource.in_flight.peak == 2
    assert resource.in_flight.seen == 6
    # Three waves of 200 ms.
    assert 0.6 <= elapsed < 0.9, elapsed


@pytest_twisted.ensureDeferred
async def test_global_cap_limits_requests_in_flight_over_all_upstreams(caller: Caller) -> None:
    """With max_total=3, requests to two upstreams run at most three at a time in all."""
    shared = _InFlight()
    first, second = _Tracking(shared), _Tracking(shared)
    one, two = _serve(first), _serve(second)
    octoplex = start_octoplex(pool=PoolSettings(max_total=3))
    try:
        uris = [f"{up.url}/delay/200?n={n}" for n in range(3) for up in (one, two)]
        started = time.monotonic()
        status, _, body = await caller.post(octoplex.url + "/multiplex", _batch(5000, uris))
        elapsed = time.monotonic() - started
    finally:
        await octoplex.stop()
        await one.stop()
        await two.stop()
    assert status == 200
    assert [o["Success"]["content"] for o in body["responses"]] == ["delayed 200"] * 6
    assert shared.peak == 3
    assert len(first.channels) == len(second.channels) == 3
    # Two waves of 200 ms.
    assert 0.4 <= elapsed < 0.7, elapsed


@pytest_twisted.ensureDeferred
async def test_request_still_queued_at_the_deadline_is_never_sent(caller: Caller) -> None:
    """A request waiting for a connection at the deadline says so and never reaches the upstream."""
    resource = _Tracking()
    upstream = _serve(resource)
    octoplex = start_octoplex(pool=PoolSettings(max_per_host=1))
    try:
        uris = [f"{upstream.url}/delay/500", f"{upstream.url}/delay/500"]
        status, _, body = await caller.post(octoplex.url + "/multiplex", _batch(200, uris))
        # Give a wrongly woken second request time to reach the upstream.
        await _sleep(0.1)
        seen_by_then = resource.in_flight.seen
        connections_by_then = len(upstream.site.connections)
        # Nothing in flight, nobody queued: no per-host cap is left behind.
        hosts_by_then = dict(octoplex.client._hosts)
        _, _, after = await caller.post(
            octoplex.url + "/multiplex", _batch(2000, [upstream.url + "/hello"])
        )
    finally:
        await octoplex.stop()
        await upstream.stop()
    assert status == 200
    sent, queued = body["responses"]
    assert sent["Failure"]["error"] == "timeout elapsed"
    assert (sent["Failure"]["kind"], queued["Failure"]["kind"]) == ("timeout", "queue_timeout")
    port = upstream.url.rsplit(":", 1)[1]
    assert queued["Failure"]["error"] == (
        f"timeout elapsed before a connection to 127.0.0.1:{port} was free "
        "(all 1 in use); the request was never sent"
    )
    assert 200 <= queued["Failure"]["duration_msec"] < 400
    assert seen_by_then == 1
    assert connections_by_then == 1
    assert hosts_by_then == {}
    # The daemon still serves, and the cap's slot was given back.
    assert after["responses"][0]["Success"]["content"] == "Hello world!"


@pytest_twisted.ensureDeferred
async def test_newest_idle_connection_is_reused_and_the_rest_idle_out(caller: Caller) -> None:
    """Under steady sequential traffic one connection serves everything; the other four idle out."""
    resource = _Tracking()
    upstream = _serve(resource)
    octoplex = start_octoplex(pool=PoolSettings(max_idle_per_host=10, idle_timeout=0.5))
    lost: list[int] = []
    try:
        url = octoplex.url + "/multiplex"
        uris = [f"{upstream.url}/delay/50?n={n}" for n in range(5)]
        _, _, body = await caller.post(url, _batch(2000, uris))
        assert all(o["Success"]["status"] == 200 for o in body["responses"])
        assert len(upstream.site.connections) == 5
        idle_since = time.monotonic()
        # Sequential traffic, one request every 0.1 s, until the four unused
        # connections have closed (bounded: they must close while it goes on).
        n = 0
        while len(upstream.site.lost) < 4:
            assert time.monotonic() - idle_since < 10, f"still open after 10 s: {lost}"
            await _sleep(0.1)
            _, _, body = await caller.post(url, _batch(2000, [f"{upstream.url}/hello?n={n}"]))
            assert body["responses"][0]["Success"]["status"] == 200
            lost.append(len(upstream.site.lost))
            n += 1
        closed_after = time.monotonic() - idle_since
        # And a few more, to see the one in use stays open.
        for m in range(3):
            await _sleep(0.1)
            _, _, body = await caller.post(url, _batch(2000, [f"{upstream.url}/hello?m={m}"]))
            assert body["responses"][0]["Success"]["status"] == 200
        lost.append(len(upstream.site.lost))
    finally:
        await octoplex.stop()
        await upstream.stop()
    assert resource.connections_used(start=5) == 1
    # The one in use was one of the five, and it is the one still open.
    assert len(upstream.site.connections) == 5
    assert lost[-1] == 4
    # They closed while traffic went on, an idle timeout (0.5 s) after they
    # idled plus up to one more sweep (the sweep coalesces connections that
    # idle out within min(SWEEP_INTERVAL, timeout) of each other), not at the
    # end. The slack is for a busy machine.
    assert closed_after < 0.5 + 0.5 + 1.5, (closed_after, lost)


@pytest_twisted.ensureDeferred
async def test_connection_is_retired_after_max_requests(caller: Caller) -> None:
    """With max_requests=3, seven sequential requests use three connections and retire two."""
    resource = _Tracking()
    upstream = _serve(resource)
    octoplex = start_octoplex(pool=PoolSettings(max_requests=3))
    try:
        for n in range(7):
            _, _, body = await caller.post(
                octoplex.url + "/multiplex", _batch(2000, [f"{upstream.url}/hello?n={n}"])
            )
            assert body["responses"][0]["Success"]["status"] == 200
        pool = octoplex.client._pool
        opened, retired = pool.opened, pool.retired
    finally:
        await octoplex.stop()
        await upstream.stop()
    assert resource.connections_used() == 3
    # Three on the first, three on the second, one on the third.
    groups = [resource.channels.index(channel) for channel in resource.channels]
    assert groups == [0, 0, 0, 3, 3, 3, 6]
    assert (opened, retired) == (3, 2)


async def _two_requests_apart(max_age: float, gap: float, caller: Caller) -> tuple[int, int]:
    resource = _Tracking()
    upstream = _serve(resource)
    octoplex = start_octoplex(pool=PoolSettings(max_age=max_age))
    try:
        for n in range(2):
            if n:
                await _sleep(gap)
            _, _, body = await caller.post(
                octoplex.url + "/multiplex", _batch(2000, [f"{upstream.url}/hello?n={n}"])
            )
            assert body["responses"][0]["Success"]["status"] == 200
    finally:
        await octoplex.stop()
        await upstream.stop()
    return resource.connections_used(), len(upstream.site.connections)


@pytest_twisted.ensureDeferred
async def test_connection_is_retired_after_max_age(caller: Caller) -> None:
    """A connection older than max_age is not reused; a young one is."""
    used, opened = await _two_requests_apart(max_age=0.3, gap=0.4, caller=caller)
    assert (used, opened) == (2, 2)
    used, opened = await _two_requests_apart(max_age=60.0, gap=0.4, caller=caller)
    assert (used, opened) == (1, 1)


@pytest_twisted.ensureDeferred
async def test_upstream_closing_idle_connections_fails_nothing(caller: Caller) -> None:
    """
    An upstream that closes each connection soon after answering costs no
    GET or POST; the pool drops each closed idle connection at once (its
    idle gauge reads 0), not when it is next picked or idles out.
    """
    resource = _Tracking(close_after=0.05)
    upstream = _serve(resource)
    metrics = Metrics()
    octoplex = start_octoplex(metrics=metrics)
    idle = ("octoplex_upstream_connections_idle", {"host": upstream.url})
    outcomes: list[dict[str, Any]] = []
    try:
        for n in range(10):
            # The upstream has closed the previous connection (at its end),
            # and the pool has let it go.
            await wait_until(lambda n=n: len(upstream.site.lost) == n, f"the upstream closing {n}")
            await wait_until(
                lambda: not metrics.registry.get_sample_value(*idle), "the pool to drop it"
            )
            request: dict[str, Any] = {"uri": f"{upstream.url}/echo?n={n}"}
            if n % 2:
                request.update(method="POST", body=f"post {n}")
            _, _, body = await caller.post(
                octoplex.url + "/multiplex", {"timeout_msec": 2000, "requests": [request]}
            )
            outcomes.extend(body["responses"])
    finally:
        await octoplex.stop()
        await upstream.stop()
    failures = [o for o in outcomes if "Failure" in o]
    assert not failures, failures
    contents = [o["Success"]["content"] for o in outcomes]
    assert contents == ["GET " if n % 2 == 0 else f"POST post {n}" for n in range(10)]
    # Every request found its connection gone and opened a new one.
    assert resource.connections_used() == len(upstream.site.connections) == 10
    assert len(upstream.site.lost) == 10


class _AnswerOnce(Protocol):
    """
    Answer the first request on a connection with a keep-alive 200; on the
    next request, close the connection without a word, as an upstream whose
    keep-alive timeout fired just as the request arrived would.
    """

    def connectionMade(self) -> None:
        self.answered = False
        self.factory.connections += 1  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        assert self.transport is not None
        if self.answered:
            self.transport.loseConnection()
            return
        self.answered = True
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest_twisted.ensureDeferred
async def test_get_is_retried_on_a_connection_found_dead(caller: Caller) -> None:
    """A GET whose reused connection is closed on it is retried on a new one; a POST is not."""
    factory = Factory.forProtocol(_AnswerOnce)
    factory.noisy = False
    factory.connections = 0  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}/"
    octoplex = start_octoplex()
    url = octoplex.url + "/multiplex"
    try:
        _, _, first = await caller.post(url, _batch(2000, [base]))
        _, _, get = await caller.post(url, _batch(2000, [base]))
        post_batch = {"timeout_msec": 2000, "requests": [{"uri": base, "method": "POST"}]}
        _, _, post = await caller.post(url, post_batch)
    finally:
        await octoplex.stop()
        await port.stopListening()
    assert first["responses"][0]["Success"]["content"] == "ok"
    # Sent on the first connection, which closed; sent again on a second.
    assert get["responses"][0]["Success"]["content"] == "ok"
    assert post["responses"][0]["Failure"]["error"] == (
        "upstream closed the connection before sending a response"
    )
    assert factory.connections == 2  # type: ignore[attr-defined]


class _Pooled:
    """A keep-alive connection as the pool sees it, on a StringTransport."""

    state = "QUIESCENT"
    generation = 0
    uses = 0
    outlier = None

    def __init__(self) -> None:
        self.born = 0.0
        self.transport = StringTransport()


def test_one_timer_idles_out_the_pool_and_the_newest_is_reused() -> None:
    """
    Idle connections are closed after the idle timeout by one timer for the
    whole pool (not one armed per connection each time it comes back),
    oldest first; the newest is the one handed out.
    """
    clock = Clock()
    pool = OctoplexPool(clock, max_requests=1000, max_age=1000.0, connect_grace=1.0)
    pool.cachedConnectionTimeout = 30  # type: ignore[assignment]
    pool.maxPersistentPerHost = 10
    pooled = [_Pooled() for _ in range(5)]
    for connection in pooled:
        pool._putConnection(b"key", connection)
        clock.advance(2)
    assert len(clock.getDelayedCalls()) == 1
    taken: list[Any] = []
    pool.getConnection(b"key", None).addCallback(taken.append)  # type: ignore[arg-type]
    assert taken[0]._connection is pooled[-1]
    clock.advance(30 - 10 + 0.5)
    # Idle since 0 and 2 s: closed; since 4 and 6 s: not yet.
    assert [c.transport.disconnecting for c in pooled[:4]] == [True, False, False, False]
    for _ in range(10):
        assert len(clock.getDelayedCalls()) <= 1
        clock.advance(1)
    assert all(c.transport.disconnecting for c in pooled[:4])
    assert not pooled[4].transport.disconnecting
    assert pool._connections == {} and clock.getDelayedCalls() == []


def _in_memory_client(
    clock: Clock, max_per_host: int, max_total: int
) -> tuple[UpstreamClient, Any, UpstreamRequest]:
    """
    A client whose connections are in memory (the endpoints of
    tests/test_agent.py), and a GET to send through it.
    """
    from octoplex.egress import EgressPolicy

    from .test_agent import _CountingEndpoints

    client = UpstreamClient(
        clock,
        PoolSettings(max_per_host=max_per_host, max_total=max_total),
        1 << 20,
        egress=EgressPolicy.from_strings(allow=["127.0.0.0/8"]),
    )
    endpoints = _CountingEndpoints()
    client._endpoints.endpointForURI = endpoints.endpointForURI  # type: ignore[method-assign]
    request = build_request("http://127.0.0.1:9/x", "GET", [], None, None, Limits())
    assert isinstance(request, UpstreamRequest)
    return client, endpoints, request


def test_slots_are_released_at_once_when_nobody_waits_for_them() -> None:
    """
    A request that settles while no other waits for a connection slot frees
    its slots there and then, arming no timer; the next reactor turn is kept
    for the case where a waiter would be woken (a deadline cancelling a
    whole batch must not hand the slot to one of its own requests).
    """
    clock = Clock()
    client, endpoints, request = _in_memory_client(clock, max_per_host=1, max_total=8)
    answers: list[Any] = []
    client.fetch(request).addBoth(answers.append)
    queued = client.fetch(request)
    queued.addBoth(answers.append)
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    # The second waits for the host's one slot: its release is deferred.
    endpoints.protocols[0].dataReceived(ok)
    assert [a.body for a in answers] == [b"ok"]
    assert [c.getTime() for c in clock.getDelayedCalls()].count(0) == 1
    clock.advance(0)
    # Now nobody waits: the second's release is immediate.
    endpoints.protocols[0].dataReceived(ok)
    assert [a.body for a in answers] == [b"ok", b"ok"]
    assert [c.getTime() for c in clock.getDelayedCalls()].count(0) == 0
    assert client._hosts == {} and client._all.tokens == 8


def test_a_fetch_frees_its_slots_once_however_it_ends() -> None:
    """
    A request's slots come back exactly once whether it is answered, fails
    before its head, or is cancelled (by a deadline) while its head or its
    body is awaited; a cancelled one closes its connection.
    """
    from twisted.internet.defer import CancelledError

    client, endpoints, request = _in_memory_client(Clock(), max_per_host=4, max_total=4)

    def fetch() -> tuple[list[Any], Any, Any]:
        results: list[Any] = []
        d = client.fetch(request)
        d.addBoth(results.append)
        return results, d, endpoints.protocols[-1]

    def free() -> int:
        return int(client._all.tokens)

    results, d, protocol = fetch()
    assert free() == 3
    d.cancel()  # awaiting the head
    # As Twisted's client protocol fails it: nothing was received.
    assert results[0].check(ResponseNeverReceived)
    assert results[0].value.reasons[0].check(CancelledError)
    assert free() == 4 and protocol.transport.disconnecting

    results, d, protocol = fetch()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    assert results == [] and free() == 3
    d.cancel()  # reading the body
    assert results[0].check(CancelledError) and free() == 4
    assert protocol.transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert free() == 4 and len(results) == 1

    results, d, protocol = fetch()
    protocol.connectionLost(Failure(ConnectionDone()))  # before any answer
    assert len(results) == 1 and isinstance(results[0], Failure) and free() == 4
    d.cancel()
    assert free() == 4 and client._hosts == {}
