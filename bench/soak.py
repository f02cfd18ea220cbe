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
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

import common
from common import HOST, REPO_ROOT, BenchError, positive_int

#: The goal: RSS and open fds grow by less than this after warm-up.
GOAL_PCT = 5.0

#: The kinds of request in a batch, and what each must come back as.
SUCCESS, TIMEOUT, FAULT = "success", "timeout", "fault"
#: The faults, taken in turn.
FAULTS = ("reset", "garbage", "close", "refused")


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


def start_upstream(tmp: str, procs: common.Processes) -> int:
    port = common.free_port()
    log = os.path.join(tmp, "upstream.log")
    with open(log, "wb") as out:
        proc = procs.start(
            "upstream",
            [sys.executable, os.path.abspath(__file__), "--serve-upstream", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def listening() -> bool:
        with socket.create_connection((HOST, port), timeout=1):
            return True

    common.wait_until(listening, proc, "the upstream", log, 20)
    return port


def start_daemon(
    tmp: str, procs: common.Processes
) -> tuple[subprocess.Popen[Any], int, list[str], str]:
    port = common.free_port()
    argv = [
        common.find_twistd()[0],
        "-n",
        "--pidfile=",
        "octoplex",
        "--listen",
        f"tcp:{port}:interface={HOST}",
        # The upstream is local, and local addresses are refused by default.
        "--allow-egress",
        "127.0.0.0/8",
        # One process, whose RSS and descriptors are the ones measured.
        "--workers",
        "1",
    ]
    log = os.path.join(tmp, "octoplex.log")
    with open(log, "wb") as out:
        proc = procs.start(
            "octoplex",
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=common.daemon_env(),
        )

    def healthy() -> bool:
        with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=1) as r:
            return bool(r.status == 200)

    common.wait_until(healthy, proc, "octoplex", log, 30)
    return proc, port, argv, log


# --------------------------------------------------------------------------
# Sampling /proc


def sample(pid: int) -> tuple[int, int]:
    """
    The RSS in KiB and the number of open file descriptors of ``pid``.
    """
    return common.rss_kib(pid), common.open_fds(pid)


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
        writer.write(common.post_bytes(self.port, "/multiplex", body))
        return await common.read_answer(reader)

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
                raise BenchError(f"the daemon exited with status {daemon.returncode} mid-soak")
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

    common.raise_on_sigterm()

    size = args.successes + args.timeouts + args.faults
    print(
        f"Octoplex soak: {args.duration} s or {args.max_batches} batches, warm-up {args.warmup} s; "
        f"{args.concurrency} callers; batches of {size} ({args.successes} success, "
        f"{args.timeouts} timeout, {args.faults} fault), deadline {args.timeout_msec} ms.",
        flush=True,
    )

    def soak(procs: common.Processes, tmp: str) -> int:
        upstream = start_upstream(tmp, procs)
        refused = common.free_port()
        daemon, port, argv_used, log = start_daemon(tmp, procs)
        print(f"Octoplex: {' '.join(argv_used)}\n  pid {daemon.pid}; upstream on {HOST}:{upstream}")

        plans = batch_plan(args, upstream, refused)
        check = Load(args, port, plans)
        asyncio.run(_check(check))
        print("Check: a first batch of each kind came back as expected.", flush=True)

        machine = common.describe_machine()  # the revision measured, before anyone commits
        load = Load(args, port, plans)
        samples: list[tuple[float, int, int]] = []
        cpu_before = common.cpu_seconds(daemon.pid)
        ran = asyncio.run(drive(args, daemon, load, samples))
        cpu_after = common.cpu_seconds(daemon.pid)
        if daemon.poll() is not None:
            raise BenchError(
                f"the daemon exited with status {daemon.returncode}\n{common.tail(log)}"
            )
        if not load.outcomes[SUCCESS]:
            raise BenchError(f"no request succeeded.\n--- {log} ---\n{common.tail(log)}")
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
            common.write_json(args.json, document)
        missed = summary["note"] is None and any(
            summary[k]["growth_pct"] is None or summary[k]["growth_pct"] >= args.goal_pct
            for k in ("rss_kib", "fds")
        )
        return 3 if missed and args.fail_on_growth else 0

    return common.run_guarded(soak, "SOAK", "octoplex-soak-", grace=10.0)


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
                raise BenchError(f"the check batch got HTTP {status}: {answer[:300]!r}")
            load._count(status, answer, kinds)
    finally:
        writer.close()
    if load.unplanned:
        raise BenchError(
            f"the check batches came back wrong: {dict(load.unplanned)}; "
            f"errors: {dict(load.errors)}"
        )


if __name__ == "__main__":
    sys.exit(main())
