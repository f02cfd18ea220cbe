"""
The multiplexer's fan-out and deadline, on a fake clock with an upstream
client whose answers the test controls: no sockets, no real time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from random import random
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from octoplex.client import UpstreamResponse
from octoplex.errors import kind_of
from octoplex.limits import Limits
from octoplex.metrics import Metrics, render_text
from octoplex.multiplexer import Multiplexer, retry_after
from octoplex.wire import Batch, UpstreamRequest, parse_batch


class ControlledClient:
    """
    An upstream client whose every request waits until the test answers it.
    """

    def __init__(self) -> None:
        self.sent: list[UpstreamRequest] = []
        self.pending: list[Deferred[UpstreamResponse]] = []
        self.cancelled: list[str] = []

    def fetch(self, request: UpstreamRequest, budget: Any = None) -> Deferred[UpstreamResponse]:
        def cancel(_: Deferred[UpstreamResponse]) -> None:
            self.cancelled.append(request.uri)

        self.sent.append(request)
        d: Deferred[UpstreamResponse] = Deferred(cancel)
        self.pending.append(d)
        return d

    def answer(self, index: int, body: bytes = b"ok", status: int = 200) -> None:
        self.pending[index].callback(UpstreamResponse(status, Headers(), body))


def _batch(timeout_msec: int, *uris: str) -> Batch:
    document = {"timeout_msec": timeout_msec, "requests": [{"uri": uri} for uri in uris]}
    return parse_batch(json.dumps(document).encode(), Limits())


def _run(
    batch: Batch, rng: Callable[[], float] = random
) -> tuple[Clock, ControlledClient, Deferred[Any], list[Any]]:
    clock = Clock()
    client = ControlledClient()
    d = Multiplexer(clock, client, rng=rng).run(batch, "test-batch")
    results: list[Any] = []
    d.addBoth(results.append)
    return clock, client, d, results


def test_outcomes_keep_request_order() -> None:
    """Answers that arrive in reverse order are reported in request order, with durations."""
    clock, client, _, results = _run(
        _batch(1000, "http://a.test/1", "http://a.test/2", "http://a.test/3")
    )
    for index in (2, 1, 0):
        clock.advance(0.010)
        client.answer(index, body=f"answer {index}".encode())
    [result] = results
    contents = [o["Success"]["content"] for o in result.outcomes]
    assert contents == ["answer 0", "answer 1", "answer 2"]
    assert [o["Success"]["duration_msec"] for o in result.outcomes] == [30, 20, 10]
    assert (result.succeeded, result.failed, result.timed_out) == (3, 0, 0)
    assert clock.getDelayedCalls() == []


def test_deadline_times_out_and_cancels_what_is_left() -> None:
    """At the deadline the unanswered requests fail as timeouts and are cancelled."""
    clock, client, _, results = _run(_batch(250, "http://a.test/fast", "http://a.test/slow"))
    clock.advance(0.1)
    client.answer(0)
    assert results == []
    clock.advance(0.15)
    [result] = results
    assert result.outcomes[0]["Success"]["duration_msec"] == 100
    assert result.outcomes[1] == {
        "Failure": {"error": "timeout elapsed", "kind": "timeout", "duration_msec": 250}
    }
    assert client.cancelled == ["http://a.test/slow"]
    assert (result.succeeded, result.failed, result.timed_out) == (1, 0, 1)
    assert clock.getDelayedCalls() == []


def test_deadline_cancels_a_request_reading_its_body() -> None:
    """A request past its headers, waiting on its body, is cancelled at the deadline too."""
    clock = Clock()
    body_cancelled: list[bool] = []

    class BodyStage:
        def fetch(self, request: UpstreamRequest, budget: Any = None) -> Deferred[UpstreamResponse]:
            body: Deferred[UpstreamResponse] = Deferred(lambda _: body_cancelled.append(True))
            # Headers have arrived: the request's Deferred now waits on the body's.
            return succeed(None).addCallback(lambda _: body)

    results: list[Any] = []
    Multiplexer(clock, BodyStage()).run(_batch(100, "http://a.test/"), "b").addBoth(results.append)
    clock.advance(0.1)
    assert body_cancelled == [True]
    assert results[0].outcomes[0]["Failure"]["error"] == "timeout elapsed"


def test_invalid_requests_fail_alone_without_being_sent() -> None:
    """An invalid request fails with duration 0 and is never sent; the rest run."""
    clock, client, _, results = _run(_batch(1000, "ftp://a/", "http://a.test/ok"))
    assert [r.uri for r in client.sent] == ["http://a.test/ok"]
    clock.advance(0.5)
    client.answer(0)
    [result] = results
    assert result.outcomes[0]["Failure"]["duration_msec"] == 0
    assert "ftp" in result.outcomes[0]["Failure"]["error"]
    assert result.outcomes[1]["Success"]["duration_msec"] == 500
    assert (result.succeeded, result.failed) == (1, 1)


def test_a_fetch_that_raises_fails_that_request_alone() -> None:
    """A client that raises while building one request fails only that request."""
    clock = Clock()

    class Picky:
        def fetch(self, request: UpstreamRequest, budget: Any = None) -> Deferred[UpstreamResponse]:
            if request.uri.endswith("bad"):
                raise ValueError("cannot build this one")
            return succeed(UpstreamResponse(204, Headers(), b""))

    results: list[Any] = []
    batch = _batch(1000, "http://a.test/bad", "http://a.test/good")
    Multiplexer(clock, Picky()).run(batch, "b").addBoth(results.append)
    [result] = results
    assert result.outcomes[0] == {
        "Failure": {
            "error": "ValueError: cannot build this one",
            "kind": "invalid",
            "duration_msec": 0,
        }
    }
    assert result.outcomes[1]["Success"]["status"] == 204
    assert clock.getDelayedCalls() == []


def test_an_outcome_that_cannot_be_built_fails_that_request_alone(
    log_events: list[dict[str, Any]],
) -> None:
    """
    A bug while building one request's outcome is logged and that request
    alone fails as an internal error; its neighbour is answered as usual.
    """
    clock, client, _, results = _run(_batch(1000, "http://a.test/bad", "http://a.test/good"))
    # Not a Headers: building the outcome raises.
    client.pending[0].callback(UpstreamResponse(200, object(), b"x"))  # type: ignore[arg-type]
    client.answer(1, body=b"fine")
    [result] = results
    assert result.outcomes[0] == {
        "Failure": {
            "error": "internal error in Octoplex; see its log",
            "kind": "internal",
            "duration_msec": 0,
        }
    }
    assert result.outcomes[1]["Success"]["content"] == "fine"
    assert (result.succeeded, result.failed) == (1, 1)
    bugs = [e for e in log_events if "log_failure" in e]
    assert [e["index"] for e in bugs] == [0]
    for event in bugs:
        event["expected_failure"] = True
    assert clock.getDelayedCalls() == []


def test_upstream_failure_is_explained() -> None:
    """A failed request becomes a Failure whose error explains it, at its own time."""
    clock, client, _, results = _run(_batch(1000, "http://a.test/"))
    clock.advance(0.003)
    client.pending[0].errback(Failure(ConnectionRefusedError()))
    assert results[0].outcomes == [
        {
            "Failure": {
                "error": "connection refused by upstream",
                "kind": "connect",
                "duration_msec": 3,
            }
        }
    ]


def test_caller_departure_cancels_everything() -> None:
    """Cancelling the batch (the caller hung up) cancels every request and the deadline."""
    clock, client, d, results = _run(_batch(1000, "http://a.test/1", "http://a.test/2"))
    client.answer(0)
    d.cancel()
    assert client.cancelled == ["http://a.test/2"]
    [failure] = results
    assert isinstance(failure, Failure) and failure.check(CancelledError)
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("timeout_msec", [0, 1, 3_600_000])
def test_deadline_is_scheduled_at_the_batch_timeout(timeout_msec: int) -> None:
    """The deadline is exactly timeout_msec after the batch starts."""
    clock, _, _, results = _run(_batch(timeout_msec, "http://a.test/"))
    [call] = clock.getDelayedCalls()
    assert call.getTime() == pytest.approx(timeout_msec / 1000.0)
    clock.advance(timeout_msec / 1000.0)
    assert results[0].timed_out == 1


def test_deadline_answers_even_if_a_cancellation_is_slow() -> None:
    """A request whose cancellation does not settle it at once does not delay the answer."""
    clock = Clock()
    results: list[Any] = []
    batch = _batch(100, "http://a.test/")
    # Deferred.cancel always settles a Deferred; a request stuck in a
    # broken canceller is one whose cancel does nothing.
    stuck_cancel: list[bool] = []

    class Swallow:
        def fetch(self, request: UpstreamRequest, budget: Any = None) -> Deferred[UpstreamResponse]:
            d: Deferred[UpstreamResponse] = Deferred()
            d.cancel = lambda: stuck_cancel.append(True)  # type: ignore[method-assign]
            return d

    Multiplexer(clock, Swallow()).run(batch, "b").addBoth(results.append)
    clock.advance(0.1)
    assert stuck_cancel == [True]
    assert results[0].outcomes == [
        {"Failure": {"error": "timeout elapsed", "kind": "timeout", "duration_msec": 100}}
    ]
    assert clock.getDelayedCalls() == []


class SlowToSend(ControlledClient):
    """
    A client whose every send takes 20 ms of the clock (TLS set-up, a
    loaded core): the deadline must not wait for the sends.
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def fetch(self, request: UpstreamRequest, budget: Any = None) -> Deferred[UpstreamResponse]:
        # Time passes, but no timed call can run in the middle of a send.
        self.clock.rightNow += 0.02
        return super().fetch(request, budget)


def test_the_deadline_counts_from_the_batch_arrival_not_the_last_send() -> None:
    """
    A batch that arrived 30 ms before it ran, with five sends of 20 ms each,
    is answered at 100 ms after its arrival: not 100 ms after the last send.
    """
    clock = Clock()
    clock.advance(5.0)
    arrived = clock.seconds()
    clock.advance(0.03)  # reading and parsing the batch
    batch = _batch(100, *[f"http://a.test/{n}" for n in range(5)])
    results: list[Any] = []
    Multiplexer(clock, SlowToSend(clock)).run(batch, "b", arrived).addBoth(results.append)
    assert clock.seconds() - arrived == pytest.approx(0.13)  # past the deadline already
    assert results == []
    clock.advance(0)
    (result,) = results
    assert [o["Failure"]["error"] for o in result.outcomes] == ["timeout elapsed"] * 5
    # 130 ms, less float rounding.
    assert all(129 <= o["Failure"]["duration_msec"] <= 130 for o in result.outcomes)
    # One that arrived just now, sent in 100 ms, is cut at 100 ms exactly.
    results.clear()
    start = clock.seconds()
    Multiplexer(clock, SlowToSend(clock)).run(batch, "b").addBoth(results.append)
    assert results == []
    clock.advance(0.001)  # float sums: 5 x 0.02 may land a hair past 0.1
    assert clock.seconds() - start == pytest.approx(0.101)
    assert len(results) == 1


def _items(timeout_msec: int, *items: dict[str, Any], **fields: Any) -> Batch:
    document = {"timeout_msec": timeout_msec, "requests": list(items), **fields}
    return parse_batch(json.dumps(document).encode(), Limits())


def test_a_request_timeout_cuts_off_that_request_alone() -> None:
    """
    A request's own timeout_msec fires on the clock, cancels it alone, and
    its timer goes; the batch waits for the rest.
    """
    clock, client, _, results = _run(
        _items(
            1000,
            {"uri": "http://a.test/short", "timeout_msec": 100, "id": "s"},
            {"uri": "http://a.test/other"},
        )
    )
    clock.advance(0.1)
    assert client.cancelled == ["http://a.test/short"]
    assert results == []
    clock.advance(0.2)
    client.answer(1)
    [result] = results
    assert result.outcomes[0] == {
        "Failure": {
            "error": "timeout elapsed (the request's own timeout_msec of 100)",
            "kind": "timeout",
            "duration_msec": 100,
            "id": "s",
        }
    }
    assert result.outcomes[1]["Success"]["duration_msec"] == 300
    assert (result.succeeded, result.timed_out) == (1, 1)
    assert clock.getDelayedCalls() == []


def test_a_request_timeout_is_stopped_by_its_answer_and_capped_by_the_batch() -> None:
    """
    An answer before its own deadline stops that timer; a timeout_msec at
    or over the batch's sets none (the batch's deadline comes first).
    """
    clock, client, _, results = _run(
        _items(
            500,
            {"uri": "http://a.test/answered", "timeout_msec": 400},
            {"uri": "http://a.test/longer", "timeout_msec": 900},
        )
    )
    # The batch deadline and one request timer, no more.
    assert len(clock.getDelayedCalls()) == 2
    client.answer(0)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.5)
    [result] = results
    assert result.outcomes[1]["Failure"] == {
        "error": "timeout elapsed",
        "kind": "timeout",
        "duration_msec": 500,
    }
    assert clock.getDelayedCalls() == []


def test_a_caller_leaving_stops_the_request_timers() -> None:
    """Cancelling the batch stops every request's own timer too."""
    clock, _, d, results = _run(_items(1000, {"uri": "http://a.test/1", "timeout_msec": 200}))
    d.cancel()
    assert clock.getDelayedCalls() == []
    assert results[0].check(CancelledError)


def test_max_parallel_sends_each_request_when_one_before_it_settles() -> None:
    """max_parallel 2: two sent at once, the third when one of them is answered."""
    clock, client, _, results = _run(
        _items(1000, *({"uri": f"http://a.test/{n}"} for n in range(3)), max_parallel=2)
    )
    assert [r.uri for r in client.sent] == ["http://a.test/0", "http://a.test/1"]
    clock.advance(0.01)
    client.answer(1)
    assert [r.uri for r in client.sent][-1] == "http://a.test/2"
    client.answer(0)
    client.answer(2)
    [result] = results
    assert result.succeeded == 3
    assert clock.getDelayedCalls() == []


def test_max_parallel_at_the_deadline_and_on_departure_sends_nothing_more() -> None:
    """
    At the deadline the sent request times out and the waiting ones fail
    as never sent, without being sent; a departed caller frees no turn.
    """
    items = [{"uri": f"http://a.test/{n}", "id": str(n)} for n in range(3)]
    clock, client, _, results = _run(_items(100, *items, max_parallel=1))
    clock.advance(0.1)
    [result] = results
    assert [r.uri for r in client.sent] == ["http://a.test/0"]
    assert result.outcomes[0]["Failure"]["kind"] == "timeout"
    assert [o["Failure"]["kind"] for o in result.outcomes[1:]] == ["queue_timeout"] * 2
    assert result.outcomes[2]["Failure"] == {
        "error": "timeout elapsed before its turn came (max_parallel 1); "
        "the request was never sent",
        "kind": "queue_timeout",
        "duration_msec": 100,
        "id": "2",
    }
    assert clock.getDelayedCalls() == []

    clock, client, d, results = _run(_items(100, *items, max_parallel=1))
    d.cancel()
    assert [r.uri for r in client.sent] == ["http://a.test/0"]
    assert clock.getDelayedCalls() == []


def test_retry_after_reads_seconds_and_dates() -> None:
    """RFC 9110's two forms, and nothing for a value that is neither."""
    now = 1_000_000_000.0  # 2001-09-09T01:46:40Z

    def after(value: bytes) -> float | None:
        return retry_after(Headers({b"retry-after": [value]}), now)

    assert after(b"3") == 3.0
    assert after(b"Sun, 09 Sep 2001 01:46:50 GMT") == 10.0
    assert after(b"Sun, 09 Sep 2001 01:00:00 GMT") == 0.0
    assert after(b"soon") is None
    assert retry_after(Headers(), now) is None


def test_a_retry_backs_off_with_jitter_and_counts_its_attempts() -> None:
    """
    With the random draw fixed at 0.5, the first retry waits 5 ms and the
    second 10 ms (full jitter over 10 ms, doubling); the answer says 3.
    """
    clock, client, _, results = _run(
        _items(1000, {"uri": "http://a.test/", "retry": {"times": 2, "statuses": [503]}}),
        rng=lambda: 0.5,
    )
    client.answer(0, status=503)
    clock.advance(0.0049)
    assert len(client.sent) == 1
    clock.advance(0.0001)
    assert len(client.sent) == 2
    client.answer(1, status=503)
    clock.advance(0.01)
    assert len(client.sent) == 3
    client.answer(2, body=b"done")
    [result] = results
    assert result.outcomes[0]["Success"]["content"] == "done"
    assert result.outcomes[0]["Success"]["attempts"] == 3
    assert clock.getDelayedCalls() == []


def test_the_deadline_cuts_off_a_retried_attempt() -> None:
    """The deadline cancels the attempt in flight; the Failure counts the attempts."""
    clock, client, _, results = _run(
        _items(1000, {"uri": "http://a.test/", "retry": {"times": 2, "statuses": [429]}}),
        rng=lambda: 0.0,
    )
    client.pending[0].callback(
        UpstreamResponse(429, Headers({b"retry-after": [b"0"]}), b"slow down")
    )
    assert results == [] and len(client.sent) == 1
    clock.advance(0)
    assert len(client.sent) == 2
    clock.advance(1.0)
    [result] = results
    assert result.outcomes[0]["Failure"]["kind"] == "timeout"
    assert result.outcomes[0]["Failure"]["attempts"] == 2
    assert clock.getDelayedCalls() == []


def test_a_caller_leaving_during_a_backoff_stops_the_retries() -> None:
    """Waiting out a Retry-After of 1 s when the caller leaves: nothing is sent again."""
    clock, client, d, results = _run(
        _items(3000, {"uri": "http://a.test/", "retry": {"times": 2, "statuses": [503]}}),
        rng=lambda: 0.0,
    )
    client.pending[0].callback(UpstreamResponse(503, Headers({b"retry-after": [b"1"]}), b"busy"))
    clock.advance(0.5)
    d.cancel()
    clock.advance(1.0)
    assert len(client.sent) == 1
    assert results[0].check(CancelledError)
    assert clock.getDelayedCalls() == []


def test_a_departed_callers_requests_are_of_kind_cancelled() -> None:
    """
    The caller never reads them, so kind cancelled shows where an operator
    looks: the items' statistics, under that cause.
    """
    metrics = Metrics()
    clock, client = Clock(), ControlledClient()
    d = Multiplexer(clock, client, metrics=metrics).run(
        _batch(1000, "http://a.test/1", "http://a.test/2"), "b"
    )
    d.addErrback(lambda f: f.trap(CancelledError))
    client.answer(0)
    d.cancel()
    text = render_text(metrics).decode()
    assert 'octoplex_items_total{cause="cancelled",outcome="failure"} 1.0' in text
    assert 'octoplex_items_total{cause="response",outcome="success"} 1.0' in text
    assert kind_of("cancelled") == "cancelled"
