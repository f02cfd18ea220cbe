"""
Statistics over real sockets: known traffic through an Octoplex, then
``/metrics`` and ``/stats`` scraped and every count checked exactly; the
bearer token guarding them, and the separate ``--metrics-listen`` listener.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pytest_twisted
import treq
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent

from octoplex.auth import Tokens
from octoplex.limits import Limits
from octoplex.metrics import (
    LATENCY_BUCKETS,
    MAX_HOSTS,
    LocklessCounter,
    LocklessHistogram,
    Metrics,
)
from octoplex.tap import Options, makeService

from .servers import Caller, Upstream, _QuietPool, start_octoplex

TOKEN = "metrics-test-token-0123456789"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of a Prometheus text scrape, by name and sorted labels.
    """
    found = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _get(url: str, token: str | None = None) -> tuple[int, Any, bytes]:
    http = HTTPClient(Agent(reactor, pool=_QuietPool(reactor, persistent=False)))
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    response = await http.get(url, headers=headers)
    return response.code, response.headers, await treq.content(response)


@pytest_twisted.ensureDeferred
async def test_known_traffic_is_counted(upstream: Upstream, caller: Caller) -> None:
    """Batches, items by outcome and cause, pool, DNS, bytes and histograms count exactly."""
    metrics = Metrics()
    server = start_octoplex(metrics=metrics)
    local = upstream.url.replace("127.0.0.1", "localhost")
    batch = {
        "timeout_msec": 500,
        "requests": [
            {"uri": local + "/hello"},
            {"uri": local + "/hello"},
            {"uri": upstream.url + "/delay/3000"},
            {"uri": f"http://127.0.0.1:{_closed_port()}/"},
            # Private: the egress policy (loopback allowed only) refuses it.
            {"uri": "http://10.255.255.1/"},
        ],
    }
    try:
        status, _, body = await caller.post(server.url + "/multiplex", batch)
        assert status == 200
        kinds = [next(iter(o)) for o in body["responses"]]
        assert kinds == ["Success", "Success", "Failure", "Failure", "Failure"]
        # The same two again: both ride the pooled connections.
        again = {"timeout_msec": 2000, "requests": batch["requests"][:2]}
        status, _, _ = await caller.post(server.url + "/multiplex", again)
        assert status == 200

        status, headers, text = await caller.get(server.url + "/metrics")
        assert status == 200
        assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        samples = _samples(text)
        status, headers, raw = await caller.get(server.url + "/stats")
        assert status == 200
        assert headers.getRawHeaders(b"content-type")[0].startswith(b"application/json")
        stats = json.loads(raw)
    finally:
        await server.stop()

    assert _value(samples, "octoplex_batches_total", status="200") == 2
    items = {
        (outcome, cause): _value(samples, "octoplex_items_total", outcome=outcome, cause=cause)
        for outcome, cause in [
            ("success", "response"),
            ("timeout", "deadline"),
            ("failure", "connect"),
            ("failure", "forbidden"),
            ("failure", "dns"),
            ("failure", "other"),
        ]
    }
    assert items == {
        ("success", "response"): 4,
        ("timeout", "deadline"): 1,
        ("failure", "connect"): 1,
        ("failure", "forbidden"): 1,
        ("failure", "dns"): 0,
        ("failure", "other"): 0,
    }
    assert _value(samples, "octoplex_egress_refused_total") == 1
    assert _value(samples, "octoplex_deadlines_expired_total") == 1
    assert _value(samples, "octoplex_batches_shed_total") == 0
    local_host = "http://localhost:" + upstream.url.rsplit(":", 1)[1]
    ip_host = upstream.url
    assert _value(samples, "octoplex_upstream_connections_opened_total", host=local_host) == 2
    assert _value(samples, "octoplex_upstream_connections_reused_total", host=local_host) == 2
    assert _value(samples, "octoplex_upstream_connections_opened_total", host=ip_host) == 1
    assert _value(samples, "octoplex_upstream_connections_idle", host=local_host) == 2
    # localhost is answered from /etc/hosts: the first lookup is a miss that
    # sends no query; the second item's lookup, a moment later, is a hit.
    assert _value(samples, "octoplex_dns_lookups_total", result="miss") == 1
    assert _value(samples, "octoplex_dns_lookups_total", result="hit") == 1
    assert _value(samples, "octoplex_dns_queries_total") == 0
    assert _value(samples, "octoplex_batch_seconds_count") == 2
    assert _value(samples, "octoplex_item_seconds_count") == 7
    assert _value(samples, "octoplex_item_seconds_bucket", le="+Inf") == 7
    # Every request that reached the client waited (if only 0 s) for a slot.
    assert _value(samples, "octoplex_upstream_connection_wait_seconds_count") == 7
    assert _value(samples, "octoplex_received_bytes_total") > 0
    assert _value(samples, "octoplex_sent_bytes_total") > 0
    assert _value(samples, "octoplex_upstream_received_bytes_total") == 4 * len(b"hello world\n")
    # The scrape itself runs no batch: the in-flight gauges read 0.
    assert _value(samples, "octoplex_batches_in_flight") == 0
    assert _value(samples, "octoplex_items_in_flight") == 0

    # /stats holds the same numbers.
    assert stats["octoplex_items"]["type"] == "counter"
    by_labels = {
        (s["labels"]["outcome"], s["labels"]["cause"]): s["value"]
        for s in stats["octoplex_items"]["samples"]
        if s["name"] == "octoplex_items_total"
    }
    assert {k: by_labels[k] for k in items} == items
    batches = stats["octoplex_batches"]["samples"]
    assert batches == [{"name": "octoplex_batches_total", "labels": {"status": "200"}, "value": 2}]
    assert not any(s["name"].endswith("_created") for f in stats.values() for s in f["samples"])


@pytest_twisted.ensureDeferred
async def test_the_in_flight_gauges_read_the_app(upstream: Upstream, caller: Caller) -> None:
    """While a batch runs, the in-flight gauges count it and its items."""
    server = start_octoplex(metrics=Metrics())
    slow = {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/delay/300"}] * 2}
    try:
        running = ensureDeferred(caller.post(server.url + "/multiplex", slow))
        # The batch and the scrape travel on separate connections: scrape
        # until the batch has arrived.
        for _ in range(20):
            _, _, text = await caller.get(server.url + "/metrics")
            samples = _samples(text)
            if _value(samples, "octoplex_batches_in_flight"):
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert _value(samples, "octoplex_batches_in_flight") == 1
        assert _value(samples, "octoplex_items_in_flight") == 2
        assert (await running)[0] == 200
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_shed_batches_are_counted(upstream: Upstream, caller: Caller) -> None:
    """A batch past the request cap is shed with 503 and counted."""
    metrics = Metrics()
    server = start_octoplex(Limits(max_batch_size=5, max_requests_in_flight=2), metrics=metrics)
    try:
        batch = {"timeout_msec": 1000, "requests": [{"uri": upstream.url + "/hello"}] * 3}
        status, _, _ = await caller.post(server.url + "/multiplex", batch)
        assert status == 503
        _, _, text = await caller.get(server.url + "/metrics")
    finally:
        await server.stop()
    samples = _samples(text)
    assert _value(samples, "octoplex_batches_shed_total") == 1
    assert _value(samples, "octoplex_batches_total", status="503") == 1
    assert _value(samples, "octoplex_items_total", outcome="success", cause="response") == 0


@pytest_twisted.ensureDeferred
async def test_metrics_need_the_token_when_tokens_are_set(
    caller: Caller, log_events: list[dict[str, Any]]
) -> None:
    """With API tokens, /metrics and /stats answer 401 (logged) without one, 200 with one."""
    server = start_octoplex(tokens=Tokens({"ops": TOKEN}))
    try:
        for path in ("/metrics", "/stats"):
            status, headers, _ = await _get(server.url + path)
            assert status == 401
            assert headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="octoplex"']
            status, _, _ = await _get(server.url + path, "not-the-token")
            assert status == 401
            status, _, _ = await _get(server.url + path, TOKEN)
            assert status == 200
    finally:
        await server.stop()
    refused = [e for e in log_events if e.get("log_format", "").startswith("statistics request")]
    assert [(e["path"], e["status"]) for e in refused] == [
        ("/metrics", 401),
        ("/metrics", 401),
        ("/stats", 401),
        ("/stats", 401),
    ]
    assert all(e["client"].startswith("127.0.0.1:") for e in refused)
    assert "token" in refused[0]["error"]


def test_hosts_past_the_cap_are_other() -> None:
    """Past MAX_HOSTS upstream hosts, the pool's counters go to host="other"."""
    metrics = Metrics()
    for n in range(MAX_HOSTS + 5):
        metrics.upstream((b"http", b"h%d.example" % n, 80)).opened.inc()
    opened = {
        s.labels["host"]: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "octoplex_upstream_connections_opened_total"
    }
    assert len(opened) == MAX_HOSTS + 1
    assert opened["other"] == 5
    assert opened["http://h0.example:80"] == 1


def test_two_daemons_in_one_process_count_apart() -> None:
    """Each Metrics has its own registry: two never share a count."""
    one, two = Metrics(), Metrics()
    one.shed.inc()
    assert one.registry.get_sample_value("octoplex_batches_shed_total") == 1
    assert two.registry.get_sample_value("octoplex_batches_shed_total") == 0


@pytest_twisted.ensureDeferred
async def test_metrics_listen_serves_them_there_only(upstream: Upstream, caller: Caller) -> None:
    """With --metrics-listen, /metrics and /stats are on that port alone, with no token."""
    main, side = _closed_port(), _closed_port()
    options = Options()
    options.parseOptions(
        [
            "--workers",
            "1",
            "--listen",
            f"tcp:{main}:interface=127.0.0.1",
            "--metrics-listen",
            f"tcp:{side}:interface=127.0.0.1",
            "--allow-egress",
            "127.0.0.0/8",
            "--api-token",
            f"ops={TOKEN}",
        ]
    )
    root = makeService(options)
    root.startService()
    try:
        batch = json.dumps({"timeout_msec": 1000, "requests": [{"uri": upstream.url + "/hello"}]})
        http = HTTPClient(Agent(reactor, pool=_QuietPool(reactor, persistent=False)))
        response = await http.post(
            f"http://127.0.0.1:{main}/multiplex",
            data=batch.encode(),
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        assert response.code == 200
        await treq.content(response)
        for path in ("/metrics", "/stats"):
            status, _, _ = await _get(f"http://127.0.0.1:{main}{path}", TOKEN)
            assert status == 404
        status, _, text = await _get(f"http://127.0.0.1:{side}/metrics")
        assert status == 200
        samples = _samples(text)
        assert _value(samples, "octoplex_batches_total", status="200") == 1
        assert _value(samples, "octoplex_items_total", outcome="success", cause="response") == 1
        status, _, raw = await _get(f"http://127.0.0.1:{side}/stats")
        assert status == 200
        assert json.loads(raw)["octoplex_batches"]["samples"][0]["value"] == 1
        status, _, _ = await _get(f"http://127.0.0.1:{side}/multiplex")
        assert status == 404
    finally:
        await root.stopService()


@pytest_twisted.ensureDeferred
async def test_the_daemon_serves_its_process_statistics() -> None:
    """
    The daemon makeService builds serves its process's resident memory (as
    /proc says), start time (before the test began) and CPU time, which a
    memory panel and a restart alert need.
    """
    began = time.time()
    side = _closed_port()
    options = Options()
    options.parseOptions(
        [
            "--workers",
            "1",
            "--listen",
            f"tcp:{_closed_port()}:interface=127.0.0.1",
            "--metrics-listen",
            f"tcp:{side}:interface=127.0.0.1",
        ]
    )
    root = makeService(options)
    root.startService()
    try:
        status, _, text = await _get(f"http://127.0.0.1:{side}/metrics")
    finally:
        await root.stopService()
    assert status == 200
    samples = _samples(text)
    with open(f"/proc/{os.getpid()}/status") as f:
        (rss_kib,) = [int(line.split()[1]) for line in f if line.startswith("VmRSS:")]
    resident = _value(samples, "process_resident_memory_bytes")
    assert 0.5 * rss_kib * 1024 < resident < 2 * rss_kib * 1024, (resident, rss_kib)
    started = _value(samples, "process_start_time_seconds")
    assert began - 24 * 3600 < started <= began, (started, began)
    assert _value(samples, "process_cpu_seconds_total") > 0


def test_lockless_metrics_expose_what_prometheus_client_exposes() -> None:
    """
    The lock-free counters and histograms of the hot path scrape, sample
    for sample (``_created`` times aside), as prometheus_client's own
    Counter and Histogram do after the same counts, labelled or not,
    observations on a bucket's bound included.
    """
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    pairs = [
        (
            LocklessCounter("t_plain", "A counter.", registry=ours),
            Counter("t_plain", "A counter.", registry=theirs),
        ),
        (
            LocklessCounter("t_by", "By label.", ["a", "b"], registry=ours),
            Counter("t_by", "By label.", ["a", "b"], registry=theirs),
        ),
        (
            LocklessHistogram("t_seconds", "A histogram.", registry=ours),
            Histogram("t_seconds", "A histogram.", buckets=LATENCY_BUCKETS, registry=theirs),
        ),
        (
            LocklessHistogram("t_host_seconds", "By host.", ["host"], registry=ours),
            Histogram(
                "t_host_seconds", "By host.", ["host"], buckets=LATENCY_BUCKETS, registry=theirs
            ),
        ),
    ]
    observations = [0, 0.0005, 0.0007, 0.001, 0.02, 0.25, 7, 30.0, 31, 1e9]
    for mine, reference in pairs:
        for n, value in enumerate(observations):
            labels = ("x", str(n % 2))[: len(reference._labelnames)]
            for metric in (mine, reference):
                target = metric.labels(*labels) if labels else metric
                if isinstance(metric, (LocklessCounter, Counter)):
                    target.inc(value)
                else:
                    target.observe(value)

    def scraped(registry: CollectorRegistry) -> list[str]:
        return [
            line
            for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line
        ]

    assert scraped(ours) == scraped(theirs)
    assert len(scraped(ours)) > 40
