#!/usr/bin/env python3
"""
Octoplex throughput benchmark.

Starts an upstream (nginx answering "hello world\\n", or bench/upstream.py if
nginx is not installed) and an Octoplex daemon, both on 127.0.0.1, then drives
them with wrk:

- once straight at the upstream (GET /), for the reference requests/s;
- once per batch size, POSTing a batch of that many requests (all to the
  upstream) to /multiplex.

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
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import common
from common import BENCH_DIR, HOST, REPO_ROOT, BenchError, positive_int

LUA_SCRIPT = os.path.join(BENCH_DIR, "batch.lua")
FALLBACK_UPSTREAM = os.path.join(BENCH_DIR, "upstream.py")
UPSTREAM_BODY = "hello world\n"


# --------------------------------------------------------------------------
# Processes


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def wait_until_serving(
    proc: subprocess.Popen[Any], url: str, name: str, log: str, timeout: float = 20.0
) -> None:
    def serving() -> bool | str:
        status, _ = http_get(url)
        return True if status == 200 else f"HTTP {status}"

    common.wait_until(serving, proc, name, log, timeout, f"answer GET {url}")


# --------------------------------------------------------------------------
# Pinning


class Pinning:
    def __init__(self, daemon_cpus: str, load_cpus: str, enabled: bool) -> None:
        self.taskset = shutil.which("taskset")
        self.daemon_cpus = daemon_cpus
        self.load_cpus = load_cpus
        self.enabled = enabled
        self.note = ""
        if not enabled:
            self.note = "pinning disabled (--no-pin)"
        elif self.taskset is None:
            self.enabled = False
            self.note = "taskset not found: NOT pinning"
        else:
            available = len(os.sched_getaffinity(0))
            if available < 2:
                self.enabled = False
                self.note = f"only {available} CPU available: NOT pinning"
            else:
                self.note = f"daemon on CPU {daemon_cpus}, upstream and wrk on CPU {load_cpus}"

    def daemon(self, argv: list[str]) -> list[str]:
        return self._wrap(self.daemon_cpus, argv)

    def load(self, argv: list[str]) -> list[str]:
        return self._wrap(self.load_cpus, argv)

    def _wrap(self, cpus: str, argv: list[str]) -> list[str]:
        if not self.enabled:
            return argv
        assert self.taskset is not None
        return [self.taskset, "-c", cpus, *argv]


# --------------------------------------------------------------------------
# Upstream


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
{temp_paths}
    server {{
        listen {host}:{port};
        location / {{
            return 200 "hello world\\n";
        }}
        # Accepted connections, to count the upstream connections Octoplex opens.
        location = /nginx_status {{
            stub_status;
        }}
    }}
}}
"""


def nginx_accepts(port: int) -> int | None:
    """
    The connections nginx has accepted so far (its stub_status), counting
    the one this call opens.
    """
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/nginx_status", timeout=5) as answer:
            text = answer.read().decode("ascii", "replace")
    except (OSError, urllib.error.URLError):
        return None
    m = re.search(r"^\s*(\d+)\s+\d+\s+\d+\s*$", text, re.M)
    return int(m.group(1)) if m else None


def nginx_version(nginx: str) -> tuple[str, tuple[int, ...]]:
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10)
    text = out.stderr + out.stdout
    m = re.search(r"nginx/(\d+(?:\.\d+)*)", text)
    version = tuple(int(x) for x in m.group(1).split(".")) if m else ()
    return text, version


def start_nginx(
    nginx: str, tmp: str, port: int, pin: Pinning, procs: common.Processes
) -> tuple[subprocess.Popen[Any], str, str]:
    configure, version = nginx_version(nginx)
    temp_paths = [f"    client_body_temp_path {tmp}/client_body;"]
    for module, directive in (
        ("proxy", "proxy_temp_path"),
        ("fastcgi", "fastcgi_temp_path"),
        ("uwsgi", "uwsgi_temp_path"),
        ("scgi", "scgi_temp_path"),
    ):
        if f"--without-http_{module}_module" not in configure:
            temp_paths.append(f"    {directive} {tmp}/{module};")
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(tmp=tmp, host=HOST, port=port, temp_paths="\n".join(temp_paths)))
    argv = [nginx, "-p", tmp + "/", "-c", conf]
    if version >= (1, 19, 5):
        # Log to our file from the start, not to the built-in path.
        argv[1:1] = ["-e", os.path.join(tmp, "error.log")]
    log = os.path.join(tmp, "nginx.out")
    with open(log, "wb") as out:
        proc = procs.start("nginx", pin.load(argv), stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    error_log = os.path.join(tmp, "error.log")
    wait_until_serving(proc, f"http://{HOST}:{port}/", "nginx", error_log)
    label = "nginx " + ".".join(map(str, version)) if version else "nginx"
    return proc, label, error_log


def start_fallback_upstream(
    tmp: str, port: int, pin: Pinning, procs: common.Processes
) -> tuple[subprocess.Popen[Any], str, str]:
    log = os.path.join(tmp, "upstream.log")
    argv = [sys.executable, FALLBACK_UPSTREAM, "--host", HOST, "--port", str(port)]
    with open(log, "wb") as out:
        proc = procs.start("upstream", pin.load(argv), stdout=out, stderr=subprocess.STDOUT)
    wait_until_serving(proc, f"http://{HOST}:{port}/", "bench/upstream.py", log)
    return proc, "bench/upstream.py (asyncio)", log


# --------------------------------------------------------------------------
# Octoplex


def octoplex_argv(cmd: str | None, port: int) -> tuple[list[str], str]:
    listen = f"tcp:{port}:interface={HOST}"
    if cmd is None:
        twistd, where = common.find_twistd(" or pass --octoplex-cmd")
        # The upstream is local, and local addresses are refused by default.
        argv = [twistd, "-n", "--pidfile=", "octoplex", "--listen", listen]
        argv += ["--allow-egress", "127.0.0.0/8"]
        return argv, f"{twistd} (found {where})"
    if "{port}" in cmd or "{listen}" in cmd:
        argv = shlex.split(cmd.replace("{port}", str(port)).replace("{listen}", listen))
    else:
        argv = [*shlex.split(cmd), "--listen", listen]
    return argv, "--octoplex-cmd"


def start_octoplex(
    cmd: str | None, tmp: str, pin: Pinning, procs: common.Processes, workers: int = 1
) -> tuple[subprocess.Popen[Any], int, str, list[str], str]:
    port = common.free_port()
    argv, source = octoplex_argv(cmd, port)
    # Always given: the default (auto) is one worker per CPU.
    argv += ["--workers", str(workers)]
    env = common.daemon_env()
    log = os.path.join(tmp, f"octoplex-workers-{workers}.log")
    with open(log, "wb") as out:
        proc = procs.start(
            "octoplex",
            pin.daemon(argv) if workers == 1 else argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )
    wait_until_serving(proc, f"http://{HOST}:{port}/healthz", "octoplex", log, timeout=30)
    return proc, port, log, argv, source


def batch_document(size: int, upstream_url: str, timeout_msec: int) -> dict[str, Any]:
    return {
        "timeout_msec": timeout_msec,
        "requests": [{"method": "GET", "uri": upstream_url} for _ in range(size)],
    }


def check_one_batch(port: int, size: int, upstream_url: str, timeout_msec: int) -> None:
    """
    POST one batch by hand and insist that every outcome is a Success with
    status 200 and the upstream's body.
    """
    url = f"http://{HOST}:{port}/multiplex"
    body = json.dumps(batch_document(size, upstream_url, timeout_msec)).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_msec / 1000 + 10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except OSError as e:
        raise BenchError(f"check batch of {size}: POST {url} failed: {e}") from None
    shown = raw[:2000].decode("utf-8", "replace")
    if status != 200:
        raise BenchError(f"check batch of {size}: /multiplex answered HTTP {status}: {shown}")
    try:
        responses = json.loads(raw)["responses"]
    except (ValueError, KeyError, TypeError) as e:
        raise BenchError(f"check batch of {size}: unreadable answer ({e}): {shown}") from None
    if not isinstance(responses, list) or len(responses) != size:
        raise BenchError(
            f"check batch of {size}: expected {size} outcomes, got "
            f"{len(responses) if isinstance(responses, list) else type(responses).__name__}"
        )
    bad = []
    for i, outcome in enumerate(responses):
        success = outcome.get("Success") if isinstance(outcome, dict) else None
        if (
            not isinstance(success, dict)
            or success.get("status") != 200
            or success.get("content") != UPSTREAM_BODY
        ):
            bad.append((i, outcome))
    if bad:
        first = ", ".join(f"#{i}: {json.dumps(o)[:400]}" for i, o in bad[:3])
        raise BenchError(
            f"check batch of {size}: {len(bad)} of {size} outcomes are not "
            f"Success/200/{UPSTREAM_BODY!r}; first: {first}"
        )


# --------------------------------------------------------------------------
# wrk


RESULT_LINE = re.compile(r"^BENCH_RESULT (\{.*\})\s*$", re.MULTILINE)


def run_wrk(
    wrk: str,
    pin: Pinning,
    procs_to_watch: list[tuple[str, subprocess.Popen[Any], str]],
    url: str,
    connections: int,
    duration: int,
    script_args: list[str],
) -> tuple[dict[str, Any], str]:
    argv = pin.load(
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            LUA_SCRIPT,
            url,
            "--",
            *script_args,
        ]
    )
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=duration + 60)
    finally:
        common.stop(proc, grace=2)
    for name, p, log in procs_to_watch:
        if p.poll() is not None:
            raise BenchError(
                f"{name} died (status {p.returncode}) during the run.\n"
                f"--- {log} ---\n{common.tail(log)}"
            )
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode}: {' '.join(argv)}\n{out}\n{err}")
    m = RESULT_LINE.search(out)
    if not m:
        raise BenchError(f"no BENCH_RESULT line in wrk's output:\n{out}\n{err}")
    result = json.loads(m.group(1))
    # Cross-check the script's status count against wrk's own report.
    m2 = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    result["wrk_non_2xx_line"] = int(m2.group(1)) if m2 else 0
    return result, out


def summarise(
    raw: dict[str, Any], batch_size: int, daemon_cpu: float | None, upstream_cpu: float | None
) -> dict[str, Any]:
    seconds = raw["duration_us"] / 1e6
    rate = raw["requests"] / seconds if seconds > 0 else 0.0
    e = raw["errors"]
    socket_errors = e["connect"] + e["read"] + e["write"] + e["timeout"]
    # With the response() check, non_2xx counts every non-2xx answer; without
    # it, wrk's status count (>= 400) is what there is.
    non_2xx = raw["non_2xx"] if raw["checked"] else max(e["status"], raw["wrk_non_2xx_line"])
    return {
        "batch_size": batch_size,
        "requests": raw["requests"],
        "seconds": round(seconds, 3),
        "requests_per_s": round(rate, 1),
        "sub_requests_per_s": round(rate * max(batch_size, 1), 1),
        "p50_ms": raw["latency_us"]["p50"] / 1000,
        "p90_ms": raw["latency_us"]["p90"] / 1000,
        "p99_ms": raw["latency_us"]["p99"] / 1000,
        "max_ms": raw["latency_us"]["max"] / 1000,
        "errors": socket_errors + non_2xx,
        "socket_errors": e,
        "non_2xx": non_2xx,
        "responses_checked": raw["checked"],
        "bad_batches": raw["bad_batches"],
        "failed_sub_requests": raw["failed_subs"],
        "sample_bad_response": raw["sample"],
        "daemon_cpu_pct": None if daemon_cpu is None else round(daemon_cpu, 1),
        "upstream_cpu_pct": None if upstream_cpu is None else round(upstream_cpu, 1),
    }


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

    result = summarise(raw, batch_size, pct(d0, d1), pct(u0, u1))
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


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be at least 1")
    return sizes


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
    parser.add_argument(
        "-c",
        "--connections",
        type=positive_int,
        default=8,
        help="wrk connections, on one wrk thread (default: %(default)s)",
    )
    parser.add_argument(
        "-b",
        "--batch-sizes",
        type=batch_sizes,
        default=batch_sizes("1,10,50"),
        metavar="LIST",
        help="comma-separated batch sizes (default: 1,10,50)",
    )
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
    parser.add_argument(
        "--upstream",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="auto: nginx if installed, else bench/upstream.py (default: %(default)s)",
    )
    parser.add_argument(
        "--nginx", default="/usr/sbin/nginx", help="nginx binary (default: %(default)s)"
    )
    parser.add_argument("--wrk", default=None, help="wrk binary (default: wrk on PATH)")
    parser.add_argument(
        "--daemon-cpus", default="0", help="taskset CPU list for the daemon (default: %(default)s)"
    )
    parser.add_argument(
        "--load-cpus",
        default="1",
        help="taskset CPU list for the upstream and wrk (default: %(default)s)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--no-check-responses",
        action="store_true",
        help="do not count failed sub-requests in wrk's response() callback",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("-v", "--verbose", action="store_true", help="print wrk's full output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    common.raise_on_sigterm()

    wrk = args.wrk or shutil.which("wrk") or "/usr/bin/wrk"
    if not os.access(wrk, os.X_OK):
        print("error: wrk not found (apt-get install -y wrk, or pass --wrk)", file=sys.stderr)
        return 2
    use_nginx = args.upstream == "nginx" or (
        args.upstream == "auto" and os.access(args.nginx, os.X_OK)
    )
    if args.upstream == "nginx" and not os.access(args.nginx, os.X_OK):
        print(f"error: {args.nginx} not found", file=sys.stderr)
        return 2

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
        if use_nginx:
            upstream, upstream_label, upstream_log = start_nginx(
                args.nginx, tmp, upstream_port, pin, procs
            )
        else:
            print(
                f"NOTE: nginx not found at {args.nginx}"
                if args.upstream == "auto"
                else "NOTE: --upstream python",
                "- using the fallback upstream bench/upstream.py (asyncio); its "
                "numbers are not comparable with nginx runs.",
            )
            upstream, upstream_label, upstream_log = start_fallback_upstream(
                tmp, upstream_port, pin, procs
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
