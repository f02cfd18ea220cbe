"""
Graceful shutdown of the real daemon: on SIGTERM ``/readyz`` turns 503
while batches are still taken (``--drain-delay``), then the listeners
close, the batches in flight finish by their own deadlines or the
``--drain-timeout`` ceiling, and the process exits 0.
"""

from __future__ import annotations

import errno
import json
import signal
import socket
import time
from pathlib import Path

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError

from .servers import Caller, start_upstream, wait_until
from .test_twistd import (
    EXIT_TIMEOUT,
    free_port,
    spawn_twistd,
    stop,
    wait_for_exit,
    wait_until_healthy,
    within,
)


def _refused(port: int) -> bool:
    """
    Whether a connection to ``port`` of 127.0.0.1 is refused: nothing listens.
    """
    with socket.socket() as probe:
        probe.settimeout(2.0)
        return probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_batches_in_flight(tmp_path: Path, caller: Caller) -> None:
    """
    A batch in flight at SIGTERM is answered in full; during the drain delay
    /readyz is 503 and a new batch is still served; then the listener is
    closed; the daemon exits 0.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logfile, output = tmp_path / "octoplex.log", tmp_path / "output.txt"
    upstream = start_upstream()
    process = spawn_twistd(port, logfile, output, "--drain-delay", "1", "--drain-timeout", "10")
    try:
        await wait_until_healthy(process, caller, url, output)
        status, _, ready = await caller.get(url + "/readyz")
        assert (status, json.loads(ready)) == (200, {"ready": True})
        slow = {
            "timeout_msec": 5000,
            "requests": [{"uri": upstream.url + "/delay/2000"}, {"uri": upstream.url + "/hello"}],
        }
        in_flight = Deferred.fromCoroutine(caller.post(url + "/multiplex", slow))
        await wait_until(
            lambda: "/delay/2000" in upstream.resource.arrivals,
            "the batch's /delay/2000 to reach the upstream",
        )
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await wait_until(
            lambda: "stopping: draining 1 batches in flight" in logfile.read_text(),
            "the daemon to log that it is draining",
        )
        # Within the drain delay: not ready, but still serving.
        status, _, ready = await caller.get(url + "/readyz")
        assert (status, json.loads(ready)) == (503, {"ready": False})
        quick = {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/hello"}]}
        status, _, body = await caller.post(url + "/multiplex", quick)
        assert status == 200
        assert body["responses"][0]["Success"]["content"] == "Hello world!"
        # Past the delay the listener is closed.
        await wait_until(lambda: _refused(port), "the listener to close", every=0.05)
        try:
            await within(2.0, caller.get(url + "/healthz"))
        except ConnectError:
            refused = True
        else:
            refused = False
        assert refused, "the listener still accepts after the drain delay"
        status, _, body = await within(10.0, in_flight)
        answered = time.monotonic() - signalled
        returncode = await wait_for_exit(process, EXIT_TIMEOUT)
    finally:
        stop(process)
        await upstream.stop()
    assert status == 200
    delayed, hello = body["responses"]
    assert delayed["Success"]["content"] == "delayed 2000"
    assert hello["Success"]["content"] == "Hello world!"
    assert 1.4 < answered < 4.0
    assert returncode == 0, output.read_text()
    log = logfile.read_text()
    assert "draining 1 batches in flight (at most 10 s)" in log, log
    assert "stopped: 1 batches drained in" in log, log


@pytest_twisted.ensureDeferred
async def test_drain_ceiling_answers_what_is_left(tmp_path: Path, caller: Caller) -> None:
    """
    Past --drain-timeout, a batch still running is answered as it stands:
    what is pending times out, what is done is kept; the daemon exits 0.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logfile, output = tmp_path / "octoplex.log", tmp_path / "output.txt"
    upstream = start_upstream()
    process = spawn_twistd(port, logfile, output, "--drain-timeout", "0.5")
    try:
        await wait_until_healthy(process, caller, url, output)
        slow = {
            "timeout_msec": 20000,
            "requests": [{"uri": upstream.url + "/delay/10000"}, {"uri": upstream.url + "/hello"}],
        }
        in_flight = Deferred.fromCoroutine(caller.post(url + "/multiplex", slow))
        await wait_until(
            lambda: "/delay/10000" in upstream.resource.arrivals,
            "the batch's /delay/10000 to reach the upstream",
        )
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status, _, body = await within(10.0, in_flight)
        answered = time.monotonic() - signalled
        returncode = await wait_for_exit(process, EXIT_TIMEOUT)
        # The upstream sees its request cancelled (awaited before stopping
        # the upstream, whose own aborts would cancel it too).
        await wait_until(
            lambda: upstream.resource.finished_early,
            "the upstream to see /delay/10000 cancelled",
        )
    finally:
        stop(process)
        await upstream.stop()
    assert status == 200
    delayed, hello = body["responses"]
    assert delayed["Failure"]["error"] == "timeout elapsed"
    assert hello["Success"]["content"] == "Hello world!"
    assert 0.4 < answered < 3.0
    assert returncode == 0, output.read_text()
    assert upstream.resource.finished_early == ["/delay/10000"]
