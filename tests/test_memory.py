"""
The process-wide bound on memory (``--max-buffered-bytes``,
``--send-timeout``), against the real daemon: ``twistd octoplex`` in a
subprocess, so that the resident memory measured is the daemon's alone.

Two attacks, each over real sockets on 127.0.0.1:

- callers that send a batch of large bodies and never read the answer;
- many concurrent batches of large upstream answers.

Each test asserts the peak resident memory against the budget, that a
normal batch is served throughout, and that memory and file descriptors
return to their baseline once the load ends.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

from .servers import Caller, Upstream, start_upstream, wait_until
from .test_twistd import free_port, sleep, spawn_twistd, stop, wait_until_healthy, within

MIB = 1024 * 1024
#: The daemon's budget of buffered bytes in these tests.
BUDGET = 32 * MIB
#: Each upstream body: as large as in the attack reported.
BODY = 7 * MIB
#: How far above its baseline the daemon's resident memory may peak.  The
#: budget holds bodies being read and answers unsent; on top of it, a batch
#: whose answer is being built holds its bodies, their decoded text and the
#: JSON answer at once (three copies of at most one batch's bytes), and each
#: connection's kernel-bound buffer holds up to 64 KiB uncounted.
PEAK_ALLOWANCE = 4 * BUDGET
#: How close to its baseline the daemon's resident memory must come back.
RETURN_MARGIN = 24 * MIB
#: Bounds on each wait.
LOAD_TIMEOUT = 90.0
SETTLE_TIMEOUT = 30.0


def _status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    # A process that has exited (a zombie) has no memory lines.
    assert fields, f"process {pid} has exited: {Path(f'/proc/{pid}/status').read_text()}"
    return fields


def rss(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes."""
    return _status(pid)["VmRSS"]


def peak_rss(pid: int) -> int:
    """The most resident memory process ``pid`` has had, in bytes."""
    return _status(pid)["VmHWM"]


def open_fds(pid: int) -> int:
    """The file descriptors process ``pid`` holds open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class Daemon:
    """
    A running ``twistd octoplex``.
    """

    def __init__(self, process: subprocess.Popen[bytes], url: str, caller: Caller) -> None:
        self.process = process
        self.pid = process.pid
        self.url = url
        self.caller = caller

    async def metric(self, name: str) -> float:
        """One unlabelled sample of ``/metrics``."""
        status, _, body = await within(10.0, self.caller.get(self.url + "/metrics"))
        assert status == 200
        match = re.search(rb"^" + name.encode() + rb" (\S+)$", body, re.MULTILINE)
        assert match is not None, f"{name} is not in /metrics"
        return float(match.group(1))

    async def serves_a_normal_batch(self, upstream: Upstream) -> None:
        """
        A small batch, to an upstream other than the attack's (whose own
        requests wait behind the attack's for its per-host slots), is
        answered, whole and on time.
        """
        batch = {"timeout_msec": 5000, "requests": [{"uri": upstream.url + "/hello"}] * 3}
        status, _, answer = await within(10.0, self.caller.post(self.url + "/multiplex", batch))
        assert status == 200, answer
        assert [r.get("Success", {}).get("content") for r in answer["responses"]] == [
            "Hello world!"
        ] * 3, answer


@pytest.fixture
def other_upstream() -> Iterator[Upstream]:
    """The normal batch's upstream, apart from the attack's."""
    server = start_upstream()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def daemon(tmp_path: Path, caller: Caller) -> Iterator[Daemon]:
    port = free_port()
    process = spawn_twistd(
        port,
        tmp_path / "octoplex.log",
        tmp_path / "output.txt",
        "--max-buffered-bytes",
        str(BUDGET),
        "--send-timeout",
        "3",
        "--idle-timeout",
        "3",
        "--pool-idle-timeout",
        "2",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        pytest_twisted.blockon(
            Deferred.fromCoroutine(
                wait_until_healthy(process, caller, url, tmp_path / "output.txt")
            )
        )
        yield Daemon(process, url, caller)
    finally:
        stop(process)


def _large_batch(upstream: Upstream, count: int) -> bytes:
    return json.dumps(
        {
            "timeout_msec": 30000,
            "requests": [{"uri": f"{upstream.url}/bytes/{BODY}?{i}"} for i in range(count)],
        }
    ).encode()


def _never_reading_caller(port: int, body: bytes) -> socket.socket:
    """
    Send ``body`` to ``/multiplex`` from a socket with a 4 KiB receive
    buffer, and never read the answer.
    """
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10.0)
    s.connect(("127.0.0.1", port))
    s.sendall(
        b"POST /multiplex HTTP/1.1\r\nhost: octoplex\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    return s


async def _settles(daemon: Daemon, baseline: int, fds: int) -> tuple[int, int]:
    """
    Wait until the daemon holds no buffered bytes, and its memory and file
    descriptors are back near their baseline; return the last readings.
    """
    waited = 0.0
    while True:
        held = await daemon.metric("octoplex_buffered_bytes")
        now, open_now = rss(daemon.pid), open_fds(daemon.pid)
        if held == 0 and now <= baseline + RETURN_MARGIN and open_now <= fds:
            return now, open_now
        assert waited < SETTLE_TIMEOUT, (
            f"after {SETTLE_TIMEOUT} s: {held} bytes buffered, RSS {now / MIB:.1f} MiB against "
            f"a baseline of {baseline / MIB:.1f} MiB, {open_now} fds against {fds}"
        )
        await sleep(0.25)
        waited += 0.25


@pytest_twisted.ensureDeferred
async def test_callers_that_never_read_are_bounded_and_cut_off(
    daemon: Daemon, upstream: Upstream, other_upstream: Upstream
) -> None:
    """
    Ten callers each ask for ten 7 MiB bodies and never read the answer:
    the daemon holds its budget, not their answers, keeps serving others,
    aborts each of them at the send timeout, and gives the memory back.
    """
    await daemon.serves_a_normal_batch(other_upstream)
    baseline, fds = rss(daemon.pid), open_fds(daemon.pid)
    port = int(daemon.url.rsplit(":", 1)[1])
    callers = [_never_reading_caller(port, _large_batch(upstream, 10)) for _ in range(10)]
    try:
        # Every item of theirs has reached the upstream: the batches run.
        await wait_until(
            lambda: sum("/bytes/" in path for path in upstream.resource.arrivals) == 100,
            "the callers' 100 requests to reach the upstream",
            timeout=LOAD_TIMEOUT,
        )
        waited = 0.0
        # Until the daemon has closed every caller's connection: those whose
        # answer filled the send buffer at the send timeout, the others
        # (answers of failed items, small enough for the kernel's buffer)
        # at the idle timeout.
        while open_fds(daemon.pid) > fds:
            # Served throughout, while the callers' answers are held.
            await daemon.serves_a_normal_batch(other_upstream)
            assert waited < LOAD_TIMEOUT, (
                f"{open_fds(daemon.pid) - fds} of the callers' connections still open"
            )
            await sleep(0.2)
            waited += 0.2
        peak = peak_rss(daemon.pid)
        cut_off = await daemon.metric("octoplex_send_timeouts_total")
    finally:
        for s in callers:
            s.close()
    assert cut_off >= 1
    await daemon.serves_a_normal_batch(other_upstream)
    now, open_now = await _settles(daemon, baseline, fds)
    assert peak - baseline <= PEAK_ALLOWANCE, (
        f"peak RSS {peak / MIB:.1f} MiB, {(peak - baseline) / MIB:.1f} MiB over a baseline of "
        f"{baseline / MIB:.1f} MiB; allowed {PEAK_ALLOWANCE / MIB:.0f} MiB"
    )
    print(
        f"never-reading callers: baseline {baseline / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, "
        f"after {now / MIB:.1f} MiB; fds {fds} -> {open_now}; {cut_off:.0f} cut off"
    )


@pytest_twisted.ensureDeferred
async def test_many_large_upstream_answers_are_bounded(
    daemon: Daemon, upstream: Upstream, other_upstream: Upstream, caller: Caller
) -> None:
    """
    Twenty concurrent batches of ten 7 MiB bodies: the bodies past the
    budget fail with kind ``too_large`` naming it, the rest of each batch is
    answered, others are served throughout, and the memory goes back.
    """
    await daemon.serves_a_normal_batch(other_upstream)
    baseline, fds = rss(daemon.pid), open_fds(daemon.pid)
    url = daemon.url + "/multiplex"
    load = DeferredList(
        [Deferred.fromCoroutine(caller.post(url, _large_batch(upstream, 10))) for _ in range(20)],
        consumeErrors=True,
    )
    waited = 0.0
    while not load.called:
        await daemon.serves_a_normal_batch(other_upstream)
        assert waited < LOAD_TIMEOUT, "the large batches were not answered"
        await sleep(0.2)
        waited += 0.2
    peak = peak_rss(daemon.pid)
    results: list[tuple[bool, Any]] = await load
    succeeded = too_large = 0
    for ok, outcome in results:
        assert ok, outcome
        status, _, answer = outcome
        assert status == 200
        for item in answer["responses"]:
            if "Success" in item:
                assert len(item["Success"]["content"]) == BODY
                succeeded += 1
            else:
                assert item["Failure"]["kind"] == "too_large", item
                assert "--max-buffered-bytes" in item["Failure"]["error"], item
                too_large += 1
    assert succeeded > 0 and too_large > 0, (succeeded, too_large)
    now, open_now = await _settles(daemon, baseline, fds)
    assert peak - baseline <= PEAK_ALLOWANCE, (
        f"peak RSS {peak / MIB:.1f} MiB, {(peak - baseline) / MIB:.1f} MiB over a baseline of "
        f"{baseline / MIB:.1f} MiB; allowed {PEAK_ALLOWANCE / MIB:.0f} MiB"
    )
    print(
        f"large answers: {succeeded} bodies served, {too_large} refused; baseline "
        f"{baseline / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, after {now / MIB:.1f} MiB; "
        f"fds {fds} -> {open_now}"
    )
