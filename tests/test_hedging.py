"""
Hedged requests (docs/hedging.md): the estimator and the two-attempt race
in memory, then the behaviour over real sockets, through the JSON API and
the gRPC frontend.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attr
import grpc
import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.usage import UsageError
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from octoplex.auth import Tokens
from octoplex.circuits import CLOSED, HALF_OPEN, OPEN
from octoplex.hedging import (
    BUDGET_WINDOW,
    MIN_SAMPLES,
    SAMPLES,
    HedgeBudget,
    HedgeBudgets,
    HedgedFetch,
    Latencies,
)
from octoplex.limits import Limits
from octoplex.metrics import Metrics
from octoplex.tap import Options, makeService
from octoplex.timings import PHASES
from octoplex.v1 import multiplexer_pb2 as pb
from octoplex.v1 import multiplexer_pb2_grpc as pb_grpc

from .schema import check_batch
from .servers import (
    Caller,
    Octoplex,
    Upstream,
    _CountingSite,
    _Upstream,
    global_reactor,
    start_octoplex,
    wait_until,
)
from .test_circuits import LIVE, closed_port, kinds, outcomes, state_of
from .test_grpc import Daemon, _serving, call
from .test_outliers import THREE, World, batch, in_world, samples, statuses

# --- The estimator ----------------------------------------------------------


def test_percentile_needs_enough_samples_then_ranks_the_recent_ones() -> None:
    """Too few samples give no delay; then the nearest-rank percentile of the last ones."""
    latencies = Latencies()
    for n in range(MIN_SAMPLES - 1):
        latencies.observe("a", n / 1000)
    assert latencies.percentile("a", 50) is None
    latencies = Latencies()
    for n in range(1, 101):
        latencies.observe("a", n / 1000)
    assert latencies.percentile("a", 50) == 0.050
    assert latencies.percentile("a", 95) == 0.095
    assert latencies.percentile("a", 99.5) == 0.100
    assert latencies.percentile("b", 50) is None
    # Only the last SAMPLES count: old slow ones are forgotten.
    for _ in range(SAMPLES):
        latencies.observe("a", 0.002)
    assert latencies.percentile("a", 99) == 0.002


def test_hosts_are_bounded_least_recently_used_first() -> None:
    """Past its bound the table forgets the upstream used least recently."""
    latencies = Latencies(max_hosts=2)
    for key in ("a", "b", "a", "c"):
        for _ in range(MIN_SAMPLES):
            latencies.observe(key, 0.01)
    assert len(latencies) == 2
    assert latencies.percentile("b", 50) is None
    assert latencies.percentile("a", 50) == 0.01


# --- The race, in memory ------------------------------------------------------


# --- The budget ---------------------------------------------------------------


def test_the_budget_allows_the_reserve_then_a_share_of_the_tries() -> None:
    """
    Over the window, min_per_second x 10 hedges go whatever the traffic,
    then percent % of the tries; a hedge over budget does not; hedges and
    tries older than the window no longer count.
    """
    clock = Clock()
    budget = HedgeBudget(clock, percent=10, min_per_second=0.2)
    assert BUDGET_WINDOW == 10
    # A reserve of 0.2 a second: 2 in the window.
    for _ in range(2):
        assert budget.allows()
        budget.spent()
    assert not budget.allows()
    for _ in range(9):
        budget.tried()
    assert not budget.allows()
    budget.tried()  # 10 tries: one hedge more.
    assert budget.allows()
    budget.spent()
    assert not budget.allows()
    # The hedges and tries of second 0 leave the window at second 10.
    clock.advance(9.5)
    assert not budget.allows()
    clock.advance(0.5)
    assert budget.counts() == (0, 0)
    assert budget.allows()


def test_the_budget_spreads_over_buckets_and_survives_a_clock_step_back() -> None:
    """Tries in each second leave one by one; a clock stepping back fills the latest bucket."""
    clock = Clock()
    budget = HedgeBudget(clock, percent=100, min_per_second=0)
    for _ in range(3):
        budget.tried()
        clock.advance(1)
    assert budget.counts() == (3, 0)
    clock.advance(7)  # second 10: second 0's try leaves
    assert budget.counts() == (2, 0)
    clock.rightNow -= 5  # a wall clock stepped back
    budget.tried()
    budget.spent()
    assert budget.counts() == (3, 1)
    clock.advance(100)
    assert budget.counts() == (0, 0)
    assert not budget.allows()
    # 100 %: a hedge for every try.
    budget.tried()
    assert budget.allows()


class _Hooks:
    def __init__(self, allow: bool = True) -> None:
        self.allow = allow
        self.events: list[Any] = []
        self.attempts: list[Deferred[Any]] = []
        self.heads: list[Any] = []
        self.cancelled_attempts: list[int] = []

    def send(self, attempt: int, on_head: Any) -> tuple[Deferred[Any], Any]:
        d: Deferred[Any] = Deferred(lambda _: self.cancelled_attempts.append(attempt))
        self.attempts.append(d)
        self.heads.append(on_head)
        return d, f"timings {attempt}"

    def may_hedge(self) -> bool:
        self.events.append("may")
        return self.allow

    def sent(self) -> None:
        self.events.append("sent")

    def over(self) -> None:
        self.events.append("over")

    def won(self, hedge: bool, timings: Any) -> None:
        self.events.append(("won", hedge, timings))

    def cancelled(self) -> None:
        self.events.append("cancelled")

    def observe(self, seconds: float) -> None:
        self.events.append(("observe", round(seconds, 3)))


def test_the_hedge_goes_at_its_time_and_the_first_head_wins() -> None:
    """Not before the delay; the hedge's head first wins and the first attempt is cancelled."""
    clock, hooks = Clock(), _Hooks()
    fetch = HedgedFetch(clock, hooks.send, 0.2, hooks)
    clock.advance(0.199)
    assert len(hooks.attempts) == 1
    clock.advance(0.001)
    assert len(hooks.attempts) == 2 and hooks.events == ["may", "sent"]
    clock.advance(0.05)
    hooks.heads[1]()
    assert hooks.cancelled_attempts == [0]
    hooks.attempts[1].callback("response")
    assert fetch.result == "response"
    assert ("won", True, "timings 1") in hooks.events
    # The winner's time from its own start, and the loser's wait so far.
    assert ("observe", 0.05) in hooks.events and ("observe", 0.25) in hooks.events
    assert hooks.events.count("over") == 1 and "cancelled" in hooks.events


def test_no_hedge_when_the_first_head_comes_in_time_or_the_share_is_full() -> None:
    """A first head before the delay disarms the hedge; a refused slot sends none."""
    clock, hooks = Clock(), _Hooks()
    fetch = HedgedFetch(clock, hooks.send, 0.2, hooks)
    clock.advance(0.1)
    hooks.heads[0]()
    hooks.attempts[0].callback("first")
    clock.advance(1)
    assert len(hooks.attempts) == 1 and fetch.result == "first"
    assert ("won", False, "timings 0") in hooks.events and "sent" not in hooks.events
    clock, hooks = Clock(), _Hooks(allow=False)
    fetch = HedgedFetch(clock, hooks.send, 0.2, hooks)
    clock.advance(0.3)
    assert len(hooks.attempts) == 1 and hooks.events == ["may"]
    hooks.attempts[0].callback("first")
    assert fetch.result == "first"


def test_cancelling_stops_both_attempts_and_fails_as_the_first() -> None:
    """A deadline cancels the hedge and the first attempt; the outcome is the first's."""
    clock, hooks = Clock(), _Hooks()
    fetch = HedgedFetch(clock, hooks.send, 0.2, hooks)
    clock.advance(0.3)
    fetch.cancel()
    assert sorted(hooks.cancelled_attempts) == [0, 1]
    assert fetch.called
    failures: list[Any] = []
    fetch.addErrback(failures.append)
    assert failures[0].check(CancelledError)
    assert "over" in hooks.events and not clock.getDelayedCalls()


def test_a_failed_attempt_leaves_the_other_to_answer() -> None:
    """The first attempt failing after the hedge went does not fail the try."""
    clock, hooks = Clock(), _Hooks()
    fetch = HedgedFetch(clock, hooks.send, 0.2, hooks)
    clock.advance(0.2)
    hooks.attempts[0].errback(ConnectionError("reset"))
    assert not fetch.called
    hooks.heads[1]()
    hooks.attempts[1].callback("hedge")
    assert fetch.result == "hedge"


# --- Over real sockets --------------------------------------------------------


def _count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def hedging(metrics: Metrics) -> Iterator[Octoplex]:
    server = start_octoplex(metrics=metrics)
    yield server
    pytest_twisted.blockon(server.stop())


def _key() -> str:
    return f"k{time.monotonic_ns()}"


def _arrivals(upstream: Upstream, path: str) -> list[tuple[float, Any]]:
    return [(at, channel) for uri, at, channel in upstream.resource.timed if uri == path]


@pytest_twisted.ensureDeferred
async def test_the_hedge_fires_at_its_time_wins_and_the_loser_is_closed_at_the_upstream(
    hedging: Octoplex, upstream: Upstream, caller: Caller, metrics: Metrics
) -> None:
    """A slow first attempt gets a hedge after after_msec; its head wins; the first is closed."""
    path = f"/first-slow/{_key()}/5000"
    posted = global_reactor.seconds()
    status, _, answer = await caller.post(
        hedging.url + "/multiplex",
        {
            "timeout_msec": 4000,
            "requests": [{"uri": upstream.url + path, "hedge": {"after_msec": 300}}],
        },
    )
    assert status == 200
    success = answer["responses"][0]["Success"]
    assert (success["content"], success["hedged"], success["hedge_won"]) == ("fast", True, True)
    (first, first_channel), (second, second_channel) = _arrivals(upstream, path)
    # Not before after_msec since the batch was posted (the first attempt
    # started after that; its arrival is later by its own connect, which the
    # hedge, on a pooled connection, may not pay), with a millisecond of
    # clock granularity, and not long after the first even on a loaded machine.
    assert second - posted >= 0.299, (second - posted, first - posted)
    assert second - first < 0.3 + 2.0, second - first
    assert first_channel is not second_channel
    await wait_until(lambda: path in upstream.resource.finished_early, "the loser's close")
    assert _count(metrics, "octoplex_hedges_sent_total") == 1
    assert _count(metrics, "octoplex_hedges_won_total") == 1
    assert _count(metrics, "octoplex_hedge_attempts_cancelled_total") == 1


@pytest_twisted.ensureDeferred
async def test_a_first_answer_in_time_sends_no_hedge(
    hedging: Octoplex, upstream: Upstream, caller: Caller, metrics: Metrics
) -> None:
    """A request answered before after_msec is sent once and says nothing of hedging."""
    _, _, answer = await caller.post(
        hedging.url + "/multiplex",
        {
            "timeout_msec": 4000,
            "requests": [{"uri": upstream.url + "/hello", "hedge": {"after_msec": 2000}}],
        },
    )
    success = answer["responses"][0]["Success"]
    assert success["content"] == "Hello world!"
    assert "hedged" not in success and "hedge_won" not in success
    assert upstream.resource.arrivals == ["/hello"]
    assert _count(metrics, "octoplex_hedges_sent_total") == 0


@pytest_twisted.ensureDeferred
async def test_a_post_is_hedged_only_with_hedge_unsafe(
    hedging: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """POST with a hedge is invalid unless hedge_unsafe; with it (from defaults too), hedged."""
    slow = f"/first-slow/{_key()}/5000"
    _, _, answer = await caller.post(
        hedging.url + "/multiplex",
        {
            "timeout_msec": 4000,
            "defaults": {"method": "POST", "body": "bid", "hedge": {"after_msec": 100}},
            "requests": [
                {"uri": upstream.url + "/first-slow/never/1"},
                {"uri": upstream.url + slow, "hedge_unsafe": True},
                {"uri": upstream.url + "/hello", "method": "GET"},
            ],
        },
    )
    refused, hedged, plain = answer["responses"]
    assert refused["Failure"]["kind"] == "invalid"
    assert refused["Failure"]["duration_msec"] == 0
    assert '"POST"' in refused["Failure"]["error"] and "hedge_unsafe" in refused["Failure"]["error"]
    assert (hedged["Success"]["hedged"], hedged["Success"]["hedge_won"]) == (True, True)
    assert "hedged" not in plain["Success"]
    assert "/first-slow/never/1" not in upstream.resource.arrivals


@pytest_twisted.ensureDeferred
async def test_bad_hedge_values_fail_the_item_and_bad_types_the_batch(
    hedging: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """Each bad value fails its item, naming it and the limit; a wrong type is a 400."""
    hedges = [
        {},
        {"after_msec": 10, "after_percentile": 50},
        {"after_msec": 0},
        {"after_msec": 3_600_001},
        {"after_percentile": 100},
        {"after_percentile": 0},
    ]
    _, _, answer = await caller.post(
        hedging.url + "/multiplex",
        {
            "timeout_msec": 1000,
            "requests": [{"uri": upstream.url + "/hello", "hedge": h} for h in hedges],
        },
    )
    errors = [outcome["Failure"]["error"] for outcome in answer["responses"]]
    assert all(o["Failure"]["kind"] == "invalid" for o in answer["responses"])
    assert "exactly one of after_msec and after_percentile, got neither" in errors[0]
    assert "got both" in errors[1]
    assert "after_msec is 0; it must be from 1 to 3600000 (--max-timeout-msec)" in errors[2]
    assert "after_msec is 3600001" in errors[3]
    assert "after_percentile is 100; it must be above 0 and below 100" in errors[4]
    assert "after_percentile is 0" in errors[5]
    assert upstream.resource.arrivals == []
    for bad, says in (
        ({"after_msec": "10"}, "hedge.after_msec must be a whole number"),
        ({"after_ms": 10}, 'unknown field "after_ms" in requests[0].hedge'),
        (5, "hedge must be a JSON object"),
    ):
        status, _, answer = await caller.post(
            hedging.url + "/multiplex",
            {"timeout_msec": 1000, "requests": [{"uri": upstream.url + "/hello", "hedge": bad}]},
        )
        assert status == 400 and says in answer["error"], answer


@pytest_twisted.ensureDeferred
async def test_the_hedge_is_cut_at_the_deadline(
    hedging: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """Both attempts still out at the batch's deadline are cancelled; the item times out."""
    path = "/delay/5000"
    started = time.monotonic()
    _, _, answer = await caller.post(
        hedging.url + "/multiplex",
        {
            "timeout_msec": 600,
            "requests": [{"uri": upstream.url + path, "hedge": {"after_msec": 100}}],
        },
    )
    assert time.monotonic() - started < 3.0
    failure = answer["responses"][0]["Failure"]
    assert (failure["kind"], failure["hedged"]) == ("timeout", True)
    assert "hedge_won" not in failure
    assert len(_arrivals(upstream, path)) == 2
    await wait_until(
        lambda: upstream.resource.finished_early.count(path) == 2, "both attempts closed"
    )


@pytest_twisted.ensureDeferred
async def test_a_hedge_due_after_the_items_own_timeout_is_never_sent(
    hedging: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """A hedge due past the request's timeout_msec never goes; the item times out alone."""
    path = "/delay/5000"
    _, _, answer = await caller.post(
        hedging.url + "/multiplex",
        {
            "timeout_msec": 3000,
            "requests": [
                {"uri": upstream.url + path, "timeout_msec": 300, "hedge": {"after_msec": 1000}}
            ],
        },
    )
    failure = answer["responses"][0]["Failure"]
    assert failure["kind"] == "timeout" and "hedged" not in failure
    assert len(_arrivals(upstream, path)) == 1


@pytest_twisted.ensureDeferred
async def test_a_hedge_counts_against_the_callers_share(
    upstream: Upstream, caller: Caller, metrics: Metrics
) -> None:
    """With the client's share full, the hedge is not sent (and counted); with room, it is."""
    for share, hedged in ((1, False), (2, True)):
        server = start_octoplex(limits=Limits(max_client_requests_in_flight=share), metrics=metrics)
        try:
            # Both attempts slow: the hedge is in flight for a while.
            path = f"/delay/{600 + share}"
            batch = {
                "timeout_msec": 4000,
                "requests": [{"uri": upstream.url + path, "hedge": {"after_msec": 100}}],
            }
            answering = Deferred.fromCoroutine(caller.post(server.url + "/multiplex", batch))
            if hedged:
                # While the hedge runs, it is one more request in flight.
                await wait_until(lambda p=path: len(_arrivals(upstream, p)) == 2, "the hedge")
                assert _count(metrics, "octoplex_items_in_flight") == 2
            _, _, answer = await answering
            success = answer["responses"][0]["Success"]
            assert ("hedged" in success) is hedged
            assert len(_arrivals(upstream, path)) == 1 + hedged
            assert _count(metrics, "octoplex_hedges_skipped_total", reason="share") == 1
            # Everything it took is given back.
            assert _count(metrics, "octoplex_items_in_flight") == 0
        finally:
            await server.stop()


async def _slow_hedged(
    caller: Caller, server: Octoplex, upstream: Upstream, headers: dict[str, str] | None = None
) -> tuple[dict[str, Any], int]:
    """A request whose first attempt takes 300 ms, hedged after 50 ms: its outcome, arrivals."""
    path = f"/first-slow/{_key()}/300"
    batch = {
        "timeout_msec": 4000,
        "requests": [{"uri": upstream.url + path, "hedge": {"after_msec": 50}}],
    }
    _, _, answer = await caller.post(server.url + "/multiplex", batch, headers)
    return answer["responses"][0]["Success"], len(_arrivals(upstream, path))


@pytest_twisted.ensureDeferred
async def test_a_hedge_over_budget_is_not_sent(
    upstream: Upstream, caller: Caller, metrics: Metrics
) -> None:
    """
    With a budget of one hedge in the window and no share of tries, the
    first slow request is hedged and the second is not: it waits for its
    first attempt, counted as skipped for the budget.
    """
    budgets = HedgeBudgets(global_reactor, percent=0, min_per_second=0.1)
    server = start_octoplex(metrics=metrics, hedge_budgets=budgets)
    try:
        first, first_arrivals = await _slow_hedged(caller, server, upstream)
        second, second_arrivals = await _slow_hedged(caller, server, upstream)
    finally:
        await server.stop()
    assert (first["content"], first["hedged"], first_arrivals) == ("fast", True, 2)
    assert ("hedged" not in second, second_arrivals) == (True, 1)
    assert _count(metrics, "octoplex_hedges_sent_total") == 1
    assert _count(metrics, "octoplex_hedges_skipped_total", reason="budget") == 1
    # The caller is its address (no tokens).
    assert len(budgets) == 1
    assert budgets.of("127.0.0.1").counts() == (2, 1)


@pytest_twisted.ensureDeferred
async def test_each_client_spends_its_own_hedge_budget(
    upstream: Upstream, caller: Caller, metrics: Metrics
) -> None:
    """
    With tokens on, each token has its own budget: once the greedy token
    has spent its one hedge, its next slow request is not hedged, while the
    polite token's is.
    """
    budgets = HedgeBudgets(global_reactor, percent=0, min_per_second=0.1)
    server = start_octoplex(
        metrics=metrics,
        hedge_budgets=budgets,
        tokens=Tokens({"greedy": "g" * 32, "polite": "p" * 32}),
    )
    greedy = {"authorization": "Bearer " + "g" * 32}
    polite = {"authorization": "Bearer " + "p" * 32}
    try:
        hedged = [
            "hedged" in (await _slow_hedged(caller, server, upstream, who))[0]
            for who in (greedy, greedy, polite)
        ]
    finally:
        await server.stop()
    assert hedged == [True, False, True]
    assert budgets.of("token greedy").counts() == (2, 1)
    assert budgets.of("token polite").counts() == (1, 1)
    assert _count(metrics, "octoplex_hedges_skipped_total", reason="budget") == 1


def test_client_budgets_are_bounded_and_a_reload_reaches_each() -> None:
    """Past max_clients the least recently used budget goes; configure() changes them all."""
    budgets = HedgeBudgets(Clock(), percent=10, min_per_second=1, max_clients=2)
    a, b = budgets.of("a"), budgets.of("b")
    assert budgets.of("a") is a
    budgets.of("c")
    assert len(budgets) == 2
    assert budgets.of("a") is a and budgets.of("b") is not b
    budgets.configure(50, 0)
    assert (a.percent, a.min_per_second) == (50, 0)
    assert (budgets.of("new").percent, budgets.of("new").min_per_second) == (50, 0)


@pytest_twisted.ensureDeferred
async def test_after_percentile_waits_for_samples_then_hedges_at_the_hosts_latency(
    hedging: Octoplex, upstream: Upstream, caller: Caller, metrics: Metrics
) -> None:
    """Without samples no hedge; after MIN_SAMPLES quick answers, a slow one is hedged soon."""
    hedge = {"after_percentile": 90}
    slow = f"/first-slow/{_key()}/3000"
    _, _, answer = await caller.post(
        hedging.url + "/multiplex",
        {"timeout_msec": 1000, "requests": [{"uri": upstream.url + slow, "hedge": hedge}]},
    )
    assert "hedged" not in answer["responses"][0]["Failure"]
    assert _count(metrics, "octoplex_hedges_skipped_total", reason="samples") == 1
    quick = [{"uri": upstream.url + "/hello", "hedge": hedge} for _ in range(MIN_SAMPLES)]
    await caller.post(hedging.url + "/multiplex", {"timeout_msec": 4000, "requests": quick})
    slow = f"/first-slow/{_key()}/3000"
    _, _, answer = await caller.post(
        hedging.url + "/multiplex",
        {"timeout_msec": 4000, "requests": [{"uri": upstream.url + slow, "hedge": hedge}]},
    )
    success = answer["responses"][0]["Success"]
    assert (success["content"], success["hedged"], success["hedge_won"]) == ("fast", True, True)
    (first, _), (second, _) = _arrivals(upstream, slow)
    # The 90th percentile of local /hello answers: well under a second.
    assert second - first < 1.0


# --- A name with several addresses ---------------------------------------------


async def _warm_two_newest_to_one_address(caller: Caller, world: World) -> None:
    """
    Leave four idle keep-alive connections to ``multi.test``: one each to
    127.0.0.2 and .3, then the two newest both to 127.0.0.1 (the pool hands
    out the newest first).  Four concurrent requests dial in the DNS
    answer's rotation (.1, .2, .3, .1), and .1 answers last.
    """
    world.answers["127.0.0.1"].delay = 0.4
    world.answers["127.0.0.3"].delay = 0.1
    items = await batch(caller, world, [world.url()] * 4)
    assert statuses(items) == [200] * 4
    assert [world.accepted(a) for a in THREE] == [2, 1, 1]
    world.answers["127.0.0.1"].delay = 0.0
    world.answers["127.0.0.3"].delay = 0.0


async def _hedged_once(caller: Caller, world: World) -> dict[str, Any]:
    """One GET, hedged after 100 ms, its first attempt held 10 s at 127.0.0.1."""
    assert world.octoplex is not None
    world.answers["127.0.0.1"].delay = 10.0
    document = {
        "timeout_msec": 3000,
        "requests": [{"uri": world.url(), "hedge": {"after_msec": 100}}],
    }
    status, _, answer = await caller.post(world.octoplex.url + "/multiplex", document)
    assert status == 200, answer
    return dict(answer["responses"][0])


@pytest_twisted.ensureDeferred
async def test_the_hedge_takes_an_idle_connection_to_another_address(caller: Caller) -> None:
    """
    A first attempt goes out on the newest idle connection, to 127.0.0.1,
    which holds it; the next newest is to 127.0.0.1 as well, but the hedge
    takes an idle connection to another address of the name, opening none,
    and wins.
    """

    async def test(world: World) -> None:
        world.start(None, keep_alive=True)
        await _warm_two_newest_to_one_address(caller, world)
        outcome = await _hedged_once(caller, world)
        success = outcome.get("Success")
        assert success is not None, outcome
        assert (success["status"], success["hedged"], success["hedge_won"]) == (200, True, True)
        # The first attempt at .1, the hedge at .2 or .3, on a pooled connection.
        assert world.answers["127.0.0.1"].requests == 3
        assert world.answers["127.0.0.2"].requests + world.answers["127.0.0.3"].requests == 3
        assert [world.accepted(a) for a in THREE] == [2, 1, 1]

    await in_world(test)


@pytest_twisted.ensureDeferred
async def test_the_hedge_dials_another_address_rather_than_reuse_the_same(
    caller: Caller,
) -> None:
    """
    With idle connections only to 127.0.0.1 (the upstream closed the
    others), a hedge whose first attempt holds .1 opens a new connection to
    another address of the name rather than reuse the one to .1, and wins.
    """

    async def test(world: World) -> None:
        world.start(None, keep_alive=True)
        assert world.octoplex is not None
        await _warm_two_newest_to_one_address(caller, world)
        for address in ("127.0.0.2", "127.0.0.3"):
            for protocol in world.sites[address].connections:
                # The site builds an HTTP/1.1 or HTTP/2 chooser around its channel.
                protocol._channel.transport.loseConnection()
        await wait_until(
            lambda: (
                samples(world.metrics).get(
                    (
                        "octoplex_upstream_connections_idle",
                        (("host", f"http://multi.test:{world.port}"),),
                    )
                )
                == 2
            ),
            "the client to see .2 and .3 close",
        )
        outcome = await _hedged_once(caller, world)
        success = outcome.get("Success")
        assert success is not None, outcome
        assert (success["status"], success["hedged"], success["hedge_won"]) == (200, True, True)
        assert world.answers["127.0.0.1"].requests == 3
        assert world.accepted("127.0.0.1") == 2
        assert world.accepted("127.0.0.2") + world.accepted("127.0.0.3") == 3

    await in_world(test)


@pytest_twisted.ensureDeferred
async def test_a_name_with_one_address_is_hedged_on_another_connection(
    caller: Caller,
) -> None:
    """
    ``one.test`` has one address: the hedge goes there too, on the other
    idle connection rather than a new one.
    """

    async def test(world: World) -> None:
        octoplex = world.start(None, keep_alive=True)
        one = world.url("one.test")
        world.answers["127.0.0.1"].delay = 0.2
        items = await batch(caller, world, [one] * 2)
        assert statuses(items) == [200] * 2
        assert world.accepted("127.0.0.1") == 2
        world.answers["127.0.0.1"].delay = 0.0
        slow = _SlowFirst(world.answers["127.0.0.1"])
        world.sites["127.0.0.1"].resource = slow
        document = {"timeout_msec": 3000, "requests": [{"uri": one, "hedge": {"after_msec": 100}}]}
        status, _, answer = await caller.post(octoplex.url + "/multiplex", document)
        assert status == 200, answer
        success = answer["responses"][0]["Success"]
        assert (success["hedged"], success["hedge_won"]) == (True, True)
        assert world.accepted("127.0.0.1") == 2
        assert len(set(slow.channels)) == 2

    await in_world(test)


class _SlowFirst(Resource):
    """Hold the first request for 10 s; answer the rest at once, noting each channel."""

    isLeaf = True

    def __init__(self, answer: Resource) -> None:
        super().__init__()
        self._answer = answer
        self.channels: list[Any] = []

    def render(self, request: Request) -> Any:
        self.channels.append(request.channel)
        if len(self.channels) > 1:
            return b"ok"
        call = global_reactor.callLater(10, lambda: (request.write(b"ok"), request.finish()))
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return NOT_DONE_YET


def test_the_schema_takes_hedges_and_refuses_bad_ones() -> None:
    """The JSON Schema accepts the hedge fields and rejects malformed ones."""
    from jsonschema import ValidationError

    check_batch(
        {
            "timeout_msec": 100,
            "defaults": {"hedge": {"after_percentile": 95}, "hedge_unsafe": False},
            "requests": [{"uri": "http://a/", "hedge": {"after_msec": 20}, "hedge_unsafe": True}],
        }
    )
    for bad in (
        {"after_msec": 20, "after_percentile": 5},
        {},
        {"after_percentile": 100},
        {"after_msec": 0},
        {"after_ms": 5},
    ):
        with pytest.raises(ValidationError):
            check_batch({"timeout_msec": 100, "requests": [{"uri": "http://a/", "hedge": bad}]})


# --- Through the gRPC frontend --------------------------------------------------


@pytest.fixture(scope="module")
def grpc_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with a plain gRPC listener."""
    running = Daemon(tmp_path_factory.mktemp("grpc-hedge"), [], plain=True, tls=False)
    yield from _serving(running, grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}"))


@pytest.fixture
def stub(grpc_daemon: Daemon) -> Iterator[pb_grpc.MultiplexerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_daemon.grpc_port}") as channel:
        yield pb_grpc.MultiplexerStub(channel)


@pytest_twisted.ensureDeferred
async def test_hedges_over_grpc(stub: pb_grpc.MultiplexerStub, upstream: Upstream) -> None:
    """The hedge, its refusal for POST, its absence when not due, and the deadline, over gRPC."""
    slow = f"/first-slow/{_key()}/5000"
    after = pb.Hedge(after_msec=200)
    batch = pb.Batch(
        timeout_msec=4000,
        requests=[
            pb.Request(uri=upstream.url + slow, hedge=after),
            pb.Request(uri=upstream.url + "/hello", method="POST", hedge=after),
            pb.Request(uri=upstream.url + "/hello", hedge=pb.Hedge(after_msec=3000)),
            pb.Request(uri=upstream.url + "/hello", hedge=pb.Hedge()),
        ],
    )
    posted = global_reactor.seconds()
    hedged, post, quick, neither = (await call(stub.Multiplex, batch, metadata=())).outcomes
    assert hedged.success.content == b"fast"
    assert hedged.hedged and hedged.HasField("hedge_won") and hedged.hedge_won
    assert post.failure.kind == pb.KIND_INVALID and "hedge_unsafe" in post.failure.error
    assert quick.success.status == 200 and not quick.hedged and not quick.HasField("hedge_won")
    assert neither.failure.kind == pb.KIND_INVALID and "got neither" in neither.failure.error
    (first, _), (second, _) = _arrivals(upstream, slow)
    assert second - posted >= 0.199, (second - posted, first - posted)
    assert second - first < 2.2
    await wait_until(lambda: slow in upstream.resource.finished_early, "the loser's close")
    cut = pb.Batch(
        timeout_msec=500,
        requests=[pb.Request(uri=upstream.url + "/delay/5000", hedge=pb.Hedge(after_msec=100))],
    )
    (timed_out,) = (await call(stub.Multiplex, cut, metadata=())).outcomes
    assert timed_out.failure.kind == pb.KIND_TIMEOUT
    assert timed_out.hedged and not timed_out.HasField("hedge_won")
    await wait_until(
        lambda: upstream.resource.finished_early.count("/delay/5000") == 2, "both attempts closed"
    )


# --- With circuit breaking, retries and timings --------------------------------


class _Scripted(_Upstream):
    """
    The tests' upstream plus ``/script/<key>/<step>/...``: the n-th request
    for ``key`` does the n-th step (the last one repeats): ``<status>``
    answers at once, ``<status>@<ms>`` after ``ms`` milliseconds, ``held``
    answers 200 once the test calls :meth:`release`.  The body names the
    request's arrival and status, ``#<n> <status>``, so that a test knows
    which attempt answered.
    """

    def __init__(self) -> None:
        super().__init__()
        #: Requests seen per key.
        self.scripted: dict[str, int] = {}
        self._held: dict[str, list[Request]] = {}

    def route_script(self, request: Request, key: str, *steps: str) -> Any:
        seen = self.scripted[key] = self.scripted.get(key, 0) + 1
        step = steps[min(seen, len(steps)) - 1]
        if step == "held":
            held = self._held.setdefault(key, [])
            held.append(request)
            request.notifyFinish().addErrback(lambda _: held.remove(request))
            return NOT_DONE_YET
        status, _, msec = step.partition("@")
        request.setResponseCode(int(status))
        body = f"#{seen} {status}".encode()
        if not msec:
            return body
        call = global_reactor.callLater(int(msec) / 1000.0, self._answer, request, body)

        def gone(_: Any) -> None:
            if call.active():
                call.cancel()
                self.finished_early.append(request.path.decode())

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET

    @staticmethod
    def _answer(request: Request, body: bytes) -> None:
        request.write(body)
        request.finish()

    def release(self, key: str) -> None:
        """Answer the held requests for ``key``: 200, ``released``."""
        for request in self._held.pop(key, []):
            request.write(b"released")
            request.finish()


def _start_scripted(port_number: int = 0) -> tuple[Upstream, _Scripted]:
    """The scripted upstream on 127.0.0.1, on ``port_number`` if given."""
    resource = _Scripted()
    site = _CountingSite(resource)
    port = global_reactor.listenTCP(port_number, site, interface="127.0.0.1")
    return Upstream(f"http://127.0.0.1:{port.getHost().port}", site, resource, port), resource


@pytest_twisted.ensureDeferred
async def test_a_probe_of_a_half_open_circuit_is_not_hedged_and_hedges_resume_once_closed(
    caller: Caller, log_events: list[dict[str, Any]]
) -> None:
    """
    While a host's circuit is half-open its probe is never hedged: the
    hedge falls due while the probe is held at the upstream, and is skipped
    (``octoplex_hedges_skipped_total{reason="circuit"}``), so only the probe
    reaches the upstream and the outcome says nothing of hedging; the
    probe's answer closes the circuit, and the host's next slow request is
    hedged as usual.
    """
    cooldown = 1.0
    port = closed_port()
    host = f"http://127.0.0.1:{port}"
    metrics = Metrics()
    server = start_octoplex(
        metrics=metrics, circuits=attr.evolve(LIVE, cooldown=cooldown, max_cooldown=4 * cooldown)
    )
    listener: Upstream | None = None
    scripted: _Scripted | None = None
    answering: Deferred[Any] | None = None
    key = _key()

    def skipped() -> float:
        return _count(metrics, "octoplex_hedges_skipped_total", reason="circuit")

    def sent() -> float:
        return _count(metrics, "octoplex_hedges_sent_total")

    try:
        refused = await outcomes(caller, server, [host + "/hello"] * 4)
        assert kinds(refused) == ["connect"] * 4
        opened = global_reactor.seconds()
        assert state_of(server, host) == OPEN
        listener, scripted = _start_scripted(port)
        await wait_until(lambda: global_reactor.seconds() >= opened + cooldown, "the cool-down")

        probe = f"/script/{key}/held"
        batch = {
            "timeout_msec": 10_000,
            "requests": [{"uri": host + probe, "hedge": {"after_msec": 50}}],
        }
        answering = Deferred.fromCoroutine(caller.post(server.url + "/multiplex", batch))
        await wait_until(lambda: scripted.scripted.get(key) == 1, "the probe at the upstream")
        assert state_of(server, host) == HALF_OPEN
        # The probe is held: its hedge falls due, and is either skipped or sent.
        await wait_until(lambda: skipped() + sent() >= 1, "the hedge's turn")
        assert (skipped(), sent()) == (1, 0)
        scripted.release(key)
        _, _, answer = await answering
        success = answer["responses"][0]["Success"]
        assert (success["status"], success["content"]) == (200, "released")
        assert "hedged" not in success and "hedge_won" not in success
        assert scripted.arrivals == [probe]
        assert len(listener.site.connections) == 1
        assert state_of(server, host) == CLOSED

        # Closed: a slow first attempt to the host is hedged again.
        slow = f"/script/{_key()}/200@5000/200"
        batch = {
            "timeout_msec": 4000,
            "requests": [{"uri": host + slow, "hedge": {"after_msec": 100}}],
        }
        _, _, answer = await caller.post(server.url + "/multiplex", batch)
        hedged = answer["responses"][0]["Success"]
        assert (hedged["content"], hedged["hedged"], hedged["hedge_won"]) == ("#2 200", True, True)
        assert (skipped(), sent()) == (1, 1)
        assert state_of(server, host) == CLOSED
    finally:
        if answering is not None and not answering.called:
            # Failed while the probe was held: let its batch end.
            assert scripted is not None
            scripted.release(key)
            await answering
        await server.stop()
        if listener is not None:
            await listener.stop()
    events = [e["circuit"] for e in log_events if e.get("upstream") == host and "circuit" in e]
    assert events == ["opened", "half_open", "closed"]


@pytest_twisted.ensureDeferred
async def test_each_try_of_a_retried_request_is_hedged_on_its_own(
    hedging: Octoplex, caller: Caller, metrics: Metrics, log_events: list[dict[str, Any]]
) -> None:
    """
    With ``retry`` and ``hedge``, every try gets its own hedge: a first try
    whose hedge wins with a retryable 503 is retried, and the retry, slow
    too, is hedged again and its hedge wins; the outcome reports the last
    try (``hedged``, ``hedge_won``) and ``attempts`` counts tries, not
    hedges.  A request whose retry answers in time reports no hedge at all,
    though its first try sent one; the batch's answered event counts the
    requests that sent a hedge.
    """
    upstream, scripted = _start_scripted()
    try:
        twice = f"/script/{_key()}/200@5000/503/200@5000/200"
        once = f"/script/{_key()}/200@5000/503/200"
        retry = {"times": 2, "statuses": [503]}
        # The quick retry of `once` has its after_msec to answer in, on a
        # loaded machine, before its own hedge would go.
        _, _, answer = await caller.post(
            hedging.url + "/multiplex",
            {
                "timeout_msec": 8000,
                "requests": [
                    {"uri": upstream.url + twice, "retry": retry, "hedge": {"after_msec": 300}},
                    {"uri": upstream.url + once, "retry": retry, "hedge": {"after_msec": 1000}},
                ],
            },
        )
        hedged_twice, hedged_first = (outcome["Success"] for outcome in answer["responses"])
        # The second try's hedge (the fourth request) answered.
        assert (hedged_twice["status"], hedged_twice["content"]) == (200, "#4 200")
        assert hedged_twice["attempts"] == 2
        assert (hedged_twice["hedged"], hedged_twice["hedge_won"]) == (True, True)
        # The second try (the third request) answered in time: no hedge then.
        assert (hedged_first["status"], hedged_first["content"]) == (200, "#3 200")
        assert hedged_first["attempts"] == 2
        assert "hedged" not in hedged_first and "hedge_won" not in hedged_first
        assert [len(_arrivals(upstream, path)) for path in (twice, once)] == [4, 3]
        # Each slow first attempt lost to its hedge and was closed.
        await wait_until(
            lambda: sorted(scripted.finished_early) == sorted([twice, twice, once]),
            "the losers' close",
        )
        assert _count(metrics, "octoplex_hedges_sent_total") == 3
        assert _count(metrics, "octoplex_hedges_won_total") == 3
        assert _count(metrics, "octoplex_hedge_attempts_cancelled_total") == 3
    finally:
        await upstream.stop()
    (event,) = [e for e in log_events if "succeeded" in e and "size" in e]
    assert (event["size"], event["succeeded"], event.get("hedged")) == (2, 2, 2)


@pytest_twisted.ensureDeferred
async def test_the_timings_of_a_winning_hedge_are_the_hedges(
    hedging: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    With ``"timings": true``, a request whose hedge wins reports the hedge
    attempt's timings: it started after_msec into the item, on a new
    connection (the first attempt took the idle pooled one), and its phases
    add up within its total, itself within the outcome's duration.
    """
    # One idle pooled connection, for the first attempt.
    await caller.post(
        hedging.url + "/multiplex",
        {"timeout_msec": 4000, "requests": [{"uri": upstream.url + "/hello"}]},
    )
    ((_, _, warm),) = upstream.resource.timed
    path = f"/first-slow/{_key()}/5000"
    after = 300
    _, _, answer = await caller.post(
        hedging.url + "/multiplex",
        {
            "timeout_msec": 4000,
            "timings": True,
            "requests": [{"uri": upstream.url + path, "hedge": {"after_msec": after}}],
        },
    )
    success = answer["responses"][0]["Success"]
    assert (success["content"], success["hedged"], success["hedge_won"]) == ("fast", True, True)
    (_, first), (_, second) = _arrivals(upstream, path)
    assert first is warm and second is not warm
    timings = success["timings"]
    assert timings["reused"] is False
    assert timings["dns_msec"] is not None and timings["connect_msec"] is not None
    assert timings["ttfb_msec"] is not None and timings["body_msec"] is not None
    # The phases follow one another within the total (each rounded to 1 µs).
    phases = sum(timings[phase] or 0.0 for phase in PHASES)
    assert phases <= timings["total_msec"] + 0.01, timings
    # The hedge started after_msec into the item at the earliest, so its
    # total is at least that much under the (floored) duration: the first
    # attempt's, which started with the item, could not be.
    assert timings["total_msec"] + after <= success["duration_msec"] + 1, (timings, success)


def test_the_budget_options_set_it_and_a_reload_changes_it(tmp_path: Path) -> None:
    """The --hedge-budget-* options and [hedge] keys make the budget; a reload applies them."""
    config = tmp_path / "octoplex.toml"
    config.write_text("[hedge]\nbudget_percent = 5\n")
    options = Options(list)
    options.parseOptions(["--workers", "1", "--listen", "tcp:0", "--config", str(config)])
    root: Any = makeService(options)
    budgets = root.app.multiplexer.hedge_budgets
    budget = budgets.of("127.0.0.1")
    assert (budget.percent, budget.min_per_second) == (5, 10.0)
    config.write_text("[hedge]\nbudget_percent = 100\nbudget_min_per_second = 0.5\n")
    root.reload()
    assert root.app.multiplexer.hedge_budgets is budgets
    assert (budget.percent, budget.min_per_second) == (100, 0.5)
    with pytest.raises(UsageError, match="101"):
        Options(list).parseOptions(["--hedge-budget-percent", "101"])
    with pytest.raises(UsageError, match="-1"):
        Options(list).parseOptions(["--hedge-budget-min-per-second", "-1"])
