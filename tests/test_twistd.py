"""
The real daemon: ``twistd -n octoplex`` run as a subprocess from the
repository (``PYTHONPATH`` is the repository root, so the plugin in
``twisted/plugins`` and the ``octoplex`` package there are used even where
the package is not installed), served one batch, and stopped with SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater

from .servers import Caller, start_upstream

ROOT = Path(__file__).resolve().parent.parent

# How long the daemon may take to answer /healthz after it is spawned, and
# to exit after SIGTERM.
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 15.0
POLL_INTERVAL = 0.05


def twistd() -> list[str]:
    """
    The command that runs twistd for this interpreter.

    ``python -m twisted`` is not an alternative: it runs ``twist``, whose
    options (``--log-file``, no ``-n``) differ from twistd's.
    """
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def environment() -> dict[str, str]:
    """
    The environment of the daemon: ours, with the repository first on the path.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    """
    A port of 127.0.0.1 that nothing listens on at the moment.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_twistd(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """
    Run twistd to completion, bounded by ``timeout`` seconds.
    """
    return subprocess.run(
        [*twistd(), *argv],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def spawn_twistd(
    port: int, logfile: Path, output: Path, *options: str, workers: int | None = 1
) -> subprocess.Popen[bytes]:
    """
    Start ``twistd -n octoplex`` listening on ``port`` of 127.0.0.1, allowed
    to reach 127.0.0.0/8 and with the plugin's further ``options``, logging
    to ``logfile``; its stdout and stderr go to ``output``.  It runs
    ``--workers 1`` (one process, whatever the CPU count), or ``workers``
    (None: as its options or config file say).
    """
    with output.open("wb") as out:
        return subprocess.Popen(
            [
                *twistd(),
                "-n",
                "--pidfile=",
                # twistd's own options come before the plugin's name.
                "--logfile",
                str(logfile),
                "octoplex",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--allow-egress",
                "127.0.0.0/8",
                *([] if workers is None else ["--workers", str(workers)]),
                *options,
            ],
            cwd=ROOT,
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def sleep(seconds: float) -> None:
    """
    Let the reactor run for ``seconds``.
    """
    await deferLater(reactor, seconds, lambda: None)


async def within(seconds: float, d: Any) -> Any:
    """
    Await a Deferred or coroutine, failing if it takes over ``seconds``.
    """
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    return await d.addTimeout(seconds, reactor)


async def wait_for_exit(process: subprocess.Popen[bytes], seconds: float) -> int:
    """
    Poll ``process`` until it exits, at most ``seconds``; return its status.
    """
    waited = 0.0
    while process.poll() is None:
        assert waited < seconds, f"twistd did not exit within {seconds} s"
        await sleep(POLL_INTERVAL)
        waited += POLL_INTERVAL
    return process.returncode


async def wait_until_healthy(
    process: subprocess.Popen[bytes], caller: Caller, url: str, output: Path
) -> None:
    """
    Ask ``url`` + ``/healthz`` until it answers, at most START_TIMEOUT
    seconds; fail at once if the daemon dies first.
    """
    waited = 0.0
    while True:
        if process.poll() is not None:
            pytest.fail(f"twistd exited with {process.returncode}: {output.read_text()}")
        try:
            status, _, body = await within(2.0, caller.get(url + "/healthz"))
        except ConnectError:
            pass
        else:
            assert (status, body) == (200, b'{"healthy":true}')
            return
        assert waited < START_TIMEOUT, f"twistd did not answer within {START_TIMEOUT} s"
        await sleep(0.1)
        waited += 0.1


def stop(process: subprocess.Popen[bytes]) -> None:
    """
    Make sure ``process`` is gone.
    """
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


@pytest_twisted.ensureDeferred
async def test_daemon_serves_a_batch_and_stops_on_sigterm(tmp_path: Path, caller: Caller) -> None:
    """twistd octoplex starts, serves a batch, logs it, and exits cleanly on SIGTERM."""
    port = free_port()
    logfile = tmp_path / "octoplex.log"
    output = tmp_path / "output.txt"
    url = f"http://127.0.0.1:{port}"
    upstream = start_upstream()
    try:
        process = spawn_twistd(port, logfile, output)
        try:
            await wait_until_healthy(process, caller, url, output)
            batch = {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/hello"}]}
            status, _, body = await within(10.0, caller.post(url + "/multiplex", batch))
            assert status == 200
            (outcome,) = body["responses"]
            assert outcome["Success"]["status"] == 200
            assert outcome["Success"]["content"] == "Hello world!"

            process.send_signal(signal.SIGTERM)
            returncode = await wait_for_exit(process, EXIT_TIMEOUT)
        finally:
            stop(process)
    finally:
        await upstream.stop()

    # twistd would re-raise the signal that stopped its reactor; Octoplex
    # takes SIGTERM itself, so a drained stop is a clean exit.
    assert returncode == 0, output.read_text()
    log = logfile.read_text()
    # The text line names the settings given, as an operator reads it.
    assert re.search(
        rf"octoplex \S+ listening on \['tcp:{port}:interface=127\.0\.0\.1'\]; "
        r"settings given: --allow-egress 127\.0\.0\.0/8 --workers 1; the rest at their defaults",
        log,
    ), log
    batch_lines = [line for line in log.splitlines() if "batch " in line]
    assert len(batch_lines) == 1, log
    assert "from 127.0.0.1:" in batch_lines[0]
    assert "1 requests, 1 succeeded, 0 failed, 0 timed out" in batch_lines[0]
    assert re.search(r"octoplex \S+ stopping: draining 0 batches in flight", log), log
    assert re.search(r"octoplex \S+ stopped: 0 batches drained in \d+ ms", log), log
    assert "Main loop terminated" in log
    assert "Server Shut Down." in log
    assert "Traceback" not in log
    assert "Unhandled" not in log
    assert output.read_text() == ""


def test_help_documents_the_options() -> None:
    """twistd -n octoplex --help exits 0 and documents --listen and --max-batch-size."""
    result = run_twistd(["-n", "octoplex", "--help"])
    assert result.returncode == 0, result.stderr
    assert "--listen=" in result.stdout
    assert "--max-batch-size=" in result.stdout
    assert "--pool-idle-timeout=" in result.stdout
    assert "repeatable" in result.stdout


def test_bad_option_exits_non_zero() -> None:
    """An invalid option value makes twistd exit 1 with the UsageError's message on stdout."""
    result = run_twistd(["-n", "--pidfile=", "octoplex", "--max-batch-size", "0"])
    assert result.returncode == 1
    # twistd prints the usage and the error on stdout.
    assert result.stdout.rstrip().endswith(
        "Parameter type enforcement failed: '0' must be a finite number greater than 0"
    )
    assert "--max-batch-size=" in result.stdout


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("with_logfile", [True, False])
def test_port_in_use_fails_start_up(tmp_path: Path, with_logfile: bool, workers: str) -> None:
    """
    A --listen port already in use makes twistd exit 1 quickly with why, in
    its log: one process, or a master (which binds it once before spawning).
    """
    logfile = tmp_path / "octoplex.log"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = run_twistd(
            [
                "-n",
                "--pidfile=",
                *(["--logfile", str(logfile)] if with_logfile else []),
                "octoplex",
                "--workers",
                workers,
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
            ]
        )
    assert result.returncode == 1
    # With -n and no --logfile, twistd logs to stdout; stderr stays empty
    # either way, because twistd's log observer has captured it.
    assert result.stderr == ""
    if with_logfile:
        assert result.stdout == ""
        log = logfile.read_text()
    else:
        log = result.stdout
    assert f"octoplex: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use" in log
    assert "Traceback" not in log
    assert "listening on" not in log
