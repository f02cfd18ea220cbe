"""
The fan-out: one batch in, every request sent at once, every outcome back in
order by the deadline.

:class:`Multiplexer` knows nothing of HTTP framing on the inbound side; it
takes a parsed :class:`~octoplex.wire.Batch` and an upstream client, and
gives back a :class:`BatchResult`.  The design is the one the original
project settled on: fire every request, gather them with a ``DeferredList``,
and cancel whatever is still running on a ``callLater`` deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from email.utils import parsedate_to_datetime
from random import random
from typing import Any, Protocol

import attr
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from octoplex.body import ResponseBudget
from octoplex.buffers import BufferBudget
from octoplex.client import QueueTimeout, UpstreamResponse
from octoplex.errors import TIMEOUT_ELAPSED, cause, describe, kind_of
from octoplex.hedging import (
    MIN_DELAY,
    HedgeBudget,
    HedgeBudgets,
    HedgedFetch,
    Latencies,
    Route,
)
from octoplex.limits import DEFAULT_MAX_BATCH_RESPONSE_BYTES
from octoplex.metrics import Metrics
from octoplex.timings import Timings
from octoplex.wire import (
    JSON_OUTCOMES,
    Batch,
    InvalidRequest,
    OutcomeFormat,
    UpstreamRequest,
)

__all__ = ["BatchResult", "Fetcher", "Multiplexer"]

#: The error of a request cancelled because its caller went away.
CANCELLED = "cancelled: the caller disconnected"


#: The tags of an outcome that echoes nothing of its request.
_NO_TAGS: dict[str, Any] = {}

#: Seconds of the first retry's backoff step; each next one doubles it.
RETRY_BASE = 0.01


def retry_after(headers: Headers, now: float) -> float | None:
    """
    The seconds an upstream's ``Retry-After`` asks to wait (RFC 9110
    section 10.2.3: a number of seconds, or an HTTP date), or ``None``.
    """
    values = headers.getRawHeaders(b"retry-after")
    if not values:
        return None
    text = values[-1].decode("latin-1").strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


class TurnTimeout(Exception):
    """
    A request of a batch with ``max_parallel`` was cancelled (by a deadline)
    while it waited for its turn.
    """

    def __init__(self, cap: int) -> None:
        super().__init__(cap)
        self.cap = cap

    def __str__(self) -> str:
        return (
            f"timeout elapsed before its turn came (max_parallel {self.cap}); "
            "the request was never sent"
        )


class Fetcher(Protocol):
    """
    What the multiplexer needs of an upstream client.
    """

    def fetch(
        self,
        request: UpstreamRequest,
        budget: ResponseBudget | None = None,
        timings: Timings | None = None,
        on_head: Callable[[], None] | None = None,
        route: Route | None = None,
    ) -> Deferred[UpstreamResponse]:
        """
        Send ``request``, reading no more body than ``budget`` has left,
        marking ``timings`` if given, calling ``on_head`` (if given) once
        the response's head is in, noting where it went in ``route`` (if
        given) and staying away from the address it avoids if it can;
        cancelling the result must abandon it.
        A client may also have ``may_hedge(request)``, which says whether
        a hedge of ``request`` may go (:mod:`octoplex.hedging`).
        """


class ExtraSlots(Protocol):
    """
    A running batch's hold on the in-flight counts, for the requests it
    sends beyond its size (hedges): :class:`octoplex.admission.Hold`.
    """

    def take(self) -> bool:
        """One more request in flight, if there is room."""

    def give_back(self) -> None:
        """One extra request is over."""

    @property
    def client(self) -> str:
        """Whose batch it is (the key of its share): its hedges spend that client's budget."""


@attr.s(slots=True, auto_attribs=True)
class BatchResult:
    """
    The outcomes of one batch, in request order, with counts for the log.

    :ivar outcomes: one outcome per request, as the batch's
        :class:`~octoplex.wire.OutcomeFormat` built it: for the HTTP
        frontend, a ``{"Success": ...}`` or ``{"Failure": ...}`` object.
    :ivar succeeded: requests that got an HTTP response (of any status).
    :ivar failed: requests that failed for a reason other than the deadline.
    :ivar timed_out: requests cut off by the deadline.
    :ivar hedged: requests that sent a hedge (:mod:`octoplex.hedging`).
    """

    outcomes: list[Any]
    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    hedged: int = 0


class Multiplexer:
    """
    Run batches against an upstream client.

    :param clock: the time source for deadlines and durations.
    :param client: sends each request.
    :param max_batch_response_bytes: the body bytes all the responses of one
        batch may hold together.
    :param metrics: counts each item's outcome and latency, and expired
        deadlines; a fresh :class:`~octoplex.metrics.Metrics` by default.
    :param rng: a uniform random number in [0, 1), for the jitter of
        retries' backoff.
    :param buffers: the process's budget of buffered bytes, which every
        batch's bodies count against as well (none by default).
    :param hedge_budgets: how many hedges each client's batches may send
        (:class:`~octoplex.hedging.HedgeBudgets`); their defaults by default.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        client: Fetcher,
        max_batch_response_bytes: int = DEFAULT_MAX_BATCH_RESPONSE_BYTES,
        metrics: Metrics | None = None,
        rng: Callable[[], float] = random,
        buffers: BufferBudget | None = None,
        hedge_budgets: HedgeBudgets | None = None,
    ) -> None:
        self._rng = rng
        self._buffers = buffers
        self._clock = clock
        self._metrics = Metrics() if metrics is None else metrics
        self._client = client
        #: Recent times to a response head per upstream, for hedges after a
        #: percentile.
        self.latencies = Latencies()
        #: How many hedges each client may send (a reload changes their
        #: settings).
        self.hedge_budgets = HedgeBudgets(clock) if hedge_budgets is None else hedge_budgets
        #: Settable: a reload changes it for the batches to come.
        self.max_batch_response_bytes = max_batch_response_bytes
        self._runs: set[_BatchRun] = set()
        self._drained: list[Deferred[None]] = []

    def run(
        self,
        batch: Batch,
        batch_id: str,
        started: float | None = None,
        on_outcome: Callable[[int, Any], None] | None = None,
        outcomes: OutcomeFormat = JSON_OUTCOMES,
        extra: ExtraSlots | None = None,
    ) -> Deferred[BatchResult]:
        """
        Send every request of ``batch`` at once and gather the outcomes.

        :param batch: the batch to run.
        :param batch_id: the batch's id, for log events.
        :param started: when the batch arrived, by the clock; its deadline
            and its items' durations count from then (by default, now).
        :param on_outcome: called with each item's index and outcome as soon
            as it has one (for a streamed answer), unless the caller left.
        :param outcomes: how the frontend wants each outcome built; the
            JSON of the wire format by default.
        :param extra: the batch's hold on the in-flight counts, which each
            hedge takes a slot of while it runs (no hedge is sent when it
            has none left); hedges are not held back without it.
        :return: a Deferred that fires with the result no later than the
            batch's deadline (plus the time to cancel what is left).
            Cancelling it, as Klein does when the caller disconnects,
            cancels every request still running.
        """
        budget = ResponseBudget(self.max_batch_response_bytes, self._buffers)
        run = _BatchRun(
            self._clock,
            self._client,
            batch,
            batch_id,
            self.log,
            budget,
            self._run_ended,
            self._metrics,
            self._rng,
            on_outcome,
            outcomes,
            self.latencies,
            extra,
            self.hedge_budgets,
        )
        self._runs.add(run)
        return run.start(self._clock.seconds() if started is None else started)

    def _run_ended(self, run: _BatchRun) -> None:
        self._runs.discard(run)
        if not self._runs:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)

    def drain(self, ceiling: float) -> Deferred[None]:
        """
        Wait for the batches in flight to be answered, each by its own
        deadline; past ``ceiling`` seconds, answer those still running at
        once, as their deadline would (what is pending times out).

        :return: a Deferred that fires once no batch is in flight.
        """
        if not self._runs:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        ceiling_call = self._clock.callLater(ceiling, self._cut_short)

        def stop_ceiling(result: None) -> None:
            if ceiling_call.active():
                ceiling_call.cancel()
            return result

        return drained.addCallback(stop_ceiling)

    def _cut_short(self) -> None:
        for run in list(self._runs):
            run.cut_short()


class _Hooks:
    """
    What one try of a hedged request (:class:`~octoplex.hedging.HedgedFetch`)
    asks of its batch and tells it: the hedge's slot in the batch's share,
    the upstream's circuit, the counts, the outcome's tags and timings, the
    upstream's latency samples.
    """

    __slots__ = ("_first", "_index", "_key", "_request", "_run")

    def __init__(self, run: _BatchRun, index: int, request: UpstreamRequest, key: Any) -> None:
        self._run = run
        self._index = index
        self._request = request
        self._key = key
        #: Where the first attempt went, which the hedge stays away from.
        self._first = Route()

    def send(self, attempt: int, on_head: Callable[[], None]) -> tuple[Deferred[Any], Any]:
        run = self._run
        timings = None
        if run._batch.options.timings:
            timings = Timings(run._clock)
            if attempt == 0:
                run._timings[self._index] = timings
        route = self._first if attempt == 0 else Route(avoid=self._first.address)
        fetch = run._client.fetch(self._request, run._budget, timings, on_head, route)
        return fetch, timings

    def may_hedge(self) -> bool:
        run = self._run
        allowed = getattr(run._client, "may_hedge", None)
        if allowed is not None and not allowed(self._request):
            run._metrics.hedges_skipped.labels("circuit").inc()
            return False
        budget = run._hedges_budget()
        if not budget.allows():
            run._metrics.hedges_skipped.labels("budget").inc()
            return False
        if run._extra is not None and not run._extra.take():
            run._metrics.hedges_skipped.labels("share").inc()
            return False
        budget.spent()
        return True

    def sent(self) -> None:
        run = self._run
        run._metrics.hedges_sent.inc()
        run._hedges[self._index] = None
        # A request counts once in the batch's count, however many of its
        # tries (retries) sent a hedge.
        hedged_once = run._hedged_once
        if hedged_once is None:
            hedged_once = run._hedged_once = set()
        if self._index not in hedged_once:
            hedged_once.add(self._index)
            run._result.hedged += 1

    def over(self) -> None:
        if self._run._extra is not None:
            self._run._extra.give_back()

    def won(self, hedge: bool, timings: Any) -> None:
        run = self._run
        if self._index in run._hedges:
            run._hedges[self._index] = hedge
        if hedge:
            run._metrics.hedges_won.inc()
            if timings is not None:
                run._timings[self._index] = timings

    def cancelled(self) -> None:
        self._run._metrics.hedge_attempts_cancelled.inc()

    def observe(self, seconds: float) -> None:
        self._run._latencies.observe(self._key, seconds)


class _BatchRun:
    """
    The state of one batch while it runs.
    """

    def __init__(
        self,
        clock: IReactorTime,
        client: Fetcher,
        batch: Batch,
        batch_id: str,
        log: Logger,
        budget: ResponseBudget,
        ended: Callable[[_BatchRun], None],
        metrics: Metrics,
        rng: Callable[[], float],
        on_outcome: Callable[[int, Any], None] | None,
        outcomes: OutcomeFormat,
        latencies: Latencies,
        extra: ExtraSlots | None,
        hedge_budgets: HedgeBudgets,
    ) -> None:
        self._latencies = latencies
        self._hedge_budgets = hedge_budgets
        #: Its client's hedge budget, looked up on its first hedge-armed try.
        self._hedge_budget: HedgeBudget | None = None
        self._extra = extra
        #: The requests whose (latest) try sent a hedge: whether the hedge
        #: won, or None while no attempt has won.
        self._hedges: dict[int, bool | None] = {}
        #: The requests any of whose tries sent a hedge (made by the first).
        self._hedged_once: set[int] | None = None
        self._on_outcome = on_outcome
        self._success = outcomes.success
        self._failure = outcomes.failure
        self._metrics = metrics
        self._budget = budget
        self._ended = ended
        self._clock = clock
        self._client = client
        self._batch = batch
        self._batch_id = batch_id
        self._log = log
        self._result = BatchResult(outcomes=[None] * len(batch.requests))
        self._items: list[Deferred[None]] = []
        # Indices still running.  Not ``not d.called``: a Deferred waiting on
        # one its callback returned (the body read) counts as called.
        self._running: set[int] = set()
        self._started = 0.0
        self._deadline: IDelayedCall | None = None
        self._abandoned = False
        self._expiring = False
        #: The deadlines of the requests that have their own timeout_msec,
        #: by index, and the index whose own deadline is cancelling it.
        self._timers: dict[int, IDelayedCall] = {}
        self._item_expiring: int | None = None
        #: Under max_parallel: the requests sent and not yet settled, and
        #: those waiting their turn, in order, each with the Deferred that
        #: stands for it in the DeferredList, and those sent after waiting.
        self._active: set[int] = set()
        self._queued: dict[int, Deferred[None]] = {}
        self._sent: dict[int, Deferred[None]] = {}
        #: Attempts made so far by the requests that may be retried, and
        #: the timings of each request's latest attempt, if asked for.
        self._attempts: dict[int, int] = {}
        self._timings: dict[int, Timings] = {}
        self._random = rng
        self._answer: Deferred[BatchResult] = Deferred(self._abandon)

    def start(self, started: float) -> Deferred[BatchResult]:
        self._started = started
        # Armed before the sends, which take time of their own: the deadline
        # is timeout_msec after the batch arrived, however long they take.
        left = self._batch.timeout_msec / 1000.0 - (self._clock.seconds() - started)
        self._deadline = self._clock.callLater(max(left, 0.0), self._expire)
        for index, request in enumerate(self._batch.requests):
            self._items.append(self._send(index, request))
        gathered = DeferredList(self._items, consumeErrors=True)
        gathered.addCallback(self._gathered)
        return self._answer

    def _elapsed_msec(self) -> int:
        return int((self._clock.seconds() - self._started) * 1000)

    def _settle_item(self, counter: Any) -> int:
        """
        Count an item's outcome in ``counter`` and its latency; the
        milliseconds elapsed since the batch started.
        """
        elapsed = self._clock.seconds() - self._started
        counter.inc()
        self._metrics.item_seconds.observe(elapsed)
        return int(elapsed * 1000)

    def _send(self, index: int, request: UpstreamRequest | InvalidRequest) -> Deferred[None]:
        if isinstance(request, InvalidRequest):
            self._fail(index, request.error, "invalid", at_once=True)
            return succeed(None)
        if request.timeout_msec is not None and request.timeout_msec < self._batch.timeout_msec:
            # Its own deadline, counted from the batch's arrival like the
            # batch's; a longer one than the batch's changes nothing.
            left = request.timeout_msec / 1000.0 - (self._clock.seconds() - self._started)
            self._timers[index] = self._clock.callLater(max(left, 0.0), self._item_expired, index)
        cap = self._batch.max_parallel
        if cap is not None and len(self._active) >= cap:
            # Its turn comes when a request sent before it settles.
            waiting: Deferred[None] = Deferred(lambda _: self._unqueue(index))
            self._queued[index] = waiting
            self._running.add(index)
            return waiting
        return self._fetch(index, request)

    def _tags(self, index: int) -> dict[str, Any]:
        """
        What an item's outcome echoes of its request: its id, and the
        attempts made if it could be retried.
        """
        request = self._batch.requests[index]
        attempts = None
        if isinstance(request, UpstreamRequest) and request.retry is not None:
            attempts = self._attempts.get(index, 1)
        timings = self._timings.get(index)
        tags = {
            "id": request.id,
            "attempts": attempts,
            "timings": None if timings is None else timings.report(),
        }
        if index in self._hedges:
            tags["hedged"] = True
            tags["hedge_won"] = self._hedges[index]
        return tags

    def _attempt(self, index: int, request: UpstreamRequest) -> Deferred[UpstreamResponse]:
        """
        Send the request once, with fresh timings if the batch asked for
        them (a client that is not asked for them need not take them);
        with both attempts if it is hedged.
        """
        if request.hedge is not None:
            return self._hedged(index, request)
        if not self._batch.options.timings:
            return self._client.fetch(request, self._budget)
        timings = self._timings[index] = Timings(self._clock)
        return self._client.fetch(request, self._budget, timings)

    def _hedges_budget(self) -> HedgeBudget:
        """The hedge budget of the batch's client (its share's key)."""
        budget = self._hedge_budget
        if budget is None:
            client = self._extra.client if self._extra is not None else ""
            budget = self._hedge_budget = self._hedge_budgets.of(client)
        return budget

    def _hedged(self, index: int, request: UpstreamRequest) -> Deferred[UpstreamResponse]:
        """
        One try of a hedged request (:class:`~octoplex.hedging.HedgedFetch`),
        its hedge armed if it is due before the request's deadline.
        """
        hedge = request.hedge
        assert hedge is not None
        url = request.url
        key = (url.scheme, url.host, url.port)
        delay: float | None
        if hedge.after_msec is not None:
            delay = hedge.after_msec / 1000.0
        else:
            assert hedge.after_percentile is not None
            delay = self._latencies.percentile(key, hedge.after_percentile)
            if delay is None:
                self._metrics.hedges_skipped.labels("samples").inc()
            else:
                delay = max(delay, MIN_DELAY)
        if delay is not None and not self._room_for(index, delay):
            # Due at or after its deadline: it would never go.
            delay = None
        if delay is not None:
            self._hedges_budget().tried()
        # What an earlier try said is not this try's.
        self._hedges.pop(index, None)
        hooks = _Hooks(self, index, request, key)
        return HedgedFetch(self._clock, hooks.send, delay, hooks)

    def _fetch(self, index: int, request: UpstreamRequest) -> Deferred[None]:
        try:
            if request.retry is None and request.hedge is None and not self._batch.options.timings:
                # None of these features asked for: straight to the client.
                d = self._client.fetch(request, self._budget)
            else:
                d = self._attempt(index, request)
                if request.retry is not None:
                    d = Deferred.fromCoroutine(self._retrying(index, request, d))
        except Exception:
            # treq parses and builds the request synchronously; a value it
            # rejects fails this request alone, like any invalid value.
            self._running.discard(index)
            self._stop_timer(index)
            self._fail(index, describe(Failure()), "invalid", at_once=True)
            return succeed(None)
        self._running.add(index)
        self._active.add(index)
        # One callback for both outcomes, not three: each callback costs a
        # few hundred bytes for as long as the request is in flight.
        d.addBoth(self._settled, index)
        return d  # type: ignore[return-value]

    async def _retrying(
        self, index: int, request: UpstreamRequest, first: Deferred[UpstreamResponse]
    ) -> UpstreamResponse:
        """
        The request's attempts: another after a status or a connect failure
        that its retry policy names, after a jittered backoff (or the
        upstream's Retry-After, if longer), while its deadline leaves room.
        """
        policy = request.retry
        assert policy is not None
        attempt, pending = 1, first
        while True:
            self._attempts[index] = attempt
            try:
                response = await pending
            except Exception:
                failure = Failure()
                if (
                    attempt > policy.times
                    or not policy.connect_errors
                    or cause(failure) != "connect"
                    or self._cancelling(index)
                ):
                    raise
                wait = self._backoff(attempt, None)
                if not self._room_for(index, wait):
                    raise
            else:
                if attempt > policy.times or response.status not in policy.statuses:
                    return response
                wait = self._backoff(attempt, response)
                if not self._room_for(index, wait):
                    return response
                # Its body will not be in the answer.
                self._budget.give_back(len(response.body))
            self._log.debug(
                "batch {batch_id}: request {index} attempt {attempt} again in {wait_ms:.0f} ms",
                batch_id=self._batch_id,
                index=index,
                attempt=attempt,
                wait_ms=wait * 1000,
            )
            await deferLater(self._clock, wait)
            attempt += 1
            pending = self._attempt(index, request)

    def _cancelling(self, index: int) -> bool:
        return self._expiring or self._abandoned or index == self._item_expiring

    def _backoff(self, attempt: int, response: UpstreamResponse | None) -> float:
        """
        Seconds before the next attempt: full jitter over an exponential
        step, or the upstream's Retry-After if that is longer.
        """
        wait = self._random() * RETRY_BASE * 2 ** (attempt - 1)
        if response is not None:
            after = retry_after(response.headers, self._clock.seconds())
            if after is not None:
                wait = max(wait, after)
        return wait

    def _room_for(self, index: int, wait: float) -> bool:
        """Whether another attempt after ``wait`` seconds starts before the item's deadline."""
        request = self._batch.requests[index]
        timeout = self._batch.timeout_msec
        if isinstance(request, UpstreamRequest) and request.timeout_msec is not None:
            timeout = min(timeout, request.timeout_msec)
        return bool(self._clock.seconds() + wait < self._started + timeout / 1000.0)

    def _next_turn(self) -> None:
        """
        Send the requests waiting under max_parallel while there is room,
        in order; none once the batch is being answered.
        """
        cap = self._batch.max_parallel
        assert cap is not None
        while self._queued and len(self._active) < cap:
            if self._expiring or self._abandoned or self._answer.called:
                return
            index = next(iter(self._queued))
            waiting = self._queued.pop(index)
            request = self._batch.requests[index]
            assert isinstance(request, UpstreamRequest)
            sent = self._fetch(index, request)
            # The waiting Deferred now stands for the sent request: its
            # end ends it, and cancelling it cancels the request.
            if not sent.called:
                self._sent[index] = sent
            sent.addBoth(self._turn_over, waiting)

    @staticmethod
    def _turn_over(_: Any, waiting: Deferred[None]) -> None:
        if not waiting.called:
            waiting.callback(None)

    def _unqueue(self, index: int) -> None:
        sent = self._sent.pop(index, None)
        if sent is not None:
            sent.cancel()
            return
        if self._queued.pop(index, None) is not None:
            # Cancelled (by a deadline or the caller) before its turn.
            assert self._batch.max_parallel is not None
            self._settled(Failure(TurnTimeout(self._batch.max_parallel)), index)

    def _set(self, index: int, outcome: Any) -> None:
        """
        Record an item's outcome, and hand it to whoever streams them.
        """
        self._result.outcomes[index] = outcome
        if self._on_outcome is not None and not self._abandoned:
            self._on_outcome(index, outcome)

    def _stop_timer(self, index: int) -> None:
        timer = self._timers.pop(index, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _item_expired(self, index: int) -> None:
        del self._timers[index]
        self._item_expiring = index
        try:
            self._items[index].cancel()
        finally:
            self._item_expiring = None
        if self._result.outcomes[index] is None:
            # A cancellation that did not settle it at once: it is a
            # timeout all the same.
            self._timed_out(index, None)

    def _settled(self, result: UpstreamResponse | Failure, index: int) -> None:
        self._running.discard(index)
        if self._timers:
            self._stop_timer(index)
        if self._timings:
            timings = self._timings.get(index)
            if timings is not None and timings.done is None:
                # It ended here (a failure, or a cancellation), before its
                # outcome and its duration are worked out.
                timings.done = timings.now()
        if index in self._active:
            self._active.discard(index)
            self._sent.pop(index, None)
            if self._queued:
                self._next_turn()
        try:
            if isinstance(result, Failure):
                self._failed(result, index)
            else:
                self._succeeded(result, index)
        except Exception:
            self._bug(Failure(), index)

    def _succeeded(self, response: UpstreamResponse, index: int) -> None:
        if self._result.outcomes[index] is not None:
            return
        request = self._batch.requests[index]
        if (
            request.id is None
            and not self._timings
            and not self._hedges
            and getattr(request, "retry", None) is None
        ):
            # Nothing to echo (the usual case): no tags to gather.
            tags: dict[str, Any] = _NO_TAGS
        else:
            tags = self._tags(index)
        self._set(
            index,
            self._success(
                response.status,
                response.headers,
                response.body,
                self._settle_item(self._metrics.item_success),
                response.content_encoding,
                **tags,
                options=self._batch.options,
                raw_headers=response.raw_headers,
            ),
        )
        self._result.succeeded += 1

    def _failed(self, failure: Failure, index: int) -> None:
        if self._result.outcomes[index] is not None:
            # Already answered by the caller's departure; this is the
            # cancellation arriving.
            return
        if self._expiring or index == self._item_expiring:
            self._timed_out(index, failure)
            return
        self._fail(index, describe(failure), cause(failure))

    def _timed_out(self, index: int, failure: Failure | None) -> None:
        """
        The outcome of a request cut off by the batch's deadline or its own:
        a timeout, which says so if the request never even got a connection.
        """
        if failure is not None and failure.check(QueueTimeout, TurnTimeout):
            error, kind = str(failure.value), "queue_timeout"
            counter = self._metrics.item_queue_timeout
        else:
            error, kind, counter = TIMEOUT_ELAPSED, "timeout", self._metrics.item_deadline
            request = self._batch.requests[index]
            if not self._expiring and isinstance(request, UpstreamRequest):
                error = (
                    f"{TIMEOUT_ELAPSED} (the request's own timeout_msec of {request.timeout_msec})"
                )
        self._set(
            index, self._failure(error, self._settle_item(counter), kind, **self._tags(index))
        )
        self._result.timed_out += 1

    def _fail(self, index: int, error: str, cause_name: str, at_once: bool = False) -> None:
        counter = self._metrics.item_failed(cause_name)
        if at_once:
            # Refused before it was sent: it took no time.
            counter.inc()
            self._metrics.item_seconds.observe(0)
            elapsed = 0
        else:
            elapsed = self._settle_item(counter)
        self._set(index, self._failure(error, elapsed, kind_of(cause_name), **self._tags(index)))
        self._result.failed += 1

    def _bug(self, failure: Failure, index: int) -> None:
        self._log.failure(
            "batch {batch_id}: building the outcome of request {index} failed",
            failure,
            batch_id=self._batch_id,
            index=index,
        )
        self._set(
            index,
            self._failure(
                "internal error in Octoplex; see its log",
                self._settle_item(self._metrics.item_failed("internal")),
                "internal",
                **self._tags(index),
            ),
        )
        self._result.failed += 1

    def _pending(self) -> list[int]:
        return sorted(self._running)

    def _expire(self) -> None:
        self._deadline = None
        pending = self._pending()
        elapsed = self._elapsed_msec()
        self._log.warn(
            "batch {batch_id}: deadline of {timeout_msec} ms expired with "
            "{pending_count} of {size} requests pending: {pending_uris}",
            batch_id=self._batch_id,
            timeout_msec=self._batch.timeout_msec,
            pending_count=len(pending),
            size=len(self._items),
            pending_uris=[self._uri(index) for index in pending],
        )
        if pending:
            self._metrics.deadlines_expired.inc()
        self._expiring = True
        try:
            self._cancel(pending)
        finally:
            self._expiring = False
        # Cancelling normally settles every request at once; one whose
        # canceller did not is a timeout all the same, and the answer goes
        # now rather than when it settles.
        for index in pending:
            if self._result.outcomes[index] is None:
                self._settle_item(self._metrics.item_deadline)
                self._set(
                    index, self._failure(TIMEOUT_ELAPSED, elapsed, "timeout", **self._tags(index))
                )
                self._result.timed_out += 1
        self._finish()

    def _uri(self, index: int) -> str:
        return self._batch.requests[index].uri or ""

    def _cancel(self, indices: list[int]) -> None:
        for index in indices:
            self._items[index].cancel()

    def _abandon(self, answer: Deferred[BatchResult]) -> None:
        """
        The caller went away: stop the deadline and every request.
        """
        self._abandoned = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._stop_timers()
        pending = self._pending()
        self._log.info(
            "batch {batch_id}: caller disconnected; cancelling {pending_count} pending requests",
            batch_id=self._batch_id,
            pending_count=len(pending),
        )
        elapsed = self._elapsed_msec()
        cancelled = self._metrics.item_failed("cancelled")
        for index in pending:
            self._settle_item(cancelled)
            self._result.outcomes[index] = self._failure(
                CANCELLED, elapsed, "cancelled", **self._tags(index)
            )
        self._cancel(pending)

    def _gathered(self, _: object) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._finish()

    def cut_short(self) -> None:
        """
        Answer now, as if the deadline had come (the daemon is stopping).
        """
        if self._deadline is not None:
            self._deadline.cancel()
            self._expire()

    def _stop_timers(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def _finish(self) -> None:
        self._stop_timers()
        if not (self._abandoned or self._answer.called):
            self._answer.callback(self._result)
        # The answer is built (and written): its bodies are no longer held
        # for it.
        self._budget.close()
        # After the answer is written: a drain waiting on this batch may
        # go on to close the connections.
        self._ended(self)
