#!/usr/bin/env python3
"""
Octoplex benchmark scenarios: idle overhead, deadline accuracy, memory per
in-flight sub-request, and TLS upstreams.

Each scenario starts its own upstream (bench/upstream.py, or nginx for TLS)
and its own daemon (``twistd -n --pidfile= octoplex --workers 1``, from this
checkout), all on 127.0.0.1; the daemon is pinned to one CPU, the upstream,
wrk and this process (the load generator) to another.  Every figure is shown
next to a baseline measured in the same run, since the machine is noisy:

- ``idle``: sequential batches of 10 to an upstream that answers after
  50 ms, on one keep-alive connection; batch latency p50/p99 and the
  overhead over 50 ms, next to 10 parallel GETs straight at the upstream.
- ``deadline``: the peak batches/s of batch-of-10 (wrk, briefly), then an
  open-loop load at half of it whose batches hold items that outlive the
  deadline; how late the answers come after the deadline, seen by the
  client, and how many come early; next to the same client's lateness on
  direct GETs the upstream delays by the deadline.
- ``memory``: the daemon's RSS before and while 10,000 sub-requests are in
  flight against an upstream that holds them; KiB per sub-request.
- ``tls``: batch-of-10 sub-requests/s over HTTPS as a ratio to plain HTTP
  with a warm pool; the new-connection cost as the first batch to a fresh
  upstream port against the next, and as sub-requests/s with
  ``--pool-max-requests 1``.

    python3 bench/run.py --scenarios all --json bench/results/scenarios.json
    python3 bench/scenarios.py --scenarios idle,deadline

Stdlib only, but for trustme (the TLS scenario's certificates; skipped
without it); needs wrk, and nginx for the TLS scenario (else
bench/upstream.py serves TLS).  Linux only (/proc).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import common
from common import HOST, BenchError, Pinning, positive_int

SCENARIOS = ("idle", "deadline", "memory", "tls")
#: ms of waiting for its CPU in one batch from which the daemon was
#: delayed by another process (the idle scenario counts such batches).
IDLE_WAIT_MS = 0.1
SCRIPT_ARGS_CHECKED = "1"


# --------------------------------------------------------------------------
# Figures


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile of ``values`` (not empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def spread(values: list[float]) -> dict[str, Any]:
    """Count, p50, p99, max and mean of ``values`` (ms), rounded."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None, "min": None, "mean": None}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
        "min": round(min(values), 3),
        "mean": round(statistics.fmean(values), 3),
    }


def fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def nonzero(counts: Counter[str]) -> str:
    shown = {k: v for k, v in counts.items() if v}
    return str(shown) if shown else "none"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Raw HTTP/1.1 on 127.0.0.1


class Connections:
    """
    Keep-alive connections to one port: an idle one is reused, else a new
    one is opened, so that a paced load never waits for a connection.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def exchange(self, request: bytes, on_sent: Callable[[], None] | None = None) -> Any:
        """
        Send ``request`` and return ``(status, body)``; ``on_sent`` is called
        just before the request is written, once a connection is ready.
        """
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(HOST, self.port)
            self.opened += 1
        try:
            if on_sent is not None:
                on_sent()
            writer.write(request)
            answer = await common.read_answer(reader)
        except BaseException:
            writer.close()
            raise
        self.idle.append((reader, writer))
        return answer

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def batch_body(uris: list[str], timeout_msec: int) -> bytes:
    return json.dumps(
        {"timeout_msec": timeout_msec, "requests": [{"method": "GET", "uri": u} for u in uris]}
    ).encode()


def outcomes(status: int, body: bytes, size: int) -> list[dict[str, Any]]:
    """The batch's outcomes, or BenchError unless 200 with ``size`` of them."""
    if status != 200:
        raise BenchError(f"/multiplex answered HTTP {status}: {body[:300]!r}")
    responses: list[dict[str, Any]] = json.loads(body)["responses"]
    if len(responses) != size:
        raise BenchError(f"expected {size} outcomes, got {len(responses)}")
    return responses


def is_ok(outcome: dict[str, Any]) -> bool:
    success = outcome.get("Success")
    return (
        isinstance(success, dict)
        and success.get("status") == 200
        and success.get("content") == common.UPSTREAM_BODY
    )


def is_timeout(outcome: dict[str, Any]) -> bool:
    failure = outcome.get("Failure")
    return isinstance(failure, dict) and str(failure.get("error", "")).startswith("timeout")


async def upstream_stats(port: int) -> dict[str, int]:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(common.get_bytes(port, "/stats"))
        _, body = await common.read_answer(reader)
    finally:
        writer.close()
    stats: dict[str, int] = json.loads(body)
    return stats


# --------------------------------------------------------------------------
# The run


class Run:
    """What every scenario needs: settings, pinning, processes, a folder."""

    def __init__(
        self, args: argparse.Namespace, pin: Pinning, procs: common.Processes, tmp: str, wrk: str
    ) -> None:
        self.args = args
        self.pin = pin
        self.procs = procs
        self.tmp = tmp
        self.wrk = wrk
        self.daemon_argvs: dict[str, list[str]] = {}

    def upstream(self, *extra: str) -> tuple[subprocess.Popen[Any], int, str]:
        port = common.free_port()
        proc, _, log = common.start_python_upstream(self.tmp, port, self.pin, self.procs, extra)
        return proc, port, log

    def daemon(self, name: str, *extra: str) -> tuple[subprocess.Popen[Any], int, str]:
        proc, port, log, argv, _ = common.start_octoplex(
            self.args.octoplex_cmd, self.tmp, self.pin, self.procs, 1, extra, name
        )
        self.daemon_argvs[name] = argv
        print(f"  daemon: {shlex.join(argv)} (pid {proc.pid})", flush=True)
        return proc, port, log

    def wrk_batches(
        self,
        watch: list[tuple[str, subprocess.Popen[Any], str]],
        daemon: subprocess.Popen[Any],
        port: int,
        upstream_url: str,
        size: int,
        seconds: int,
        accepts: Callable[[], int | None] | None = None,
    ) -> dict[str, Any]:
        """
        wrk -c CONNECTIONS for ``seconds`` (after ``--wrk-warmup``) POSTing
        batches of ``size`` GETs of ``upstream_url``; summarised.
        """
        url = f"http://{HOST}:{port}/multiplex"
        script = ["multiplex", str(size), upstream_url, "5000", SCRIPT_ARGS_CHECKED]
        connections = self.args.connections
        if self.args.wrk_warmup:
            common.run_wrk(
                self.wrk, self.pin, watch, url, connections, self.args.wrk_warmup, script
            )
        a0 = accepts() if accepts else None
        c0, t0 = common.cpu_seconds(daemon.pid), time.monotonic()
        raw, _ = common.run_wrk(self.wrk, self.pin, watch, url, connections, seconds, script)
        c1, elapsed = common.cpu_seconds(daemon.pid), time.monotonic() - t0
        a1 = accepts() if accepts else None
        cpu = None if c0 is None or c1 is None else 100 * (c1 - c0) / elapsed
        result = common.summarise_wrk(raw, size, cpu, None)
        subs = raw["requests"] * size
        result["upstream_connections_per_1k"] = (
            None if a0 is None or a1 is None or not subs else round((a1 - a0 - 1) * 1000 / subs, 2)
        )
        return result


def alive(watch: list[tuple[str, subprocess.Popen[Any], str]]) -> None:
    for name, proc, log in watch:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} died (status {proc.returncode}).\n--- {log} ---\n{common.tail(log)}"
            )


# --------------------------------------------------------------------------
# 3. Overhead when idle


def scenario_idle(run: Run) -> dict[str, Any]:
    args = run.args
    delay = args.idle_delay_ms
    upstream, up_port, up_log = run.upstream()
    daemon, port, log = run.daemon("idle")
    watch = [("upstream", upstream, up_log), ("octoplex", daemon, log)]
    uri = f"http://{HOST}:{up_port}/delay/{delay}"
    size = args.idle_batch_size
    body = common.post_bytes(port, "/multiplex", batch_body([uri] * size, 5000))
    get = common.get_bytes(up_port, f"/delay/{delay}")

    async def measure() -> tuple[list[float], list[float], list[float], list[tuple[float, float]]]:
        direct = [Connections(up_port) for _ in range(size)]
        octoplex = Connections(port)
        via: list[float] = []
        straight: list[float] = []
        item_max: list[float] = []
        # The daemon's time on its CPU, and waiting for it, during each batch.
        sched: list[tuple[float, float]] = []
        try:
            for i in range(args.idle_warmup + args.idle_batches):
                # One round each way, in turn, so that both see the same noise.
                t0 = time.perf_counter()
                answers = await asyncio.gather(*(c.exchange(get) for c in direct))
                t1 = time.perf_counter()
                if any(status != 200 for status, _ in answers):
                    raise BenchError(f"a direct GET failed: {answers[:2]}")
                s0 = common.schedstat_ms(daemon.pid)
                t2 = time.perf_counter()
                status, answer = await octoplex.exchange(body)
                t3 = time.perf_counter()
                s1 = common.schedstat_ms(daemon.pid)
                results = outcomes(status, answer, size)
                if not all(is_ok(o) for o in results):
                    raise BenchError(f"a batch item failed: {answer[:400]!r}")
                if i >= args.idle_warmup:
                    straight.append((t1 - t0) * 1000)
                    via.append((t3 - t2) * 1000)
                    item_max.append(max(o["Success"]["duration_msec"] for o in results))
                    if s0 is not None and s1 is not None:
                        sched.append((s1[0] - s0[0], s1[1] - s0[1]))
        finally:
            octoplex.close()
            for c in direct:
                c.close()
        return via, straight, item_max, sched

    print(
        f"  {args.idle_warmup} + {args.idle_batches} batches of {size} (upstream delay "
        f"{delay} ms), each after {size} parallel direct GETs ...",
        flush=True,
    )
    c0 = common.cpu_seconds(daemon.pid)
    via, straight, item_max, sched = asyncio.run(measure())
    c1 = common.cpu_seconds(daemon.pid)
    alive(watch)
    v, d, items = spread(via), spread(straight), spread(item_max)
    on_cpu, waited = spread([c for c, _ in sched]), spread([w for _, w in sched])
    delayed = sum(1 for _, w in sched if w >= IDLE_WAIT_MS)
    target_p50, target_p99 = delay + args.idle_target_p50_ms, delay + args.idle_target_p99_ms
    # The target counts what Octoplex adds: the client's and the upstream's
    # own overhead, the excess over the delay of the direct baseline sent
    # just before the batch, is subtracted from each batch's latency.  Per
    # round, not p99 less p99: a stall that delays only the baseline (the
    # load's CPU was busy) must not make Octoplex's tail look shorter.
    net = spread([a - b + delay for a, b in zip(via, straight, strict=True)])
    net_p50, net_p99 = net["p50"], net["p99"]
    rows = [
        [
            f"batch of {size} via Octoplex",
            str(v["n"]),
            fmt(v["p50"]),
            fmt(v["p99"]),
            fmt(v["max"]),
            fmt(v["p50"] - delay, sign=True),
            fmt(v["p99"] - delay, sign=True),
        ],
        [
            f"{size} parallel GETs direct (baseline)",
            str(d["n"]),
            fmt(d["p50"]),
            fmt(d["p99"]),
            fmt(d["max"]),
            fmt(d["p50"] - delay, sign=True),
            fmt(d["p99"] - delay, sign=True),
        ],
        [
            "Octoplex minus direct",
            "",
            fmt(v["p50"] - d["p50"], sign=True),
            fmt(v["p99"] - d["p99"], sign=True),
            "",
            "",
            "",
        ],
        [
            "via Octoplex less the same round's direct excess",
            str(net["n"]),
            fmt(net["p50"]),
            fmt(net["p99"]),
            fmt(net["max"]),
            fmt(net["p50"] - delay, sign=True),
            fmt(net["p99"] - delay, sign=True),
        ],
        [
            "daemon's slowest item (duration_msec)",
            str(items["n"]),
            fmt(items["p50"]),
            fmt(items["p99"]),
            fmt(items["max"]),
            fmt(items["p50"] - delay, sign=True),
            fmt(items["p99"] - delay, sign=True),
        ],
        [
            "daemon on-CPU per batch (schedstat)",
            str(on_cpu["n"]),
            fmt(on_cpu["p50"]),
            fmt(on_cpu["p99"]),
            fmt(on_cpu["max"]),
            "",
            "",
        ],
        [
            "daemon waiting for its CPU per batch",
            str(waited["n"]),
            fmt(waited["p50"]),
            fmt(waited["p99"]),
            fmt(waited["max"]),
            "",
            "",
        ],
    ]
    met_p50, met_p99 = net_p50 <= target_p50, net_p99 <= target_p99
    text = table(
        ["", "n", "p50 ms", "p99 ms", "max ms", f"p50 over {delay} ms", f"p99 over {delay} ms"],
        rows,
    )
    text += (
        f"\n\nTarget, with each round's direct baseline excess over {delay} ms (the "
        f"client's and the upstream's own overhead) subtracted: p50 {fmt(net_p50)} <= "
        f"{target_p50:g} ms: "
        f"{verdict(met_p50)}; p99 {fmt(net_p99)} <= {target_p99:g} ms: {verdict(met_p99)}.  "
        f"Daemon CPU {fmt(None if c0 is None or c1 is None else c1 - c0, 1)} s; "
        f"{delayed} of {waited['n']} batches waited >= {IDLE_WAIT_MS:g} ms for the daemon's "
        "CPU (another process had it: the Octoplex row, not the baseline, pays for that)."
    )
    return {
        "title": f"3. Overhead when idle: batch of {size}, upstream delay {delay} ms",
        "table": text,
        "upstream_delay_ms": delay,
        "batch_size": size,
        "octoplex_ms": v,
        "direct_ms": d,
        "daemon_item_duration_ms": items,
        "overhead_p50_ms": round(v["p50"] - delay, 3),
        "overhead_p99_ms": round(v["p99"] - delay, 3),
        "overhead_vs_direct_p50_ms": round(v["p50"] - d["p50"], 3),
        "overhead_vs_direct_p99_ms": round(v["p99"] - d["p99"], 3),
        "net_ms": net,
        "daemon_on_cpu_ms": on_cpu,
        "daemon_cpu_wait_ms": waited,
        "batches_waiting_for_cpu": delayed,
        "target_p50_ms": target_p50,
        "target_p99_ms": target_p99,
        "met": {"p50": met_p50, "p99": met_p99},
        "met_without_subtracting": {"p50": v["p50"] <= target_p50, "p99": v["p99"] <= target_p99},
    }


# --------------------------------------------------------------------------
# 4. Deadline accuracy


async def paced(
    rate: float,
    count: int,
    send: Callable[[Callable[[], None]], Awaitable[tuple[int, bytes]]],
    drain_s: float,
) -> tuple[list[tuple[float, float, float, int, bytes]], Counter[str]]:
    """
    Open loop: start ``send`` ``count`` times, ``rate`` per second, whether
    or not the earlier ones are answered.  Return, for each answered one,
    (scheduled, sent, answered, status, body) in perf_counter seconds, and
    the errors by kind.
    """
    done: list[tuple[float, float, float, int, bytes]] = []
    errors: Counter[str] = Counter()
    start = time.perf_counter() + 0.05

    async def one(scheduled: float) -> None:
        sent = [0.0]

        def on_sent() -> None:
            sent[0] = time.perf_counter()

        try:
            status, body = await send(on_sent)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            errors[type(e).__name__] += 1
            return
        done.append((scheduled, sent[0], time.perf_counter(), status, body))

    tasks = []
    for i in range(count):
        scheduled = start + i / rate
        wait = scheduled - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.ensure_future(one(scheduled)))
    _, unfinished = await asyncio.wait(tasks, timeout=drain_s)
    for task in unfinished:
        task.cancel()
    errors["unanswered"] += len(unfinished)
    return done, errors


def scenario_deadline(run: Run) -> dict[str, Any]:
    args = run.args
    deadline = args.deadline_msec
    size, late = args.deadline_batch_size, args.deadline_late_items
    upstream, up_port, up_log = run.upstream()
    daemon, port, log = run.daemon("deadline")
    watch = [("upstream", upstream, up_log), ("octoplex", daemon, log)]

    # The peak first, briefly, with batches of quick items.
    print(f"  peak: wrk -c{args.connections}, batches of {size}, {args.peak_seconds} s ...")
    peak = run.wrk_batches(
        watch, daemon, port, f"http://{HOST}:{up_port}/", size, args.peak_seconds
    )
    if not peak["requests_per_s"] or peak["errors"] or peak["failed_sub_requests"]:
        raise BenchError(f"the peak run failed: {json.dumps(peak)[:600]}")
    rate = peak["requests_per_s"] * args.load_fraction
    count = max(1, round(rate * args.deadline_seconds))

    quick = f"http://{HOST}:{up_port}/"
    slow = f"http://{HOST}:{up_port}/delay/{deadline + args.deadline_overrun_ms}"
    uris = [slow] * late + [quick] * (size - late)
    body = common.post_bytes(port, "/multiplex", batch_body(uris, deadline))
    get = common.get_bytes(up_port, f"/delay/{deadline}")
    drain_s = deadline / 1000 + 10

    async def load() -> tuple[Any, Any, int, Any, Any, float | None]:
        octoplex, direct = Connections(port), Connections(up_port)
        try:
            # The baseline: the same client and pace, straight at the upstream,
            # which answers after the deadline.
            direct_done, direct_errors = await paced(
                rate, count, lambda on_sent: direct.exchange(get, on_sent), drain_s
            )
            c0 = common.cpu_seconds(daemon.pid)
            t0 = time.monotonic()
            via_done, via_errors = await paced(
                rate, count, lambda on_sent: octoplex.exchange(body, on_sent), drain_s
            )
            c1 = common.cpu_seconds(daemon.pid)
            cpu = None if c0 is None or c1 is None else 100 * (c1 - c0) / (time.monotonic() - t0)
        finally:
            octoplex.close()
            direct.close()
        return via_done, via_errors, octoplex.opened, direct_done, direct_errors, cpu

    print(
        f"  peak {peak['requests_per_s']:.1f} batches/s; pacing {rate:.1f}/s "
        f"({args.load_fraction:.0%}) for {args.deadline_seconds} s, direct then via "
        f"Octoplex: deadline {deadline} ms, {late} of {size} items delayed "
        f"{deadline + args.deadline_overrun_ms} ms ...",
        flush=True,
    )
    via_done, via_errors, opened, direct_done, direct_errors, cpu = asyncio.run(load())
    alive(watch)

    lateness: list[float] = []
    lag: list[float] = []
    early: list[float] = []
    # The daemon's own view: the duration_msec of the items the deadline cut off.
    reported: list[float] = []
    pending_none = 0
    unplanned: Counter[str] = Counter()
    for scheduled, sent, answered, status, answer in via_done:
        lag.append((sent - scheduled) * 1000)
        if status != 200:
            unplanned[f"HTTP {status}"] += 1
            continue
        results = json.loads(answer)["responses"]
        timeouts = sum(1 for o in results if is_timeout(o))
        reported += [o["Failure"]["duration_msec"] - deadline for o in results if is_timeout(o)]
        for kind, outcome in zip(["slow"] * late + ["quick"] * (size - late), results, strict=True):
            got = "ok" if is_ok(outcome) else ("timeout" if is_timeout(outcome) else "other")
            if (kind, got) not in (("slow", "timeout"), ("quick", "ok")):
                unplanned[f"{kind} item came back {got}"] += 1
        if not timeouts:
            pending_none += 1
            continue
        late_ms = (answered - sent) * 1000 - deadline
        lateness.append(late_ms)
        if late_ms < 0:
            early.append(late_ms)
    direct_late = [(a - s) * 1000 - deadline for _, s, a, status, _ in direct_done if status == 200]
    direct_lag = [(s - sch) * 1000 for sch, s, _, _, _ in direct_done]
    v, d, r = spread(lateness), spread(direct_late), spread(reported)
    vl, dl = spread(lag), spread(direct_lag)
    target = args.deadline_target_ms
    met_p99 = v["p99"] is not None and v["p99"] <= target
    met_early = not early

    def row(name: str, s: dict[str, Any], lag_s: dict[str, Any], n_early: int) -> list[str]:
        return [
            name,
            str(s["n"]),
            fmt(s["min"], sign=True),
            fmt(s["p50"], sign=True),
            fmt(s["p99"], sign=True),
            fmt(s["max"], sign=True),
            str(n_early),
            fmt(lag_s["p99"]),
        ]

    rows = [
        row(f"batches via Octoplex (timeout_msec {deadline})", v, vl, len(early)),
        row(
            f"direct GET /delay/{deadline} (baseline)",
            d,
            dl,
            sum(1 for x in direct_late if x < 0),
        ),
        [
            "the daemon's duration_msec of cut-off items",
            str(r["n"]),
            fmt(r["min"], sign=True),
            fmt(r["p50"], sign=True),
            fmt(r["p99"], sign=True),
            fmt(r["max"], sign=True),
            "",
            "",
        ],
    ]
    text = table(
        [
            "answers after the deadline",
            "n",
            "min ms",
            "p50 ms",
            "p99 ms",
            "max ms",
            "early",
            "send lag p99 ms",
        ],
        rows,
    )
    text += (
        f"\n\nPeak {fmt(peak['requests_per_s'], 1)} batches/s of {size} (wrk -c{args.connections},"
        f" {args.peak_seconds} s, daemon CPU {fmt(peak['daemon_cpu_pct'], 0)} %); paced at "
        f"{rate:.1f}/s ({args.load_fraction:.0%}), daemon CPU {fmt(cpu, 0)} %, "
        f"{opened} client connections.  Lateness = answer time - (send time + deadline), "
        f"client-side; 'early' counts answers before the deadline with items pending.\n"
        f"Target: p99 <= deadline + {target:g} ms: {verdict(met_p99)}; never early: "
        f"{verdict(met_early)}.  Batches with no item pending: {pending_none}; "
        f"unplanned outcomes: {dict(unplanned) or 'none'}; client errors: "
        f"{nonzero(via_errors)} (direct: {nonzero(direct_errors)})."
    )
    return {
        "title": (
            f"4. Deadline accuracy at {args.load_fraction:.0%} of peak: deadline {deadline} ms, "
            f"{late} of {size} items delayed past it"
        ),
        "table": text,
        "peak": peak,
        "rate_per_s": round(rate, 2),
        "daemon_cpu_pct": None if cpu is None else round(cpu, 1),
        "deadline_msec": deadline,
        "lateness_ms": v,
        "early": len(early),
        "early_ms": sorted(early)[:20],
        "send_lag_ms": vl,
        "direct_lateness_ms": d,
        "daemon_reported_lateness_ms": r,
        "direct_send_lag_ms": dl,
        "batches_without_pending": pending_none,
        "unplanned": dict(unplanned),
        "client_errors": {k: v for k, v in via_errors.items() if v},
        "direct_client_errors": {k: v for k, v in direct_errors.items() if v},
        "client_connections": opened,
        "target_ms": target,
        "met": {"p99": met_p99, "never_early": met_early},
    }


# --------------------------------------------------------------------------
# 5. Memory per in-flight sub-request


def scenario_memory(run: Run) -> dict[str, Any]:
    args = run.args
    batches, size = args.memory_batches, args.memory_batch_size
    total = batches * size
    hold = args.memory_hold_ms
    upstream, up_port, up_log = run.upstream()
    room = str(2 * total)
    daemon, port, log = run.daemon(
        "memory",
        "--max-batch-size",
        str(size),
        "--max-batches-in-flight",
        str(2 * batches),
        "--max-requests-in-flight",
        room,
        # Every batch comes from this one address: one client.
        "--max-client-batches-in-flight",
        str(2 * batches),
        "--max-client-requests-in-flight",
        room,
        "--pool-max-per-host",
        room,
        "--pool-max-total",
        room,
        "--drain-timeout",
        "0",
    )
    watch = [("upstream", upstream, up_log), ("octoplex", daemon, log)]
    quick = f"http://{HOST}:{up_port}/"
    slow = f"http://{HOST}:{up_port}/delay/{hold}"
    warm_body = common.post_bytes(port, "/multiplex", batch_body([quick] * size, 5000))
    body = common.post_bytes(port, "/multiplex", batch_body([slow] * size, hold + 60_000))

    def samples(pid: int, n: int = 5, gap: float = 0.1) -> list[int]:
        values = []
        for _ in range(n):
            values.append(common.rss_kib(pid))
            time.sleep(gap)
        return values

    async def load() -> dict[str, Any]:
        warm = Connections(port)
        for _ in range(args.memory_warmup):
            status, answer = await warm.exchange(warm_body)
            if not all(is_ok(o) for o in outcomes(status, answer, size)):
                raise BenchError(f"a warm-up batch failed: {answer[:400]!r}")
        warm.close()
        await asyncio.sleep(0.5)
        before = samples(daemon.pid)
        up_before = common.rss_kib(upstream.pid)
        fds_before = common.open_fds(daemon.pid)
        stats0 = await upstream_stats(up_port)
        pool = [Connections(port) for _ in range(batches)]
        tasks = [asyncio.ensure_future(c.exchange(body)) for c in pool]
        t0 = time.monotonic()
        pending = 0
        try:
            while time.monotonic() - t0 < args.memory_ramp_s:
                await asyncio.sleep(0.2)
                alive(watch)
                pending = (await upstream_stats(up_port))["pending"]
                if pending >= total:
                    break
            ramp = time.monotonic() - t0
            during = samples(daemon.pid, 10, 0.1)
            up_during = common.rss_kib(upstream.pid)
            fds_during = common.open_fds(daemon.pid)
            pending_after = (await upstream_stats(up_port))["pending"]
            answered_early = sum(1 for t in tasks if t.done())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in pool:
                c.close()
        return {
            "before_kib": before,
            "during_kib": during,
            "upstream_before_kib": up_before,
            "upstream_during_kib": up_during,
            "fds_before": fds_before,
            "fds_during": fds_during,
            "ramp_s": round(ramp, 2),
            "pending": min(pending, pending_after),
            "upstream_connections_before": stats0["open"],
            "batches_answered_while_held": answered_early,
        }

    print(
        f"  {args.memory_warmup} warm-up batches, then {batches} batches of {size} "
        f"({total:,} sub-requests) held {hold} ms by the upstream ...",
        flush=True,
    )
    m = asyncio.run(load())
    # Stop the daemon now; its 10,000 upstream connections go with it.
    common.stop(daemon, 10.0)
    before = statistics.median(m["before_kib"])
    during = statistics.median(m["during_kib"])
    in_flight = m["pending"]
    per = (during - before) / in_flight if in_flight else None
    up_per = (
        (m["upstream_during_kib"] - m["upstream_before_kib"]) / in_flight if in_flight else None
    )
    target = args.memory_target_kib
    met = None if per is None or in_flight < total else per <= target
    rows = [
        ["daemon RSS MiB", fmt(before / 1024), fmt(during / 1024), fmt((during - before) / 1024)],
        ["daemon open fds", str(m["fds_before"]), str(m["fds_during"]), ""],
        [
            "upstream RSS MiB (bench/upstream.py, for scale)",
            fmt(m["upstream_before_kib"] / 1024),
            fmt(m["upstream_during_kib"] / 1024),
            fmt((m["upstream_during_kib"] - m["upstream_before_kib"]) / 1024),
        ],
    ]
    text = table(["", "before", f"{in_flight:,} in flight", "difference"], rows)
    text += (
        f"\n\nPer in-flight sub-request: daemon {fmt(per)} KiB (upstream {fmt(up_per)} KiB)."
        f"  Target <= {target:g} KiB: {verdict(met)}.  {in_flight:,} of {total:,} reached "
        f"the upstream in {m['ramp_s']} s; batches answered while held: "
        f"{m['batches_answered_while_held']}.  RSS: median of 5 samples before, of 10 during."
    )
    if in_flight < total:
        text += f"\nNOTE: only {in_flight:,} of {total:,} were in flight within the bound."
    return {
        "title": f"5. Memory: {total:,} sub-requests in flight ({batches} batches of {size})",
        "table": text,
        **m,
        "in_flight": in_flight,
        "planned": total,
        "per_sub_request_kib": None if per is None else round(per, 3),
        "upstream_per_request_kib": None if up_per is None else round(up_per, 3),
        "target_kib": target,
        "met": met,
    }


# --------------------------------------------------------------------------
# 6. TLS


def scenario_tls(run: Run) -> dict[str, Any]:
    args = run.args
    try:
        import trustme
    except ImportError:
        return {
            "title": "6. TLS",
            "table": "SKIPPED: trustme is not installed (pip install trustme).",
            "skipped": True,
        }
    ca = trustme.CA()
    cert = ca.issue_cert(HOST)
    ca_pem = os.path.join(run.tmp, "ca.pem")
    cert_pem = os.path.join(run.tmp, "cert.pem")
    key_pem = os.path.join(run.tmp, "key.pem")
    ca.cert_pem.write_to_path(ca_pem)
    cert.private_key_pem.write_to_path(key_pem)
    with open(cert_pem, "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())

    cold = args.tls_cold_hosts
    http_port, https_port = common.free_port(), common.free_port()
    cold_http = [common.free_port() for _ in range(cold)]
    cold_https = [common.free_port() for _ in range(cold)]
    use_nginx = (
        args.upstream != "python"
        and os.access(args.nginx, os.X_OK)
        and common.nginx_has_ssl(args.nginx)
    )
    accepts: Callable[[], int | None] | None = None
    if use_nginx:
        upstreams = [
            common.start_nginx(
                args.nginx,
                run.tmp,
                http_port,
                run.pin,
                run.procs,
                more_ports=cold_http,
                tls_ports=[https_port, *cold_https],
                tls=(cert_pem, key_pem),
            )
        ]
        label = upstreams[0][1]

        def accepts() -> int | None:
            return common.nginx_accepts(http_port)

    else:
        plain = [a for p in cold_http for a in ("--port", str(p))]
        secure = [a for p in cold_https for a in ("--port", str(p))]
        upstreams = [
            common.start_python_upstream(run.tmp, http_port, run.pin, run.procs, plain),
            common.start_python_upstream(
                run.tmp,
                https_port,
                run.pin,
                run.procs,
                [*secure, "--tls-cert", cert_pem, "--tls-key", key_pem],
            ),
        ]
        label = "bench/upstream.py (asyncio, ssl module)"
    size, seconds = args.tls_batch_size, args.tls_seconds
    http_url, https_url = f"http://{HOST}:{http_port}/", f"https://{HOST}:{https_port}/"

    def throughput(name: str, *extra: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
        daemon, port, log = run.daemon(name, "--upstream-ca", ca_pem, *extra)
        watch = [("upstream", p, lg) for p, _, lg in upstreams] + [("octoplex", daemon, log)]
        common.check_one_batch(port, size, http_url, 5000)
        common.check_one_batch(port, size, https_url, 5000)
        results = []
        for url in (http_url, https_url):
            print(f"  {name}: wrk -c{args.connections}, batches of {size} of {url} ...")
            results.append(run.wrk_batches(watch, daemon, port, url, size, seconds, accepts))
        return results[0], results[1], (daemon, port, watch)

    plain_warm, tls_warm, (daemon, port, watch) = throughput("tls-warm")

    # The first batch to a fresh upstream (new connections) against the next.
    async def first_and_next() -> dict[str, list[tuple[float, float]]]:
        conn = Connections(port)
        timings: dict[str, list[tuple[float, float]]] = {"http": [], "https": []}
        try:
            for http_p, https_p in zip(cold_http, cold_https, strict=True):
                for scheme, p in (("http", http_p), ("https", https_p)):
                    request = common.post_bytes(
                        port, "/multiplex", batch_body([f"{scheme}://{HOST}:{p}/"] * size, 5000)
                    )
                    pair = []
                    for _ in range(2):
                        t0 = time.perf_counter()
                        status, answer = await conn.exchange(request)
                        pair.append((time.perf_counter() - t0) * 1000)
                        if not all(is_ok(o) for o in outcomes(status, answer, size)):
                            raise BenchError(f"a {scheme} batch failed: {answer[:400]!r}")
                    timings[scheme].append((pair[0], pair[1]))
        finally:
            conn.close()
        return timings

    print(f"  first batch of {size} to {cold} fresh ports per scheme, then the next ...")
    timings = asyncio.run(first_and_next())
    alive(watch)
    common.stop(daemon, 10.0)
    plain_new, tls_new, (daemon2, _, watch2) = throughput(
        "tls-new-connections", "--pool-max-requests", "1"
    )
    alive(watch2)
    common.stop(daemon2, 10.0)

    def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
        base = b["sub_requests_per_s"]
        return a["sub_requests_per_s"] / base if base else None

    warm_ratio, new_ratio = ratio(tls_warm, plain_warm), ratio(tls_new, plain_new)
    met = None if warm_ratio is None else warm_ratio >= args.tls_target_ratio

    def wrk_row(name: str, r: dict[str, Any], vs: float | None) -> list[str]:
        return [
            name,
            fmt(r["sub_requests_per_s"], 0),
            fmt(r["p50_ms"]),
            fmt(r["p99_ms"]),
            str(r["errors"] + r["failed_sub_requests"]),
            fmt(r.get("upstream_connections_per_1k")),
            fmt(r["daemon_cpu_pct"], 0),
            "1.000" if vs is None else fmt(vs, 3),
        ]

    text = table(
        [
            f"batches of {size}",
            "sub-requests/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "new upstream conns / 1k",
            "daemon CPU %",
            "vs plain HTTP",
        ],
        [
            wrk_row("plain HTTP, warm pool (baseline)", plain_warm, None),
            wrk_row("HTTPS, warm pool", tls_warm, warm_ratio),
            wrk_row("plain HTTP, --pool-max-requests 1", plain_new, None),
            wrk_row("HTTPS, --pool-max-requests 1", tls_new, new_ratio),
        ],
    )
    cold_rows = []
    summary: dict[str, Any] = {}
    for scheme in ("http", "https"):
        first = [a for a, _ in timings[scheme]]
        after = [b for _, b in timings[scheme]]
        summary[scheme] = {
            "first_ms": spread(first),
            "next_ms": spread(after),
            "first_minus_next_p50_ms": round(
                statistics.median(first) - statistics.median(after), 3
            ),
        }
        cold_rows.append(
            [
                scheme,
                str(len(first)),
                fmt(statistics.median(first)),
                fmt(statistics.median(after)),
                fmt(statistics.median(first) - statistics.median(after), sign=True),
            ]
        )
    text += "\n\n" + table(
        [
            f"first batch of {size} to a fresh port",
            "ports",
            "first p50 ms",
            "next p50 ms",
            "first - next",
        ],
        cold_rows,
    )
    text += (
        f"\n\nUpstream: {label}.  Target: HTTPS/HTTP with a warm pool >= "
        f"{args.tls_target_ratio:g}: {verdict(met)} ({fmt(warm_ratio, 3)})."
    )
    return {
        "title": f"6. TLS upstream: batch of {size}, HTTPS vs plain HTTP",
        "table": text,
        "upstream": label,
        "warm": {"http": plain_warm, "https": tls_warm, "ratio": warm_ratio},
        "pool_max_requests_1": {"http": plain_new, "https": tls_new, "ratio": new_ratio},
        "first_batch_to_fresh_port": summary,
        "target_ratio": args.tls_target_ratio,
        "met": met,
    }


RUNNERS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "idle": scenario_idle,
    "deadline": scenario_deadline,
    "memory": scenario_memory,
    "tls": scenario_tls,
}


# --------------------------------------------------------------------------
# Main


def scenario_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {unknown}; choose from all or {','.join(SCENARIOS)}"
        )
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Octoplex scenarios on 127.0.0.1: idle overhead, deadline accuracy, memory per "
            "in-flight sub-request, TLS upstreams; each next to a baseline from the same run."
        ),
        epilog="Needs wrk; nginx with ssl (or bench/upstream.py) and trustme for tls.  "
        "Linux only.  See bench/README.md.",
    )
    add = parser.add_argument
    add(
        "--scenarios",
        type=scenario_list,
        default=list(SCENARIOS),
        metavar="LIST",
        help=f"all, or a comma-separated list of {','.join(SCENARIOS)} (default: all)",
    )
    add("--octoplex-cmd", metavar="CMD", default=None, help="as bench/run.py's --octoplex-cmd")
    add("--upstream", choices=("auto", "python"), default="auto", help="tls: nginx if it can")
    add("--nginx", default="/usr/sbin/nginx", help="nginx binary (default: %(default)s)")
    add("--wrk", default=None, help="wrk binary (default: wrk on PATH)")
    add("--daemon-cpus", default="0", help="taskset CPU list for the daemon (default: 0)")
    add("--load-cpus", default="1", help="CPU list for the load, upstream, wrk (default: 1)")
    add("--no-pin", action="store_true", help="do not pin processes to CPUs")
    add("-c", "--connections", type=positive_int, default=8, help="wrk connections (8)")
    add("--wrk-warmup", type=int, default=1, help="seconds of wrk warm-up before a run (1)")
    add("--json", metavar="PATH", help="also write the results as JSON to PATH")
    idle = parser.add_argument_group("idle")
    idle.add_argument("--idle-delay-ms", type=positive_int, default=50, help="(50)")
    idle.add_argument("--idle-batch-size", type=positive_int, default=10, help="(10)")
    idle.add_argument("--idle-batches", type=positive_int, default=200, help="measured (200)")
    idle.add_argument("--idle-warmup", type=int, default=20, help="batches not counted (20)")
    idle.add_argument("--idle-target-p50-ms", type=float, default=1.0, help="over delay (1)")
    idle.add_argument("--idle-target-p99-ms", type=float, default=3.0, help="over delay (3)")
    dl = parser.add_argument_group("deadline")
    dl.add_argument("--peak-seconds", type=positive_int, default=3, help="peak wrk run (3)")
    dl.add_argument("--load-fraction", type=float, default=0.5, help="of the peak (0.5)")
    dl.add_argument("--deadline-seconds", type=float, default=6.0, help="paced run, each (6)")
    dl.add_argument("--deadline-msec", type=positive_int, default=100, help="timeout_msec (100)")
    dl.add_argument("--deadline-batch-size", type=positive_int, default=10, help="(10)")
    dl.add_argument("--deadline-late-items", type=int, default=2, help="items delayed (2)")
    dl.add_argument(
        "--deadline-overrun-ms", type=positive_int, default=1000, help="their delay past it (1000)"
    )
    dl.add_argument("--deadline-target-ms", type=float, default=2.0, help="p99 lateness (2)")
    mem = parser.add_argument_group("memory")
    mem.add_argument("--memory-batches", type=positive_int, default=200, help="(200)")
    mem.add_argument("--memory-batch-size", type=positive_int, default=50, help="(50)")
    mem.add_argument("--memory-hold-ms", type=positive_int, default=60_000, help="upstream delay")
    mem.add_argument("--memory-ramp-s", type=float, default=60.0, help="bound on the ramp (60)")
    mem.add_argument("--memory-warmup", type=int, default=5, help="quick batches first (5)")
    mem.add_argument("--memory-target-kib", type=float, default=10.0, help="per request (10)")
    tls = parser.add_argument_group("tls")
    tls.add_argument("--tls-batch-size", type=positive_int, default=10, help="(10)")
    tls.add_argument("--tls-seconds", type=positive_int, default=4, help="each wrk run (4)")
    tls.add_argument("--tls-cold-hosts", type=positive_int, default=5, help="fresh ports (5)")
    tls.add_argument("--tls-target-ratio", type=float, default=0.8, help="(0.8)")
    args = parser.parse_args(argv)
    if not 0 < args.load_fraction <= 1:
        parser.error("--load-fraction must be in (0, 1]")
    if args.deadline_late_items > args.deadline_batch_size:
        parser.error("--deadline-late-items exceeds --deadline-batch-size")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.isdir("/proc/self/fd"):
        print("error: the scenarios read /proc; they run on Linux only", file=sys.stderr)
        return 2
    wrk = args.wrk or shutil.which("wrk") or "/usr/bin/wrk"
    if not os.access(wrk, os.X_OK):
        print("error: wrk not found (apt-get install -y wrk, or pass --wrk)", file=sys.stderr)
        return 2
    started = time.monotonic()
    common.raise_on_sigterm()
    nofile = common.raise_nofile()
    pin = Pinning(args.daemon_cpus, args.load_cpus, not args.no_pin)
    print(
        f"Octoplex scenarios: {', '.join(args.scenarios)}.  Pinning: {pin.note}, and this "
        f"process (the load generator) with them; RLIMIT_NOFILE {nofile}.",
        flush=True,
    )
    if args.octoplex_cmd is None:
        where = common.daemon_code_path(common.octoplex_argv(None, 0)[0])
        print(f"The daemon imports octoplex from {where}")
        if not where.startswith(common.REPO_ROOT + os.sep):
            raise SystemExit(f"error: not this checkout's ({common.REPO_ROOT}) octoplex: {where}")
    machine = common.describe_machine()

    def scenarios(procs: common.Processes, tmp: str) -> int:
        pin.pin_self_to_load()
        run = Run(args, pin, procs, tmp, wrk)
        results: dict[str, dict[str, Any]] = {}
        for name in args.scenarios:
            print(f"\n[{name}]", flush=True)
            t0 = time.monotonic()
            results[name] = RUNNERS[name](run)
            results[name]["seconds"] = round(time.monotonic() - t0, 1)
            procs.stop_all()
            print(f"\n{results[name]['title']}\n\n{results[name]['table']}", flush=True)
        print(f"\nTotal time: {time.monotonic() - started:.0f} s")
        if args.json:
            common.write_json(
                args.json,
                {
                    "config": {k: v for k, v in vars(args).items()},
                    "pinning": pin.note,
                    "machine": machine,
                    "octoplex_cmds": run.daemon_argvs,
                    "scenarios": results,
                    "markdown": "\n\n".join(
                        f"{r['title']}\n\n{r['table']}" for r in results.values()
                    ),
                },
            )
        return 0

    return common.run_guarded(scenarios, "SCENARIOS", "octoplex-scenarios-", grace=10.0)


if __name__ == "__main__":
    sys.exit(main())
