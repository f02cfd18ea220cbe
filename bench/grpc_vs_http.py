#!/usr/bin/env python3
"""
Octoplex's gRPC frontend against its HTTP/JSON frontend, and the HTTP/JSON
frontend on Twisted's asyncio reactor against the default one, on one
daemon core, all on 127.0.0.1.

1. One daemon, ``twistd --reactor=asyncio octoplex --listen ...
   --grpc-listen ...``, pinned to one CPU; the upstream (nginx, else
   bench/upstream.py) and the load generator on the others.  Two workloads,
   each through both frontends: batches of 10 GETs, and batches of 30 POSTs
   of 5,120 random bytes each.  Reported: sub-requests/s, batch latency p50
   and p99, errors, bytes per batch (the messages, and the TCP payload both
   ways measured through a counting proxy), daemon and client CPU, and the
   gRPC/HTTP ratio of sub-requests/s.
2. The HTTP/JSON frontend, batches of 10 GETs, on a daemon with the default
   reactor (epoll) and on one with ``--reactor=asyncio`` (no gRPC
   listener): sub-requests/s, p50, p99, and the asyncio/default ratio.

The load generator is this file run as a child (``--client``), pinned with
the upstream: ``--concurrency`` callers (16) that each keep one batch in
flight, split over ``--client-procs`` processes (1).  HTTP: one raw
HTTP/1.1 keep-alive connection per caller.  gRPC: one grpc.aio channel per
process, the callers' calls multiplexed on it.  Each run lasts
``--warmup`` + ``--duration`` seconds; only batches answered in the
measured part count.  One batch of each kind goes through each frontend
first, and the run stops unless every outcome is a Success with status 200
and the upstream's body (POSTs are also sent once to bench/upstream.py's
``/echo``, whose answers must be the bodies sent).

Needs grpcio and the checkout's octoplex (run it with the project's
virtualenv: ``.venv/bin/python bench/grpc_vs_http.py``), nginx for the
reference upstream, and Linux (/proc, taskset).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import common
from common import HOST, BenchError, Pinning, add_placement_arguments, positive_int
from scenarios import fmt, percentile, table

#: The two workloads: batch size, method, and each body's length.
WORKLOADS: dict[str, dict[str, Any]] = {
    "get10": {"label": "10 GETs", "size": 10, "method": "GET", "body_bytes": 0},
    "post30": {"label": "30 POSTs of 5 KB", "size": 30, "method": "POST", "body_bytes": 5120},
}
FRONTENDS = ("http", "grpc")
#: Sequential batches on one warm connection whose bytes are counted.
WIRE_BATCHES = 20
#: Batches sent (and not counted) on that connection first.
WIRE_WARMUP = 3
#: Seconds the load processes get to start (imports, connections) before
#: the run's first second.
CLIENT_START_S = 2.0
#: The random bodies are the same in every process and run.
SEED = 20261128


# --------------------------------------------------------------------------
# Batches, both frontends (the client side, also run in the children)


def bodies(workload: str) -> list[bytes | None]:
    spec = WORKLOADS[workload]
    if not spec["body_bytes"]:
        return [None] * spec["size"]
    rng = random.Random(SEED)
    return [rng.randbytes(spec["body_bytes"]) for _ in range(spec["size"])]


def json_batch(workload: str, uri: str, timeout_msec: int) -> bytes:
    requests: list[dict[str, Any]] = []
    for body in bodies(workload):
        item: dict[str, Any] = {"method": WORKLOADS[workload]["method"], "uri": uri}
        if body is not None:
            item["body_base64"] = base64.b64encode(body).decode("ascii")
        requests.append(item)
    return json.dumps({"timeout_msec": timeout_msec, "requests": requests}).encode()


def grpc_batch(pb: Any, workload: str, uri: str, timeout_msec: int) -> Any:
    method = WORKLOADS[workload]["method"]
    return pb.Batch(
        timeout_msec=timeout_msec,
        requests=[
            pb.Request(uri=uri, method=method)
            if body is None
            else pb.Request(uri=uri, method=method, body=body)
            for body in bodies(workload)
        ],
    )


def json_contents(status: int, raw: bytes, size: int) -> list[tuple[int | None, bytes]]:
    """
    Each outcome's status and content (for a Failure: None and the outcome,
    to show) of a /multiplex answer; ValueError unless it is a 200 with
    ``size`` outcomes.
    """
    if status != 200:
        raise ValueError(f"/multiplex answered HTTP {status}: {raw[:300]!r}")
    responses = json.loads(raw)["responses"]
    if len(responses) != size:
        raise ValueError(f"expected {size} outcomes, got {len(responses)}")
    seen: list[tuple[int | None, bytes]] = []
    for outcome in responses:
        success = outcome.get("Success")
        if not isinstance(success, dict):
            # A Failure: its error, to show.
            seen.append((None, json.dumps(outcome).encode()))
        elif "content_base64" in success:
            seen.append((success.get("status"), base64.b64decode(success["content_base64"])))
        else:
            seen.append((success.get("status"), str(success.get("content", "")).encode()))
    return seen


def grpc_contents(answer: Any, size: int) -> list[tuple[int | None, bytes]]:
    if len(answer.outcomes) != size:
        raise ValueError(f"expected {size} outcomes, got {len(answer.outcomes)}")
    seen: list[tuple[int | None, bytes]] = []
    for i, outcome in enumerate(answer.outcomes):
        if outcome.index != i:
            raise ValueError(f"outcome {i} has index {outcome.index}")
        if outcome.WhichOneof("result") == "success":
            seen.append((outcome.success.status, outcome.success.content))
        else:
            seen.append((None, str(outcome.failure).encode()))
    return seen


def not_ok(seen: list[tuple[int | None, bytes]]) -> int:
    """Outcomes that are not a Success with status 200."""
    return sum(1 for status, _ in seen if status != 200)


def grpc_options() -> list[tuple[str, Any]]:
    # Never through a proxy from the environment: 127.0.0.1 only.
    return [("grpc.enable_http_proxy", 0)]


async def http_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    writer.write(request)
    return await common.read_answer(reader)


class CountingProxy:
    """
    A TCP relay on 127.0.0.1 that counts the payload bytes each way: what a
    batch costs on the wire, framing and headers included.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.up = 0
        self.down = 0
        self.server: asyncio.base_events.Server | None = None
        self.listening = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, HOST, 0)
        self.listening = self.server.sockets[0].getsockname()[1]

    def reset(self) -> None:
        self.up = self.down = 0

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, way: str) -> None:
            try:
                while data := await src.read(65536):
                    setattr(self, way, getattr(self, way) + len(data))
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, "up"), pump(up_reader, writer, "down"))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


# --------------------------------------------------------------------------
# The client processes: the check, and the load


def client_main(config: dict[str, Any]) -> int:
    sys.path.insert(0, common.REPO_ROOT)
    try:
        if config["mode"] == "check":
            result = asyncio.run(client_check(config))
        else:
            result = asyncio.run(client_load(config))
    except CheckFailed as e:
        print(f"CHECK FAILED: {e}", file=sys.stderr)
        return 1
    with open(config["out"], "w") as f:
        json.dump(result, f)
    return 0


class CheckFailed(Exception):
    pass


async def client_check(config: dict[str, Any]) -> dict[str, Any]:
    """
    One batch of each workload through each frontend, checked; the POSTs
    once more to the echo upstream; then the bytes per batch of each.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from octoplex.v1 import multiplexer_pb2 as pb
    from octoplex.v1 import multiplexer_pb2_grpc as pb_grpc

    http_port, grpc_port = config["http_port"], config["grpc_port"]
    timeout_msec = config["timeout_msec"]
    call_timeout = timeout_msec / 1000 + 10
    hello = common.UPSTREAM_BODY.encode()

    def verify(what: str, seen: list[tuple[int | None, bytes]], expected: list[bytes]) -> None:
        bad = [
            (i, status, content[:200])
            for i, ((status, content), want) in enumerate(zip(seen, expected, strict=True))
            if status != 200 or content != want
        ]
        if bad:
            raise CheckFailed(
                f"{what}: {len(bad)} of {len(seen)} outcomes are not Success/200 with the "
                f"expected body; first (index, status, content): {bad[:3]}"
            )

    async def via_http(port: int, workload: str, uri: str) -> list[tuple[int | None, bytes]]:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            body = json_batch(workload, uri, timeout_msec)
            status, raw = await asyncio.wait_for(
                http_exchange(reader, writer, common.post_bytes(port, "/multiplex", body)),
                call_timeout,
            )
        finally:
            writer.close()
        try:
            return json_contents(status, raw, WORKLOADS[workload]["size"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckFailed(f"HTTP {workload} to {uri}: {e}") from None

    async def via_grpc(stub: Any, workload: str, uri: str) -> list[tuple[int | None, bytes]]:
        try:
            answer = await stub.Multiplex(
                grpc_batch(pb, workload, uri, timeout_msec), timeout=call_timeout
            )
            return grpc_contents(answer, WORKLOADS[workload]["size"])
        except grpc.aio.AioRpcError as e:
            raise CheckFailed(f"gRPC {workload} to {uri}: {e.code().name}: {e.details()}") from None
        except ValueError as e:
            raise CheckFailed(f"gRPC {workload} to {uri}: {e}") from None

    target = f"{HOST}:{grpc_port}"
    async with grpc.aio.insecure_channel(target, options=grpc_options()) as channel:
        stub = pb_grpc.MultiplexerStub(channel)
        # The gRPC listener starts after the HTTP one answers: wait until
        # its health service says the Multiplexer is serving.
        health = health_pb2_grpc.HealthStub(channel)
        service = pb.DESCRIPTOR.services_by_name["Multiplexer"].full_name
        deadline = time.monotonic() + 20
        last = ""
        while True:
            try:
                answer = await health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2, wait_for_ready=True
                )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
            if time.monotonic() > deadline:
                raise CheckFailed(f"the gRPC listener on {target} is not serving: {last}")
            await asyncio.sleep(0.2)
        for workload in WORKLOADS:
            size = WORKLOADS[workload]["size"]
            verify(
                f"HTTP {workload}",
                await via_http(http_port, workload, config["upstream_url"]),
                [hello] * size,
            )
            verify(
                f"gRPC {workload}",
                await via_grpc(stub, workload, config["upstream_url"]),
                [hello] * size,
            )
            if WORKLOADS[workload]["body_bytes"]:
                sent = [b or b"" for b in bodies(workload)]
                verify(
                    f"HTTP {workload} (echo)",
                    await via_http(http_port, workload, config["echo_url"]),
                    sent,
                )
                verify(
                    f"gRPC {workload} (echo)",
                    await via_grpc(stub, workload, config["echo_url"]),
                    sent,
                )

    wire: dict[str, dict[str, Any]] = {}
    for workload in WORKLOADS:
        wire[workload] = {
            "http": await wire_http(config, workload),
            "grpc": await wire_grpc(config, workload, grpc, pb, pb_grpc),
        }
    return {"wire": wire}


async def wire_http(config: dict[str, Any], workload: str) -> dict[str, Any]:
    port = config["http_port"]
    body = json_batch(workload, config["upstream_url"], config["timeout_msec"])
    request = common.post_bytes(port, "/multiplex", body)
    proxy = CountingProxy(port)
    await proxy.start()
    reader, writer = await asyncio.open_connection(HOST, proxy.listening)
    try:
        answer_bytes = 0
        for i in range(WIRE_WARMUP + WIRE_BATCHES):
            if i == WIRE_WARMUP:
                proxy.reset()
            _, raw = await asyncio.wait_for(http_exchange(reader, writer, request), 30)
            answer_bytes = len(raw)
        await asyncio.sleep(0.1)
        return {
            "request_message": len(body),
            "answer_message": answer_bytes,
            "request_wire": round(proxy.up / WIRE_BATCHES),
            "answer_wire": round(proxy.down / WIRE_BATCHES),
        }
    finally:
        writer.close()
        proxy.close()


async def wire_grpc(
    config: dict[str, Any], workload: str, grpc: Any, pb: Any, pb_grpc: Any
) -> dict[str, Any]:
    batch = grpc_batch(pb, workload, config["upstream_url"], config["timeout_msec"])
    proxy = CountingProxy(config["grpc_port"])
    await proxy.start()
    try:
        target = f"{HOST}:{proxy.listening}"
        async with grpc.aio.insecure_channel(target, options=grpc_options()) as channel:
            stub = pb_grpc.MultiplexerStub(channel)
            answer_bytes = 0
            for i in range(WIRE_WARMUP + WIRE_BATCHES):
                if i == WIRE_WARMUP:
                    await asyncio.sleep(0.1)
                    proxy.reset()
                answer = await stub.Multiplex(batch, timeout=30)
                answer_bytes = answer.ByteSize()
            # Window updates and pings that trail the last call.
            await asyncio.sleep(0.1)
            return {
                "request_message": batch.ByteSize(),
                "answer_message": answer_bytes,
                "request_wire": round(proxy.up / WIRE_BATCHES),
                "answer_wire": round(proxy.down / WIRE_BATCHES),
            }
    finally:
        proxy.close()


async def drive(
    call: Callable[[int], Awaitable[int]],
    callers: int,
    measure_at: float,
    end_at: float,
    call_timeout: float,
    on_error: Callable[[int], Awaitable[None]],
) -> dict[str, Any]:
    """
    ``callers`` tasks, each calling ``call(its number)`` (which returns the
    batch's failed sub-requests) until ``end_at`` (perf_counter); the
    batches answered between ``measure_at`` and ``end_at`` count.
    """
    latencies: list[float] = []
    tally = {"batches": 0, "failed_batches": 0, "failed_sub_requests": 0, "all_batches": 0}
    sample: list[str] = []
    cpu: dict[str, float] = {}

    async def caller(n: int) -> None:
        while (started := time.perf_counter()) < end_at:
            try:
                failed: int | None = await asyncio.wait_for(call(n), call_timeout)
                error = None
            except Exception as e:  # every failure is counted
                failed, error = None, f"{type(e).__name__}: {e}"
            done = time.perf_counter()
            tally["all_batches"] += 1
            counted = measure_at <= done <= end_at
            if error is not None:
                if counted:
                    tally["failed_batches"] += 1
                if not sample:
                    sample.append(error[:500])
                await on_error(n)
                await asyncio.sleep(0.01)
                continue
            if counted:
                assert failed is not None
                tally["batches"] += 1
                tally["failed_sub_requests"] += failed
                latencies.append((done - started) * 1000)

    async def cpu_sampler() -> None:
        await asyncio.sleep(max(0.0, measure_at - time.perf_counter()))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, end_at - time.perf_counter()))
        cpu["end"] = time.process_time()

    await asyncio.gather(cpu_sampler(), *(caller(n) for n in range(callers)))
    return {
        **tally,
        "latencies_ms": [round(x, 3) for x in latencies],
        "seconds": end_at - measure_at,
        "client_cpu_s": cpu["end"] - cpu["start"],
        "sample_error": sample[0] if sample else None,
    }


async def client_load(config: dict[str, Any]) -> dict[str, Any]:
    workload, port = config["workload"], config["port"]
    size = WORKLOADS[workload]["size"]
    timeout_msec = config["timeout_msec"]
    call_timeout = timeout_msec / 1000 + 10
    callers = config["callers"]
    # The parent's wall-clock schedule, on this process's perf_counter.
    offset = time.perf_counter() - time.time()
    measure_at = config["start_at"] + config["warmup"] + offset
    end_at = measure_at + config["duration"]

    async def start() -> None:
        await asyncio.sleep(max(0.0, config["start_at"] + offset - time.perf_counter()))

    if config["frontend"] == "http":
        request = common.post_bytes(
            port, "/multiplex", json_batch(workload, config["upstream_url"], timeout_msec)
        )
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = [None] * callers

        async def http_call(n: int) -> int:
            conn = conns[n]
            if conn is None:
                conn = conns[n] = await asyncio.open_connection(HOST, port)
            status, raw = await http_exchange(conn[0], conn[1], request)
            return not_ok(json_contents(status, raw, size))

        async def http_error(n: int) -> None:
            conn, conns[n] = conns[n], None
            if conn is not None:
                conn[1].close()

        for n in range(callers):
            conns[n] = await asyncio.open_connection(HOST, port)
        await start()
        try:
            return await drive(http_call, callers, measure_at, end_at, call_timeout, http_error)
        finally:
            for conn in conns:
                if conn is not None:
                    conn[1].close()

    import grpc

    from octoplex.v1 import multiplexer_pb2 as pb
    from octoplex.v1 import multiplexer_pb2_grpc as pb_grpc

    batch = grpc_batch(pb, workload, config["upstream_url"], timeout_msec)
    async with grpc.aio.insecure_channel(f"{HOST}:{port}", options=grpc_options()) as channel:
        stub = pb_grpc.MultiplexerStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 20)

        async def grpc_call(n: int) -> int:
            answer = await stub.Multiplex(batch, timeout=call_timeout)
            return not_ok(grpc_contents(answer, size))

        async def grpc_error(n: int) -> None:
            pass

        await start()
        return await drive(grpc_call, callers, measure_at, end_at, call_timeout, grpc_error)


# --------------------------------------------------------------------------
# The parent: daemons, runs, report


def spawn_client(
    config: dict[str, Any], name: str, tmp: str, pin: Pinning, procs: common.Processes
) -> tuple[subprocess.Popen[Any], str, str]:
    out = os.path.join(tmp, f"{name}.json")
    log = os.path.join(tmp, f"{name}.log")
    config = {**config, "out": out}
    argv = [sys.executable, os.path.abspath(__file__), "--client", json.dumps(config)]
    with open(log, "wb") as f:
        proc = procs.start(
            name, pin.load(argv), stdout=f, stderr=subprocess.STDOUT, env=common.daemon_env()
        )
    return proc, out, log


def finish_client(
    proc: subprocess.Popen[Any], out: str, log: str, timeout: float, what: str = "load process"
) -> Any:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        common.stop(proc, 2)
        raise BenchError(
            f"the {what} did not finish in time.\n--- {log} ---\n{common.tail(log)}"
        ) from None
    if proc.returncode != 0:
        raise BenchError(
            f"the {what} exited with {proc.returncode}.\n--- {log} ---\n{common.tail(log)}"
        )
    with open(out) as f:
        return json.load(f)


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of ``pid``: its name and utime + stime, from /proc."""
    threads: dict[int, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return threads
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        threads[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return threads


def thread_seconds(
    pid: int, before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> tuple[float, dict[str, float], int]:
    """
    The CPU seconds the daemon's main (reactor) thread and its other threads
    (grpc's, Python's; by name) spent between two :func:`thread_cpu`
    samples, and how many threads it had.
    """
    main = after.get(pid, ("", 0.0))[1] - before.get(pid, ("", 0.0))[1]
    others: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        if tid != pid:
            others[name] = others.get(name, 0.0) + cpu - before.get(tid, (name, 0.0))[1]
    return main, others, len(after)


def alive(watch: list[tuple[str, subprocess.Popen[Any], str]]) -> None:
    for name, proc, log in watch:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} died (status {proc.returncode}).\n--- {log} ---\n{common.tail(log)}"
            )


def run_load(
    args: argparse.Namespace,
    label: str,
    frontend: str,
    workload: str,
    port: int,
    upstream_url: str,
    daemon: subprocess.Popen[Any],
    upstream: subprocess.Popen[Any],
    watch: list[tuple[str, subprocess.Popen[Any], str]],
    pin: Pinning,
    procs: common.Processes,
    tmp: str,
) -> dict[str, Any]:
    print(
        f"  {label}: {args.warmup} s warm-up + {args.duration} s, "
        f"{args.concurrency} callers in {args.client_procs} process(es) ...",
        flush=True,
    )
    start_at = time.time() + CLIENT_START_S
    share, rest = divmod(args.concurrency, args.client_procs)
    shares = [share + (1 if i < rest else 0) for i in range(args.client_procs)]
    clients = []
    for i, callers in enumerate(s for s in shares if s):
        config = {
            "mode": "load",
            "frontend": frontend,
            "workload": workload,
            "port": port,
            "upstream_url": upstream_url,
            "timeout_msec": args.timeout_msec,
            "callers": callers,
            "start_at": start_at,
            "warmup": args.warmup,
            "duration": args.duration,
        }
        clients.append(spawn_client(config, f"load-{frontend}-{workload}-{i}", tmp, pin, procs))

    def sleep_until(at: float) -> None:
        time.sleep(max(0.0, at - time.time()))

    sleep_until(start_at + args.warmup)
    d0, u0, t0 = common.tree_cpu_seconds(daemon.pid), common.cpu_seconds(upstream.pid), time.time()
    threads0 = thread_cpu(daemon.pid)
    sleep_until(start_at + args.warmup + args.duration)
    d1, u1 = common.tree_cpu_seconds(daemon.pid), common.cpu_seconds(upstream.pid)
    threads1 = thread_cpu(daemon.pid)
    elapsed = time.time() - t0
    results = [
        finish_client(proc, out, log, args.timeout_msec / 1000 + 70) for proc, out, log in clients
    ]
    alive(watch)

    size = WORKLOADS[workload]["size"]
    seconds = max(r["seconds"] for r in results)
    batches = sum(r["batches"] for r in results)
    latencies = [x for r in results for x in r["latencies_ms"]]
    one = {
        "seconds": seconds,
        "batches": batches,
        "latencies_ms": latencies,
        "failed_batches": sum(r["failed_batches"] for r in results),
        "failed_sub_requests": sum(r["failed_sub_requests"] for r in results),
        "elapsed": elapsed,
        "daemon_cpu_s": None if d0 is None or d1 is None else d1 - d0,
        "threads_before": threads0,
        "threads_after": threads1,
        "daemon_pid": daemon.pid,
        "upstream_cpu_s": None if u0 is None or u1 is None else u1 - u0,
        "client_cpu_s": sum(r["client_cpu_s"] for r in results),
        "client_processes": len(results),
        "sample_error": next((r["sample_error"] for r in results if r["sample_error"]), None),
    }
    failed = one["failed_batches"] + one["failed_sub_requests"]
    daemon_pct = None if one["daemon_cpu_s"] is None else 100 * one["daemon_cpu_s"] / elapsed
    print(
        f"  {label}: {fmt(batches * size / seconds, 0)} sub-requests/s, "
        f"p50 {fmt(percentile(latencies, 50) if latencies else None)} ms, "
        f"p99 {fmt(percentile(latencies, 99) if latencies else None)} ms, "
        f"errors {failed}, "
        f"daemon CPU {fmt(daemon_pct, 0)} %, "
        f"client CPU {fmt(100 * one['client_cpu_s'] / seconds, 0)} %",
        flush=True,
    )
    if one["sample_error"]:
        print(f"  {label}: first error: {one['sample_error']}")
    return one


def summarise(frontend: str, workload: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The rounds of one frontend and workload, pooled: rates over the sum of
    their seconds, percentiles over all their batches.
    """
    size = WORKLOADS[workload]["size"]
    seconds = sum(r["seconds"] for r in rounds)
    elapsed = sum(r["elapsed"] for r in rounds)
    batches = sum(r["batches"] for r in rounds)
    latencies = [x for r in rounds for x in r["latencies_ms"]]

    def cpu_pct(key: str) -> float | None:
        values = [r[key] for r in rounds]
        return None if None in values else round(100 * sum(values) / elapsed, 1)

    main = 0.0
    others: dict[str, float] = {}
    count = 0
    for r in rounds:
        m, o, count = thread_seconds(r["daemon_pid"], r["threads_before"], r["threads_after"])
        main += m
        for name, cpu in o.items():
            others[name] = others.get(name, 0.0) + cpu
    threads = {
        "daemon_main_thread_cpu_pct": round(100 * main / elapsed, 1),
        "daemon_other_threads_cpu_pct": round(100 * sum(others.values()) / elapsed, 1),
        "daemon_threads": count,
        "daemon_busy_other_threads": {
            name: round(100 * cpu / elapsed, 1) for name, cpu in sorted(others.items()) if cpu > 0
        },
    }
    summary = {
        "frontend": frontend,
        "workload": workload,
        "batch_size": size,
        "rounds": len(rounds),
        "batches": batches,
        "seconds": round(seconds, 3),
        "batches_per_s": round(batches / seconds, 1),
        "sub_requests_per_s": round(batches * size / seconds, 1),
        "sub_requests_per_s_by_round": [
            round(r["batches"] * size / r["seconds"], 1) for r in rounds
        ],
        "p50_ms": round(percentile(latencies, 50), 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 2) if latencies else None,
        "max_ms": round(max(latencies), 2) if latencies else None,
        "failed_batches": sum(r["failed_batches"] for r in rounds),
        "failed_sub_requests": sum(r["failed_sub_requests"] for r in rounds),
        "daemon_cpu_pct": cpu_pct("daemon_cpu_s"),
        **threads,
        "upstream_cpu_pct": cpu_pct("upstream_cpu_s"),
        "client_cpu_pct": round(100 * sum(r["client_cpu_s"] for r in rounds) / seconds, 1),
        "client_processes": rounds[0]["client_processes"],
        "sample_error": next((r["sample_error"] for r in rounds if r["sample_error"]), None),
    }
    summary["errors"] = summary["failed_batches"] + summary["failed_sub_requests"]
    return summary


def round_label(n: int, rounds: int) -> str:
    return f"round {n + 1}/{rounds}: " if rounds > 1 else ""


LOG_TROUBLE = re.compile(r"#(warn|error|critical)\]|Traceback|Unhandled", re.IGNORECASE)


def daemon_log_report(log: str) -> dict[str, Any]:
    """The reactor the daemon ran, and its log lines that look like trouble."""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return {"reactor": None, "trouble_lines": None, "trouble_sample": []}
    reactor = None
    for line in lines:
        m = re.search(r"reactor class: (\S+?)\.?$", line)
        if m:
            reactor = m.group(1)
            break
    trouble = [line for line in lines if LOG_TROUBLE.search(line)]
    return {"reactor": reactor, "trouble_lines": len(trouble), "trouble_sample": trouble[:10]}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def kib(n: int) -> str:
    return f"{n:,}" if n < 10_000 else f"{n / 1024:,.1f} Ki"


def daemon_cpu(r: dict[str, Any]) -> str:
    return f"{fmt(r['daemon_cpu_pct'], 0)} ({fmt(r['daemon_other_threads_cpu_pct'], 0)})"


def frontend_table(runs: dict[str, dict[str, Any]], wire: dict[str, Any]) -> str:
    rows = []
    for workload, spec in WORKLOADS.items():
        for frontend in FRONTENDS:
            r = runs[f"{frontend}-{workload}"]
            w = wire[workload][frontend]
            rows.append(
                [
                    spec["label"],
                    "gRPC" if frontend == "grpc" else "HTTP/JSON",
                    fmt(r["sub_requests_per_s"], 0),
                    fmt(r["batches_per_s"], 1),
                    fmt(r["p50_ms"]),
                    fmt(r["p99_ms"]),
                    f"{r['failed_batches']} / {r['failed_sub_requests']}",
                    f"{kib(w['request_message'])} / {kib(w['request_wire'])}",
                    f"{kib(w['answer_message'])} / {kib(w['answer_wire'])}",
                    daemon_cpu(r),
                    fmt(r["client_cpu_pct"], 0),
                ]
            )
    return table(
        [
            "workload",
            "frontend",
            "sub-requests/s",
            "batches/s",
            "p50 ms",
            "p99 ms",
            "errors (batches / subs)",
            "request B/batch (message / wire)",
            "answer B/batch (message / wire)",
            "daemon CPU % (off the reactor thread)",
            "client CPU %",
        ],
        rows,
    )


def by_round(a: dict[str, Any], b: dict[str, Any]) -> list[float | None]:
    """The ratio of two pooled runs' sub-requests/s, round by round."""
    return [
        ratio(x, y)
        for x, y in zip(
            a["sub_requests_per_s_by_round"], b["sub_requests_per_s_by_round"], strict=True
        )
    ]


def ratio_table(runs: dict[str, dict[str, Any]], wire: dict[str, Any]) -> str:
    rows = []
    several = runs["http-get10"]["rounds"] > 1
    for workload, spec in WORKLOADS.items():
        g, h = runs[f"grpc-{workload}"], runs[f"http-{workload}"]
        wg, wh = wire[workload]["grpc"], wire[workload]["http"]
        pooled = fmt(ratio(g["sub_requests_per_s"], h["sub_requests_per_s"]), 3)
        if g["rounds"] > 1:
            pooled += " (" + ", ".join(fmt(x, 2) for x in by_round(g, h)) + ")"
        rows.append(
            [
                spec["label"],
                pooled,
                fmt(ratio(g["p50_ms"], h["p50_ms"]), 3),
                fmt(ratio(g["p99_ms"], h["p99_ms"]), 3),
                fmt(ratio(wg["request_wire"], wh["request_wire"]), 3),
                fmt(ratio(wg["answer_wire"], wh["answer_wire"]), 3),
            ]
        )
    return table(
        [
            "workload",
            "gRPC / HTTP sub-requests/s" + (" (by round)" if several else ""),
            "p50",
            "p99",
            "request wire bytes",
            "answer wire bytes",
        ],
        rows,
    )


def reactor_table(reactors: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> str:
    base = reactors[0][1]
    rows = []
    for i, (label, r, log) in enumerate(reactors):
        versus = fmt(ratio(r["sub_requests_per_s"], base["sub_requests_per_s"]), 3)
        # Only the second daemon took turns with the first.
        if i == 1 and r["rounds"] > 1:
            versus += " (" + ", ".join(fmt(x, 2) for x in by_round(r, base)) + ")"
        rows.append(
            [
                label,
                str(log["reactor"]),
                fmt(r["sub_requests_per_s"], 0),
                fmt(r["p50_ms"]),
                fmt(r["p99_ms"]),
                f"{r['failed_batches']} / {r['failed_sub_requests']}",
                daemon_cpu(r),
                fmt(r["client_cpu_pct"], 0),
                versus,
            ]
        )
    return table(
        [
            "daemon",
            "reactor class",
            "sub-requests/s",
            "p50 ms",
            "p99 ms",
            "errors (batches / subs)",
            "daemon CPU % (off the reactor thread)",
            "client CPU %",
            "vs default" + (" (by round)" if base["rounds"] > 1 else ""),
        ],
        rows,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Octoplex's gRPC frontend against its HTTP/JSON frontend (batches of 10 GETs, "
            "and of 30 POSTs of 5 KB), and the HTTP/JSON frontend on the asyncio reactor "
            "against the default one, on one daemon core, on 127.0.0.1."
        ),
        epilog="Run it with the project's virtualenv (grpcio): .venv/bin/python "
        "bench/grpc_vs_http.py.  CI smoke run: --duration 2 --warmup 1.",
    )
    parser.add_argument(
        "-d",
        "--duration",
        type=positive_int,
        default=10,
        help="measured seconds of each run (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="seconds of load before each measured run (default: %(default)s)",
    )
    parser.add_argument(
        "-c",
        "--concurrency",
        type=positive_int,
        default=16,
        help="callers, each with one batch in flight (default: %(default)s)",
    )
    parser.add_argument(
        "--client-procs",
        type=positive_int,
        default=1,
        help="load processes the callers are split over (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout-msec",
        type=positive_int,
        default=5000,
        help="the batches' timeout_msec, generous so that deadlines do not shape "
        "the result (default: %(default)s)",
    )
    add_placement_arguments(parser, "the load processes")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="run every measurement this many times, taking turns (the first of each "
        "pair swaps each round), and pool them (default: %(default)s)",
    )
    parser.add_argument(
        "--no-reactors",
        action="store_true",
        help="skip part 2 (the HTTP frontend on the asyncio reactor against the default one)",
    )
    parser.add_argument(
        "--log-dir", metavar="DIR", help="copy the daemons' logs into DIR (made if need be)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        return client_main(json.loads(argv[1]))
    args = parse_args(argv)
    started = time.monotonic()
    common.raise_on_sigterm()
    if importlib.util.find_spec("grpc") is None:
        print(
            f"error: {sys.executable} has no grpcio; run with the project's virtualenv "
            "(.venv/bin/python bench/grpc_vs_http.py)",
            file=sys.stderr,
        )
        return 2
    use_nginx = common.use_nginx(args.upstream, args.nginx)
    runs_count = (4 + (0 if args.no_reactors else 2)) * args.rounds
    load_s = runs_count * (args.duration + args.warmup + CLIENT_START_S)
    print(
        f"gRPC vs HTTP/JSON: {args.concurrency} callers in {args.client_procs} load "
        f"process(es), {args.duration} s per run (+{args.warmup:g} s warm-up), "
        f"{runs_count} runs; about {load_s:.0f} s of load.",
        flush=True,
    )
    pin = Pinning(args.daemon_cpus, args.load_cpus, not args.no_pin)
    print(f"Pinning: {pin.note.replace('wrk', 'the load processes')}")
    pin.pin_self_to_load()

    def bench(procs: common.Processes, tmp: str) -> int:
        echo_port = common.free_port()
        echo, _, echo_log = common.start_python_upstream(tmp, echo_port, pin, procs)
        if use_nginx:
            upstream_port = common.free_port()
            upstream, upstream_label, upstream_log = common.start_nginx(
                args.nginx, tmp, upstream_port, pin, procs
            )
        else:
            print(
                "NOTE: using bench/upstream.py (asyncio) as the upstream; its numbers are "
                "not comparable with nginx runs."
            )
            upstream, upstream_port, upstream_log = echo, echo_port, echo_log
            upstream_label = "bench/upstream.py (asyncio)"
        upstream_url = f"http://{HOST}:{upstream_port}/"
        echo_url = f"http://{HOST}:{echo_port}/echo"
        print(f"Upstream: {upstream_label} at {upstream_url}; echo check at {echo_url}")
        upstreams = [(upstream_label, upstream, upstream_log), ("echo upstream", echo, echo_log)]

        daemons: dict[str, dict[str, Any]] = {}

        def daemon(
            name: str, twistd_options: list[str], extra: list[str]
        ) -> tuple[subprocess.Popen[Any], int, str]:
            proc, port, log, argv, _ = common.start_octoplex(
                None, tmp, pin, procs, 1, extra, name, twistd_options
            )
            print(f"Daemon {name}: {shlex.join(argv)} (pid {proc.pid})", flush=True)
            daemons[name] = {"argv": argv, "log": log}
            return proc, port, log

        def retire(name: str, proc: subprocess.Popen[Any]) -> None:
            common.stop(proc, 40.0)
            daemons[name].update(daemon_log_report(daemons[name]["log"]))
            if args.log_dir:
                os.makedirs(args.log_dir, exist_ok=True)
                shutil.copy(daemons[name]["log"], args.log_dir)

        # Part 1: one daemon, both frontends.
        grpc_port = common.free_port()
        name = "asyncio-grpc"
        proc, http_port, log = daemon(
            name, ["--reactor=asyncio"], ["--grpc-listen", f"{HOST}:{grpc_port}"]
        )
        check_config = {
            "mode": "check",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "upstream_url": upstream_url,
            "echo_url": echo_url,
            "timeout_msec": args.timeout_msec,
        }
        checker = spawn_client(check_config, "check", tmp, pin, procs)
        check = finish_client(*checker, 120, "check before measuring")
        print(
            "Check: one batch of each workload through each frontend answered all "
            "Success/200 with the upstream's body; the POSTs' bodies came back intact "
            "from the echo upstream."
        )
        watch = [("octoplex", proc, log), *upstreams]
        rounds: dict[str, list[dict[str, Any]]] = {}
        for n in range(args.rounds):
            # Each round swaps which frontend goes first.
            order = FRONTENDS if n % 2 == 0 else FRONTENDS[::-1]
            for workload, spec in WORKLOADS.items():
                for frontend in order:
                    rounds.setdefault(f"{frontend}-{workload}", []).append(
                        run_load(
                            args,
                            f"{round_label(n, args.rounds)}{frontend} {spec['label']}",
                            frontend,
                            workload,
                            grpc_port if frontend == "grpc" else http_port,
                            upstream_url,
                            proc,
                            upstream,
                            watch,
                            pin,
                            procs,
                            tmp,
                        )
                    )
        runs = {key: summarise(*key.split("-"), found) for key, found in rounds.items()}
        retire(name, proc)

        # Part 2: the HTTP frontend, default reactor against asyncio: both
        # daemons up (each pinned to the daemon CPU, the idle one idle),
        # taking turns.
        reactors: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        if not args.no_reactors:
            kinds = (
                ("default-reactor", [], "default reactor"),
                ("asyncio", ["--reactor=asyncio"], "--reactor=asyncio"),
            )
            started_daemons = []
            for name, options, label in kinds:
                proc, port, log = daemon(name, options, [])
                common.check_one_batch(port, 10, upstream_url, args.timeout_msec)
                started_daemons.append((name, label, proc, port, log))
            print("Check: one batch of 10 GETs through each answered all Success/200.")
            by_reactor: dict[str, list[dict[str, Any]]] = {}
            for n in range(args.rounds):
                order = started_daemons if n % 2 == 0 else started_daemons[::-1]
                for name, label, proc, port, _ in order:
                    by_reactor.setdefault(name, []).append(
                        run_load(
                            args,
                            f"{round_label(n, args.rounds)}http 10 GETs, {label}",
                            "http",
                            "get10",
                            port,
                            upstream_url,
                            proc,
                            upstream,
                            [(d[0], d[2], d[4]) for d in started_daemons] + upstreams,
                            pin,
                            procs,
                            tmp,
                        )
                    )
            for name, label, proc, _, _ in started_daemons:
                retire(name, proc)
                reactors.append(
                    (label, summarise("http", "get10", by_reactor[name]), daemons[name])
                )
            reactors.append(
                (
                    "--reactor=asyncio + gRPC listener (part 1, not in turn)",
                    runs["http-get10"],
                    daemons["asyncio-grpc"],
                )
            )

        wire = check["wire"]
        where = pin.note
        if pin.enabled:
            where = f"daemon on CPU {pin.daemon_cpus}, upstream and load on CPU {pin.load_cpus}"
        setting = (
            f"{args.concurrency} callers in {args.client_procs} load process(es), "
            f"{args.duration} s measured after {args.warmup:g} s; {where}; upstream "
            f"{upstream_label}."
        )
        tables = {
            "frontends": frontend_table(runs, wire),
            "ratios": ratio_table(runs, wire),
        }
        print()
        print(f"gRPC vs HTTP/JSON, one daemon (--reactor=asyncio), {setting}")
        print(
            "Bytes per batch: message = the JSON body or the protobuf message (ByteSize); "
            f"wire = TCP payload that way, through a counting proxy, averaged over {WIRE_BATCHES} "
            "sequential batches on one warm connection (HTTP headers; HTTP/2 frames, HPACK, "
            "window updates and pings)."
        )
        print()
        print(tables["frontends"])
        print()
        print(tables["ratios"])
        if reactors:
            tables["reactors"] = reactor_table(reactors)
            print()
            print(f"HTTP/JSON frontend, 10 GETs, by reactor; {setting}")
            print()
            print(tables["reactors"])
        print()
        for name, info in daemons.items():
            count = info.get("trouble_lines")
            print(f"Daemon log {name}: {count} warning/error/traceback lines")
            for line in info.get("trouble_sample", [])[:5]:
                print(f"    {line[:300]}")
        print()
        print(f"Total time: {time.monotonic() - started:.0f} s")
        if args.json:
            document = {
                "config": {
                    "duration_s": args.duration,
                    "warmup_s": args.warmup,
                    "concurrency": args.concurrency,
                    "client_processes": args.client_procs,
                    "timeout_msec": args.timeout_msec,
                    "pinning": where,
                    "upstream": upstream_label,
                    "workloads": WORKLOADS,
                    "wire_batches": WIRE_BATCHES,
                    "rounds": args.rounds,
                },
                "machine": common.describe_machine(),
                "daemons": {
                    name: {k: v for k, v in info.items() if k != "log"}
                    for name, info in daemons.items()
                },
                "frontends": runs,
                "wire_bytes_per_batch": wire,
                "ratios": {
                    "grpc_over_http_sub_requests_per_s": {
                        w: ratio(
                            runs[f"grpc-{w}"]["sub_requests_per_s"],
                            runs[f"http-{w}"]["sub_requests_per_s"],
                        )
                        for w in WORKLOADS
                    },
                    "grpc_over_http_by_round": {
                        w: by_round(runs[f"grpc-{w}"], runs[f"http-{w}"]) for w in WORKLOADS
                    },
                    "asyncio_over_default_sub_requests_per_s": ratio(
                        reactors[1][1]["sub_requests_per_s"], reactors[0][1]["sub_requests_per_s"]
                    )
                    if reactors
                    else None,
                    "asyncio_over_default_by_round": by_round(reactors[1][1], reactors[0][1])
                    if reactors
                    else None,
                },
                "reactors": [
                    {"daemon": label, "reactor": info["reactor"], **result}
                    for label, result, info in reactors
                ],
                "markdown": "\n\n".join(tables.values()),
            }
            common.write_json(args.json, document)
        return 0

    return common.run_guarded(bench, "BENCHMARK", "octoplex-grpc-bench-")


if __name__ == "__main__":
    sys.exit(main())
