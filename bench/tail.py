#!/usr/bin/env python3
"""
Octoplex tail benchmark: what hedged requests, outlier ejection and circuit
breaking do to a batch's tail latency when one of a host's backends is
slow at random and another comes and goes (issue 19).

It starts, as subprocesses on loopback only:

- bench/tail_backends.py: three HTTP/1.1 keep-alive backends on one port
  of 127.0.0.1 (A: 5 ms), 127.0.0.2 (B: 5 % of answers 200 ms, the rest
  5 ms) and 127.0.0.3 (C: 5 ms, its listener closed for part of the time,
  so its connects are refused then), an address whose connects hang
  (127.0.0.4), and a twisted.names DNS server answering ``bidder.test``
  with the three addresses and ``dead.test`` with the fourth;
- one daemon per configuration, ``twistd -n --pidfile= octoplex
  --workers 1 --allow-egress 127.0.0.0/8 --dns-server 127.0.0.1:PORT`` and
  the configuration's options, from this checkout;

and drives each daemon in turn from this process (asyncio, raw HTTP/1.1
keep-alive, a closed loop of ``--concurrency`` callers) with batches of
``--batch-size`` GETs of ``http://bidder.test:PORT/bid``.  It reports batch
latency (p50, p99, p99.9), the share of items answered within 50 ms, and
the upstream requests each item cost, per configuration, all in one run.

    .venv/bin/python bench/tail.py                  # about 4 minutes
    .venv/bin/python bench/tail.py --smoke          # about 30 s
    .venv/bin/python bench/tail.py --configs baseline,hedge-ms --seconds 20

Stdlib only in this process; the backends need Twisted (the project's
virtualenv).  Linux only (/proc).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import common
from common import BenchError, Pinning, positive_int

BACKENDS = os.path.join(common.BENCH_DIR, "tail_backends.py")
LETTERS = ("A", "B", "C")
#: Daemon counters read from /metrics before and after each measured run.
METRICS = (
    "octoplex_hedges_sent_total",
    "octoplex_hedges_won_total",
    "octoplex_hedges_skipped_total",
    "octoplex_upstream_ejections_total",
    "octoplex_circuit_opened_total",
    "octoplex_circuit_rejected_total",
)
#: The outlier thresholds of the ejecting configurations.  B's mean latency
#: (0.95 x 5 + 0.05 x 200, about 15 ms) is 3 times A's but only 10 ms above
#: it, so the defaults (factor 3, floor 50 ms) would never eject it (and a
#: busy daemon adds the same few ms to every address, which shrinks the
#: ratio: hence 1.5, not 2); and
#: with 3 addresses the default 50 % lets only one out, which C's refusals
#: may already take.
OUTLIER_OPTIONS = (
    "--outlier-ejection on --outlier-latency-factor 1.5 --outlier-latency-floor 0.005 "
    "--outlier-max-ejected-percent 67"
)
CIRCUIT_OPTIONS = "--circuit-breaking on"
#: The daemon counter of hedges not sent for the budget.
BUDGET_SKIPS = "octoplex_hedges_skipped_total{reason=budget}"
#: Every daemon's: a dead bidder's connect fails after 0.25 s rather than the
#: default 10 s (which outlasts the batch deadline).  Loopback connects to
#: the live backends take well under a millisecond, so nothing else changes.
DAEMON_OPTIONS = "--connect-timeout 0.25"


@dataclass
class Config:
    """One configuration: the daemon's options and the batch's hedge."""

    name: str
    what: str
    outlier: bool = False
    circuit: bool = False
    hedge: str | None = None  # "ms" or "percentile"
    dead: bool = False


CONFIGS = {
    c.name: c
    for c in (
        Config("baseline", "all off"),
        Config("hedge-ms", "hedge after_msec (--hedge-after-msec)", hedge="ms"),
        Config("hedge-p95", "hedge after_percentile (--hedge-percentile)", hedge="percentile"),
        Config("outlier", "outlier ejection on (--outlier-options)", outlier=True),
        Config("circuit", "circuit breaking on (--circuit-options)", circuit=True),
        Config("all", "all three: ejection, circuit breaking, hedge after_msec", True, True, "ms"),
        Config("dead", "all off; one item of each batch to dead.test", dead=True),
        Config(
            "dead-circuit", "circuit breaking on; one item to dead.test", circuit=True, dead=True
        ),
    )
}


# --------------------------------------------------------------------------
# Figures


def percentile(values: list[float], pct: float) -> float | None:
    """The nearest-rank percentile of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def pct(part: float, whole: float, digits: int = 1) -> str:
    return "n/a" if not whole else f"{100 * part / whole:.{digits}f} %"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Tally:
    """What one configuration's measured batches came to, over its rounds."""

    batch_ms: list[float] = field(default_factory=list)
    round_p99: list[float | None] = field(default_factory=list)
    items: int = 0
    within: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    answered_by: Counter[str] = field(default_factory=Counter)
    hedged: int = 0
    hedge_won: int = 0
    dead_ms: list[float] = field(default_factory=list)
    dead_kinds: Counter[str] = field(default_factory=Counter)
    backend: Counter[str] = field(default_factory=Counter)
    metrics: Counter[str] = field(default_factory=Counter)
    totals: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cpu: float = 0.0


# --------------------------------------------------------------------------
# The load


def batch_body(config: Config, args: argparse.Namespace, port: int) -> bytes:
    uri = f"http://bidder.test:{port}/bid"
    requests: list[dict[str, Any]] = [{"uri": uri} for _ in range(args.batch_size)]
    if config.dead:
        requests[-1] = {"uri": f"http://dead.test:{port}/bid"}
    document: dict[str, Any] = {"timeout_msec": args.timeout_msec, "requests": requests}
    if config.hedge == "ms":
        document["defaults"] = {"hedge": {"after_msec": args.hedge_after_msec}}
    elif config.hedge == "percentile":
        document["defaults"] = {"hedge": {"after_percentile": args.hedge_percentile}}
    return json.dumps(document).encode()


def count_outcomes(
    tally: Tally, responses: list[dict[str, Any]], dead: bool, deadline_ms: float
) -> None:
    for i, outcome in enumerate(responses):
        result = outcome.get("Success") or outcome.get("Failure") or {}
        if dead and i == len(responses) - 1:
            tally.dead_ms.append(float(result.get("duration_msec", math.nan)))
            tally.dead_kinds[
                result.get("kind", "success") if "Failure" in outcome else "success"
            ] += 1
            continue
        tally.items += 1
        if result.get("hedged"):
            tally.hedged += 1
            if result.get("hedge_won"):
                tally.hedge_won += 1
        success = outcome.get("Success")
        if success is not None and success.get("status") == 200:
            tally.answered_by[str(success.get("content", "")).strip() or "?"] += 1
            if success.get("duration_msec", math.inf) <= deadline_ms:
                tally.within += 1
        else:
            failure = outcome.get("Failure") or {}
            tally.failed[failure.get("kind") or f"status {success and success.get('status')}"] += 1


async def closed_loop(
    port: int, body: bytes, seconds: float, max_batches: int, concurrency: int
) -> list[tuple[float, bytes]]:
    """
    ``concurrency`` callers posting ``body`` in a closed loop, each on its
    own keep-alive connection, until ``seconds`` or ``max_batches``; each
    batch's latency (ms, from writing the request to having read the whole
    answer) and answer.  A caller finishes the batch it is waiting for.
    """
    request = common.post_bytes(port, "/multiplex", body)
    results: list[tuple[float, bytes]] = []
    stop_at = time.monotonic() + seconds

    async def caller() -> None:
        reader, writer = await asyncio.open_connection(common.HOST, port)
        try:
            while time.monotonic() < stop_at and len(results) < max_batches:
                t0 = time.perf_counter()
                writer.write(request)
                status, answer = await asyncio.wait_for(common.read_answer(reader), 30)
                elapsed = (time.perf_counter() - t0) * 1000
                if status != 200:
                    raise BenchError(f"/multiplex answered HTTP {status}: {answer[:300]!r}")
                results.append((elapsed, answer))
        finally:
            writer.close()

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return results


# --------------------------------------------------------------------------
# Processes


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())


def metric_sums(port: int) -> dict[str, float]:
    """
    The daemon's counters named in METRICS, summed over their labels, and
    per ``reason`` label where they have one.
    """
    sums: dict[str, float] = {}
    with urllib.request.urlopen(f"http://{common.HOST}:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in METRICS:
            value = float(line.rsplit(" ", 1)[1])
            sums[name] = sums.get(name, 0.0) + value
            reason = re.search(r'reason="([^"]*)"', line)
            if reason:
                key = f"{name}{{reason={reason.group(1)}}}"
                sums[key] = sums.get(key, 0.0) + value
    return sums


def start_backends(
    args: argparse.Namespace, tmp: str, pin: Pinning, procs: common.Processes
) -> tuple[subprocess.Popen[Any], dict[str, Any], str]:
    ready_file = os.path.join(tmp, "backends.json")
    log = os.path.join(tmp, "backends.log")
    argv = [
        sys.executable,
        BACKENDS,
        "--ready-file",
        ready_file,
        "--fast-ms",
        str(args.fast_ms),
        "--slow-ms",
        str(args.slow_ms),
        "--slow-share",
        str(args.slow_share),
        "--c-up",
        str(args.c_up),
        "--c-down",
        str(args.c_down),
        "--seed",
        str(args.seed),
    ]
    with open(log, "wb") as out:
        proc = procs.start("backends", pin.load(argv), stdout=out, stderr=subprocess.STDOUT)
    common.wait_until(lambda: os.path.exists(ready_file), proc, "tail_backends.py", log, 30)
    with open(ready_file) as f:
        ready: dict[str, Any] = json.load(f)
    return proc, ready, log


def daemon_argv(config: Config, args: argparse.Namespace, dns_port: int) -> list[str]:
    extra = ["--workers", "1", "--dns-server", f"127.0.0.1:{dns_port}"]
    if config.outlier:
        extra += shlex.split(args.outlier_options)
    if config.circuit:
        extra += shlex.split(args.circuit_options)
    extra += shlex.split(args.daemon_options)
    return extra


def start_daemons(
    configs: list[Config],
    args: argparse.Namespace,
    dns_port: int,
    tmp: str,
    pin: Pinning,
    procs: common.Processes,
) -> dict[str, tuple[subprocess.Popen[Any], int, str, list[str]]]:
    """Start one daemon per configuration, all at once; wait for each."""
    daemons = {}
    env = common.daemon_env()
    for config in configs:
        port = common.free_port()
        argv, _ = common.octoplex_argv(None, port)
        argv += daemon_argv(config, args, dns_port)
        log = os.path.join(tmp, f"octoplex-{config.name}.log")
        with open(log, "wb") as out:
            proc = procs.start(
                f"octoplex {config.name}",
                pin.daemon(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=common.REPO_ROOT,
                env=env,
            )
        daemons[config.name] = (proc, port, log, argv)
    for name, (proc, port, log, argv) in daemons.items():
        url = f"http://{common.HOST}:{port}/healthz"
        common.wait_until_serving(proc, url, f"octoplex ({name})", log, timeout=60)
        print(f"  {name}: {shlex.join(argv)} (pid {proc.pid})", flush=True)
    return daemons


def check(port: int, backend_port: int, args: argparse.Namespace, name: str) -> None:
    """One batch to bidder.test; every item must be a 200 from A, B or C."""
    config = Config("check", "")
    body = batch_body(config, args, backend_port)

    async def once() -> list[tuple[float, bytes]]:
        return await closed_loop(port, body, 60, 1, 1)

    (_, answer), *_ = asyncio.run(once())
    bad = [
        o
        for o in json.loads(answer)["responses"]
        if (o.get("Success") or {}).get("content", "").strip() not in LETTERS
    ]
    if bad:
        raise BenchError(f"check batch on the {name} daemon: {len(bad)} bad items; first: {bad[0]}")


def alive(watch: list[tuple[str, subprocess.Popen[Any], str]]) -> None:
    for name, proc, log in watch:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} died (status {proc.returncode}).\n--- {log} ---\n{common.tail(log)}"
            )


# --------------------------------------------------------------------------
# The run


def measure(
    args: argparse.Namespace,
    configs: list[Config],
    daemons: dict[str, tuple[subprocess.Popen[Any], int, str, list[str]]],
    ready: dict[str, Any],
    watch: list[tuple[str, subprocess.Popen[Any], str]],
) -> tuple[dict[str, Tally], list[str]]:
    stats_url = f"http://{common.HOST}:{ready['stats_port']}/stats"
    tallies = {c.name: Tally() for c in configs}
    order: list[str] = []
    warmed: set[str] = set()
    for round_number in range(args.rounds):
        turn = configs if round_number % 2 == 0 else list(reversed(configs))
        for config in turn:
            proc, port, _, _ = daemons[config.name]
            body = batch_body(config, args, ready["port"])
            if config.name not in warmed and args.warmup > 0:
                asyncio.run(closed_loop(port, body, args.warmup, 10**9, args.concurrency))
                warmed.add(config.name)
            before, m0 = get_json(stats_url), metric_sums(port)
            c0, t0 = common.cpu_seconds(proc.pid), time.monotonic()
            results = asyncio.run(
                closed_loop(port, body, args.seconds, args.max_batches, args.concurrency)
            )
            c1, elapsed = common.cpu_seconds(proc.pid), time.monotonic() - t0
            after, m1 = get_json(stats_url), metric_sums(port)
            alive(watch)
            tally = tallies[config.name]
            tally.seconds += elapsed
            tally.cpu += 0.0 if c0 is None or c1 is None else c1 - c0
            latencies = [ms for ms, _ in results]
            tally.batch_ms += latencies
            tally.round_p99.append(percentile(latencies, 99))
            for _, answer in results:
                count_outcomes(tally, json.loads(answer)["responses"], config.dead, args.item_ms)
            for letter in LETTERS:
                for key in ("requests", "cancelled", "connections", "slow"):
                    tally.backend[f"{letter}.{key}"] += after[letter][key] - before[letter][key]
            tally.backend["C.down_periods"] += (
                after["C"]["down_periods"] - before["C"]["down_periods"]
            )
            for name in sorted(set(m0) | set(m1)):
                tally.metrics[name] += int(m1.get(name, 0.0) - m0.get(name, 0.0))
            order.append(config.name)
            print(
                f"  round {round_number + 1}, {config.name}: {len(results)} batches in "
                f"{elapsed:.1f} s, p99 {fmt(percentile(latencies, 99))} ms",
                flush=True,
            )
    for config in configs:
        tallies[config.name].totals = metric_sums(daemons[config.name][1])
    return tallies, order


def summarise(config: Config, tally: Tally, args: argparse.Namespace) -> dict[str, Any]:
    ms = tally.batch_ms
    upstream = sum(tally.backend[f"{x}.requests"] for x in LETTERS)
    answered = sum(tally.answered_by.values())
    return {
        "config": config.name,
        "what": config.what,
        "batches": len(ms),
        "batches_per_s": round(len(ms) / tally.seconds, 1) if tally.seconds else None,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "p999_ms": percentile(ms, 99.9),
        "max_ms": max(ms) if ms else None,
        "round_p99_ms": tally.round_p99,
        "items": tally.items,
        "items_within": tally.within,
        "items_within_share": tally.within / tally.items if tally.items else None,
        "failed_items": dict(tally.failed),
        "answered_by": dict(tally.answered_by),
        "answered_by_share": {k: v / answered for k, v in tally.answered_by.items()}
        if answered
        else {},
        "hedged_items": tally.hedged,
        "hedges_won": tally.hedge_won,
        "upstream_requests": upstream,
        "upstream_requests_per_item": upstream / tally.items if tally.items else None,
        "new_connections_per_1k_items": 1000
        * sum(tally.backend[f"{x}.connections"] for x in LETTERS)
        / tally.items
        if tally.items
        else None,
        "backend": dict(tally.backend),
        "daemon_metrics": dict(tally.metrics),
        "daemon_metrics_since_start": dict(tally.totals),
        "daemon_cpu_pct": 100 * tally.cpu / tally.seconds if tally.seconds else None,
        "dead_item_ms_p50": percentile(tally.dead_ms, 50),
        "dead_item_ms_p99": percentile(tally.dead_ms, 99),
        "dead_item_kinds": dict(tally.dead_kinds),
        "seconds": round(tally.seconds, 2),
    }


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    item_ms = f"{args.item_ms:g}"
    lines = []
    main = []
    for r in rows:
        share = r["answered_by_share"]
        main.append(
            [
                r["config"],
                str(r["batches"]),
                fmt(r["p50_ms"]),
                fmt(r["p99_ms"]),
                fmt(r["p999_ms"]),
                pct(r["items_within"], r["items"]),
                str(sum(r["failed_items"].values())),
                f"{pct(r['hedged_items'], r['items'])} ({pct(r['hedges_won'], r['items'])})",
                pct(r["daemon_metrics"].get(BUDGET_SKIPS, 0), r["items"]),
                fmt(r["upstream_requests_per_item"], 3),
                fmt(r["new_connections_per_1k_items"], 1),
                "/".join(f"{100 * share.get(x, 0):.0f}" for x in LETTERS),
                ejections(r["daemon_metrics_since_start"]),
                f"{r['daemon_metrics_since_start'].get('octoplex_circuit_opened_total', 0):g}",
                fmt(r["daemon_cpu_pct"], 0),
            ]
        )
    lines.append(
        table(
            [
                "config",
                "batches",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                f"items ≤ {item_ms} ms",
                "failed items",
                "hedged (won)",
                "over budget",
                "upstream req/item",
                "new conns /1k items",
                "A/B/C answered %",
                "ejections*",
                "circuits opened*",
                "daemon CPU %",
            ],
            main,
        )
    )
    lines.append(
        f"\n* since the daemon started, warm-up included.  Items ≤ {item_ms} ms: a Success "
        f"with status 200 whose own duration_msec is at most {item_ms}.  Upstream req/item: "
        "requests the three backends received ÷ items sent to bidder.test (a hedge that "
        "reaches a backend counts; one cancelled while its connect was opening does not).  "
        "p99.9 is the maximum where a config has fewer than 1,000 batches.  Over budget: "
        "hedges due but not sent, the hedge budget spent (--hedge-budget-percent), per item."
    )
    dead = [r for r in rows if r["config"].startswith("dead")]
    if dead:
        lines.append(
            "\nOne item of each batch to dead.test (connects hang):\n\n"
            + table(
                [
                    "config",
                    "batches",
                    "batch p50 ms",
                    "batch p99 ms",
                    "dead item p50 ms",
                    "dead item p99 ms",
                    "dead item kinds",
                ],
                [
                    [
                        r["config"],
                        str(r["batches"]),
                        fmt(r["p50_ms"]),
                        fmt(r["p99_ms"]),
                        fmt(r["dead_item_ms_p50"], 0),
                        fmt(r["dead_item_ms_p99"], 0),
                        ", ".join(f"{k} {v}" for k, v in sorted(r["dead_item_kinds"].items())),
                    ]
                    for r in dead
                ],
            )
        )
    return "\n".join(lines)


def ejections(metrics: dict[str, float]) -> str:
    """Ejections since the daemon started, and their reasons."""
    total = metrics.get("octoplex_upstream_ejections_total", 0)
    prefix = "octoplex_upstream_ejections_total{reason="
    reasons = [
        f"{k[len(prefix) : -1]} {v:g}" for k, v in sorted(metrics.items()) if k.startswith(prefix)
    ]
    return f"{total:g}" + (f" ({', '.join(reasons)})" if reasons else "")


def targets(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    by = {r["config"]: r for r in rows}
    out = []
    base = by.get("baseline")
    if base and base["p99_ms"] is not None:
        b_share = base["answered_by_share"].get("B", 0.0)
        expected = 1 - (1 - args.slow_share * b_share) ** args.batch_size
        out.append(
            f"baseline p99 {fmt(base['p99_ms'])} ms (expected about {args.slow_ms:g} ms: "
            f"B answered {100 * b_share:.0f} % of items, so about {100 * expected:.0f} % of "
            f"batches of {args.batch_size} hold a slow item)"
        )
    for name in ("hedge-ms", "hedge-p95", "all"):
        r = by.get(name)
        if r and r["p99_ms"] is not None:
            ok = r["p99_ms"] < args.target_p99_ms
            out.append(
                f"{name}: batch p99 {fmt(r['p99_ms'])} ms < {args.target_p99_ms:g} ms: "
                f"{'met' if ok else 'MISSED'}"
            )
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, run in this order (default: all: {','.join(CONFIGS)})",
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured s per config per round (default 10)"
    )
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="s before a config's first round (default 3)"
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=2,
        help="rounds; every other one runs the configs in reverse order (default 2)",
    )
    parser.add_argument(
        "--max-batches",
        type=positive_int,
        default=20000,
        help="most batches per config per round (default 20000)",
    )
    parser.add_argument(
        "--concurrency", type=positive_int, default=4, help="callers in the closed loop (default 4)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=10, help="requests per batch (default 10)"
    )
    parser.add_argument(
        "--timeout-msec", type=positive_int, default=1000, help="batch deadline (default 1000)"
    )
    parser.add_argument(
        "--item-ms",
        type=float,
        default=50.0,
        help="an item meets the deadline if a Success with duration_msec <= this (default 50)",
    )
    parser.add_argument("--target-p99-ms", type=float, default=50.0, help="(default 50)")
    parser.add_argument(
        "--hedge-after-msec", type=positive_int, default=15, help="hedge-ms and all (default 15)"
    )
    parser.add_argument("--hedge-percentile", type=float, default=95.0, help="hedge-p95 (95)")
    parser.add_argument(
        "--outlier-options",
        default=OUTLIER_OPTIONS,
        help=f"the daemon options of outlier and all (default: {OUTLIER_OPTIONS!r})",
    )
    parser.add_argument(
        "--circuit-options",
        default=CIRCUIT_OPTIONS,
        help=f"the daemon options of circuit, all, dead-circuit (default: {CIRCUIT_OPTIONS!r})",
    )
    parser.add_argument(
        "--daemon-options",
        default=DAEMON_OPTIONS,
        help=f"options of every daemon (default: {DAEMON_OPTIONS!r})",
    )
    parser.add_argument("--fast-ms", type=float, default=5.0, help="every backend (default 5)")
    parser.add_argument("--slow-ms", type=float, default=200.0, help="B's slow answers (200)")
    parser.add_argument("--slow-share", type=float, default=0.05, help="of B's answers (0.05)")
    parser.add_argument("--c-up", type=float, default=2.0, help="s C listens (default 2)")
    parser.add_argument("--c-down", type=float, default=2.0, help="s C refuses (default 2)")
    parser.add_argument("--seed", type=int, default=19, help="B's random slowness (default 19)")
    parser.add_argument("--daemon-cpus", default="0", help="taskset list (default 0)")
    parser.add_argument("--load-cpus", default="1", help="backends and load (default 1)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--json", metavar="PATH", help="write every figure here")
    parser.add_argument(
        "--log-dir", metavar="DIR", help="keep the daemons' and backends' logs here"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI: --seconds 2 --warmup 1 --rounds 1 (a couple of seconds per config)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.warmup, args.rounds = 2.0, 1.0, 1
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        parser.error(f"unknown configs {unknown}; choose among {','.join(CONFIGS)}")
    args.config_list = [CONFIGS[n] for n in names]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.isdir("/proc/self/fd"):
        print("error: the tail benchmark reads /proc; it runs on Linux only", file=sys.stderr)
        return 2
    started = time.monotonic()
    common.raise_on_sigterm()
    common.raise_nofile()
    pin = Pinning(args.daemon_cpus, args.load_cpus, not args.no_pin)
    configs: list[Config] = args.config_list
    print(
        f"Octoplex tail benchmark: {', '.join(c.name for c in configs)}; {args.rounds} "
        f"round(s) of {args.seconds:g} s each (after {args.warmup:g} s warm-up), "
        f"{args.concurrency} callers, batches of {args.batch_size}, deadline "
        f"{args.timeout_msec} ms.  {os.cpu_count()} CPUs; pinning: {pin.note}, and this "
        "process (the load generator) with the backends.",
        flush=True,
    )
    where = common.daemon_code_path(common.octoplex_argv(None, 0)[0])
    if not where.startswith(common.REPO_ROOT + os.sep):
        raise SystemExit(f"error: not this checkout's ({common.REPO_ROOT}) octoplex: {where}")
    machine = common.describe_machine()

    def body(procs: common.Processes, tmp: str) -> int:
        try:
            return measured(procs, tmp)
        finally:
            if args.log_dir:
                procs.stop_all()
                os.makedirs(args.log_dir, exist_ok=True)
                for name in os.listdir(tmp):
                    if name.endswith(".log"):
                        shutil.copy(os.path.join(tmp, name), args.log_dir)

    def measured(procs: common.Processes, tmp: str) -> int:
        pin.pin_self_to_load()
        backends, ready, backends_log = start_backends(args, tmp, pin, procs)
        print(
            f"  backends on port {ready['port']} (A 127.0.0.1, B .2, C .3; dead.test .4 "
            f"{'drops SYNs' if ready['dead_drops_syn'] else 'does NOT drop SYNs'}), DNS on "
            f"127.0.0.1:{ready['dns_port']} (pid {backends.pid})",
            flush=True,
        )
        daemons = start_daemons(configs, args, ready["dns_port"], tmp, pin, procs)
        watch = [("backends", backends, backends_log)]
        watch += [(f"octoplex {n}", d[0], d[2]) for n, d in daemons.items()]
        for name, (_, port, _, _) in daemons.items():
            check(port, ready["port"], args, name)
        tallies, order = measure(args, configs, daemons, ready, watch)
        rows = [summarise(c, tallies[c.name], args) for c in configs]
        text = report(rows, args)
        verdicts = targets(rows, args)
        print(f"\n{text}\n")
        for line in verdicts:
            print(line)
        print(f"\nOrder: {', '.join(order)}.  Total time: {time.monotonic() - started:.0f} s")
        if args.json:
            settings = {k: v for k, v in vars(args).items() if k != "config_list"}
            common.write_json(
                args.json,
                {
                    "settings": settings,
                    "machine": machine,
                    "pinning": pin.note,
                    "backends": ready,
                    "octoplex_cmds": {n: d[3] for n, d in daemons.items()},
                    "order": order,
                    "results": rows,
                    "targets": verdicts,
                    "markdown": text,
                },
            )
        return 0

    return common.run_guarded(body, "TAIL", "octoplex-tail-", grace=10.0)


if __name__ == "__main__":
    sys.exit(main())
