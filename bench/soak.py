#!/usr/bin/env python3
"""
Octoplex soak benchmark: does the daemon's memory or file-descriptor count
grow under a long, steady mix of successes, timeouts and faults?

It starts, on 127.0.0.1 and as subprocesses, an upstream (this file, with
``--serve-upstream``) and the real daemon (``twistd -n octoplex``), then
drives batches at the daemon from this process with a fixed number of
concurrent callers, for ``--duration`` seconds or ``--max-batches`` batches,
whichever comes first.  Each batch holds requests that succeed, requests
that outlive the batch's deadline, and requests whose upstream resets,
answers garbage, closes without answering, or refuses the connection.

Once a second it samples the daemon's resident memory (``VmRSS`` in
``/proc/PID/status``) and its open file descriptors (``/proc/PID/fd``), and
at the end reports both at the start (after ``--warmup``), at the end, their
maximum, and their growth after warm-up against the goal of under 5 %.

Stdlib only; Linux only (``/proc``).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
HOST = "127.0.0.1"

#: The goal: RSS and open fds grow by less than this after warm-up.
GOAL_PCT = 5.0

#: The kinds of request in a batch, and what each must come back as.
SUCCESS, TIMEOUT, FAULT = "success", "timeout", "fault"
#: The faults, taken in turn.
FAULTS = ("reset", "garbage", "close", "refused")


class SoakError(Exception):
    """A failure that ends the soak with a message, not a traceback."""


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that cleanup runs."""


# --------------------------------------------------------------------------
# The upstream (runs in its own process: soak.py --serve-upstream PORT)

_OK_BODY = b"hello world\n"
_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(_OK_BODY)
    + _OK_BODY
)
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_GARBAGE = b"this is not HTTP at all\r\n\r\n"


class _UpstreamProtocol(asyncio.Protocol):
    """
    ``/ok``: 200 at once; ``/delay/MS``: 200 after MS ms; ``/reset``: an RST;
    ``/garbage``: a line that is not HTTP, then a close; ``/close``: a close
    with no answer.  Keep-alive; a request body is skipped by its length.
    """

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""
        self.pending: asyncio.TimerHandle | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve()

    def _serve(self) -> None:
        while self.pending is None and not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.transport.close()
                return
            lines = self.buffer[:end].split(b"\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            parts = lines[0].split(b" ")
            self._route(parts[1].decode("ascii", "replace") if len(parts) > 1 else "")

    def _route(self, path: str) -> None:
        if path == "/ok":
            self.transport.write(_OK)
        elif path.startswith("/delay/"):
            delay = int(path.rsplit("/", 1)[1]) / 1000.0
            self.pending = asyncio.get_running_loop().call_later(delay, self._late)
        elif path == "/reset":
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0: close() sends an RST, not a FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        elif path == "/garbage":
            self.transport.write(_GARBAGE)
            self.transport.close()
        elif path == "/close":
            self.transport.close()
        else:
            self.transport.write(_NOT_FOUND)

    def _late(self) -> None:
        self.pending = None
        if not self.transport.is_closing():
            self.transport.write(_OK)
            self._serve()


async def _serve_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    server = await loop.create_server(_UpstreamProtocol, HOST, port, backlog=1024)
    async with server:
        await stop


# --------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])


def default_twistd() -> str:
    """
    The twistd next to this Python, else the repository's .venv, else PATH
    (as bench/run.py finds it).
    """
    for path in (
        os.path.join(os.path.dirname(sys.executable), "twistd"),
        os.path.join(REPO_ROOT, ".venv", "bin", "twistd"),
    ):
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("twistd")
    if found:
        return found
    raise SoakError(
        f"cannot find twistd (looked next to {sys.executable}, in {REPO_ROOT}/.venv/bin "
        "and on PATH); run with the virtualenv's python"
    )


def wait_until(
    check: Any, proc: subprocess.Popen[Any], name: str, log: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SoakError(
                f"{name} exited with status {proc.returncode} before serving.\n"
                f"--- {log} ---\n{tail(log)}"
            )
        try:
            if check():
                return
        except (OSError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.1)
    raise SoakError(
        f"{name} did not start within {timeout:.0f} s (last: {last}).\n--- {log} ---\n{tail(log)}"
    )


def start_upstream(tmp: str, procs: list[subprocess.Popen[Any]]) -> int:
    port = free_port()
    log = os.path.join(tmp, "upstream.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve-upstream", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    procs.append(proc)

    def listening() -> bool:
        with socket.create_connection((HOST, port), timeout=1):
            return True

    wait_until(listening, proc, "the upstream", log, 20)
    return port


def start_daemon(
    tmp: str, procs: list[subprocess.Popen[Any]]
) -> tuple[subprocess.Popen[Any], int, list[str], str]:
    port = free_port()
    argv = [
        default_twistd(),
        "-n",
        "--pidfile=",
        "octoplex",
        "--listen",
        f"tcp:{port}:interface={HOST}",
        # The upstream is local, and local addresses are refused by default.
        "--allow-egress",
        "127.0.0.0/8",
    ]
    env = dict(os.environ)
    # The working tree's octoplex and plugin, not an installed copy.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    log = os.path.join(tmp, "octoplex.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
        )
    procs.append(proc)

    def healthy() -> bool:
        with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=1) as r:
            return bool(r.status == 200)

    wait_until(healthy, proc, "octoplex", log, 30)
    return proc, port, argv, log


# --------------------------------------------------------------------------
# Sampling /proc


def sample(pid: int) -> tuple[int, int]:
    """
    The RSS in KiB and the number of open file descriptors of ``pid``.
    """
    rss = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    if rss is None:
        raise SoakError(f"no VmRSS in /proc/{pid}/status")
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# --------------------------------------------------------------------------
# The load


def batch_plan(
    args: argparse.Namespace, upstream: int, refused: int
) -> list[tuple[bytes, list[str]]]:
    """
    The batches to send, in turn: each the JSON body and the kind of each
    request.  They differ only in which faults they hold, so that every
    fault comes round equally.
    """
    urls = {
        "reset": f"http://{HOST}:{upstream}/reset",
        "garbage": f"http://{HOST}:{upstream}/garbage",
        "close": f"http://{HOST}:{upstream}/close",
        "refused": f"http://{HOST}:{refused}/refused",
    }
    plans = []
    for turn in range(len(FAULTS)):
        kinds: list[str] = []
        requests: list[dict[str, Any]] = []
        for _ in range(args.successes):
            kinds.append(SUCCESS)
            requests.append({"uri": f"http://{HOST}:{upstream}/ok"})
        for _ in range(args.timeouts):
            kinds.append(TIMEOUT)
            requests.append({"uri": f"http://{HOST}:{upstream}/delay/{args.delay_msec}"})
        for i in range(args.faults):
            kinds.append(FAULT)
            requests.append({"uri": urls[FAULTS[(turn + i) % len(FAULTS)]]})
        body = json.dumps({"timeout_msec": args.timeout_msec, "requests": requests}).encode()
        plans.append((body, kinds))
    return plans


class Load:
    """
    The state of the load: what was sent and what came back.
    """

    def __init__(
        self, args: argparse.Namespace, port: int, plans: list[tuple[bytes, list[str]]]
    ) -> None:
        self.args = args
        self.port = port
        self.plans = plans
        self.sent = 0
        self.answered = 0
        self.statuses: Counter[int] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        #: Requests that came back other than planned: under load a quick
        #: request can still miss a 200 ms deadline.
        self.unplanned: Counter[str] = Counter()
        self.client_errors: Counter[str] = Counter()
        self.stopping = False

    def take(self) -> int | None:
        """
        The number of the next batch, or None once the count is reached.
        """
        if self.stopping or self.sent >= self.args.max_batches:
            return None
        self.sent += 1
        return self.sent

    async def caller(self, index: int) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        on_connection = 0
        try:
            while (number := self.take()) is not None:
                if writer is None or on_connection >= self.args.reconnect_every:
                    if writer is not None:
                        writer.close()
                    reader, writer = await asyncio.open_connection(HOST, self.port)
                    on_connection = 0
                assert reader is not None
                on_connection += 1
                body, kinds = self.plans[(number + index) % len(self.plans)]
                try:
                    status, answer = await asyncio.wait_for(
                        self._exchange(reader, writer, body), self.args.client_timeout
                    )
                except (
                    OSError,
                    asyncio.IncompleteReadError,
                    asyncio.TimeoutError,
                    ValueError,
                ) as e:
                    self.client_errors[type(e).__name__] += 1
                    writer.close()
                    writer = None
                    continue
                self._count(status, answer, kinds)
        finally:
            if writer is not None:
                writer.close()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes
    ) -> tuple[int, bytes]:
        writer.write(
            b"POST /multiplex HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (HOST.encode(), self.port, len(body)) + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if length is None:
            raise ValueError("an answer without Content-Length")
        return status, await reader.readexactly(length)

    def _count(self, status: int, answer: bytes, kinds: list[str]) -> None:
        self.statuses[status] += 1
        if status != 200:
            return
        self.answered += 1
        outcomes = json.loads(answer)["responses"]
        if len(outcomes) != len(kinds):
            self.unplanned["wrong number of outcomes"] += 1
            return
        for kind, outcome in zip(kinds, outcomes, strict=True):
            if "Success" in outcome:
                got = SUCCESS if outcome["Success"]["status"] == 200 else "other status"
            else:
                error = outcome["Failure"]["error"]
                got = TIMEOUT if error.startswith("timeout elapsed") else FAULT
                if got == FAULT:
                    self.errors[error.split(":")[0][:100]] += 1
            self.outcomes[got] += 1
            if got != kind:
                self.unplanned[f"{kind} came back as {got}"] += 1


async def drive(
    args: argparse.Namespace,
    daemon: subprocess.Popen[Any],
    load: Load,
    samples: list[tuple[float, int, int]],
) -> float:
    """
    Run the load and sample the daemon once a second until the time or
    the count runs out; return the seconds it ran.
    """
    started = time.monotonic()
    callers = [asyncio.ensure_future(load.caller(i)) for i in range(args.concurrency)]
    done = asyncio.gather(*callers)
    next_progress = args.progress
    try:
        while not done.done():
            elapsed = time.monotonic() - started
            if daemon.poll() is not None:
                raise SoakError(f"the daemon exited with status {daemon.returncode} mid-soak")
            rss, fds = sample(daemon.pid)
            samples.append((round(elapsed, 2), rss, fds))
            if args.progress and elapsed >= next_progress:
                next_progress += args.progress
                print(
                    f"  {elapsed:5.0f} s: {load.sent} batches, RSS {rss / 1024:.1f} MiB, {fds} fds",
                    flush=True,
                )
            if elapsed >= args.duration:
                load.stopping = True
            await asyncio.wait([done], timeout=max(0.0, started + len(samples) - time.monotonic()))
        await done
    finally:
        load.stopping = True
        for task in callers:
            task.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
    return time.monotonic() - started


# --------------------------------------------------------------------------
# Report


def summarise(samples: list[tuple[float, int, int]], warmup: float, window: int) -> dict[str, Any]:
    """
    RSS and fds at the start (after warm-up), at the end and at most, and
    their growth.  Start and end are medians of ``window`` samples, so that
    one sample taken mid-burst does not decide the result.
    """
    after = [s for s in samples if s[0] >= warmup]
    note = None
    if len(after) < 2:
        note = "the run ended within the warm-up; the figures cover the whole run"
        after = samples
    head, end = after[:window], after[-window:]
    result: dict[str, Any] = {"samples_used": len(after), "note": note}
    for name, column in (("rss_kib", 1), ("fds", 2)):
        start_value = statistics.median(s[column] for s in head)
        end_value = statistics.median(s[column] for s in end)
        growth = (end_value - start_value) / start_value * 100 if start_value else None
        result[name] = {
            "start": start_value,
            "end": end_value,
            "max": max(s[column] for s in after),
            "growth_pct": growth,
        }
    return result


def describe_machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = ""
    try:
        commit = subprocess.run(
            ["git", "-C", REPO_ROOT, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git": commit or "(no commit)",
    }


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} %"


def report(
    args: argparse.Namespace, load: Load, summary: dict[str, Any], ran: float, cpu: float | None
) -> list[str]:
    rss, fds = summary["rss_kib"], summary["fds"]
    window = f"median of up to {args.window} samples"
    lines = [
        f"Ran {ran:.0f} s; batches sent {load.sent}, answered 200 {load.answered} "
        f"({load.sent / ran:.1f} batches/s); daemon CPU {cpu or 0:.0f} s.",
        f"HTTP statuses: {dict(sorted(load.statuses.items()))}; "
        f"client errors: {dict(load.client_errors) or 'none'}",
        f"Outcomes: {load.outcomes[SUCCESS]} success, {load.outcomes[TIMEOUT]} timeout, "
        f"{load.outcomes[FAULT]} fault, {load.outcomes['other status']} other status; "
        f"other than planned: {dict(load.unplanned) or 'none'}",
        f"Fault errors: {dict(load.errors.most_common())}",
        f"RSS: start {rss['start'] / 1024:.1f} MiB, end {rss['end'] / 1024:.1f} MiB, "
        f"max {rss['max'] / 1024:.1f} MiB, growth {pct(rss['growth_pct'])}",
        f"fds: start {fds['start']:g}, end {fds['end']:g}, max {fds['max']}, "
        f"growth {pct(fds['growth_pct'])}",
        f"(start: after the {args.warmup} s warm-up; start and end are each the {window}, "
        f"out of {summary['samples_used']} samples)",
    ]
    if summary["note"]:
        lines.append(f"NOTE: {summary['note']}")
    for name, figures in (("RSS", rss), ("fds", fds)):
        growth = figures["growth_pct"]
        verdict = "met" if growth is not None and growth < args.goal_pct else "MISSED"
        if summary["note"]:
            verdict = "not judged (no samples after the warm-up)"
        lines.append(f"Goal: {name} growth under {args.goal_pct:g} % after warm-up: {verdict}")
    return lines


# --------------------------------------------------------------------------
# Main


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be at least 0")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Soak Octoplex with batches of successes, timeouts and faults on 127.0.0.1, "
            "sampling its RSS and open fds once a second."
        ),
        epilog="Linux only (reads /proc).  See bench/README.md.",
    )
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--duration",
        type=positive_int,
        default=600,
        help="seconds of load, warm-up included (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batches",
        type=positive_int,
        default=1_000_000,
        help="stop after this many batches if the time has not run out (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=natural,
        default=30,
        help="seconds before the start figures are taken (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=16,
        help="callers, each with one batch in flight at a time (default: %(default)s)",
    )
    parser.add_argument(
        "--successes", type=natural, default=7, help="successful requests per batch (default: 7)"
    )
    parser.add_argument(
        "--timeouts",
        type=natural,
        default=1,
        help="requests per batch that outlive the deadline (default: %(default)s)",
    )
    parser.add_argument(
        "--faults",
        type=natural,
        default=2,
        help="requests per batch that fail: reset, garbage, close and refused, in turn "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--timeout-msec",
        type=positive_int,
        default=200,
        help="each batch's deadline (default: %(default)s)",
    )
    parser.add_argument(
        "--delay-msec",
        type=positive_int,
        default=2000,
        help="how long the upstream delays the requests meant to time out (default: %(default)s)",
    )
    parser.add_argument(
        "--reconnect-every",
        type=positive_int,
        default=50,
        help="batches each caller sends on one connection before it opens a new one "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--client-timeout",
        type=float,
        default=30.0,
        help="seconds a caller waits for an answer before it counts an error (default: 30)",
    )
    parser.add_argument(
        "--window",
        type=positive_int,
        default=10,
        help="samples whose median is the start figure, and the end figure; the fd count "
        "swings with every connection opened and closed (default: %(default)s)",
    )
    parser.add_argument(
        "--goal-pct",
        type=float,
        default=GOAL_PCT,
        help="the growth goal in %% (default: %(default)s)",
    )
    parser.add_argument(
        "--progress",
        type=natural,
        default=60,
        help="print a progress line every this many seconds; 0 for none (default: %(default)s)",
    )
    parser.add_argument(
        "--fail-on-growth",
        action="store_true",
        help="exit with status 3 if a growth goal is missed",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.successes + args.timeouts + args.faults < 1:
        parser.error("a batch needs at least one request")
    if args.timeouts and args.delay_msec <= args.timeout_msec:
        parser.error("--delay-msec must be longer than --timeout-msec, or nothing times out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream is not None:
        asyncio.run(_serve_upstream(args.serve_upstream))
        return 0
    if not os.path.isdir("/proc/self/fd"):
        print("error: the soak reads /proc; it runs on Linux only", file=sys.stderr)
        return 2

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)

    size = args.successes + args.timeouts + args.faults
    print(
        f"Octoplex soak: {args.duration} s or {args.max_batches} batches, warm-up {args.warmup} s; "
        f"{args.concurrency} callers; batches of {size} ({args.successes} success, "
        f"{args.timeouts} timeout, {args.faults} fault), deadline {args.timeout_msec} ms.",
        flush=True,
    )
    procs: list[subprocess.Popen[Any]] = []
    tmp = tempfile.mkdtemp(prefix="octoplex-soak-")
    plugin_cache = os.path.join(REPO_ROOT, "twisted", "plugins", "dropin.cache")
    had_plugin_cache = os.path.exists(plugin_cache)
    try:
        upstream = start_upstream(tmp, procs)
        refused = free_port()
        daemon, port, argv_used, log = start_daemon(tmp, procs)
        print(f"Octoplex: {' '.join(argv_used)}\n  pid {daemon.pid}; upstream on {HOST}:{upstream}")

        plans = batch_plan(args, upstream, refused)
        check = Load(args, port, plans)
        asyncio.run(_check(check))
        print("Check: a first batch of each kind came back as expected.", flush=True)

        machine = describe_machine()  # the revision measured, before anyone commits
        load = Load(args, port, plans)
        samples: list[tuple[float, int, int]] = []
        cpu_before = cpu_seconds(daemon.pid)
        ran = asyncio.run(drive(args, daemon, load, samples))
        cpu_after = cpu_seconds(daemon.pid)
        if daemon.poll() is not None:
            raise SoakError(f"the daemon exited with status {daemon.returncode}\n{tail(log)}")
        if not load.outcomes[SUCCESS]:
            raise SoakError(f"no request succeeded.\n--- {log} ---\n{tail(log)}")
        summary = summarise(samples, args.warmup, args.window)
        cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        lines = report(args, load, summary, ran, cpu)
        print()
        print("\n".join(lines))
        if args.json:
            document = {
                "config": {k: v for k, v in vars(args).items() if k != "serve_upstream"},
                "machine": machine,
                "octoplex_cmd": argv_used,
                "ran_s": ran,
                "batches_sent": load.sent,
                "batches_answered_200": load.answered,
                "statuses": dict(load.statuses),
                "client_errors": dict(load.client_errors),
                "outcomes": dict(load.outcomes),
                "fault_errors": dict(load.errors),
                "unplanned": dict(load.unplanned),
                "daemon_cpu_s": cpu,
                "summary": summary,
                "samples": [{"t": t, "rss_kib": r, "fds": f} for t, r, f in samples],
            }
            parent = os.path.dirname(os.path.abspath(args.json))
            os.makedirs(parent, exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(document, f, indent=2)
                f.write("\n")
            print(f"Wrote {args.json}")
        missed = summary["note"] is None and any(
            summary[k]["growth_pct"] is None or summary[k]["growth_pct"] >= args.goal_pct
            for k in ("rss_kib", "fds")
        )
        return 3 if missed and args.fail_on_growth else 0
    except SoakError as e:
        print(f"\nSOAK FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    except Terminated:
        print("\nterminated; cleaning up", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while procs:
            stop(procs.pop())
        shutil.rmtree(tmp, ignore_errors=True)
        # twistd writes a plugin cache next to the working tree's plugin;
        # leave the tree as we found it.
        if not had_plugin_cache and os.path.exists(plugin_cache):
            try:
                os.remove(plugin_cache)
            except OSError:
                pass


async def _check(load: Load) -> None:
    """
    Send one batch of each plan and fail unless every request came back as
    its kind says, so that a soak never measures a broken set-up.
    """
    reader, writer = await asyncio.open_connection(HOST, load.port)
    try:
        for body, kinds in load.plans:
            status, answer = await asyncio.wait_for(
                load._exchange(reader, writer, body), load.args.client_timeout
            )
            if status != 200:
                raise SoakError(f"the check batch got HTTP {status}: {answer[:300]!r}")
            load._count(status, answer, kinds)
    finally:
        writer.close()
    if load.unplanned:
        raise SoakError(
            f"the check batches came back wrong: {dict(load.unplanned)}; "
            f"errors: {dict(load.errors)}"
        )


if __name__ == "__main__":
    sys.exit(main())
