#!/usr/bin/env python3
"""
Octoplex side by side with its peers, in one run: the ratios that say how
close it comes to what its design allows (GitHub issue 16).

Starts nginx (or bench/upstream.py if nginx is missing, and says so) and,
each on 127.0.0.1 and pinned to the daemon CPU, the contenders:

- ``octoplex``: ``twistd -n --pidfile= octoplex --workers 1 --allow-egress
  127.0.0.0/8 --listen tcp:PORT:interface=127.0.0.1``, this checkout's code;
- ``floor``: bench/peer_floor.py, the treq + Klein floor probe (treq over a
  lean agent, Klein inbound, nothing else);
- ``aiohttp``: bench/peer_aiohttp.py, a plain aiohttp multiplexer;
- ``naive`` (only if asked for): bench/peer_naive.py, treq and Klein with
  every default;
- any ``--also NAME=COMMAND`` (``{port}`` filled in), e.g. a second
  Octoplex checkout to A/B-test in the same run.

Every contender must first answer one batch of each size with every item a
Success/200 with nginx's body.  Then wrk (bench/batch.lua, pinned to the
load CPU with nginx) measures nginx direct, and for each batch size and
round each contender in turn (the order reversed every other round):
sub-requests/s, latency, errors and the contender's CPU seconds, hence its
CPU per sub-request.  The rounds are pooled per contender and batch size,
and the tables give each as a ratio to the floor probe (CPU) and to aiohttp
(throughput), with each round's ratio to show the noise.  The targets are
printed as met or MISSED, never asserted: the exit status is 0 whenever the
run completed.

    python3 bench/peers.py                                  # about 3 minutes
    python3 bench/peers.py --duration 1 --warmup 0.5 --rounds 1
    python3 bench/peers.py -b 10 --also base="env PYTHONPATH=/tmp/base \\
        .venv/bin/twistd -n --pidfile= octoplex --workers 1 \\
        --allow-egress 127.0.0.0/8 --listen tcp:{port}:interface=127.0.0.1"
    python3 bench/peers.py --json bench/results/peers.json

Stdlib only; the peers run with the project's virtualenv (the Python of the
twistd that starts Octoplex, or ``--python``).  Needs wrk, and nginx for the
reference upstream.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import common
from common import (
    HOST,
    BenchError,
    Pinning,
    add_placement_arguments,
    check_one_batch,
    positive_int,
    run_wrk,
    start_octoplex,
    summarise_wrk,
    tail,
)

#: The built-in contenders and their scripts (octoplex is the daemon).
PEER_SCRIPTS = {
    "floor": "peer_floor.py",
    "aiohttp": "peer_aiohttp.py",
    "naive": "peer_naive.py",
}
BUILT_IN = ("octoplex", *PEER_SCRIPTS)
DEFAULT_CONTENDERS = "octoplex,floor,aiohttp"
#: The references of the ratios.
CPU_REFERENCE = "floor"
THROUGHPUT_REFERENCE = "aiohttp"
#: The targets of issue 16.
TARGET_SIZE = 10
MAX_CPU_RATIO = 1.25
MIN_THROUGHPUT_RATIO = 0.9
OTHER_SIZES = (1, 50)
#: Below this CPU % a contender was not saturated, and the run says so.
BUSY_NOTE_PCT = 90


@dataclass
class Contender:
    name: str
    what: str
    proc: subprocess.Popen[Any]
    port: int
    log: str
    argv: list[str]
    #: Where it imports octoplex from, for a Python contender that can.
    octoplex_from: str | None = None


# --------------------------------------------------------------------------
# Starting the contenders


def shebang_python(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            first = f.readline().decode("utf-8", "replace")
    except OSError:
        return None
    words = first[2:].split() if first.startswith("#!") else []
    return words[0] if words else None


#: What each peer imports.
PEER_PACKAGES = {
    "floor": ("treq", "klein", "httptools"),
    "aiohttp": ("aiohttp",),
    "naive": ("treq", "klein"),
}


def peer_python(choice: str | None, peers: list[str]) -> str:
    """
    The Python that runs the peers: ``--python``, else the interpreter of
    the twistd that starts Octoplex (the project's virtualenv), else this
    one.  It must import what ``peers`` import (aiohttp is not one of the
    project's dependencies).
    """
    python = choice
    if python is None:
        twistd, _ = common.find_twistd(" or pass --python")
        python = shebang_python(twistd) or sys.executable
    packages = sorted({p for name in peers for p in PEER_PACKAGES.get(name, ())})
    if not packages:
        return python
    out = subprocess.run(
        [python, "-c", "import " + ", ".join(packages)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise BenchError(
            f"{python} cannot import the peers' packages ({', '.join(packages)}); "
            f"install them (e.g. {python} -m pip install aiohttp) or pass "
            f"--python:\n{out.stderr.strip()}"
        )
    return python


def octoplex_source(pid: int) -> str | None:
    """
    Where the running Python process ``pid`` imports octoplex from: its own
    interpreter asked with its environment and working directory (from
    /proc), the script's folder left off sys.path as a script would have
    it; None for a process that is not Python or cannot import it.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(
                item.decode("utf-8", "replace").partition("=")[::2]
                for item in f.read().split(b"\0")
                if b"=" in item
            )
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    if not argv or not os.path.basename(argv[0]).startswith("python"):
        return None
    code = "import sys; del sys.path[0]; import octoplex; print(octoplex.__file__)"
    out = subprocess.run(
        [argv[0], "-c", code], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )
    if out.returncode != 0:
        return None
    return os.path.dirname(out.stdout.strip())


def start_command(
    name: str,
    what: str,
    argv: list[str],
    port: int,
    tmp: str,
    pin: Pinning,
    procs: common.Processes,
    env: dict[str, str],
) -> Contender:
    log = os.path.join(tmp, f"{name}.log")
    with open(log, "wb") as out:
        proc = procs.start(
            name, pin.daemon(argv), stdout=out, stderr=subprocess.STDOUT, cwd=tmp, env=env
        )
    common.wait_until_serving(proc, f"http://{HOST}:{port}/healthz", name, log, timeout=30)
    return Contender(name, what, proc, port, log, argv)


def start_contenders(
    args: argparse.Namespace, python: str, tmp: str, pin: Pinning, procs: common.Processes
) -> list[Contender]:
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    contenders = []
    for name in args.contenders:
        if name == "octoplex":
            proc, port, log, argv, source = start_octoplex(
                None, tmp, pin, procs, workers=1, name="octoplex"
            )
            contender = Contender(name, f"this checkout ({source})", proc, port, log, argv)
        else:
            port = common.free_port()
            script = os.path.join(common.BENCH_DIR, PEER_SCRIPTS[name])
            argv = [python, script, "--host", HOST, "--port", str(port)]
            contender = start_command(
                name, f"bench/{PEER_SCRIPTS[name]}", argv, port, tmp, pin, procs, env
            )
        contenders.append(contender)
    for name, command in args.also:
        port = common.free_port()
        filled = command.replace("{listen}", f"tcp:{port}:interface={HOST}")
        filled = filled.replace("{port}", str(port))
        # exec: the pid measured and stopped is the contender's own.
        argv = ["/bin/sh", "-c", "exec " + filled]
        contenders.append(start_command(name, "--also", argv, port, tmp, pin, procs, env))
    for contender in contenders:
        if contender.name == "octoplex" or contender.what == "--also":
            contender.octoplex_from = octoplex_source(contender.proc.pid)
    return contenders


# --------------------------------------------------------------------------
# Measuring


def warm_up(
    wrk: str, pin: Pinning, url: str, connections: int, seconds: float, script_args: list[str]
) -> None:
    """
    wrk for ``seconds`` (a fraction too), its results not read: it is
    stopped by SIGINT, as wrk's own -d takes whole seconds.
    """
    argv = pin.load(
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{math.ceil(seconds) + 1}s",
            "-s",
            common.LUA_SCRIPT,
            url,
            "--",
            *script_args,
        ]
    )
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        time.sleep(seconds)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    finally:
        common.stop(proc, grace=2)


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        wrk: str,
        pin: Pinning,
        upstream: subprocess.Popen[Any],
        upstream_label: str,
        upstream_log: str,
    ) -> None:
        self.args = args
        self.wrk = wrk
        self.pin = pin
        self.upstream = upstream
        self.watch: list[tuple[str, subprocess.Popen[Any], str]] = [
            (upstream_label, upstream, upstream_log)
        ]

    def measure(
        self,
        label: str,
        url: str,
        script_args: list[str],
        size: int,
        contender: Contender | None,
    ) -> dict[str, Any]:
        args = self.args
        if args.warmup > 0:
            warm_up(self.wrk, self.pin, url, args.connections, args.warmup, script_args)

        def cpu(p: subprocess.Popen[Any] | None) -> float | None:
            return None if p is None else common.tree_cpu_seconds(p.pid)

        daemon = contender.proc if contender else None
        c0, u0, t0 = cpu(daemon), cpu(self.upstream), time.monotonic()
        raw, _ = run_wrk(
            self.wrk, self.pin, self.watch, url, args.connections, args.duration, script_args
        )
        c1, u1, elapsed = cpu(daemon), cpu(self.upstream), time.monotonic() - t0

        def used(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else b - a

        cpu_s, upstream_s = used(c0, c1), used(u0, u1)
        result = summarise_wrk(
            raw,
            size,
            None if cpu_s is None else 100 * cpu_s / elapsed,
            None if upstream_s is None else 100 * upstream_s / elapsed,
        )
        subs = raw["requests"] * size
        result.update(
            {
                "contender": contender.name if contender else "nginx direct",
                "sub_requests": subs,
                "cpu_seconds": cpu_s,
                "elapsed_s": round(elapsed, 3),
                "cpu_us_per_sub_request": (
                    None if cpu_s is None or not subs else round(cpu_s / subs * 1e6, 2)
                ),
            }
        )
        cpu_text = (
            ""
            if result["cpu_us_per_sub_request"] is None
            else f", {result['cpu_us_per_sub_request']:.1f} us CPU per sub-request"
        )
        print(
            f"  {label}: {result['sub_requests_per_s']:,.0f} sub-requests/s{cpu_text}, "
            f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
            f"errors {result['errors']}, failed sub-requests {result['failed_sub_requests']}",
            flush=True,
        )
        if result["sample_bad_response"]:
            print(f"  {label}: first bad answer: {result['sample_bad_response'][:600]}")
        return result


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender's rounds at one batch size, pooled."""
    subs = sum(r["sub_requests"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    elapsed = sum(r["elapsed_s"] for r in runs)
    cpus = [r["cpu_seconds"] for r in runs]
    cpu = None if None in cpus else sum(cpus)
    return {
        "rounds": len(runs),
        "sub_requests": subs,
        "seconds": round(seconds, 3),
        "sub_requests_per_s": subs / seconds if seconds else 0.0,
        "cpu_seconds": cpu,
        "cpu_us_per_sub_request": None if cpu is None or not subs else cpu / subs * 1e6,
        "cpu_pct": None if cpu is None or not elapsed else 100 * cpu / elapsed,
        # Percentiles cannot be pooled: the median of the rounds'.
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "failed_sub_requests": sum(r["failed_sub_requests"] for r in runs),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# --------------------------------------------------------------------------
# Report


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def by_round(
    runs: list[dict[str, Any]], name: str, reference: str, size: int, key: str
) -> list[float | None]:
    """``name``'s ``key`` ÷ ``reference``'s, round by round, at ``size``."""
    mine = {r["round"]: r[key] for r in runs if r["contender"] == name and r["batch_size"] == size}
    theirs = {
        r["round"]: r[key] for r in runs if r["contender"] == reference and r["batch_size"] == size
    }
    return [ratio(mine[i], theirs.get(i)) for i in sorted(mine)]


def round_list(values: list[float | None]) -> str:
    return ", ".join(fmt(v, 2) for v in values) or "n/a"


def size_table(
    size: int,
    names: list[str],
    pooled: dict[str, dict[str, Any]],
    direct: dict[str, Any],
    runs: list[dict[str, Any]],
) -> str:
    rows = [
        "| contender | sub-requests/s | of nginx direct | CPU µs per sub-request "
        "| CPU ratio to floor | throughput ratio to aiohttp | p50 ms | p99 ms "
        "| daemon CPU % | errors / failed sub-requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cpu_ref = pooled.get(CPU_REFERENCE, {}).get("cpu_us_per_sub_request")
    rate_ref = pooled.get(THROUGHPUT_REFERENCE, {}).get("sub_requests_per_s")
    for name in names:
        p = pooled[name]
        rows.append(
            f"| {name} | {fmt(p['sub_requests_per_s'], 0)} "
            f"| {fmt(ratio(p['sub_requests_per_s'], direct['requests_per_s']), 3)} "
            f"| {fmt(p['cpu_us_per_sub_request'])} "
            f"| {fmt(ratio(p['cpu_us_per_sub_request'], cpu_ref), 3)} "
            f"| {fmt(ratio(p['sub_requests_per_s'], rate_ref), 3)} "
            f"| {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {fmt(p['cpu_pct'], 0)} "
            f"| {p['errors']} / {p['failed_sub_requests']} |"
        )
    lines = ["\n".join(rows), ""]
    for name in names:
        if name in (CPU_REFERENCE, THROUGHPUT_REFERENCE):
            continue
        if CPU_REFERENCE in pooled:
            values = by_round(runs, name, CPU_REFERENCE, size, "cpu_us_per_sub_request")
            lines.append(
                f"- {name} ÷ {CPU_REFERENCE}, CPU per sub-request, by round: {round_list(values)}"
            )
        if THROUGHPUT_REFERENCE in pooled:
            values = by_round(runs, name, THROUGHPUT_REFERENCE, size, "sub_requests_per_s")
            lines.append(
                f"- {name} ÷ {THROUGHPUT_REFERENCE}, sub-requests/s, by round: {round_list(values)}"
            )
    return "\n".join(lines).rstrip()


def targets(
    subjects: list[str], pooled: dict[int, dict[str, dict[str, Any]]], runs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Issue 16's targets for each Octoplex contender, met or MISSED."""

    def cpu_ratio(name: str, size: int) -> float | None:
        at = pooled.get(size, {})
        if name not in at or CPU_REFERENCE not in at:
            return None
        return ratio(
            at[name]["cpu_us_per_sub_request"], at[CPU_REFERENCE]["cpu_us_per_sub_request"]
        )

    def verdict(value: float | None, ok: bool) -> str:
        return "not measured" if value is None else ("met" if ok else "MISSED")

    rows = []
    for name in subjects:
        at = pooled.get(TARGET_SIZE, {})
        cpu10 = cpu_ratio(name, TARGET_SIZE)
        rows.append(
            {
                "contender": name,
                "target": f"1. batch {TARGET_SIZE}: CPU per sub-request ÷ floor probe's",
                "goal": f"≤ {MAX_CPU_RATIO}",
                "value": cpu10,
                "by_round": by_round(
                    runs, name, CPU_REFERENCE, TARGET_SIZE, "cpu_us_per_sub_request"
                ),
                "status": verdict(cpu10, cpu10 is not None and cpu10 <= MAX_CPU_RATIO),
            }
        )
        rate10 = None
        if name in at and THROUGHPUT_REFERENCE in at:
            rate10 = ratio(
                at[name]["sub_requests_per_s"], at[THROUGHPUT_REFERENCE]["sub_requests_per_s"]
            )
        rows.append(
            {
                "contender": name,
                "target": f"2. batch {TARGET_SIZE}: sub-requests/s ÷ aiohttp's",
                "goal": f"≥ {MIN_THROUGHPUT_RATIO}",
                "value": rate10,
                "by_round": by_round(
                    runs, name, THROUGHPUT_REFERENCE, TARGET_SIZE, "sub_requests_per_s"
                ),
                "status": verdict(rate10, rate10 is not None and rate10 >= MIN_THROUGHPUT_RATIO),
            }
        )
        for size in OTHER_SIZES:
            value = cpu_ratio(name, size)
            rows.append(
                {
                    "contender": name,
                    "target": f"3. batch {size}: CPU per sub-request ÷ floor probe's",
                    "goal": f"≤ {MAX_CPU_RATIO}, as batch {TARGET_SIZE} (there {fmt(cpu10, 3)})",
                    "value": value,
                    "by_round": by_round(runs, name, CPU_REFERENCE, size, "cpu_us_per_sub_request"),
                    "status": verdict(value, value is not None and value <= MAX_CPU_RATIO),
                }
            )
    return rows


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| contender | target | goal | measured | by round | status |",
        "|---|---|---|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['contender']} | {r['target']} | {r['goal']} | {fmt(r['value'], 3)} "
            f"| {round_list(r['by_round'])} | {r['status']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Command line


def contender_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in BUILT_IN]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma-separated list of distinct names among {', '.join(BUILT_IN)}"
        )
    return names


def also(text: str) -> tuple[str, str]:
    name, sep, command = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not command.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=COMMAND")
    if name in BUILT_IN:
        raise argparse.ArgumentTypeError(f"{name!r} is a built-in contender's name")
    if "{port}" not in command and "{listen}" not in command:
        raise argparse.ArgumentTypeError(f"{name}: the command must contain {{port}} or {{listen}}")
    return name, command


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must not be negative")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Octoplex side by side with nginx direct, the treq + Klein floor probe and a "
            "plain aiohttp multiplexer, in one run: CPU per sub-request and throughput as "
            "ratios, and issue 16's targets."
        ),
        epilog="Needs wrk, and nginx for the reference upstream (apt-get install -y "
        "nginx-light wrk).  See bench/README.md.",
    )
    parser.add_argument(
        "-d",
        "--duration",
        type=positive_int,
        default=5,
        help="whole seconds of each measured wrk run (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_float,
        default=1.0,
        help="seconds of warm-up before each measured run, fractions allowed; 0 for none "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "-r",
        "--rounds",
        type=positive_int,
        default=3,
        help="rounds per batch size, each contender once per round, the order reversed "
        "every other round (default: %(default)s)",
    )
    common.add_wrk_arguments(parser)
    parser.add_argument(
        "--contenders",
        type=contender_list,
        default=contender_list(DEFAULT_CONTENDERS),
        metavar="LIST",
        help=f"which of {', '.join(BUILT_IN)} run (default: {DEFAULT_CONTENDERS})",
    )
    parser.add_argument(
        "--also",
        type=also,
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="one more contender: a shell command serving /multiplex and /healthz on "
        "127.0.0.1, {port} (or {listen}: tcp:PORT:interface=127.0.0.1) filled in; run "
        "pinned like the others, with cwd a temporary folder and this environment (no "
        "PYTHONPATH added: give the checkout to measure with env PYTHONPATH=...).  "
        "Repeatable.",
    )
    parser.add_argument(
        "--timeout-msec",
        type=positive_int,
        default=5000,
        help="the batches' timeout_msec, generous so that deadlines do not shape the "
        "result (default: %(default)s)",
    )
    parser.add_argument(
        "--python",
        default=None,
        help="the Python that runs the peers (default: the interpreter of the twistd "
        "found for Octoplex, i.e. the project's virtualenv)",
    )
    add_placement_arguments(parser, "wrk")
    parser.add_argument("--wrk", default=None, help="wrk binary (default: wrk on PATH)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if len({name for name, _ in args.also}) != len(args.also):
        parser.error("--also names must be distinct")
    return args


# --------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    common.raise_on_sigterm()

    wrk = common.find_wrk(args.wrk)
    use_nginx = common.use_nginx(args.upstream, args.nginx)

    names = [*args.contenders, *(name for name, _ in args.also)]
    runs_count = 1 + len(args.batch_sizes) * args.rounds * len(names)
    estimate = runs_count * (args.warmup + args.duration)
    print(
        f"Peers benchmark: {', '.join(names)}; batch sizes {args.batch_sizes}, "
        f"{args.rounds} round(s), {args.connections} connections, {args.duration} s per run "
        f"(+{args.warmup:g} s warm-up); about {estimate:.0f} s of load.",
        flush=True,
    )
    pin = Pinning(args.daemon_cpus, args.load_cpus, not args.no_pin)
    print(f"Pinning: {pin.note} (every contender on the daemon CPU)")

    def bench(procs: common.Processes, tmp: str) -> int:
        python = peer_python(args.python, args.contenders)
        if "octoplex" in args.contenders:
            where = common.daemon_code_path(common.octoplex_argv(None, 0)[0])
            if not where.startswith(common.REPO_ROOT + os.sep):
                raise BenchError(f"not this checkout's ({common.REPO_ROOT}) octoplex: {where}")
        pin.pin_self_to_load()

        upstream_port = common.free_port()
        upstream, upstream_label, upstream_log = common.start_upstream(
            use_nginx, args.nginx, args.upstream, tmp, upstream_port, pin, procs
        )
        upstream_url = f"http://{HOST}:{upstream_port}/"
        print(f"Upstream: {upstream_label} at {upstream_url}")

        contenders = start_contenders(args, python, tmp, pin, procs)
        for c in contenders:
            print(f"{c.name} ({c.what}), pid {c.proc.pid}, port {c.port}: {shlex.join(c.argv)}")
            if c.octoplex_from is not None:
                print(f"  imports octoplex from {c.octoplex_from}")

        for c in contenders:
            for size in args.batch_sizes:
                try:
                    check_one_batch(c.port, size, upstream_url, args.timeout_msec)
                except BenchError as e:
                    raise BenchError(f"{c.name}: {e}\n--- {c.log} ---\n{tail(c.log)}") from None
        print("Check: one batch of each size answered all Success/200 by every contender.")

        run = Bench(args, wrk, pin, upstream, upstream_label, upstream_log)
        run.watch += [(c.name, c.proc, c.log) for c in contenders]
        print("\nnginx direct:", flush=True)
        direct = run.measure("nginx direct", upstream_url, ["direct"], 1, None)
        runs: list[dict[str, Any]] = []
        for size in args.batch_sizes:
            print(f"\nbatch {size}:", flush=True)
            script_args = ["multiplex", str(size), upstream_url, str(args.timeout_msec), "1"]
            for i in range(args.rounds):
                order = contenders if i % 2 == 0 else contenders[::-1]
                for c in order:
                    url = f"http://{HOST}:{c.port}/multiplex"
                    result = run.measure(f"round {i + 1}, {c.name}", url, script_args, size, c)
                    result["round"] = i
                    runs.append(result)

        pooled = {
            size: {
                name: pool([r for r in runs if r["contender"] == name and r["batch_size"] == size])
                for name in names
            }
            for size in args.batch_sizes
        }
        place = pin.note if pin.enabled else "NOT pinned"
        print(
            f"\nSide by side, {upstream_label} upstream; wrk -t1 -c{args.connections}, "
            f"{args.rounds} round(s) of {args.duration} s pooled per contender; {place}.\n"
            f"nginx direct: {direct['requests_per_s']:,.0f} requests/s, "
            f"p50 {direct['p50_ms']:.2f} ms, p99 {direct['p99_ms']:.2f} ms."
        )
        tables = {}
        for size in args.batch_sizes:
            tables[size] = size_table(size, names, pooled[size], direct, runs)
            print(f"\n### Batch of {size}\n\n{tables[size]}")
        busy = [
            p["cpu_pct"] for at in pooled.values() for p in at.values() if p["cpu_pct"] is not None
        ]
        if busy and min(busy) < BUSY_NOTE_PCT:
            print(
                f"\nNOTE: a contender used as little as {min(busy):.0f} % of its core "
                f"(closed-loop load should keep it near 100 %): something else ran on "
                f"CPU {args.daemon_cpus}, or the load CPU was the limit.  CPU per "
                "sub-request still compares; throughput ratios are less trustworthy."
            )
        subjects = [c.name for c in contenders if c.name == "octoplex" or c.what == "--also"]
        target_rows = targets(subjects, pooled, runs)
        summary = targets_table(target_rows) if target_rows else "(no Octoplex contender)"
        print(f"\n### Targets (issue 16)\n\n{summary}")
        print(f"\nTotal time: {time.monotonic() - started:.0f} s")

        if args.json:
            document = {
                "settings": {
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "rounds": args.rounds,
                    "connections": args.connections,
                    "wrk_threads": 1,
                    "batch_sizes": args.batch_sizes,
                    "timeout_msec": args.timeout_msec,
                    "contenders": names,
                    "pinning": pin.note,
                    "upstream": upstream_label,
                    "peer_python": python,
                },
                "machine": common.describe_machine(),
                "commands": {c.name: c.argv for c in contenders},
                "imports_octoplex_from": {
                    c.name: c.octoplex_from for c in contenders if c.octoplex_from is not None
                },
                "direct": direct,
                "runs": runs,
                "pooled": {str(size): at for size, at in pooled.items()},
                "targets": target_rows,
                "markdown": {
                    **{f"batch_{size}": table for size, table in tables.items()},
                    "targets": summary,
                },
            }
            common.write_json(args.json, document)
        return 0

    return common.run_guarded(bench, "PEERS BENCHMARK", "octoplex-peers-")


if __name__ == "__main__":
    sys.exit(main())
