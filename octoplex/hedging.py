"""
Hedged requests (Dean and Barroso, "The Tail at Scale", 2013): a request
that has had no response head after a while sends a second, identical
attempt, and whichever attempt's head comes first is the answer; the other
is cancelled, its connection closed.

A request asks for it with ``"hedge": {"after_msec": N}`` or
``{"after_percentile": P}`` (:class:`~octoplex.wire.Hedge`).  For the
percentile, :class:`Latencies` keeps each upstream's recent times to a
response head; with fewer than :data:`MIN_SAMPLES` of them the request is
not hedged (it is sent once, and its time is one more sample).

:class:`HedgedFetch` runs the two attempts of one try; the multiplexer
gives it the clock, the way to send an attempt, and hooks for what it
counts and reports (:class:`HedgeHooks`).  ``docs/hedging.md`` says why it
works the way it does.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

__all__ = [
    "BUDGET_WINDOW",
    "MAX_CLIENTS",
    "MAX_HOSTS",
    "MIN_DELAY",
    "MIN_SAMPLES",
    "SAMPLES",
    "HedgeBudget",
    "HedgeBudgets",
    "HedgeHooks",
    "HedgedFetch",
    "Latencies",
    "Route",
]

#: The times to a response head kept per upstream: the most recent ones.
SAMPLES = 256

#: The samples an upstream needs before ``after_percentile`` hedges its
#: requests; with fewer, they are sent once.
MIN_SAMPLES = 20

#: Upstreams whose samples are kept; past it the least recently used one
#: is forgotten.
MAX_HOSTS = 1000

#: The shortest wait, in seconds, before a hedge derived from a percentile
#: (an upstream that answers in microseconds is not hedged at once).
MIN_DELAY = 0.001


#: Seconds of tries and hedges a :class:`HedgeBudget` weighs, in one-second
#: buckets.
BUDGET_WINDOW = 10


class HedgeBudget:
    """
    How many hedges one client may send (see :class:`HedgeBudgets`): over
    the last :data:`BUDGET_WINDOW` seconds, at most ``percent`` % of its
    hedge-armed tries sent, plus ``min_per_second`` a second whatever the
    traffic (so that a quiet caller is hedged too), as Finagle's backup
    requests bound their extra load.

    Without it, hedges feed an overload: when every answer is late because
    the daemon or its upstreams are saturated, every request hedges, which
    adds load exactly when it hurts most.  A hedge over budget is not sent;
    its first attempt carries on alone.

    :param clock: the time, whose whole seconds are the buckets.
    :param percent: hedges as a share of tries, in percent (100: no limit
        beyond one hedge a try, which there is anyway).
    :param min_per_second: hedges a second always allowed.
    """

    __slots__ = (
        "_clock",
        "_hedges",
        "_hedges_in_window",
        "_tick",
        "_tries",
        "_tries_in_window",
        "min_per_second",
        "percent",
    )

    def __init__(
        self, clock: IReactorTime, percent: float = 10.0, min_per_second: float = 10.0
    ) -> None:
        self._clock = clock
        self.percent = percent
        self.min_per_second = min_per_second
        self._tick = int(clock.seconds())
        self._tries = [0] * BUDGET_WINDOW
        self._hedges = [0] * BUDGET_WINDOW
        self._tries_in_window = 0
        self._hedges_in_window = 0

    def _advance(self) -> int:
        """The current bucket's index, the buckets older than the window emptied."""
        tick = int(self._clock.seconds())
        last = self._tick
        if tick > last:
            for step in range(last + 1, min(tick, last + BUDGET_WINDOW) + 1):
                index = step % BUDGET_WINDOW
                self._tries_in_window -= self._tries[index]
                self._hedges_in_window -= self._hedges[index]
                self._tries[index] = self._hedges[index] = 0
            self._tick = tick
        # A clock that stepped back keeps filling the latest bucket.
        return self._tick % BUDGET_WINDOW

    def tried(self) -> None:
        """A try with a hedge armed was sent."""
        self._tries[self._advance()] += 1
        self._tries_in_window += 1

    def allows(self) -> bool:
        """Whether a hedge may go now (:meth:`spent` once it does)."""
        self._advance()
        allowed = self.min_per_second * BUDGET_WINDOW + self.percent / 100 * self._tries_in_window
        # One more must stay within it (a hair of slack for float sums).
        return self._hedges_in_window + 1 <= allowed + 1e-9

    def spent(self) -> None:
        """A hedge was sent."""
        self._hedges[self._advance()] += 1
        self._hedges_in_window += 1

    def counts(self) -> tuple[int, int]:
        """The tries and the hedges in the window now."""
        self._advance()
        return self._tries_in_window, self._hedges_in_window


#: Clients whose hedge budgets are kept; past it the least recently used
#: one is forgotten (and starts afresh, with its reserve, if it comes back).
MAX_CLIENTS = 4096


class HedgeBudgets:
    """
    A :class:`HedgeBudget` per client (its token's name, else its address,
    as its share of requests in flight is counted), so that one caller whose
    requests hedge a lot spends its own budget, not the others'; at most
    :data:`MAX_CLIENTS` of them, the least recently used forgotten past it.

    :ivar percent: each budget's share of its client's tries, in percent.
    :ivar min_per_second: each budget's hedges a second always allowed.
    """

    def __init__(
        self,
        clock: IReactorTime,
        percent: float = 10.0,
        min_per_second: float = 10.0,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self._clock = clock
        self.percent = percent
        self.min_per_second = min_per_second
        self._max_clients = max_clients
        self._budgets: OrderedDict[str, HedgeBudget] = OrderedDict()

    def __len__(self) -> int:
        return len(self._budgets)

    def of(self, client: str) -> HedgeBudget:
        """The budget of ``client``, made on its first hedge-armed try."""
        budget = self._budgets.get(client)
        if budget is None:
            budget = self._budgets[client] = HedgeBudget(
                self._clock, self.percent, self.min_per_second
            )
            if len(self._budgets) > self._max_clients:
                self._budgets.popitem(last=False)
        else:
            self._budgets.move_to_end(client)
        return budget

    def configure(self, percent: float, min_per_second: float) -> None:
        """New settings, for every budget now and to come (a reload)."""
        self.percent, self.min_per_second = percent, min_per_second
        for budget in self._budgets.values():
            budget.percent, budget.min_per_second = percent, min_per_second


class Route:
    """
    Where one attempt of a hedged request went, and the address it is to
    avoid if it can.

    The multiplexer gives each attempt one (the pool and the dialler read
    it); the pool, or the dialler of a new connection, fills in
    :attr:`address`: that of the connection the attempt was sent on, or,
    while one is being opened for it, of the address being dialled.  The
    hedge's route avoids its first attempt's address: the pool gives it an
    idle connection to another address of the host, or opens one to
    another address (:meth:`octoplex.pool.OctoplexPool.request`), and only
    when the host has no other usable address does it go to the same one,
    on another connection.
    """

    __slots__ = ("address", "avoid")

    def __init__(self, avoid: str | None = None) -> None:
        #: The address (an IP) the attempt went to, once known.
        self.address: str | None = None
        #: The address to stay away from, if the host has another.
        self.avoid = avoid


class _Ring:
    """The last :data:`SAMPLES` times of one upstream, and their order, cached."""

    __slots__ = ("next", "samples", "sorted")

    def __init__(self) -> None:
        self.samples = array("d")
        self.next = 0
        self.sorted: list[float] | None = None

    def add(self, seconds: float) -> None:
        if len(self.samples) < SAMPLES:
            self.samples.append(seconds)
        else:
            self.samples[self.next] = seconds
            self.next = (self.next + 1) % SAMPLES
        self.sorted = None


class Latencies:
    """
    Recent times to a response head, per upstream, bounded: the last
    :data:`SAMPLES` of each of at most :data:`MAX_HOSTS` upstreams.
    """

    def __init__(self, max_hosts: int = MAX_HOSTS) -> None:
        self._max_hosts = max_hosts
        self._rings: OrderedDict[Hashable, _Ring] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rings)

    def observe(self, key: Hashable, seconds: float) -> None:
        """One more time to a response head, of upstream ``key``."""
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = _Ring()
            if len(self._rings) > self._max_hosts:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(key)
        ring.add(seconds)

    def percentile(self, key: Hashable, percentile: float) -> float | None:
        """
        The ``percentile`` (above 0, below 100) of upstream ``key``'s recent
        times, by nearest rank, in seconds; ``None`` with fewer than
        :data:`MIN_SAMPLES` of them.
        """
        ring = self._rings.get(key)
        if ring is None or len(ring.samples) < MIN_SAMPLES:
            return None
        ordered = ring.sorted
        if ordered is None:
            ordered = ring.sorted = sorted(ring.samples)
        # Nearest rank: the smallest sample with at least percentile% of
        # them at or below it.
        rank = -(-percentile * len(ordered) // 100)
        return ordered[max(int(rank), 1) - 1]


class HedgeHooks(Protocol):
    """What a :class:`HedgedFetch` asks of, and tells, whoever runs it."""

    def may_hedge(self) -> bool:
        """Whether the hedge may be sent now; if so, it holds a slot until :meth:`over`."""

    def sent(self) -> None:
        """The hedge was sent."""

    def over(self) -> None:
        """The hedge ended (answered, failed or cancelled): its slot is free."""

    def won(self, hedge: bool, timings: Any) -> None:
        """An attempt's head came first: the hedge's if ``hedge``; its timings."""

    def cancelled(self) -> None:
        """The losing attempt was cancelled."""

    def observe(self, seconds: float) -> None:
        """A time to a response head (or a lower bound of one), for the upstream's samples."""


#: Sends one attempt: given its index (0, the first; 1, the hedge) and the
#: callable to call once its response head is in; gives its Deferred (of
#: the whole response) and its timings, if any.
Send = Callable[[int, Callable[[], None]], "tuple[Deferred[Any], Any]"]


class HedgedFetch(Deferred[Any]):
    """
    One try of a hedged request: the first attempt now, the hedge after
    ``delay`` seconds if the first has had no response head by then (and
    ``hooks.may_hedge()`` agrees), the first head's attempt the winner.

    It fires with the winner's response (or failure, if its body fails),
    or, when no attempt got a head, with the failure of the last to end.
    Cancelling it (a deadline, the caller leaving) cancels the timer and
    both attempts, and it fails as the first attempt does (so that a
    request still queued for a connection is a ``queue_timeout``).

    :param clock: for the timer and the times to a head.
    :param send: sends an attempt (:data:`Send`).
    :param delay: seconds before the hedge, or ``None`` for none.
    :param hooks: what it asks and tells (:class:`HedgeHooks`).
    """

    def __init__(
        self,
        clock: IReactorTime,
        send: Send,
        delay: float | None,
        hooks: HedgeHooks,
    ) -> None:
        super().__init__(_cancel_hedged)
        self._clock = clock
        self._send = send
        self._hooks = hooks
        self._attempts: list[Deferred[Any] | None] = [None, None]
        self._timings: list[Any] = [None, None]
        self._started = [clock.seconds(), 0.0]
        self._winner: int | None = None
        self._cancelling = False
        self._timer: IDelayedCall | None = None
        self._start(0)
        if delay is not None and not self.called and self._attempts[0] is not None:
            self._timer = clock.callLater(delay, self._fire)

    def _start(self, index: int) -> None:
        self._started[index] = self._clock.seconds()
        d, self._timings[index] = self._send(index, lambda: self._headed(index))
        if not d.called:
            self._attempts[index] = d
        d.addBoth(self._ended, index)

    def _fire(self) -> None:
        self._timer = None
        if self.called or self._winner is not None or not self._hooks.may_hedge():
            return
        self._hooks.sent()
        self._start(1)

    def _headed(self, index: int) -> None:
        """Attempt ``index``'s response head is in: it wins, unless the other's came first."""
        if self._winner is not None or self._cancelling or self.called:
            return
        self._winner = index
        now = self._clock.seconds()
        self._stop_timer()
        self._hooks.observe(now - self._started[index])
        self._hooks.won(index == 1, self._timings[index])
        loser = self._attempts[1 - index]
        if loser is not None:
            if index == 1:
                # The first attempt has waited this long at least: a lower
                # bound of its time, so that slow ones are not left out.
                self._hooks.observe(now - self._started[0])
            self._hooks.cancelled()
            loser.cancel()

    def _ended(self, result: Any, index: int) -> None:
        self._attempts[index] = None
        if index == 1:
            self._hooks.over()
        if self.called:
            return
        if self._winner is None and not isinstance(result, Failure):
            # A response whose head was not announced: it wins now.
            self._headed(index)
        if self._cancelling:
            if self._winner == index or (self._winner is None and index == 0):
                self._finish(result)
            return
        if self._winner == index:
            self._finish(result)
        elif self._winner is None and all(a is None for a in self._attempts):
            # Neither got a head, and none is left to get one: the try
            # failed (a hedge not yet sent is not: the failure, a refused
            # connect say, is the answer, as it is without hedging).
            self._stop_timer()
            self._finish(result)
        # Otherwise: the loser, cancelled, or a failure while the other
        # attempt may still answer.

    def _finish(self, result: Any) -> None:
        if isinstance(result, Failure):
            self.errback(result)
        else:
            self.callback(result)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def cancel_attempts(self) -> None:
        """The canceller: stop the timer and both attempts, the hedge first."""
        self._cancelling = True
        self._stop_timer()
        for index in (1, 0):
            attempt = self._attempts[index]
            if attempt is not None:
                attempt.cancel()


def _cancel_hedged(d: Deferred[Any]) -> None:
    cast(HedgedFetch, d).cancel_attempts()
