"""
Statistics: every metric Octoplex keeps, defined in one place.

:class:`Metrics` owns a ``prometheus_client`` registry (never the global
default one, so that several daemons can run in one process, as the tests
do) and is passed, like the reactor, to each piece that counts: the app,
the multiplexer, the upstream client and its pool, the endpoints and the
resolver.  The hot path only touches counters and histograms whose
labelled children were bound beforehand: no dict is built per request.

The metrics counted per batch, per item and per connection are
:class:`LocklessCounter` and :class:`LocklessHistogram`: an increment is an
addition to a Python number, with no lock (prometheus_client's take one on
every ``inc``, and its ``observe`` walks the buckets in Python), read by a
collector at scrape time.  They are only ever changed on the reactor
thread.  Their exposition is prometheus_client's, sample for sample.

:func:`render_text` serves the registry in Prometheus' text format
(``/metrics``), :func:`render_json` as a JSON document (``/stats``).
"""

from __future__ import annotations

import json
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = [
    "CAUSES",
    "CIRCUIT_STATES",
    "LATENCY_BUCKETS",
    "MAX_HOSTS",
    "TEXT_CONTENT_TYPE",
    "LocklessCounter",
    "LocklessHistogram",
    "Metrics",
    "UpstreamMetrics",
    "registry_stats",
    "render_json",
    "render_text",
]

#: Seconds, from a fraction of a millisecond to the longest deadline.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

#: Upstream hosts (``host:port``) given a label of their own; the rest are
#: counted under ``other``, so made-up names cannot grow the series.
MAX_HOSTS = 100

#: The ``cause`` label of ``octoplex_items_total``, by outcome.
CAUSES: dict[str, tuple[str, ...]] = {
    "success": ("response",),
    "timeout": ("deadline", "queue_timeout"),
    "failure": (
        "connect",
        "dns",
        "tls",
        "protocol",
        "connection",
        "too_large",
        "forbidden",
        "invalid",
        "cancelled",
        "internal",
        "other",
        "circuit_open",
    ),
}

#: The ``state`` label of ``octoplex_circuit_state``.
CIRCUIT_STATES = ("closed", "open", "half_open")

TEXT_CONTENT_TYPE = CONTENT_TYPE_LATEST.encode("ascii")


class _Count:
    """One series of a :class:`LocklessCounter`."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (never negative: callers count things that happened)."""
        self.value += amount


class _Distribution:
    """One series of a :class:`LocklessHistogram`: a count per bucket."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        #: Observations per bucket, not cumulative; the last is +Inf's.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """Count one observation (a bucket's bound is inclusive, as Prometheus' ``le``)."""
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Lockless(Collector):
    """
    A metric family whose series live in plain Python numbers, collected
    at scrape time; only the reactor thread changes them.
    """

    kind = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        if not self._labelnames:
            self._children[()] = self._child()
        if registry is not None:
            registry.register(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        """The series of these label values, made on first use."""
        key = tuple(str(v) for v in values)
        if len(key) != len(self._labelnames):
            raise ValueError(f"{self._name} takes labels {self._labelnames}, not {key}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._child()
        return child

    def describe(self) -> Iterable[Metric]:
        return [Metric(self._name, self._documentation, self.kind)]

    def _labelled(self, key: tuple[str, ...], **more: str) -> dict[str, str]:
        labels = dict(zip(self._labelnames, key, strict=True))
        labels.update(more)
        return labels


class LocklessCounter(_Lockless):
    """
    A counter (``NAME_total``, ``NAME_created``) with the interface the
    daemon uses of prometheus_client's: ``labels(...)`` and ``inc()``.
    """

    kind = "counter"

    def _child(self) -> _Count:
        return _Count()

    def inc(self, amount: float = 1) -> None:
        """Count ``amount`` in the unlabelled series."""
        self._children[()].value += amount

    def collect(self) -> Iterable[Metric]:
        family = Metric(self._name, self._documentation, self.kind)
        for key, child in list(self._children.items()):
            family.add_sample(self._name + "_total", self._labelled(key), child.value)
            family.add_sample(self._name + "_created", self._labelled(key), child.created)
        yield family


class LocklessHistogram(_Lockless):
    """
    A histogram (cumulative ``NAME_bucket`` per ``le``, ``NAME_count``,
    ``NAME_sum``, ``NAME_created``) with the interface the daemon uses of
    prometheus_client's: ``labels(...)`` and ``observe()``.
    """

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        registry: CollectorRegistry | None = None,
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        self._bounds = tuple(float(b) for b in buckets if b != math.inf)
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _Distribution:
        return _Distribution(self._bounds)

    def observe(self, amount: float) -> None:
        """Count one observation in the unlabelled series."""
        self._children[()].observe(amount)

    def collect(self) -> Iterable[Metric]:
        family = Metric(self._name, self._documentation, self.kind)
        bounds = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        for key, child in list(self._children.items()):
            running = 0
            for bound, count in zip(bounds, child.counts, strict=True):
                running += count
                labels = self._labelled(key, le=bound)
                family.add_sample(self._name + "_bucket", labels, running)
            family.add_sample(self._name + "_count", self._labelled(key), running)
            family.add_sample(self._name + "_sum", self._labelled(key), child.sum)
            family.add_sample(self._name + "_created", self._labelled(key), child.created)
        yield family


class UpstreamMetrics:
    """
    The pool's counters for one upstream host (or for ``other``).
    """

    __slots__ = ("opened", "retired", "reused")

    def __init__(self, metrics: Metrics, host: str) -> None:
        self.opened = metrics.connections_opened.labels(host)
        self.reused = metrics.connections_reused.labels(host)
        self.retired = metrics.connections_retired.labels(host)


class _CircuitStates(Collector):
    """
    ``octoplex_circuit_state``, per host and state, read from the circuits
    (``--circuit-breaking``) when the registry is collected: 1 for the state
    a host's circuit is in, 0 for the others.  One series per state rather
    than one gauge holding a state's number, so that the master's sum over
    its workers (``--workers``) counts the workers whose circuit to a host
    is in each state; under ``other``, the circuits in each state.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "octoplex_circuit_state",
            "Circuits (--circuit-breaking) by upstream host and state: 1 for the state "
            "each is in (closed, open, half_open), 0 for the others.",
            labels=["host", "state"],
        )
        counts: dict[str, dict[str, int]] = {}
        for host, state in self._metrics.circuit_source():
            by_state = counts.get(host)
            if by_state is None:
                by_state = counts[host] = dict.fromkeys(CIRCUIT_STATES, 0)
            by_state[state] += 1
        for host, by_state in sorted(counts.items()):
            for state, count in by_state.items():
                family.add_metric([host, state], count)
        yield family

    def describe(self) -> Iterable[Metric]:
        return []


class _EjectedAddresses(Collector):
    """
    ``octoplex_upstream_address_ejected``, per host and address, read from
    the outlier tracker (``--outlier-ejection``) when the registry is
    collected: 1 for each address out of rotation (ejected, or probing).
    Only such addresses are listed.  The hosts past the first
    :data:`MAX_HOSTS` are counted under ``other`` with address ``other``,
    so the series stay bounded; the master's sum over its workers counts
    the workers that leave an address out.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "octoplex_upstream_address_ejected",
            "Addresses of upstream hosts out of rotation (--outlier-ejection): 1 for each "
            "ejected or probing address, by host and address.",
            labels=["host", "address"],
        )
        counts: dict[tuple[str, str], int] = {}
        for host, address in self._metrics.ejected_source():
            if host == "other":
                address = "other"
            counts[host, address] = counts.get((host, address), 0) + 1
        for (host, address), count in sorted(counts.items()):
            family.add_metric([host, address], count)
        yield family

    def describe(self) -> Iterable[Metric]:
        return []


class _IdleConnections(Collector):
    """
    ``octoplex_upstream_connections_idle``, per host, read from the pool
    when the registry is collected.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "octoplex_upstream_connections_idle",
            "Idle keep-alive connections in the pool, by upstream host.",
            labels=["host"],
        )
        by_host: dict[str, int] = {}
        for key, count in self._metrics.idle_source():
            host = self._metrics.host_label(key)
            by_host[host] = by_host.get(host, 0) + count
        for host, count in sorted(by_host.items()):
            family.add_metric([host], count)
        yield family

    def describe(self) -> Iterable[Metric]:
        return []


def _host(key: Hashable) -> str:
    # The pool's key is the Agent's (scheme, host, port), host in bytes.
    if isinstance(key, tuple) and len(key) == 3:
        scheme, host, port = key
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if isinstance(scheme, bytes):
            scheme = scheme.decode("ascii", "replace")
        return f"{scheme}://{host}:{port}"
    return str(key)


class Metrics:
    """
    Every metric of one Octoplex, in its own registry.

    :param registry: the registry to define them in; a new one by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = CollectorRegistry() if registry is None else registry
        self.batches = LocklessCounter(
            "octoplex_batches", "Batches answered, by HTTP status.", ["status"], registry=registry
        )
        self.batch_seconds = LocklessHistogram(
            "octoplex_batch_seconds",
            "Seconds from a batch's arrival to its answer.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.items = LocklessCounter(
            "octoplex_items",
            "Items (upstream requests) settled, by outcome and cause.",
            ["outcome", "cause"],
            registry=registry,
        )
        self.item_seconds = LocklessHistogram(
            "octoplex_item_seconds",
            "Seconds from a batch's start to each item's outcome.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batches_in_flight = Gauge(
            "octoplex_batches_in_flight", "Batches being answered now.", registry=registry
        )
        self.items_in_flight = Gauge(
            "octoplex_items_in_flight",
            "Items of the batches being answered now.",
            registry=registry,
        )
        self.shed = Counter(
            "octoplex_batches_shed",
            "Batches refused with 503 because the in-flight caps were reached.",
            registry=registry,
        )
        self.throttled = Counter(
            "octoplex_batches_throttled",
            "Batches refused with 429 because their client was over its share of the "
            "in-flight caps.",
            registry=registry,
        )
        self.inbound_refused = Counter(
            "octoplex_inbound_refused",
            "Requests and connections refused before reaching the app, by status: 400 "
            "malformed, 408 too slow, 413 too large, 431 head too large, 503 too many "
            "connections.",
            ["status"],
            registry=registry,
        )
        self.buffered_bytes = Gauge(
            "octoplex_buffered_bytes",
            "Bytes of upstream bodies and unsent answers held now (--max-buffered-bytes).",
            registry=registry,
        )
        self.buffered_bytes_limit = Gauge(
            "octoplex_buffered_bytes_limit",
            "The budget of buffered bytes (--max-buffered-bytes).",
            registry=registry,
        )
        self.send_timeouts = Counter(
            "octoplex_send_timeouts",
            "Inbound connections aborted because an answer was not read within --send-timeout.",
            registry=registry,
        )
        self.deadlines_expired = Counter(
            "octoplex_deadlines_expired",
            "Batches whose deadline expired with items still pending.",
            registry=registry,
        )
        self.egress_refused = Counter(
            "octoplex_egress_refused",
            "Upstream connections refused by the egress policy.",
            registry=registry,
        )
        self.bytes_received = LocklessCounter(
            "octoplex_received_bytes",
            "Bytes of batch request bodies received (as sent, before any gzip decoding).",
            registry=registry,
        )
        self.bytes_sent = LocklessCounter(
            "octoplex_sent_bytes",
            "Bytes of batch answers (JSON, before any gzip encoding).",
            registry=registry,
        )
        self.upstream_bytes = LocklessCounter(
            "octoplex_upstream_received_bytes",
            "Body bytes read from upstream responses (after gzip decoding).",
            registry=registry,
        )
        self.connections_opened = LocklessCounter(
            "octoplex_upstream_connections_opened",
            f"Upstream connections opened, by host (the first {MAX_HOSTS}, then other).",
            ["host"],
            registry=registry,
        )
        self.connections_reused = LocklessCounter(
            "octoplex_upstream_connections_reused",
            "Requests sent on an idle pooled connection rather than a new one, by host.",
            ["host"],
            registry=registry,
        )
        self.connections_retired = LocklessCounter(
            "octoplex_upstream_connections_retired",
            "Pooled connections closed by the pool's policy (age, uses, overflow, "
            "egress change), by host.",
            ["host"],
            registry=registry,
        )
        self.connection_wait = LocklessHistogram(
            "octoplex_upstream_connection_wait_seconds",
            "Seconds a request waited in the queue for a connection slot.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.dns_lookups = Counter(
            "octoplex_dns_lookups",
            "Host name lookups by the DNS cache: hit, stale (served while refreshed) or miss.",
            ["result"],
            registry=registry,
        )
        self.dns_queries = Counter(
            "octoplex_dns_queries",
            "Lookups sent to name servers (a miss answered from /etc/hosts sends none).",
            registry=registry,
        )
        self.circuit_opened = LocklessCounter(
            "octoplex_circuit_opened",
            "Times a circuit (--circuit-breaking) opened, reopening after a failed probe "
            "included, by upstream host.",
            ["host"],
            registry=registry,
        )
        self.circuit_rejected = LocklessCounter(
            "octoplex_circuit_rejected",
            "Requests failed at once (kind circuit_open) because their upstream's circuit "
            "was open, by upstream host.",
            ["host"],
            registry=registry,
        )
        self.hedges_sent = Counter(
            "octoplex_hedges_sent",
            "Hedges sent: second attempts of hedged requests whose first had no response "
            "head in time.",
            registry=registry,
        )
        self.hedges_won = Counter(
            "octoplex_hedges_won",
            "Hedges whose response head came before the first attempt's.",
            registry=registry,
        )
        self.hedge_attempts_cancelled = Counter(
            "octoplex_hedge_attempts_cancelled",
            "Attempts of hedged requests cancelled because the other attempt's head came first.",
            registry=registry,
        )
        self.hedges_skipped = Counter(
            "octoplex_hedges_skipped",
            "Hedges not sent when due: the caller's share or the in-flight cap was full "
            "(share), the upstream's circuit was not closed (circuit), the hedge budget was "
            "spent (budget); or not armed, the upstream having too few samples for "
            "after_percentile (samples).",
            ["reason"],
            registry=registry,
        )
        self.upstream_ejections = LocklessCounter(
            "octoplex_upstream_ejections",
            "Times an address of an upstream host was ejected (--outlier-ejection), by host "
            "and reason: connect (consecutive connect failures), 5xx (consecutive 5xx "
            "answers), latency, probe (its probe failed).",
            ["host", "reason"],
            registry=registry,
        )
        #: Where the idle connections per pool key are read; the pool sets it.
        self.idle_source: Callable[[], Iterable[tuple[Hashable, int]]] = lambda: ()
        registry.register(_IdleConnections(self))
        #: Where each circuit's host label and state are read; the upstream
        #: client sets it.
        self.circuit_source: Callable[[], Iterable[tuple[str, str]]] = lambda: ()
        registry.register(_CircuitStates(self))
        #: Where the host label and address of each address out of rotation
        #: are read; the upstream client sets it.
        self.ejected_source: Callable[[], Iterable[tuple[str, str]]] = lambda: ()
        registry.register(_EjectedAddresses(self))

        # Bound once: the hot path only increments.
        self._batch_status: dict[int, Any] = {}
        self._outcomes = {
            (outcome, cause): self.items.labels(outcome, cause)
            for outcome, causes in CAUSES.items()
            for cause in causes
        }
        self.item_success = self._outcomes["success", "response"]
        self.item_deadline = self._outcomes["timeout", "deadline"]
        self.item_queue_timeout = self._outcomes["timeout", "queue_timeout"]
        self.dns_hit = self.dns_lookups.labels("hit")
        self.dns_stale = self.dns_lookups.labels("stale")
        self.dns_miss = self.dns_lookups.labels("miss")
        self._hosts: dict[Hashable, UpstreamMetrics] = {}
        self._labels: dict[Hashable, str] = {}
        self._other: UpstreamMetrics | None = None

    def watch(self, batches: Callable[[], float], items: Callable[[], float]) -> None:
        """
        Read the in-flight gauges from these callables at each scrape.
        """
        self.batches_in_flight.set_function(batches)
        self.items_in_flight.set_function(items)

    def watch_process(self) -> None:
        """
        Serve this process's own statistics too, read from ``/proc`` at each
        scrape (Linux; none elsewhere), as every Prometheus client serves
        them from its default registry, which the daemon does not use:
        ``process_resident_memory_bytes``, ``process_start_time_seconds``,
        ``process_cpu_seconds_total``, ``process_open_fds`` and their kin.
        Call it once.
        """
        ProcessCollector(registry=self.registry)

    def watch_buffers(self, used: Callable[[], float], limit: Callable[[], float]) -> None:
        """
        Read the buffered bytes and their budget from these callables at
        each scrape.
        """
        self.buffered_bytes.set_function(used)
        self.buffered_bytes_limit.set_function(limit)

    def batch(self, status: int, seconds: float, bytes_out: int) -> None:
        """
        Count one answered batch.
        """
        counter = self._batch_status.get(status)
        if counter is None:
            counter = self._batch_status[status] = self.batches.labels(str(status))
        counter.inc()
        self.batch_seconds.observe(seconds)
        self.bytes_sent.inc(bytes_out)

    def item_failed(self, cause: str) -> Any:
        """
        The counter of failed items of ``cause`` (one of :data:`CAUSES`).
        """
        return self._outcomes.get(("failure", cause)) or self._outcomes["failure", "other"]

    def host_label(self, key: Hashable) -> str:
        """
        The ``host`` label of a pool key: ``scheme://host:port`` for the first
        :data:`MAX_HOSTS` keys seen, ``other`` after.
        """
        label = self._labels.get(key)
        if label is None:
            if len(self._labels) >= MAX_HOSTS:
                return "other"
            label = self._labels[key] = _host(key)
        return label

    def upstream(self, key: Hashable) -> UpstreamMetrics:
        """
        The pool's counters for the upstream of pool key ``key``.
        """
        found = self._hosts.get(key)
        if found is not None:
            return found
        label = self.host_label(key)
        if label == "other":
            if self._other is None:
                self._other = UpstreamMetrics(self, "other")
            return self._other
        found = self._hosts[key] = UpstreamMetrics(self, label)
        return found


def render_text(metrics: Metrics) -> bytes:
    """
    The registry in Prometheus' text exposition format.
    """
    return generate_latest(metrics.registry)


def _number(value: float) -> Any:
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return None
    return int(value) if value.is_integer() else value


def stats(metrics: Metrics) -> dict[str, Any]:
    """
    The registry's samples as a nested document: by metric, its type, help
    and samples, each sample its name, labels and value (``_created``
    timestamps left out).
    """
    return registry_stats(metrics.registry)


def registry_stats(registry: CollectorRegistry) -> dict[str, Any]:
    """
    :func:`stats` of any registry (the master's own, see :mod:`octoplex.totals`).
    """
    document: dict[str, Any] = {}
    for family in registry.collect():
        document[family.name] = {
            "type": family.type,
            "help": family.documentation,
            "samples": [
                {"name": s.name, "labels": s.labels, "value": _number(s.value)}
                for s in family.samples
                if not s.name.endswith("_created")
            ],
        }
    return document


def render_json(metrics: Metrics) -> bytes:
    """
    :func:`stats` as JSON.
    """
    return json.dumps(stats(metrics), sort_keys=True, indent=1).encode("utf-8") + b"\n"
