#!/usr/bin/env python3
"""
Octoplex throughput benchmark.

Starts an upstream (nginx answering "hello world\\n", or bench/upstream.py if
nginx is not installed) and an Octoplex daemon, both on 127.0.0.1, then drives
them with wrk:

- once straight at the upstream (GET /), for the reference requests/s;
- once per batch size, POSTing a batch of that many requests (all to the
  upstream) to /multiplex.

``--scenarios all`` runs bench/scenarios.py instead: idle overhead, deadline
accuracy, memory per in-flight sub-request and TLS upstreams.

For each batch size it reports batches/s, sub-requests/s, batch latency p50
and p99, errors, failed sub-requests, and sub-requests/s as a fraction of the
direct upstream requests/s.  The daemon runs pinned to one CPU, upstream and
wrk to another.

``--workers 1,2`` runs the batch sizes once per worker count, a fresh daemon
started with ``--workers N`` each time; with N > 1 the daemon (its master
and workers) is not pinned, and its CPU % is summed over its processes.

Stdlib only; needs wrk, and nginx for the reference upstream.  See
bench/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from typing import Any

import common
from common import (
    HOST,
    Pinning,
    add_placement_arguments,
    check_one_batch,
    nginx_accepts,
    positive_int,
    run_wrk,
    start_octoplex,
    summarise_wrk,
)

# --------------------------------------------------------------------------
# Octoplex


def measured(
    label: str,
    wrk: str,
    pin: Pinning,
    watch: list[tuple[str, subprocess.Popen[Any], str]],
    url: str,
    args: argparse.Namespace,
    script_args: list[str],
    batch_size: int,
    daemon: subprocess.Popen[Any] | None,
    upstream: subprocess.Popen[Any],
    accepts: Any = None,
) -> dict[str, Any]:
    if args.warmup > 0:
        print(f"  {label}: warm-up {args.warmup} s ...", flush=True)
        run_wrk(wrk, pin, watch, url, args.connections, args.warmup, script_args)
    print(f"  {label}: measuring {args.duration} s ...", flush=True)

    def cpu(p: subprocess.Popen[Any] | None) -> float | None:
        # The daemon's whole process tree: its workers with --workers.
        return None if p is None else common.tree_cpu_seconds(p.pid)

    a0 = accepts() if accepts else None
    d0, u0, t0 = cpu(daemon), cpu(upstream), time.monotonic()
    raw, out = run_wrk(wrk, pin, watch, url, args.connections, args.duration, script_args)
    d1, u1, elapsed = cpu(daemon), cpu(upstream), time.monotonic() - t0
    a1 = accepts() if accepts else None

    def pct(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else 100 * (b - a) / elapsed

    result = summarise_wrk(raw, batch_size, pct(d0, d1), pct(u0, u1))
    # Connections the upstream accepted during the measured run (less the
    # status request's own), per 1,000 sub-requests: near 0 once warm.
    subs = raw["requests"] * max(batch_size, 1)
    result["upstream_connections_per_1k"] = (
        None if a0 is None or a1 is None or not subs else round((a1 - a0 - 1) * 1000 / subs, 2)
    )
    if args.verbose:
        print(out)
    print(
        f"  {label}: {result['requests_per_s']:.0f} req/s, "
        f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
        f"errors {result['errors']}, failed sub-requests {result['failed_sub_requests']}",
        flush=True,
    )
    if result["sample_bad_response"]:
        print(f"  {label}: first bad answer: {result['sample_bad_response'][:600]}")
    return result


# --------------------------------------------------------------------------
# Report


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown_table(direct: dict[str, Any], batches: list[dict[str, Any]]) -> str:
    rows = [
        "| batch size | batches/s | sub-requests/s | p50 ms | p99 ms | errors "
        "| failed sub-requests | vs direct | daemon CPU % | new upstream conns / 1k |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = direct["requests_per_s"]
    for r in batches:
        ratio = r["sub_requests_per_s"] / base if base else None
        rows.append(
            f"| {r['batch_size']} | {fmt(r['requests_per_s'])} | {fmt(r['sub_requests_per_s'])} "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} "
            f"| {r['failed_sub_requests']} | {fmt(ratio, 3)} | {fmt(r['daemon_cpu_pct'], 0)} "
            f"| {fmt(r.get('upstream_connections_per_1k'), 2)} |"
        )
    rows.append(
        f"| direct GET (upstream) | - | {fmt(base)} | {direct['p50_ms']:.2f} "
        f"| {direct['p99_ms']:.2f} | {direct['errors']} | - | 1.000 | - | - |"
    )
    return "\n".join(rows)


def worker_table(by_workers: list[tuple[int, list[dict[str, Any]], list[str]]]) -> str:
    """
    Sub-requests/s per batch size (rows) and worker count (columns).
    """
    counts = [workers for workers, _, _ in by_workers]
    rows = [
        "| batch size | " + " | ".join(f"{n} worker{'s' if n > 1 else ''}" for n in counts) + " |",
        "|---:|" + "---:|" * len(counts),
    ]
    for i, first in enumerate(by_workers[0][1]):
        cells = [fmt(batches[i]["sub_requests_per_s"]) for _, batches, _ in by_workers]
        rows.append(f"| {first['batch_size']} | " + " | ".join(cells) + " |")
    return "sub-requests/s by worker count:\n\n" + "\n".join(rows)


# --------------------------------------------------------------------------
# Main


def worker_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("worker counts must be at least 1")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark Octoplex against nginx on 127.0.0.1 with wrk: batches/s, "
            "sub-requests/s and batch latency per batch size, next to wrk's "
            "requests/s straight at the upstream."
        ),
        epilog=(
            "Needs wrk (and nginx for the reference upstream; without it "
            "bench/upstream.py stands in).  Debian: apt-get install -y nginx-light wrk."
        ),
    )
    parser.add_argument(
        "-d",
        "--duration",
        type=positive_int,
        default=10,
        help="seconds of each measured wrk run (default: %(default)s)",
    )
    common.add_wrk_arguments(parser)
    parser.add_argument(
        "-w",
        "--workers",
        type=worker_counts,
        default=[1],
        metavar="LIST",
        help="comma-separated worker counts, a daemon run with --workers N for each; "
        "N > 1 is not pinned (default: 1)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="seconds of warm-up before each measured run; 0 for none (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout-msec",
        type=positive_int,
        default=5000,
        help="the batches' timeout_msec, generous so that deadlines do not "
        "shape the result (default: %(default)s)",
    )
    parser.add_argument(
        "--octoplex-cmd",
        metavar="CMD",
        default=None,
        help="how to launch the daemon, as a shell-quoted command.  {port} or "
        "{listen} (tcp:PORT:interface=127.0.0.1) are filled in; without "
        "either, '--listen tcp:PORT:interface=127.0.0.1' is appended.  "
        "Default: TWISTD -n --pidfile= octoplex, with the twistd next to "
        "sys.executable (else .venv/bin/twistd, else PATH).  It runs with "
        "cwd and PYTHONPATH set to the repository root.",
    )
    add_placement_arguments(parser, "wrk")
    parser.add_argument("--wrk", default=None, help="wrk binary (default: wrk on PATH)")
    parser.add_argument(
        "--no-check-responses",
        action="store_true",
        help="do not count failed sub-requests in wrk's response() callback",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("-v", "--verbose", action="store_true", help="print wrk's full output")
    parser.add_argument(
        "--scenarios",
        metavar="LIST",
        help="run bench/scenarios.py instead (all, or idle,deadline,memory,tls); every "
        "other option then goes to it: see python3 bench/scenarios.py --help",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--scenarios" or a.startswith("--scenarios=") for a in argv):
        import scenarios

        return scenarios.main(argv)
    args = parse_args(argv)
    started = time.monotonic()
    common.raise_on_sigterm()

    wrk = common.find_wrk(args.wrk)
    use_nginx = common.use_nginx(args.upstream, args.nginx)

    runs = 1 + len(args.batch_sizes) * len(args.workers)
    estimate = runs * (args.warmup + args.duration)
    print(
        f"Octoplex benchmark: {args.connections} connections, {args.duration} s per run "
        f"(+{args.warmup} s warm-up), batch sizes {args.batch_sizes}, "
        f"workers {args.workers}; about {estimate} s of load.",
        flush=True,
    )
    pin = Pinning(args.daemon_cpus, args.load_cpus, not args.no_pin)
    print(f"Pinning: {pin.note}")

    def bench(procs: common.Processes, tmp: str) -> int:
        upstream_port = common.free_port()
        upstream, upstream_label, upstream_log = common.start_upstream(
            use_nginx, args.nginx, args.upstream, tmp, upstream_port, pin, procs
        )
        upstream_url = f"http://{HOST}:{upstream_port}/"
        print(f"Upstream: {upstream_label} at {upstream_url}")
        accepts = None
        if nginx_accepts(upstream_port) is not None:

            def accepts() -> int | None:
                return nginx_accepts(upstream_port)

        direct_raw: dict[str, Any] | None = None
        by_workers: list[tuple[int, list[dict[str, Any]], list[str]]] = []
        for workers in args.workers:
            daemon, port, daemon_log, daemon_argv, source = start_octoplex(
                args.octoplex_cmd, tmp, pin, procs, workers
            )
            print(
                f"Octoplex ({workers} worker{'s' if workers > 1 else ''}"
                f"{', not pinned' if workers > 1 else ''}): {shlex.join(daemon_argv)}\n"
                f"  ({source}), pid {daemon.pid}"
            )

            for size in args.batch_sizes:
                check_one_batch(port, size, upstream_url, args.timeout_msec)
            print("Check: one batch of each size answered all Success/200.")

            watch = [
                ("octoplex", daemon, daemon_log),
                (upstream_label, upstream, upstream_log),
            ]
            if direct_raw is None:
                direct_raw = measured(
                    "direct", wrk, pin, watch, upstream_url, args, ["direct"], 1, None, upstream
                )
            batches = []
            multiplex_url = f"http://{HOST}:{port}/multiplex"
            for size in args.batch_sizes:
                script_args = [
                    "multiplex",
                    str(size),
                    upstream_url,
                    str(args.timeout_msec),
                    "0" if args.no_check_responses else "1",
                ]
                result = measured(
                    f"workers {workers}, batch {size}",
                    wrk,
                    pin,
                    watch,
                    multiplex_url,
                    args,
                    script_args,
                    size,
                    daemon,
                    upstream,
                    accepts,
                )
                result["workers"] = workers
                batches.append(result)
            by_workers.append((workers, batches, daemon_argv))
            common.stop(daemon, 40.0)
        assert direct_raw is not None

        tables = []
        for workers, batches, _ in by_workers:
            table = markdown_table(direct_raw, batches)
            tables.append(table)
            where = pin.note
            if workers > 1 and pin.enabled:
                where = f"daemon NOT pinned, upstream and wrk on CPU {pin.load_cpus}"
            print()
            print(
                f"Octoplex --workers {workers} vs {upstream_label}, "
                f"wrk -t1 -c{args.connections} -d{args.duration}s; {where}."
            )
            print()
            print(table)
        if len(by_workers) > 1:
            print()
            print(worker_table(by_workers))
        print()
        print(f"Total time: {time.monotonic() - started:.0f} s")
        if args.json:
            document = {
                "config": {
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "connections": args.connections,
                    "wrk_threads": 1,
                    "batch_sizes": args.batch_sizes,
                    "timeout_msec": args.timeout_msec,
                    "pinning": pin.note,
                    "upstream": upstream_label,
                    "octoplex_cmd": by_workers[0][2],
                    "workers": args.workers,
                    "response_check": not args.no_check_responses,
                },
                "machine": common.describe_machine(),
                "direct": direct_raw,
                # The first worker count's, as before --workers; then every run.
                "batches": by_workers[0][1],
                "runs": [
                    {"workers": workers, "octoplex_cmd": argv, "batches": batches}
                    for workers, batches, argv in by_workers
                ],
                "markdown": "\n\n".join(tables),
            }
            common.write_json(args.json, document)
        return 0

    return common.run_guarded(bench, "BENCHMARK", "octoplex-bench-")


if __name__ == "__main__":
    sys.exit(main())
