"""
Outlier ejection across a host's addresses (``--outlier-ejection on``):
when one address of a name misbehaves while its siblings do not, new
connections leave it out for a back-off, then one probe request decides
whether it comes back.  Envoy's outlier detection, scaled to a fan-out
daemon.

Each address is tracked per upstream, ``(scheme, host, port)`` as the pool
keys its connections, so two names of one address are judged apart.  An
address is one of:

- **active**: in rotation.  It is **ejected** when it has
  ``consecutive_failures`` connect failures in a row (refused, unreachable,
  ``--connect-timeout``, TLS handshake failed), ``consecutive_5xx`` ``5xx``
  answers in a row (0: never), or when its mean latency (request written to
  response head) over the last ``latency_window`` seconds, from at least
  ``latency_min_samples`` requests, is above ``latency_factor`` times the
  median of its siblings' (those with as many samples), and at least
  ``latency_floor`` seconds above it, so that 1 ms against 3 ms ejects
  nothing.
- **ejected**: no new connection dials it, and its pooled connections are
  retired instead of reused, for ``ejection_time`` seconds times the number
  of times it was ejected, at most ``max_ejection_time`` (the count starts
  again once it has stayed active that long).
- **probing**: the back-off is over.  The next new connection to the host
  dials it first, and the one request on that connection is the probe:
  an answer (not a counted ``5xx``, not a latency outlier) restores the
  address; a failure ejects it again, for longer.  Others leave it out
  while the probe is out; a probe that has said nothing for
  ``ejection_time`` seconds is given up on, and the next connection probes.

No more than ``max_ejected_percent`` of a host's addresses (as its last DNS
answer lists them, rounded down) are out of rotation at once: a host with a
single address is never ejected, which is the circuit breaker's job
(:mod:`octoplex.circuits`).  If every address of a host is out anyway (the
DNS answer changed), all are dialled.

Where it plugs in: :mod:`octoplex.endpoints` asks :meth:`Outliers.choose`
for the order of a new connection's addresses and reports each failed
attempt (:meth:`Outliers.connect_failed`); the pool attaches each new
connection to its address (:meth:`Outliers.attach`), and builds it as a
:class:`TrackedUpstreamProtocol`, which reports its TLS handshake, its
answers' status and latency, and a connection lost before an answer; the
pool retires a connection whose address was ejected since it opened
(:func:`usable`).  With ejection off, none of it runs: a new connection
costs three attribute checks (one in the dialler, two in the pool), a
reused one one.

Memory is bounded: :data:`MAX_HOSTS` hosts (least recently used evicted
first), :data:`MAX_ADDRESSES` addresses each (more are not tracked, and
never ejected), and :meth:`Outliers.prune` forgets hosts with no recent
traffic.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from statistics import median
from typing import Any

import attr
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from octoplex.errors import describe
from octoplex.http11 import UpstreamProtocol
from octoplex.metrics import Metrics

__all__ = [
    "ACTIVE",
    "EJECTED",
    "MAX_ADDRESSES",
    "MAX_HOSTS",
    "PROBING",
    "REASONS",
    "OutlierSettings",
    "Outliers",
    "TrackedUpstreamProtocol",
    "usable",
]

ACTIVE, EJECTED, PROBING = "active", "ejected", "probing"

#: The ``reason`` label of ``octoplex_upstream_ejections_total``: consecutive
#: connect failures, consecutive ``5xx``, latency, or a failed probe.
REASONS = ("connect", "5xx", "latency", "probe")

#: Hosts tracked at most; a new one evicts the least recently used.
MAX_HOSTS = 10_000

#: Addresses tracked per host; the others are dialled but never ejected.
MAX_ADDRESSES = 64

#: Buckets of the latency window.
BUCKETS = 10

#: Seconds between two latency checks of one address (each costs a pass
#: over its siblings).
LATENCY_CHECK_INTERVAL = 1.0


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class OutlierSettings:
    """
    How outlier ejection behaves (``--outlier-*``).

    :ivar enabled: whether addresses are tracked at all.
    :ivar consecutive_failures: connect failures in a row that eject.
    :ivar consecutive_5xx: ``5xx`` answers in a row that eject; 0 never.
    :ivar latency_factor: how many times its siblings' median latency an
        address's may be before it is ejected; 0 never.
    :ivar latency_min_samples: requests an address, and each sibling it is
        compared with, must have answered in the window.
    :ivar latency_floor: seconds an address's latency must also be above
        its siblings' median.
    :ivar latency_window: seconds of latencies judged.
    :ivar ejection_time: the first back-off, in seconds; the n-th is n times
        as long.
    :ivar max_ejection_time: the longest back-off.
    :ivar max_ejected_percent: the most of a host's addresses out at once,
        in percent, rounded down.
    """

    enabled: bool = False
    consecutive_failures: int = 5
    consecutive_5xx: int = 0
    latency_factor: float = 3.0
    latency_min_samples: int = 20
    latency_floor: float = 0.05
    latency_window: float = 10.0
    ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejected_percent: int = 50


class _Host:
    """The tracked addresses of one upstream."""

    __slots__ = ("addresses", "key", "label", "last_used", "name", "out", "size")

    def __init__(self, key: Hashable, name: str, label: str, now: float) -> None:
        self.key = key
        #: ``host:port``, for the log.
        self.name = name
        #: The metrics' ``host`` label.
        self.label = label
        self.addresses: dict[str, _Address] = {}
        #: Addresses in its last DNS answer.
        self.size = 0
        #: Addresses ejected or probing.
        self.out = 0
        self.last_used = now


class _Address:
    """The state of one address of a host."""

    __slots__ = (
        "address",
        "count",
        "counts",
        "ejections",
        "epoch",
        "failures",
        "fives",
        "host",
        "next_check",
        "owner",
        "probe_out",
        "probe_since",
        "restored_at",
        "state",
        "sum",
        "sums",
        "tick",
        "until",
    )

    def __init__(self, owner: Outliers, host: _Host, address: str) -> None:
        self.owner = owner
        self.host = host
        self.address = address
        self.state = ACTIVE
        #: Bumped at each ejection (and each probe given up): a connection
        #: opened in an earlier epoch is not reused, and its outcomes do not
        #: count.
        self.epoch = 0
        self.failures = 0
        self.fives = 0
        self.ejections = 0
        self.until = 0.0
        self.restored_at = 0.0
        self.probe_out = False
        self.probe_since = 0.0
        #: When its latency may next be judged.
        self.next_check = 0.0
        #: Latencies in the window: totals, and per bucket.
        self.sum = 0.0
        self.count = 0
        self.sums = [0.0] * BUCKETS
        self.counts = [0] * BUCKETS
        self.tick = 0

    def forget_window(self) -> None:
        self.sum, self.count = 0.0, 0
        self.sums = [0.0] * BUCKETS
        self.counts = [0] * BUCKETS

    def advance(self, tick: int) -> None:
        passed = tick - self.tick
        if passed <= 0:
            return
        if passed >= BUCKETS:
            if self.count:
                self.forget_window()
        else:
            for step in range(self.tick + 1, tick + 1):
                index = step % BUCKETS
                self.sum -= self.sums[index]
                self.count -= self.counts[index]
                self.sums[index], self.counts[index] = 0.0, 0
        self.tick = tick

    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0


def usable(connection: Any) -> bool:
    """
    Whether the pool may reuse ``connection`` (one with an ``outlier``): its
    address has not been ejected since it opened, and is not ejected now.
    """
    address: _Address = connection.outlier
    return bool(connection.outlier_epoch == address.epoch and address.state is not EJECTED)


class TrackedUpstreamProtocol(UpstreamProtocol):
    """
    An upstream connection that tells its address's state how it goes:
    its TLS handshake, each answer's status and latency (request written to
    response head), how long a request cancelled unanswered had waited (a
    lower bound of its latency), and a connection lost before an answer.
    The pool builds these while outlier ejection is on.
    """

    #: Whether its TLS handshake is still awaited.
    tls_pending = False
    _sent_at = 0.0

    def request(self, request: Any, finished: Any = None) -> Any:
        self._sent_at = self.clock.seconds()
        return super().request(request, finished)

    def handshakeCompleted(self) -> None:
        super().handshakeCompleted()
        address = self.outlier
        if self.tls_pending and address is not None:
            self.tls_pending = False
            address.owner.connected(address, self.outlier_epoch)

    def _head_received(self, exchange: Any, code: int) -> None:
        address = self.outlier
        if address is not None:
            now = self.clock.seconds()
            start = self._sent_at
            if self.tls_done is not None and self.tls_done > start:
                # The request waited for the handshake: not the address's
                # answering time.
                start = self.tls_done
            address.owner.answered(address, self.outlier_epoch, code, now - start)
        super()._head_received(exchange, code)

    def _cancel(self, finished: Any) -> None:
        address = self.outlier
        exchange = self._exchange
        if (
            address is not None
            and self._state == "WAITING"
            and not self.tls_pending
            and exchange is not None
            and exchange.response is None
        ):
            # Sent, not answered, given up on: it took at least this long.
            start = self._sent_at
            if self.tls_done is not None and self.tls_done > start:
                start = self.tls_done
            address.owner.waited(address, self.outlier_epoch, self.clock.seconds() - start)
        super()._cancel(finished)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        address = self.outlier
        if address is not None and self._state != "ABORTING":
            exchange = self._exchange
            if self.tls_pending:
                self.tls_pending = False
                address.owner.failed(address, self.outlier_epoch, reason, "TLS handshake failed")
            elif exchange is not None and exchange.response is None:
                # Lost before the answer, the request not cancelled (that
                # ends the exchange first).
                address.owner.lost(address, self.outlier_epoch, reason)
        super().connectionLost(reason)


def _name(key: Any) -> str:
    """``host:port`` of a pool key."""
    _, host, port = key
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    return f"{host}:{port}"


class Outliers:
    """
    Every tracked address's state.

    :param clock: the time source.
    :param settings: how addresses are judged; :attr:`settings` may be
        replaced (:meth:`reconfigure`).
    :param metrics: counts ejections per host and reason, and reads the
        ejected addresses at each scrape.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, settings: OutlierSettings, metrics: Metrics) -> None:
        self._clock = clock
        self.settings = settings
        self._metrics = metrics
        self._step = settings.latency_window / BUCKETS
        #: Least recently used first.
        self._hosts: OrderedDict[Hashable, _Host] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hosts)

    def reconfigure(self, settings: OutlierSettings) -> None:
        """
        Apply new settings (a reload): states and back-offs stand, the new
        thresholds apply from the next outcome, and a new latency window
        empties every address's.
        """
        if settings.latency_window != self.settings.latency_window:
            self._step = settings.latency_window / BUCKETS
            for host in self._hosts.values():
                for address in host.addresses.values():
                    address.forget_window()
                    address.tick = 0
        self.settings = settings

    def state(self, key: Hashable, address: str) -> str:
        """The state of ``address`` of upstream ``key``: active if untracked."""
        host = self._hosts.get(key)
        found = None if host is None else host.addresses.get(address)
        return ACTIVE if found is None else found.state

    def ejected(self) -> Iterator[tuple[str, str]]:
        """The host label and address of every address out of rotation."""
        for host in list(self._hosts.values()):
            if host.out:
                for address in list(host.addresses.values()):
                    if address.state is not ACTIVE:
                        yield host.label, address.address

    # The dialler's side -------------------------------------------------

    def _host(self, key: Hashable, now: float) -> _Host:
        hosts = self._hosts
        host = hosts.get(key)
        if host is None:
            if len(hosts) >= MAX_HOSTS:
                del hosts[next(iter(hosts))]
            host = hosts[key] = _Host(key, _name(key), self._metrics.host_label(key), now)
        else:
            hosts.move_to_end(key)
        host.last_used = now
        return host

    def _address(self, host: _Host, address: str) -> _Address | None:
        found = host.addresses.get(address)
        if found is None and len(host.addresses) < MAX_ADDRESSES:
            found = host.addresses[address] = _Address(self, host, address)
            found.tick = int(self._clock.seconds() // self._step)
        return found

    def choose(self, key: Hashable, addresses: list[str]) -> tuple[list[str], str | None]:
        """
        The addresses a new connection to upstream ``key`` may dial, of the
        DNS answer's ``addresses`` in their order: those ejected left out,
        and an address whose back-off is over first, as the probe.

        :return: the addresses, and the probe's address or ``None``.
        """
        now = self._clock.seconds()
        host = self._host(key, now)
        host.size = len(addresses)
        if not host.out:
            return addresses, None
        chosen: list[str] = []
        probe = None
        giving_up = self.settings.ejection_time
        for name in addresses:
            address = host.addresses.get(name)
            if address is None or address.state is ACTIVE:
                chosen.append(name)
                continue
            if address.state is EJECTED:
                if now < address.until:
                    continue
                self._probing(address, now)
            if address.probe_out:
                if now - address.probe_since < giving_up:
                    continue
                # Its probe said nothing: give it up (whatever it says later
                # does not count) and probe again.
                address.epoch += 1
            if probe is None:
                address.probe_out = True
                address.probe_since = now
                probe = name
        if probe is not None:
            chosen.insert(0, probe)
        if not chosen:
            # Every address is out: dial them all rather than none.
            return addresses, None
        return chosen, probe

    def connect_failed(self, key: Hashable, name: str, failure: Failure) -> None:
        """A connect to address ``name`` of upstream ``key`` failed."""
        host = self._hosts.get(key)
        if host is None:
            return
        address = self._address(host, name)
        if address is not None:
            self.failed(address, address.epoch, failure, describe(failure))

    def probe_dropped(self, key: Hashable, name: str) -> None:
        """The probe's connect to ``name`` was cancelled: the next connection probes."""
        host = self._hosts.get(key)
        address = None if host is None else host.addresses.get(name)
        if address is not None and address.state is PROBING:
            address.probe_out = False

    # The pool's side ----------------------------------------------------

    def attach(self, protocol: Any, key: Hashable) -> None:
        """
        Track the new connection ``protocol`` of upstream ``key`` under the
        address it reached.
        """
        if not isinstance(protocol, TrackedUpstreamProtocol):
            # Opened while ejection was off.
            return
        peer = protocol.transport.getPeer()
        name = getattr(peer, "host", None)
        if not isinstance(name, str):
            return
        host = self._host(key, self._clock.seconds())
        address = self._address(host, name)
        if address is None:
            return
        protocol.outlier = address
        protocol.outlier_epoch = address.epoch
        if ISSLTransport.providedBy(protocol.transport) and protocol.tls_done is None:
            protocol.tls_pending = True
        else:
            self.connected(address, address.epoch)

    # Outcomes -----------------------------------------------------------

    def connected(self, address: _Address, epoch: int) -> None:
        """A connection to ``address`` opened (its TLS handshake done)."""
        if epoch == address.epoch and address.state is ACTIVE:
            address.failures = 0

    def failed(self, address: _Address, epoch: int, failure: Failure, reason: str) -> None:
        """A connection to ``address`` failed to open, for ``reason``."""
        if epoch != address.epoch or failure.check(CancelledError):
            return
        if address.state is PROBING:
            self._eject_again(address, reason)
            return
        if address.state is EJECTED:
            return
        address.failures += 1
        count = self.settings.consecutive_failures
        if address.failures >= count:
            self._eject(address, "connect", f"{count} consecutive connect failures ({reason})")

    def lost(self, address: _Address, epoch: int, failure: Failure) -> None:
        """
        A connection to ``address`` was lost before its request's answer:
        the probe failed, if it was the probe.
        """
        if epoch == address.epoch and address.state is PROBING:
            self._eject_again(address, describe(failure))

    def answered(self, address: _Address, epoch: int, status: int, latency: float) -> None:
        """``address`` answered with ``status``, ``latency`` seconds after the request."""
        if epoch != address.epoch:
            return
        settings = self.settings
        host = address.host
        now = self._clock.seconds()
        host.last_used = now
        if address.state is PROBING:
            if settings.consecutive_5xx and status >= 500:
                self._eject_again(address, f"status {status}")
                return
            slow = self._slow(address, latency)
            if slow is not None:
                self._eject_again(address, slow)
                return
            self._restore(address, now)
            return
        if address.state is EJECTED:
            return
        address.failures = 0
        if settings.consecutive_5xx:
            if status >= 500:
                address.fives += 1
                if address.fives >= settings.consecutive_5xx:
                    self._eject(
                        address,
                        "5xx",
                        f"{address.fives} consecutive 5xx answers (the last: status {status})",
                    )
                    return
            else:
                address.fives = 0
        if settings.latency_factor:
            self._sample(address, latency, now)

    def waited(self, address: _Address, epoch: int, latency: float) -> None:
        """
        A request to ``address`` was cancelled (its deadline, or a hedge
        that answered first) ``latency`` seconds after it was sent, with no
        answer yet: a lower bound of its latency, taken as a sample.

        Without it an address that accepts requests and answers none, or
        too late for its callers' deadlines, or whose slow answers hedges
        cut short, would show latency ejection nothing.  A lower bound can
        make an address look faster than it is, never slower: it ejects
        none that its true latencies would not.  It resets no failure count.
        """
        if epoch != address.epoch or address.state is not ACTIVE:
            return
        if self.settings.latency_factor:
            now = self._clock.seconds()
            address.host.last_used = now
            self._sample(address, latency, now)

    def _sample(self, address: _Address, latency: float, now: float) -> None:
        """One more latency of ``address``, in its window; judge it when due."""
        tick = int(now // self._step)
        address.advance(tick)
        index = tick % BUCKETS
        address.sum += latency
        address.count += 1
        address.sums[index] += latency
        address.counts[index] += 1
        if now >= address.next_check and address.count >= self.settings.latency_min_samples:
            self._check_latency(address, now, tick)

    def _means(self, host: _Host, tick: int, leave_out: _Address | None) -> list[float]:
        """The mean latencies of ``host``'s active addresses with enough samples."""
        wanted = self.settings.latency_min_samples
        means = []
        for address in host.addresses.values():
            if address is leave_out or address.state is not ACTIVE:
                continue
            address.advance(tick)
            if address.count >= wanted:
                means.append(address.mean())
        return means

    def _too_slow(self, latency: float, siblings: list[float]) -> str | None:
        settings = self.settings
        if not siblings or not settings.latency_factor:
            return None
        middle = median(siblings)
        floor = settings.latency_floor
        if latency > settings.latency_factor * middle and latency - middle >= floor:
            return (
                f"{latency * 1000:.0f} ms, above {settings.latency_factor:g} times its "
                f"siblings' median of {middle * 1000:.0f} ms"
            )
        return None

    def _slow(self, address: _Address, latency: float) -> str | None:
        """Why the probe's ``latency`` is an outlier's, or ``None``."""
        tick = int(self._clock.seconds() // self._step)
        why = self._too_slow(latency, self._means(address.host, tick, address))
        return None if why is None else f"its answer took {why}"

    def _check_latency(self, address: _Address, now: float, tick: int) -> None:
        """Eject ``address`` if its mean latency is an outlier's among its siblings'."""
        siblings = self._means(address.host, tick, address)
        if not siblings:
            return
        # Judged at most once a second, once there is something to judge by.
        address.next_check = now + LATENCY_CHECK_INTERVAL
        why = self._too_slow(address.mean(), siblings)
        if why is not None:
            window = self.settings.latency_window
            self._eject(
                address,
                "latency",
                f"mean latency over the last {window:g} s ({address.count} requests) {why}",
            )

    # Changes of state ---------------------------------------------------

    def _back_off(self, address: _Address, now: float) -> float:
        settings = self.settings
        if address.state is ACTIVE and now - address.restored_at >= settings.max_ejection_time:
            # Active for the longest back-off: its past is forgiven.
            address.ejections = 0
        address.ejections += 1
        return float(min(settings.ejection_time * address.ejections, settings.max_ejection_time))

    def _out(self, address: _Address, now: float, seconds: float) -> None:
        address.state = EJECTED
        address.epoch += 1
        address.until = now + seconds
        address.failures = address.fives = 0
        address.probe_out = False
        address.forget_window()

    def _eject(self, address: _Address, reason: str, why: str) -> None:
        host = self._hosts.get(address.host.key)
        if host is not address.host:
            # Forgotten meanwhile (pruned or evicted).
            return
        if host.out + 1 > host.size * self.settings.max_ejected_percent // 100:
            # The share of the host's addresses out is at its most (one
            # address alone is never ejected): it stays, and the next
            # outcome tries again.
            return
        now = self._clock.seconds()
        seconds = self._back_off(address, now)
        self._out(address, now, seconds)
        host.out += 1
        self._metrics.upstream_ejections.labels(host.label, reason).inc()
        self.log.warn(
            "address {address} of {host} ejected for {seconds:g} s: {reason}",
            address=address.address,
            host=host.name,
            seconds=seconds,
            reason=why,
            why=reason,
            outlier="ejected",
        )

    def _probing(self, address: _Address, now: float) -> None:
        address.state = PROBING
        address.probe_out = False
        self.log.info(
            "address {address} of {host} probing: its back-off is over, and the next "
            "connection to {host} tries it first",
            address=address.address,
            host=address.host.name,
            outlier="probing",
        )

    def _restore(self, address: _Address, now: float) -> None:
        address.state = ACTIVE
        address.probe_out = False
        address.restored_at = now
        address.failures = address.fives = 0
        address.forget_window()
        address.tick = int(now // self._step)
        address.host.out -= 1
        self.log.info(
            "address {address} of {host} restored: its probe request succeeded",
            address=address.address,
            host=address.host.name,
            outlier="restored",
        )

    def _eject_again(self, address: _Address, reason: str) -> None:
        now = self._clock.seconds()
        seconds = self._back_off(address, now)
        self._out(address, now, seconds)
        self._metrics.upstream_ejections.labels(address.host.label, "probe").inc()
        self.log.warn(
            "address {address} of {host} re-ejected for {seconds:g} s: its probe failed ({reason})",
            address=address.address,
            host=address.host.name,
            seconds=seconds,
            reason=reason,
            why="probe",
            outlier="re_ejected",
        )

    def prune(self) -> int:
        """
        Forget the hosts with no recent traffic: those with every address
        active after a latency window, the others after the longest
        back-off too.

        :return: how many were forgotten.
        """
        now = self._clock.seconds()
        settings = self.settings
        quiet = settings.latency_window + settings.max_ejection_time
        stale = [
            key
            for key, host in self._hosts.items()
            if now - host.last_used >= (quiet if host.out else settings.latency_window)
        ]
        for key in stale:
            del self._hosts[key]
        return len(stale)
