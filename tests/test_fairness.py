"""
No caller can lock out the others: each client (its token's name, else its
address) has a share of the in-flight caps, and a client over it gets 429
with Retry-After while every other client is still served; and one upstream
that never answers holds at most its per-host share of the pool.  Over real
sockets, with a greedy client whose batches go to a host that never answers
and a polite one beside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.python import usage
from twisted.web.client import ResponseNeverReceived

from octoplex.admission import Admission, client_key
from octoplex.auth import Tokens
from octoplex.client import PoolSettings
from octoplex.limits import Limits
from octoplex.metrics import Metrics, stats
from octoplex.tap import Options

from .servers import Caller, Upstream, start_misbehaving, start_octoplex

GREEDY_TOKEN = "greedy-s3cret-token-1"
POLITE_TOKEN = "polite-s3cret-token-2"

#: The greedy batches' deadline: far past the test, so only a cancel ends them.
LONG_MSEC = 60_000

#: Seconds a test waits for the daemon to reach a state.
SETTLE = 10.0


def _batch(uris: list[str], timeout_msec: int = LONG_MSEC) -> dict[str, Any]:
    return {"timeout_msec": timeout_msec, "requests": [{"uri": uri} for uri in uris]}


def _in_flight(metrics: Metrics) -> tuple[float, float]:
    """The daemon's batches and requests in flight, as its gauges read them."""
    batches = metrics.registry.get_sample_value("octoplex_batches_in_flight")
    items = metrics.registry.get_sample_value("octoplex_items_in_flight")
    assert batches is not None and items is not None
    return batches, items


async def _until(what: Callable[[], bool], why: str) -> None:
    """Wait, at most :data:`SETTLE` seconds, until ``what()`` holds."""
    deadline = time.monotonic() + SETTLE
    while not what():
        assert time.monotonic() < deadline, f"not within {SETTLE} s: {why}"
        await deferLater(reactor, 0.01, lambda: None)


class _Greedy:
    """A client's long batches, sent and left running until :meth:`cancel`."""

    def __init__(self, caller: Caller, url: str, headers: dict[str, str] | None = None) -> None:
        self._caller = caller
        self._url = url
        self._headers = headers
        self.running: list[Deferred[Any]] = []

    def send(self, uris: list[str]) -> None:
        self.running.append(
            ensureDeferred(self._caller.post(self._url, _batch(uris), self._headers))
        )

    async def cancel(self, metrics: Metrics) -> None:
        """
        Hang up on every batch still running (the daemon cancels each) and
        wait until the daemon has none in flight.
        """
        running, self.running = self.running, []
        for batch in running:
            batch.cancel()
        for batch in running:
            # treq's cancel ends the exchange with the CancelledError inside.
            with pytest.raises((CancelledError, ResponseNeverReceived)):
                await batch
        await _until(lambda: _in_flight(metrics) == (0, 0), "the cancelled batches left")


async def _served(polite: Caller, url: str, upstream: Upstream, **kwargs: Any) -> None:
    """A polite batch is answered 200, with its data, well within its deadline."""
    started = time.monotonic()
    status, _, body = await polite.post(
        url, _batch([upstream.url + "/hello"] * 2, timeout_msec=5000), **kwargs
    )
    assert status == 200, body
    assert [o["Success"]["content"] for o in body["responses"]] == ["Hello world!"] * 2
    assert time.monotonic() - started < 5.0


def test_shares_are_counted_per_client_and_forgotten_at_zero() -> None:
    """Each client's counts rise and fall with its batches; its entry goes with its last."""
    metrics = Metrics()
    admission = Admission(
        Limits(max_client_batches_in_flight=2, max_client_requests_in_flight=5), metrics
    )
    assert admission.over_share("a", 5) is None
    admission.enter(3, "a")
    admission.enter(2, "a")
    admission.enter(4, "b")
    assert admission.clients == {"a": [2, 5], "b": [1, 4]}
    assert (admission.batches_in_flight, admission.requests_in_flight) == (3, 9)
    # "a" is at both caps; "b" has room for one more batch of 1.
    assert admission.over_share("a", 1) == (
        "client a is over its share: 2 batches with 5 requests in flight, and this one "
        "has 1 (at most 2 batches and 5 requests per client); retry once its batches are "
        "answered"
    )
    assert admission.over_share("b", 2) is not None
    assert admission.over_share("b", 1) is None
    assert admission.over_share("c", 5) is None
    assert admission.throttled == 2
    assert metrics.registry.get_sample_value("octoplex_batches_throttled_total") == 2
    assert "octoplex_batches_throttled" in stats(metrics)
    # Throttling is not shedding.
    assert admission.shed == 0
    admission.leave(3, "a")
    assert admission.clients == {"a": [1, 2], "b": [1, 4]}
    admission.leave(4, "b")
    admission.leave(2, "a")
    assert admission.clients == {}
    assert (admission.batches_in_flight, admission.requests_in_flight) == (0, 0)
    # Many clients, one batch each, leave nothing behind.
    for n in range(1000):
        admission.enter(1, f"10.0.{n // 256}.{n % 256}")
    for n in range(1000):
        admission.leave(1, f"10.0.{n // 256}.{n % 256}")
    assert admission.clients == {}


def test_a_client_is_its_token_else_its_host() -> None:
    """The key of a share: the token's name when there is one, else the host alone."""
    assert client_key(None, "127.0.0.2") == "127.0.0.2"
    assert client_key("bidder-7", "127.0.0.2") == "token bidder-7"


def test_a_batch_size_above_the_client_share_is_refused_at_start_up() -> None:
    """A full batch that could never fit a client's share stops start-up, naming both."""
    options = Options()
    with pytest.raises(usage.UsageError, match="--max-client-requests-in-flight 40: a full"):
        options.parseOptions(["--max-client-requests-in-flight", "40"])


@pytest_twisted.ensureDeferred
async def test_a_greedy_address_gets_429_while_a_polite_one_is_served(
    upstream: Upstream, log_events: list[dict[str, Any]]
) -> None:
    """
    A client (127.0.0.2) whose batches hang fills its share and gets 429
    with Retry-After, on its batch count and on its request count, while
    another address (127.0.0.1) is served throughout.
    """
    metrics = Metrics()
    server = start_octoplex(
        Limits(max_batch_size=5, max_client_batches_in_flight=3, max_client_requests_in_flight=4),
        metrics=metrics,
    )
    hang_url, hang_port = start_misbehaving("hang")
    url = server.url + "/multiplex"
    greedy_caller, polite = Caller(bind="127.0.0.2"), Caller(bind="127.0.0.1")
    greedy = _Greedy(greedy_caller, url)
    hang = hang_url + "/never"
    try:
        await _served(polite, url, upstream)
        greedy.send([hang, hang])
        greedy.send([hang])
        await _until(lambda: _in_flight(metrics) == (2, 3), "2 greedy batches in flight")
        await _served(polite, url, upstream)
        # 3 requests held: 2 more would pass the client's 4.
        status, headers, body = await greedy_caller.post(url, _batch([hang, hang]))
        assert status == 429
        assert headers.getRawHeaders(b"retry-after") == [b"1"]
        assert body["error"] == (
            "client 127.0.0.2 is over its share: 2 batches with 3 requests in flight, and "
            "this one has 2 (at most 3 batches and 4 requests per client); retry once its "
            "batches are answered"
        )
        await _served(polite, url, upstream)
        # One more fits; then the fourth batch passes the client's 3.
        greedy.send([hang])
        await _until(lambda: _in_flight(metrics) == (3, 4), "3 greedy batches in flight")
        status, headers, body = await greedy_caller.post(url, _batch([upstream.url + "/hello"]))
        assert status == 429
        assert headers.getRawHeaders(b"retry-after") == [b"1"]
        assert body["error"].startswith(
            "client 127.0.0.2 is over its share: 3 batches with 4 requests in flight"
        )
        # The polite client is still served, its batches beside the greedy ones.
        for _ in range(3):
            await _served(polite, url, upstream)
        await greedy.cancel(metrics)
        # With its batches gone, the greedy client is served again.
        await _served(greedy_caller, url, upstream)
        # /stats counts them.
        _, _, raw = await polite.get(server.url + "/stats")
        samples = json.loads(raw)["octoplex_batches_throttled"]["samples"]
        assert [s["value"] for s in samples if s["name"].endswith("_total")] == [2]
    finally:
        await greedy.cancel(metrics)
        await server.stop()
        await hang_port.stopListening()
    throttled = [e for e in log_events if e.get("status") == 429]
    assert [(e["client_address"].split(":")[0], e["size"]) for e in throttled] == [
        ("127.0.0.2", 2),
        ("127.0.0.2", 1),
    ]
    assert [e["throttled_total"] for e in throttled] == [1, 2]
    assert metrics.registry.get_sample_value("octoplex_batches_throttled_total") == 2
    assert metrics.registry.get_sample_value("octoplex_batches_total", {"status": "429"}) == 2
    assert metrics.registry.get_sample_value("octoplex_batches_shed_total") == 0


@pytest_twisted.ensureDeferred
async def test_a_greedy_token_gets_429_while_another_token_is_served(upstream: Upstream) -> None:
    """
    With tokens on, the token is the client: two callers from the same
    address are two clients, and only the greedy one is refused.
    """
    metrics = Metrics()
    server = start_octoplex(
        Limits(max_batch_size=5, max_client_batches_in_flight=2),
        metrics=metrics,
        tokens=Tokens({"greedy": GREEDY_TOKEN, "polite": POLITE_TOKEN}),
    )
    hang_url, hang_port = start_misbehaving("hang")
    url = server.url + "/multiplex"
    caller = Caller()
    greedy_auth = {"authorization": f"Bearer {GREEDY_TOKEN}"}
    polite_auth = {"authorization": f"Bearer {POLITE_TOKEN}"}
    greedy = _Greedy(caller, url, greedy_auth)
    try:
        greedy.send([hang_url + "/never"])
        greedy.send([hang_url + "/never"])
        await _until(lambda: _in_flight(metrics) == (2, 2), "2 greedy batches in flight")
        status, headers, body = await caller.post(
            url, _batch([upstream.url + "/hello"]), greedy_auth
        )
        assert status == 429
        assert headers.getRawHeaders(b"retry-after") == [b"1"]
        assert body["error"].startswith(
            "client token greedy is over its share: 2 batches with 2 requests in flight"
        )
        for _ in range(3):
            await _served(caller, url, upstream, headers=polite_auth)
    finally:
        await greedy.cancel(metrics)
        await server.stop()
        await hang_port.stopListening()


async def _hold_pool(metrics: Metrics, greedy: _Greedy, hosts: list[str], count: int) -> None:
    """Send ``count`` requests to each never-answering host, each in its own batch."""
    for host in hosts:
        for _ in range(count):
            greedy.send([host + "/never"])
    await _until(
        lambda: _in_flight(metrics)[1] == len(hosts) * count, "the greedy requests in flight"
    )


@pytest_twisted.ensureDeferred
async def test_a_host_that_never_answers_holds_only_its_per_host_slots(
    upstream: Upstream,
) -> None:
    """
    Requests to a host that never answers take at most --pool-max-per-host
    of the --pool-max-total slots; the rest queue for that host alone, and
    another host's requests are served.
    """
    metrics = Metrics()
    server = start_octoplex(
        Limits(max_batch_size=5), PoolSettings(max_per_host=2, max_total=4), metrics=metrics
    )
    hang_url, hang_port = start_misbehaving("hang")
    url = server.url + "/multiplex"
    greedy = _Greedy(Caller(bind="127.0.0.2"), url)
    try:
        # 6 requests to the hanging host: 2 hold slots, 4 queue for it.
        await _hold_pool(metrics, greedy, [hang_url], 6)
        for _ in range(3):
            await _served(Caller(bind="127.0.0.1"), url, upstream)
    finally:
        await greedy.cancel(metrics)
        await server.stop()
        await hang_port.stopListening()


@pytest.mark.parametrize("share", [None, 2])
@pytest_twisted.ensureDeferred
async def test_hanging_hosts_fill_the_pool_unless_the_client_share_is_below_it(
    upstream: Upstream, share: int | None
) -> None:
    """
    Two hosts that never answer fill --pool-max-total between them (2 x
    --pool-max-per-host), and another client's requests then wait for a
    slot until their deadline; a client request share below
    --pool-max-total stops the greedy client first (429), and the polite
    one is served.
    """
    metrics = Metrics()
    limits = Limits(max_batch_size=2)
    if share is not None:
        limits = Limits(max_batch_size=2, max_client_requests_in_flight=share)
    server = start_octoplex(limits, PoolSettings(max_per_host=2, max_total=4), metrics=metrics)
    hangs = [start_misbehaving("hang") for _ in range(2)]
    url = server.url + "/multiplex"
    greedy_caller, polite = Caller(bind="127.0.0.2"), Caller(bind="127.0.0.1")
    greedy = _Greedy(greedy_caller, url)
    try:
        await _hold_pool(metrics, greedy, [hangs[0][0]], 2)
        if share is None:
            await _hold_pool(metrics, greedy, [hangs[1][0]], 2)
            # Wait until all 4 slots are taken: the connects are under way.
            await _until(lambda: not server.client._all.tokens, "every pool slot taken")
            status, _, body = await polite.post(
                url, _batch([upstream.url + "/hello"], timeout_msec=300)
            )
            assert status == 200
            assert body["responses"][0]["Failure"]["kind"] == "queue_timeout"
        else:
            status, _, _ = await greedy_caller.post(url, _batch([hangs[1][0] + "/never"]))
            assert status == 429
            await _served(polite, url, upstream)
    finally:
        await greedy.cancel(metrics)
        await server.stop()
        for _, port in hangs:
            await port.stopListening()
