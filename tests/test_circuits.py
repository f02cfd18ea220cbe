"""
Circuit breaking per upstream (``--circuit-breaking``): the state machine on
a ``Clock`` (closed, open, half-open; what counts, the window, the probes,
the back-off, the bounded table), then over real sockets through Octoplex's
HTTP API and its gRPC API: a refused port opens its circuit and is then
never dialled during the cool-down, a probe closes or reopens it, the rest
of a batch is untouched, and the metrics and log events say so.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import attr
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.failure import Failure

from octoplex import circuits as circuits_module
from octoplex.circuits import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    CircuitOpen,
    Circuits,
    CircuitSettings,
    Ticket,
)
from octoplex.client import PoolSettings
from octoplex.metrics import Metrics, render_text
from octoplex.tap import Options, circuits_of, makeService

from .servers import (
    Caller,
    Octoplex,
    Upstream,
    full_backlog,
    start_octoplex,
    start_upstream,
    wait_until,
)

KEY = ("http", "127.0.0.1", 8081)
OTHER = ("http", "127.0.0.1", 8082)

#: Settings small enough to reason about: opens at 3 of 4 failing, or more.
SMALL = CircuitSettings(
    enabled=True,
    failure_ratio=0.5,
    min_requests=4,
    window=10.0,
    cooldown=5.0,
    max_cooldown=20.0,
    probes=1,
)


class Counted(Exception):
    """A failure the test's judge counts against the upstream."""


def judge(failure: Failure) -> str | None:
    """Count :class:`Counted` only, by its message."""
    return str(failure.value) if failure.check(Counted) else None


def refused() -> Failure:
    return Failure(Counted("connection refused by upstream"))


def uncounted() -> Failure:
    return Failure(ValueError("not the upstream's fault"))


def make(settings: CircuitSettings = SMALL) -> tuple[Circuits, Clock, Metrics]:
    clock = Clock()
    metrics = Metrics()
    return Circuits(clock, settings, metrics, judge), clock, metrics


def fail_times(table: Circuits, count: int, key: Any = KEY) -> None:
    for _ in range(count):
        table.admit(key).failed(refused())


def succeed_times(table: Circuits, count: int, key: Any = KEY) -> None:
    for _ in range(count):
        table.admit(key).answered(200)


def rejected(table: Circuits, key: Any = KEY) -> CircuitOpen:
    with pytest.raises(CircuitOpen) as caught:
        table.admit(key)
    return caught.value


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(render_text(metrics).decode()):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_opens_when_enough_requests_mostly_fail() -> None:
    """The failure that brings the window to min_requests at the ratio opens the circuit."""
    table, clock, _ = make()
    fail_times(table, 3)
    assert table.state(KEY) == CLOSED
    fail_times(table, 1)
    assert table.state(KEY) == OPEN
    clock.advance(0.8)
    error = rejected(table)
    assert str(error) == (
        "circuit to http://127.0.0.1:8081 is open: 4 of the 4 requests in the last 10 s "
        "failed (connection refused by upstream); next probe in 4.2 s (--circuit-cooldown)"
    )
    assert error.upstream == "http://127.0.0.1:8081"


def test_a_minority_of_failures_never_opens() -> None:
    """Failures under the ratio keep it closed, however many there are."""
    table, clock, _ = make()
    for _ in range(50):
        succeed_times(table, 2)
        fail_times(table, 1)
        clock.advance(0.05)
    assert table.state(KEY) == CLOSED


def test_too_few_requests_never_open() -> None:
    """Every request failing is not enough below min_requests in the window."""
    table, clock, _ = make()
    for _ in range(10):
        fail_times(table, 3)
        # Past the window: the three are forgotten.
        clock.advance(10.0)
    assert table.state(KEY) == CLOSED


def test_the_window_forgets_old_outcomes() -> None:
    """Successes older than the window no longer dilute the failures."""
    table, clock, _ = make()
    succeed_times(table, 20)
    clock.advance(5.0)
    fail_times(table, 10)
    assert table.state(KEY) == CLOSED
    # The successes' bucket leaves the window; the failures' does not.
    clock.advance(5.5)
    fail_times(table, 1)
    assert table.state(KEY) == OPEN


def test_uncounted_failures_say_nothing() -> None:
    """A failure the judge does not count, and a neutral end, count neither way."""
    table, _, _ = make()
    for _ in range(20):
        table.admit(KEY).failed(uncounted())
        table.admit(KEY).neutral()
    fail_times(table, 4)
    assert table.state(KEY) == OPEN


def test_5xx_counts_only_when_asked() -> None:
    """A 5xx answer is a success by default, a failure with count_5xx."""
    table, _, _ = make()
    for _ in range(10):
        table.admit(KEY).answered(503)
    assert table.state(KEY) == CLOSED
    table, _, _ = make(attr.evolve(SMALL, count_5xx=True))
    for _ in range(4):
        table.admit(KEY).answered(503)
    assert table.state(KEY) == OPEN
    assert "failed (status 503)" in str(rejected(table))


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    """After the cool-down one probe goes; the rest fail at once; its success closes."""
    table, clock, _ = make()
    fail_times(table, 4)
    clock.advance(4.9)
    rejected(table)
    clock.advance(0.1)
    probe = table.admit(KEY)
    assert table.state(KEY) == HALF_OPEN
    error = rejected(table)
    assert str(error).startswith(
        "circuit to http://127.0.0.1:8081 is half-open: waiting for its probe request "
        "(--circuit-probes 1); it opened because 4 of the 4 requests"
    )
    probe.answered(200)
    assert table.state(KEY) == CLOSED
    succeed_times(table, 5)
    # The window starts empty: three failures are not enough again.
    fail_times(table, 3)
    assert table.state(KEY) == CLOSED


def test_a_failed_probe_reopens_with_a_doubled_cooldown_up_to_the_most() -> None:
    """Each failed probe doubles the cool-down, capped; closing resets it."""
    table, clock, _ = make()
    fail_times(table, 4)
    waits = []
    for _ in range(4):
        clock.advance(30)
        table.admit(KEY).failed(refused())
        assert table.state(KEY) == OPEN
        error = str(rejected(table))
        waits.append(error.split("next probe in ")[1].split(" s")[0])
    assert waits == ["10.0", "20.0", "20.0", "20.0"]
    assert "is open: its probe request failed (connection refused by upstream)" in error
    clock.advance(30)
    table.admit(KEY).answered(200)
    fail_times(table, 4)
    assert str(rejected(table)).endswith("next probe in 5.0 s (--circuit-cooldown)")


def test_a_probe_that_says_nothing_gives_its_turn_to_the_next() -> None:
    """A probe cut short (neutral) lets the next request probe; the circuit stays half-open."""
    table, clock, _ = make()
    fail_times(table, 4)
    clock.advance(5)
    table.admit(KEY).neutral()
    assert table.state(KEY) == HALF_OPEN
    probe = table.admit(KEY)
    rejected(table)
    probe.answered(200)
    assert table.state(KEY) == CLOSED


def test_a_probe_out_for_a_whole_window_is_given_up() -> None:
    """A probe that never ends stops blocking after a window; its late outcome is ignored."""
    table, clock, _ = make()
    fail_times(table, 4)
    clock.advance(5)
    lost = table.admit(KEY)
    clock.advance(9.9)
    rejected(table)
    clock.advance(0.1)
    probe = table.admit(KEY)
    lost.failed(refused())
    assert table.state(KEY) == HALF_OPEN
    probe.answered(200)
    assert table.state(KEY) == CLOSED


def test_several_probes_must_all_succeed() -> None:
    """With probes=3, three go through, a fourth waits, and all three must succeed."""
    table, clock, _ = make(attr.evolve(SMALL, probes=3))
    fail_times(table, 4)
    clock.advance(5)
    probes = [table.admit(KEY) for _ in range(3)]
    rejected(table)
    probes[0].answered(200)
    probes[1].answered(200)
    assert table.state(KEY) == HALF_OPEN
    rejected(table)
    probes[2].failed(refused())
    assert table.state(KEY) == OPEN


def test_outcomes_of_an_earlier_state_are_ignored() -> None:
    """Requests let through while closed and ending after it opened change nothing."""
    table, clock, _ = make()
    late = [table.admit(KEY) for _ in range(5)]
    fail_times(table, 4)
    assert table.state(KEY) == OPEN
    clock.advance(5)
    probe = table.admit(KEY)
    for ticket in late:
        ticket.failed(refused())
    assert table.state(KEY) == HALF_OPEN
    probe.answered(200)
    assert table.state(KEY) == CLOSED


def test_a_ticket_counts_once() -> None:
    """Only a ticket's first outcome counts."""
    table, _, _ = make()
    ticket = table.admit(KEY)
    ticket.answered(200)
    for _ in range(4):
        ticket.failed(refused())
    fail_times(table, 3)
    # 3 failures of 4 outcomes: at the ratio, and at min_requests.
    assert table.state(KEY) == OPEN


def test_a_connection_finished_in_the_background_decides() -> None:
    """Cut short while connecting: the connection's fate counts, not the cancellation."""
    table, _, _ = make()
    for _ in range(4):
        ticket = table.admit(KEY)
        ticket.connecting()
        ticket.neutral()
        ticket.failed(Failure(Counted("ignored: the connection decides")))
        ticket.connect_given_up("connecting did not finish")
    assert table.state(KEY) == OPEN
    assert "failed (connecting did not finish)" in str(rejected(table))

    table, _, _ = make()
    for _ in range(4):
        ticket = table.admit(KEY)
        ticket.connecting()
        ticket.connect_failed(refused())
    assert table.state(KEY) == OPEN

    table, _, _ = make()
    for _ in range(8):
        ticket = table.admit(KEY)
        ticket.connecting()
        ticket.connected()
    fail_times(table, 3)
    assert table.state(KEY) == CLOSED
    for _ in range(8):
        ticket = table.admit(KEY)
        ticket.connecting()
        ticket.connect_given_up(None)
    fail_times(table, 4)
    assert table.state(KEY) == CLOSED


def test_hosts_are_judged_apart() -> None:
    """One host's failures leave another's circuit closed."""
    table, _, _ = make()
    fail_times(table, 4)
    succeed_times(table, 1, OTHER)
    assert (table.state(KEY), table.state(OTHER)) == (OPEN, CLOSED)


def test_the_table_is_bounded_and_forgets_idle_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the cap the least recently used closed circuit goes; prune drops idle hosts."""
    monkeypatch.setattr(circuits_module, "MAX_CIRCUITS", 3)
    table, clock, _ = make()
    fail_times(table, 4)
    for port in range(9000, 9005):
        succeed_times(table, 1, ("http", "127.0.0.1", port))
    assert len(table) == 3
    # The open circuit was kept over the closed ones.
    assert table.state(KEY) == OPEN
    clock.advance(10)
    assert table.prune() == 2
    assert len(table) == 1
    clock.advance(SMALL.max_cooldown)
    assert table.prune() == 1
    assert len(table) == 0


def test_reconfigure_keeps_states_and_applies_thresholds() -> None:
    """New settings keep an open circuit open; a new window empties the windows."""
    table, _, _ = make()
    fail_times(table, 4)
    fail_times(table, 3, OTHER)
    table.reconfigure(attr.evolve(SMALL, min_requests=3))
    assert table.state(KEY) == OPEN
    fail_times(table, 1, OTHER)
    assert table.state(OTHER) == OPEN
    third = ("http", "127.0.0.1", 8083)
    fail_times(table, 2, third)
    table.reconfigure(attr.evolve(SMALL, min_requests=3, window=20.0))
    fail_times(table, 2, third)
    assert table.state(third) == CLOSED
    fail_times(table, 1, third)
    assert table.state(third) == OPEN


def test_metrics_count_openings_rejections_and_states() -> None:
    """octoplex_circuit_state is one-hot per host; opened and rejected count per host."""
    table, clock, metrics = make()
    metrics.circuit_source = table.states
    fail_times(table, 4)
    succeed_times(table, 1, OTHER)
    rejected(table)
    rejected(table)
    clock.advance(5)
    table.admit(KEY).failed(refused())
    found = samples(metrics)
    host, other = "http://127.0.0.1:8081", "http://127.0.0.1:8082"

    def value(name: str, **labels: str) -> float:
        return found.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("octoplex_circuit_opened_total", host=host) == 2
    assert value("octoplex_circuit_rejected_total", host=host) == 2
    assert value("octoplex_circuit_rejected_total", host=other) == 0
    states = {
        (labels["host"], labels["state"]): v
        for (name, pairs), v in found.items()
        if name == "octoplex_circuit_state"
        for labels in [dict(pairs)]
    }
    assert states == {
        (host, "closed"): 0,
        (host, "open"): 1,
        (host, "half_open"): 0,
        (other, "closed"): 1,
        (other, "open"): 0,
        (other, "half_open"): 0,
    }


def test_log_events_name_the_upstream_and_what_happened(log_events: list[dict[str, Any]]) -> None:
    """Opened, half-open, reopened and closed are each one structured event."""
    table, clock, _ = make()
    fail_times(table, 4)
    clock.advance(5)
    table.admit(KEY).failed(refused())
    clock.advance(10)
    table.admit(KEY).answered(200)
    events = [e for e in log_events if "circuit" in e and "upstream" in e]
    assert [(e["circuit"], e["log_level"].name) for e in events] == [
        ("opened", "warn"),
        ("half_open", "info"),
        ("reopened", "warn"),
        ("half_open", "info"),
        ("closed", "info"),
    ]
    assert all(e["upstream"] == "http://127.0.0.1:8081" for e in events)
    opened = events[0]
    assert (opened["failed"], opened["requests"], opened["cooldown"]) == (4, 4, 5.0)
    assert opened["reason"] == "connection refused by upstream"
    assert events[2]["cooldown"] == 10.0


def test_ipv6_hosts_are_bracketed() -> None:
    """An IPv6 upstream is named as in a URI."""
    table, _, _ = make()
    fail_times(table, 4, ("https", "::1", 8443))
    assert str(rejected(table, ("https", "::1", 8443))).startswith("circuit to https://[::1]:8443 ")


def test_tickets_are_small() -> None:
    """A ticket holds four slots and no dict."""
    table, _, _ = make()
    ticket = table.admit(KEY)
    assert isinstance(ticket, Ticket)
    assert not hasattr(ticket, "__dict__")


# Over real sockets: Octoplex's HTTP API, wired as the tap wires it.

#: Seconds of the cool-down in the tests over sockets: far longer than a
#: batch of failed-fast items takes, even on a loaded machine.
COOLDOWN = 3.0

LIVE = attr.evolve(SMALL, cooldown=COOLDOWN, max_cooldown=4 * COOLDOWN)


def closed_port() -> int:
    """A port of 127.0.0.1 with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def batch(uris: list[str], timeout_msec: int = 3000) -> dict[str, Any]:
    return {"timeout_msec": timeout_msec, "requests": [{"uri": uri} for uri in uris]}


async def outcomes(
    caller: Caller, server: Octoplex, uris: list[str], timeout_msec: int = 3000
) -> list[dict[str, Any]]:
    """Run a batch of GETs; each outcome's Success or Failure object, in order."""
    status, _, body = await caller.post(server.url + "/multiplex", batch(uris, timeout_msec))
    assert status == 200, body
    return [outcome.get("Success") or outcome["Failure"] for outcome in body["responses"]]


def kinds(items: list[dict[str, Any]]) -> list[str]:
    return [item.get("kind", "success") for item in items]


def key_of(url: str) -> tuple[str, str, int]:
    host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
    return ("http", host, int(port))


def state_of(server: Octoplex, url: str) -> str:
    circuits = server.client.circuits
    assert circuits is not None
    return circuits.state(key_of(url))


@pytest_twisted.ensureDeferred
async def test_a_refused_port_opens_and_is_not_dialled_until_a_probe_closes_it(
    upstream: Upstream, caller: Caller, log_events: list[dict[str, Any]]
) -> None:
    """
    Refused requests open the circuit; then requests to the port fail at
    once, none reaching the listener opened there meanwhile, the rest of
    the batch untouched; after the cool-down exactly one probe goes, and
    its success closes the circuit: traffic flows.  The metrics and the log
    event say so.
    """
    port = closed_port()
    dead = f"http://127.0.0.1:{port}/hello"
    metrics = Metrics()
    server = start_octoplex(metrics=metrics, circuits=LIVE)
    listener = None
    try:
        assert kinds(await outcomes(caller, server, [dead] * 4)) == ["connect"] * 4
        opened = reactor.seconds()
        assert state_of(server, dead) == OPEN

        # A listener that counts the connections it accepts, on that port.
        listener = start_upstream(port)
        items = await outcomes(caller, server, [dead, dead, upstream.url + "/hello", dead])
        assert kinds(items) == ["circuit_open", "circuit_open", "success", "circuit_open"]
        assert items[2]["content"] == "Hello world!"
        for item in items[:2] + items[3:]:
            assert item["error"].startswith(
                f"circuit to http://127.0.0.1:{port} is open: 4 of the 4 requests in the "
                "last 10 s failed (connection refused by upstream); next probe in "
            ), item
            assert item["error"].endswith(" s (--circuit-cooldown)")
            assert item["duration_msec"] < 100
        assert listener.site.connections == []
        status, _, text = await caller.get(server.url + "/metrics")
        assert status == 200

        # After the cool-down, one probe: the first item; the rest wait.
        await wait_until(lambda: reactor.seconds() >= opened + COOLDOWN, "the cool-down")
        items = await outcomes(caller, server, [dead] * 3)
        assert kinds(items) == ["success", "circuit_open", "circuit_open"]
        assert items[1]["error"].startswith(
            f"circuit to http://127.0.0.1:{port} is half-open: waiting for its probe request"
        )
        assert len(listener.site.connections) == 1
        assert listener.resource.arrivals == ["/hello"]
        assert state_of(server, dead) == CLOSED
        assert kinds(await outcomes(caller, server, [dead] * 3)) == ["success"] * 3
    finally:
        await server.stop()
        if listener is not None:
            await listener.stop()

    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    host = f"http://127.0.0.1:{port}"
    assert found["octoplex_circuit_state", (("host", host), ("state", "open"))] == 1
    assert found["octoplex_circuit_state", (("host", host), ("state", "closed"))] == 0
    assert found["octoplex_circuit_opened_total", (("host", host),)] == 1
    assert found["octoplex_circuit_rejected_total", (("host", host),)] == 3
    items_key = ("octoplex_items_total", (("cause", "circuit_open"), ("outcome", "failure")))
    assert found[items_key] == 3
    events = [e for e in log_events if e.get("upstream") == host and "circuit" in e]
    assert [e["circuit"] for e in events] == ["opened", "half_open", "closed"]
    assert events[0]["reason"] == "connection refused by upstream"


@pytest_twisted.ensureDeferred
async def test_a_failing_probe_reopens_for_longer(
    caller: Caller, log_events: list[dict[str, Any]]
) -> None:
    """A probe that is refused again reopens the circuit, its cool-down doubled."""
    dead = f"http://127.0.0.1:{closed_port()}/"
    server = start_octoplex(circuits=LIVE)
    try:
        await outcomes(caller, server, [dead] * 4)
        opened = reactor.seconds()
        await wait_until(lambda: reactor.seconds() >= opened + COOLDOWN, "the cool-down")
        items = await outcomes(caller, server, [dead] * 2)
        assert kinds(items) == ["connect", "circuit_open"]
        assert state_of(server, dead) == OPEN
        (item,) = await outcomes(caller, server, [dead])
    finally:
        await server.stop()
    assert item["kind"] == "circuit_open"
    assert "is open: its probe request failed (connection refused by upstream)" in item["error"]
    wait = float(item["error"].split("next probe in ")[1].split(" s")[0])
    assert COOLDOWN < wait <= 2 * COOLDOWN
    assert [e["circuit"] for e in log_events if "circuit" in e and "upstream" in e] == [
        "opened",
        "half_open",
        "reopened",
    ]


@pytest_twisted.ensureDeferred
async def test_connect_timeouts_open_it_and_then_cost_nothing(
    upstream: Upstream, caller: Caller
) -> None:
    """
    A port that never answers a SYN: its requests each wait out the connect
    timeout, then, once the circuit is open, fail in no time while the
    rest of the batch is answered.
    """
    server = start_octoplex(pool=PoolSettings(connect_timeout=0.3), circuits=LIVE)
    try:
        with full_backlog() as port:
            hole = f"http://127.0.0.1:{port}/"
            slow = await outcomes(caller, server, [hole] * 4)
            fast = await outcomes(caller, server, [hole, hole, upstream.url + "/hello"])
    finally:
        await server.stop()
    assert kinds(slow) == ["connect"] * 4
    assert all(item["duration_msec"] >= 300 for item in slow), slow
    assert kinds(fast) == ["circuit_open", "circuit_open", "success"]
    assert "failed (connecting to upstream timed out)" in fast[0]["error"]
    assert all(item["duration_msec"] < 100 for item in fast[:2]), fast


@pytest_twisted.ensureDeferred
async def test_connects_that_outlast_the_deadline_open_it(caller: Caller) -> None:
    """
    Requests cut short by their deadline while connecting say nothing
    themselves; their connections, given up after --pool-connect-grace,
    open the circuit.
    """
    server = start_octoplex(pool=PoolSettings(connect_grace=0.3), circuits=LIVE)
    try:
        with full_backlog() as port:
            hole = f"http://127.0.0.1:{port}/"
            cut = await outcomes(caller, server, [hole] * 4, timeout_msec=200)
            assert state_of(server, hole) == CLOSED
            await wait_until(lambda: state_of(server, hole) == OPEN, "the circuit to open")
            (item,) = await outcomes(caller, server, [hole])
    finally:
        await server.stop()
    assert kinds(cut) == ["timeout"] * 4
    assert item["kind"] == "circuit_open"
    assert (
        "4 of the 4 requests in the last 10 s failed (connecting did not finish within the "
        "deadline and 0.3 s more (--pool-connect-grace))"
    ) in item["error"]


class _Choosy(Protocol):
    """
    An upstream that answers ``/ok`` with 200 and resets the connection of
    any other request, one request per connection.
    """

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if data.startswith(b"GET /ok "):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n")
            self.transport.write(b"\r\nok")
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_a_host_failing_a_minority_of_requests_never_opens(caller: Caller) -> None:
    """One request in three reset, over and over: the circuit stays closed."""
    factory = Factory.forProtocol(_Choosy)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    server = start_octoplex(circuits=LIVE)
    try:
        seen = []
        for _ in range(10):
            seen += kinds(await outcomes(caller, server, [base + "/ok"] * 2))
            seen += kinds(await outcomes(caller, server, [base + "/reset"]))
        assert state_of(server, base) == CLOSED
    finally:
        await server.stop()
        await port.stopListening()
    assert seen == ["success", "success", "connection"] * 10


@pytest_twisted.ensureDeferred
async def test_the_callers_deadline_cutting_slow_answers_does_not_open_it(
    upstream: Upstream, caller: Caller
) -> None:
    """Requests cut short by their deadline while the upstream thinks count for nothing."""
    server = start_octoplex(circuits=LIVE)
    try:
        for _ in range(3):
            items = await outcomes(caller, server, [upstream.url + "/delay/3000"] * 4, 150)
            assert kinds(items) == ["timeout"] * 4
        assert state_of(server, upstream.url) == CLOSED
        assert kinds(await outcomes(caller, server, [upstream.url + "/hello"])) == ["success"]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_requests_queued_for_a_connection_slot_count_too(
    upstream: Upstream, caller: Caller
) -> None:
    """
    Behind --pool-max-per-host 1, the queued requests' refusals count (the
    circuit opens), and those still queued at their deadline count for
    nothing.
    """
    dead = f"http://127.0.0.1:{closed_port()}/"
    server = start_octoplex(pool=PoolSettings(max_per_host=1), circuits=LIVE)
    try:
        slow = await outcomes(caller, server, [upstream.url + "/delay/3000"] * 4, 150)
        assert kinds(slow) == ["timeout"] + ["queue_timeout"] * 3
        assert state_of(server, upstream.url) == CLOSED
        assert kinds(await outcomes(caller, server, [dead] * 4)) == ["connect"] * 4
        assert state_of(server, dead) == OPEN
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_off_by_default(caller: Caller) -> None:
    """With the default settings nothing is ever circuit_open, and the tap leaves it off."""
    dead = f"http://127.0.0.1:{closed_port()}/"
    server = start_octoplex()
    try:
        assert server.client.circuits is None
        for _ in range(3):
            assert kinds(await outcomes(caller, server, [dead] * 6)) == ["connect"] * 6
    finally:
        await server.stop()
    options = Options(list)
    options.parseOptions([])
    assert circuits_of(options) == CircuitSettings()
    assert not CircuitSettings().enabled


def test_a_reload_turns_it_on_and_off(tmp_path: Path) -> None:
    """SIGHUP's reload applies the [circuit] keys to the running client."""
    config = tmp_path / "octoplex.toml"
    config.write_text("[circuit]\nbreaking = 'on'\nmin_requests = 3\ncooldown = 2.5\n")
    options = Options(list)
    options.parseOptions(["--workers", "1", "--listen", "tcp:0", "--config", str(config)])
    root: Any = makeService(options)
    circuits = root.client.circuits
    assert circuits is not None
    assert (circuits.settings.min_requests, circuits.settings.cooldown) == (3, 2.5)
    config.write_text("[circuit]\nbreaking = 'on'\nmin_requests = 7\n")
    root.reload()
    assert root.client.circuits is circuits
    assert (circuits.settings.min_requests, circuits.settings.cooldown) == (7, 5.0)
    config.write_text("")
    root.reload()
    assert root.client.circuits is None


def test_bad_circuit_settings_are_usage_errors() -> None:
    """A ratio out of range, a cool-down above its maximum, or not on/off stop start-up."""
    for argv, message in [
        (["--circuit-failure-ratio", "1.5"], "'1.5' must be above 0 and at most 1"),
        (["--circuit-failure-ratio", "0"], "'0' must be above 0 and at most 1"),
        (["--circuit-breaking", "yes"], "'yes' is neither on nor off"),
        (["--circuit-cooldown", "90"], "--circuit-cooldown 90.0 is above --circuit-max-cooldown"),
    ]:
        with pytest.raises(usage.UsageError, match=re.escape(message)):
            Options(list).parseOptions(argv)


@pytest_twisted.ensureDeferred
async def test_grpc_answers_kind_circuit_open(tmp_path: Path) -> None:
    """Through the gRPC frontend, a request failed at once is KIND_CIRCUIT_OPEN."""
    import grpc

    from octoplex.v1 import multiplexer_pb2 as pb
    from octoplex.v1 import multiplexer_pb2_grpc as pb_grpc

    from .test_grpc import Daemon, call, wait_serving

    dead = f"http://127.0.0.1:{closed_port()}/"
    options = ["--circuit-breaking", "on", "--circuit-min-requests", "2"]
    options += ["--circuit-cooldown", "60", "--circuit-max-cooldown", "60"]
    daemon = Daemon(tmp_path, options, plain=True, tls=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
            wait_serving(daemon, channel)
            stub = pb_grpc.MultiplexerStub(channel)
            request = pb.Batch(timeout_msec=3000, requests=[pb.Request(uri=dead)] * 2)
            first = await call(stub.Multiplex, request, metadata=())
            second = await call(stub.Multiplex, request, metadata=())
    finally:
        daemon.stop()
    assert daemon.errors() == []
    assert [o.failure.kind for o in first.outcomes] == [pb.KIND_CONNECT] * 2
    assert [o.failure.kind for o in second.outcomes] == [pb.KIND_CIRCUIT_OPEN] * 2
    assert second.outcomes[0].failure.error.startswith(
        f"circuit to {dead.rstrip('/')} is open: 2 of the 2 requests"
    )
    opened = [e for e in daemon.events() if e.get("circuit") == "opened"]
    assert [e["upstream"] for e in opened] == [dead.rstrip("/")]
