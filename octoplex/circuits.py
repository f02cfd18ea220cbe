"""
Circuit breaking per upstream (``--circuit-breaking on``): when a host fails
most of its recent requests, the next ones to it fail at once, with kind
``circuit_open``, instead of each waiting on a connect that will not come.

Each upstream ``(scheme, host, port)``, as the request's URI names it (the
pool's key), has a circuit:

- **closed**: requests go through.  Their outcomes are counted over a
  sliding window of the last ``window`` seconds (in ten buckets).  When a
  request fails, and the window holds at least ``min_requests`` outcomes of
  which at least ``failure_ratio`` failed, the circuit opens.
- **open**: every request fails at once, for ``cooldown`` seconds.
- **half-open**: once the cool-down is over, the next ``probes`` requests
  go through as probes while the others still fail at once.  When all of
  them succeed, the circuit closes (its window starts empty); when one
  fails, it opens again for twice the previous cool-down, at most
  ``max_cooldown`` (back to ``cooldown`` once it has closed).  A probe
  that says nothing (see below) gives its turn to the next request; one
  still out after ``window`` seconds is given up on, and the next request
  probes instead.

What counts as a failure of the upstream (:data:`COUNTED_CAUSES`): it could
not be connected to (refused, unreachable, ``--connect-timeout``), its TLS
handshake failed, the connection broke before the response was complete,
or it answered something that is not HTTP; with ``count_5xx``, a ``5xx``
status too.  Any other answer is a success.

What says nothing either way: the caller's own deadline (or departure)
cutting a request short, a request that waited for a connection slot until
its deadline, egress refusals, requests that could not be sent as given,
responses over a size limit, and DNS failures (the DNS cache already fails
those at once for ``--dns-negative-ttl``, with the more precise kind
``dns``; and a resolver outage would otherwise open every circuit at once).
A request cut short while its connection was still opening is judged by
that connection, which the pool finishes in the background: it counts as a
failure if the connect fails, or does not finish within
``--pool-connect-grace``, and as a success if it opens.  That is how a host
that drops every SYN, whose connects always outlast the deadline, opens its
circuit.

The table of circuits is bounded (:data:`MAX_CIRCUITS`, least recently used
closed circuits evicted first), and :meth:`Circuits.prune` forgets the
circuits of hosts with no recent traffic.  Every operation on a request is
O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from octoplex.metrics import CIRCUIT_STATES, Metrics

__all__ = [
    "CLOSED",
    "COUNTED_CAUSES",
    "HALF_OPEN",
    "MAX_CIRCUITS",
    "OPEN",
    "STATES",
    "CircuitOpen",
    "CircuitSettings",
    "Circuits",
    "Ticket",
]

#: Every state, as the ``state`` label of ``octoplex_circuit_state`` names it.
STATES = CIRCUIT_STATES
CLOSED, OPEN, HALF_OPEN = STATES

#: The causes (:func:`octoplex.errors.cause`) of a failed request that count
#: against its upstream.
COUNTED_CAUSES = frozenset({"connect", "tls", "connection", "protocol"})

#: Circuits kept at most; a new host past it evicts the least recently used
#: closed circuit.
MAX_CIRCUITS = 10_000

#: Buckets of the sliding window: it covers the last ``window`` seconds, less
#: up to a tenth of it.
BUCKETS = 10

#: How far into the table's least recently used end a new circuit looks for
#: a closed one to evict, before it evicts the oldest whatever its state.
_EVICTION_SCAN = 8


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class CircuitSettings:
    """
    How circuits behave (``--circuit-*``).

    :ivar enabled: whether there are circuits at all.
    :ivar failure_ratio: the share of failed requests in the window at
        which a circuit opens, above 0 and at most 1.
    :ivar min_requests: outcomes the window must hold before the circuit
        can open, so that a few failures of a rarely called host do not.
    :ivar window: seconds of outcomes judged.
    :ivar cooldown: seconds an opened circuit fails requests at once before
        it lets a probe through.
    :ivar max_cooldown: the longest cool-down, which doubles after each
        failed probe.
    :ivar probes: requests let through while half-open; all must succeed.
    :ivar count_5xx: whether a ``5xx`` answer counts as a failure.
    """

    enabled: bool = False
    failure_ratio: float = 0.5
    min_requests: int = 10
    window: float = 10.0
    cooldown: float = 5.0
    max_cooldown: float = 60.0
    probes: int = 1
    count_5xx: bool = False


class CircuitOpen(Exception):
    """
    A request failed at once: its upstream's circuit is open (or half-open
    with its probes out).

    :ivar upstream: the upstream, ``scheme://host:port``.
    """

    def __init__(self, upstream: str, message: str) -> None:
        super().__init__(upstream, message)
        self.upstream = upstream
        self.message = message

    def __str__(self) -> str:
        return self.message


#: An upstream: ``(scheme, host, port)`` as a request's URI names it.
UpstreamKey = tuple[str, str, "int | None"]


def _upstream(key: UpstreamKey) -> str:
    scheme, host, port = key
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


class _Circuit:
    """
    The state of one upstream's circuit.
    """

    __slots__ = (
        "bad",
        "bads",
        "cooldown",
        "epoch",
        "key",
        "label",
        "last_used",
        "ok",
        "oks",
        "opened",
        "probe_since",
        "probes_ok",
        "probes_out",
        "rejected",
        "reopen_at",
        "state",
        "tick",
        "upstream",
        "why",
    )

    def __init__(self, key: UpstreamKey, label: str, metrics: Metrics, now: float) -> None:
        self.key = key
        self.upstream = _upstream(key)
        self.label = label
        self.opened = metrics.circuit_opened.labels(label)
        self.rejected = metrics.circuit_rejected.labels(label)
        self.state = CLOSED
        #: Bumped at every change of state: an outcome of a request let
        #: through in an earlier state is not counted.
        self.epoch = 0
        #: Outcomes in the window: totals, and per bucket.
        self.ok = self.bad = 0
        self.oks = [0] * BUCKETS
        self.bads = [0] * BUCKETS
        self.tick = 0
        self.cooldown = 0.0
        self.reopen_at = 0.0
        self.probes_out = self.probes_ok = 0
        self.probe_since = 0.0
        self.last_used = now
        #: Why it is open: a sentence for the callers' errors.
        self.why = ""

    def forget_window(self) -> None:
        self.ok = self.bad = 0
        self.oks = [0] * BUCKETS
        self.bads = [0] * BUCKETS

    def advance(self, tick: int) -> None:
        """
        Move the window on to bucket ``tick``, emptying the buckets passed.
        """
        passed = tick - self.tick
        if passed <= 0:
            return
        if passed >= BUCKETS:
            if self.ok or self.bad:
                self.forget_window()
        else:
            oks, bads = self.oks, self.bads
            for step in range(self.tick + 1, tick + 1):
                index = step % BUCKETS
                self.ok -= oks[index]
                self.bad -= bads[index]
                oks[index] = bads[index] = 0
        self.tick = tick


class Ticket:
    """
    A request let through a circuit, until its outcome is told: exactly
    one of :meth:`answered`, :meth:`failed` or :meth:`neutral` counts;
    later calls are ignored.

    When the request is cut short while its connection is still opening,
    the pool calls :meth:`connecting`, and then the connection's own fate
    (:meth:`connected`, :meth:`connect_failed`) is the outcome, whatever the
    request's.
    """

    __slots__ = ("_circuit", "_circuits", "_epoch", "_state")

    # _state: what the ticket waits for.
    _OUT, _CONNECTING, _TOLD = 0, 1, 2

    def __init__(self, circuits: Circuits, circuit: _Circuit) -> None:
        self._circuits = circuits
        self._circuit = circuit
        self._epoch = circuit.epoch
        self._state = self._OUT

    def answered(self, status: int) -> None:
        """The upstream answered with ``status``."""
        if self._state != self._OUT:
            return
        self._state = self._TOLD
        circuits = self._circuits
        if status >= 500 and circuits.settings.count_5xx:
            circuits._told(self._circuit, self._epoch, f"status {status}")
        else:
            circuits._told(self._circuit, self._epoch, None)

    def failed(self, failure: Failure) -> None:
        """
        The request failed with ``failure``; whether that counts, the
        circuits' ``judge`` says.
        """
        if self._state != self._OUT:
            return
        self._state = self._TOLD
        circuits = self._circuits
        reason = circuits.judge(failure)
        if reason is None:
            circuits._untold(self._circuit, self._epoch)
        else:
            circuits._told(self._circuit, self._epoch, reason)

    def neutral(self) -> None:
        """The request ended in a way that says nothing of the upstream."""
        if self._state != self._OUT:
            return
        self._state = self._TOLD
        self._circuits._untold(self._circuit, self._epoch)

    def connecting(self) -> None:
        """
        The request was cut short while its connection was opening; the
        pool finishes that connection, whose fate will be the outcome.
        """
        if self._state == self._OUT:
            self._state = self._CONNECTING

    def connected(self) -> None:
        """The connection opened after all: the upstream is reachable."""
        if self._state == self._CONNECTING:
            self._state = self._TOLD
            self._circuits._told(self._circuit, self._epoch, None)

    def connect_failed(self, failure: Failure) -> None:
        """The connection did not open, with ``failure``."""
        if self._state == self._CONNECTING:
            self._state = self._OUT
            self.failed(failure)

    def connect_given_up(self, reason: str | None) -> None:
        """
        The pool gave up on the connection, which counts for ``reason``;
        ``None`` if that says nothing of the upstream.
        """
        if self._state == self._CONNECTING:
            self._state = self._TOLD
            if reason is None:
                self._circuits._untold(self._circuit, self._epoch)
            else:
                self._circuits._told(self._circuit, self._epoch, reason)


class Circuits:
    """
    Every upstream's circuit.

    :param clock: the time source.
    :param settings: how circuits behave; :attr:`settings` may be replaced
        (see :meth:`reconfigure`).
    :param metrics: counts circuits opened and requests failed at once, per
        upstream host (the first hosts, then ``other``, as the pool's
        metrics), and reads the circuits' states at each scrape.
    :param judge: given the failure of a request let through, the reason it
        counts against the upstream (a few words for the log and the
        callers' errors), or ``None`` if it says nothing of the upstream.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        settings: CircuitSettings,
        metrics: Metrics,
        judge: Callable[[Failure], str | None],
    ) -> None:
        self._clock = clock
        self.settings = settings
        self._metrics = metrics
        self.judge = judge
        self._step = settings.window / BUCKETS
        #: Least recently used first.
        self._table: OrderedDict[UpstreamKey, _Circuit] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def reconfigure(self, settings: CircuitSettings) -> None:
        """
        Apply new settings (a reload): states and cool-downs stand, and the
        new thresholds apply from the next outcome; a new window empties
        every circuit's window.
        """
        if settings.window != self.settings.window:
            self._step = settings.window / BUCKETS
            for circuit in self._table.values():
                circuit.forget_window()
                circuit.tick = 0
        self.settings = settings

    def state(self, key: UpstreamKey) -> str:
        """The state of the circuit of ``key``: closed if it has none."""
        circuit = self._table.get(key)
        return CLOSED if circuit is None else circuit.state

    def states(self) -> Iterator[tuple[str, str]]:
        """Every circuit's metric label and state, for a scrape."""
        for circuit in list(self._table.values()):
            yield circuit.label, circuit.state

    def admit(self, key: UpstreamKey) -> Ticket:
        """
        Let a request to ``key``'s upstream through, or refuse it.

        :return: the ticket whose outcome its caller tells.
        :raises CircuitOpen: the circuit is open, or half-open with its
            probes out; the message says why and until when.
        """
        now = self._clock.seconds()
        table = self._table
        circuit = table.get(key)
        if circuit is None:
            circuit = self._new(key, now)
        else:
            table.move_to_end(key)
        circuit.last_used = now
        state = circuit.state
        if state is CLOSED:
            return Ticket(self, circuit)
        if state is OPEN:
            if now < circuit.reopen_at:
                circuit.rejected.inc()
                raise CircuitOpen(circuit.upstream, self._open_message(circuit, now))
            self._half_open(circuit)
        settings = self.settings
        if circuit.probes_out + circuit.probes_ok >= settings.probes:
            if now - circuit.probe_since < settings.window:
                circuit.rejected.inc()
                raise CircuitOpen(circuit.upstream, self._half_open_message(circuit))
            # The probes out have said nothing for a whole window: give them
            # up (their outcomes no longer count) and probe again.
            circuit.epoch += 1
            circuit.probes_out = circuit.probes_ok = 0
        circuit.probes_out += 1
        circuit.probe_since = now
        return Ticket(self, circuit)

    def _new(self, key: UpstreamKey, now: float) -> _Circuit:
        table = self._table
        if len(table) >= MAX_CIRCUITS:
            self._evict()
        scheme, host, port = key
        # The pool's key, so that the label is the one its metrics use.
        pool_key = (scheme.encode("ascii", "replace"), host.encode("ascii", "replace"), port)
        circuit = table[key] = _Circuit(key, self._metrics.host_label(pool_key), self._metrics, now)
        circuit.tick = int(now // self._step)
        return circuit

    def _evict(self) -> None:
        table = self._table
        victim = None
        for scanned, (key, circuit) in enumerate(table.items()):
            if circuit.state is CLOSED:
                victim = key
                break
            if scanned + 1 >= _EVICTION_SCAN:
                break
        if victim is None:
            victim = next(iter(table))
        del table[victim]

    def prune(self) -> int:
        """
        Forget the circuits of hosts with no recent traffic: closed ones
        with no request for a window, others with none for a window and the
        longest cool-down.

        :return: how many were forgotten.
        """
        now = self._clock.seconds()
        settings = self.settings
        quiet = settings.window + settings.max_cooldown
        stale = [
            key
            for key, circuit in self._table.items()
            if now - circuit.last_used >= (settings.window if circuit.state is CLOSED else quiet)
        ]
        for key in stale:
            del self._table[key]
        return len(stale)

    def _told(self, circuit: _Circuit, epoch: int, reason: str | None) -> None:
        """
        A request let through in ``epoch`` succeeded (``reason`` is
        ``None``), or failed for ``reason``.
        """
        if circuit.epoch != epoch:
            return
        if circuit.state is HALF_OPEN:
            circuit.probes_out -= 1
            if reason is not None:
                self._reopen(circuit, reason)
                return
            circuit.probes_ok += 1
            if circuit.probes_ok >= self.settings.probes:
                self._close(circuit)
            return
        # Closed (an open circuit has moved on from every epoch that let a
        # request through).
        now = self._clock.seconds()
        circuit.advance(int(now // self._step))
        index = circuit.tick % BUCKETS
        if reason is None:
            circuit.ok += 1
            circuit.oks[index] += 1
            return
        circuit.bad += 1
        circuit.bads[index] += 1
        settings = self.settings
        total = circuit.ok + circuit.bad
        if total >= settings.min_requests and circuit.bad >= settings.failure_ratio * total:
            self._open(circuit, now, circuit.bad, total, reason)

    def _untold(self, circuit: _Circuit, epoch: int) -> None:
        """A request let through in ``epoch`` ended saying nothing."""
        if circuit.epoch == epoch and circuit.state is HALF_OPEN:
            # Its probe's turn goes to the next request.
            circuit.probes_out -= 1

    def _open(self, circuit: _Circuit, now: float, failed: int, total: int, reason: str) -> None:
        settings = self.settings
        circuit.state = OPEN
        circuit.epoch += 1
        circuit.cooldown = settings.cooldown
        circuit.reopen_at = now + settings.cooldown
        circuit.forget_window()
        circuit.why = (
            f"{failed} of the {total} requests in the last {settings.window:g} s failed ({reason})"
        )
        circuit.opened.inc()
        self.log.warn(
            "circuit to {upstream} opened: {failed} of the {requests} requests in the last "
            "{window:g} s failed ({reason}); requests to it fail at once for {cooldown:g} s",
            upstream=circuit.upstream,
            failed=failed,
            requests=total,
            window=settings.window,
            reason=reason,
            cooldown=settings.cooldown,
            circuit="opened",
        )

    def _half_open(self, circuit: _Circuit) -> None:
        circuit.state = HALF_OPEN
        circuit.epoch += 1
        circuit.probes_out = circuit.probes_ok = 0
        self.log.info(
            "circuit to {upstream} half-open after {cooldown:g} s: letting {probes} probe "
            "request(s) through",
            upstream=circuit.upstream,
            cooldown=circuit.cooldown,
            probes=self.settings.probes,
            circuit="half_open",
        )

    def _close(self, circuit: _Circuit) -> None:
        circuit.state = CLOSED
        circuit.epoch += 1
        circuit.cooldown = 0.0
        circuit.forget_window()
        circuit.tick = int(self._clock.seconds() // self._step)
        self.log.info(
            "circuit to {upstream} closed after probe: {probes} probe request(s) succeeded",
            upstream=circuit.upstream,
            probes=circuit.probes_ok,
            circuit="closed",
        )

    def _reopen(self, circuit: _Circuit, reason: str) -> None:
        settings = self.settings
        now = self._clock.seconds()
        circuit.state = OPEN
        circuit.epoch += 1
        circuit.cooldown = min(max(circuit.cooldown, settings.cooldown) * 2, settings.max_cooldown)
        circuit.reopen_at = now + circuit.cooldown
        circuit.why = f"its probe request failed ({reason})"
        circuit.opened.inc()
        self.log.warn(
            "circuit to {upstream} reopened: a probe request failed ({reason}); requests to "
            "it fail at once for {cooldown:g} s",
            upstream=circuit.upstream,
            reason=reason,
            cooldown=circuit.cooldown,
            circuit="reopened",
        )

    def _open_message(self, circuit: _Circuit, now: float) -> str:
        return (
            f"circuit to {circuit.upstream} is open: {circuit.why}; next probe in "
            f"{circuit.reopen_at - now:.1f} s (--circuit-cooldown)"
        )

    def _half_open_message(self, circuit: _Circuit) -> str:
        return (
            f"circuit to {circuit.upstream} is half-open: waiting for its probe request "
            f"(--circuit-probes {self.settings.probes}); it opened because {circuit.why}"
        )
