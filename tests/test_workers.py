"""
``--workers N``: the real daemon as a master of N worker processes that
share the listener (SO_REUSEPORT), replace a worker that dies, pass SIGHUP
on, and drain and exit 0 on SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import pytest_twisted
from twisted.python import usage

from octoplex.tap import Options
from octoplex.workers import worker_argv

from .servers import Caller, start_upstream
from .test_twistd import (
    EXIT_TIMEOUT,
    free_port,
    run_twistd,
    sleep,
    spawn_twistd,
    stop,
    wait_for_exit,
    wait_until_healthy,
    within,
)

WORKER_TIMEOUT = 15.0


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


async def worker_of(caller: Caller, url: str) -> tuple[int, int] | None:
    """
    Ask /healthz on a new connection; the worker id and pid that answered,
    or None if the connection failed (a worker just killed).
    """
    try:
        status, headers, _ = await within(5.0, caller.get(url + "/healthz"))
    except Exception:
        return None
    assert status == 200
    (value,) = headers.getRawHeaders(b"x-octoplex-worker")
    worker_id, pid = value.decode().split(":")
    return int(worker_id), int(pid)


async def workers_seen(caller: Caller, url: str, wanted: int) -> dict[int, int]:
    """
    Open new connections until ``wanted`` workers have answered; their pid
    by id.
    """
    seen: dict[int, int] = {}
    for _ in range(400):
        answer = await worker_of(caller, url)
        if answer is not None:
            seen[answer[0]] = answer[1]
            if len(seen) == wanted:
                return seen
    pytest.fail(f"only workers {seen} answered 400 new connections")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest_twisted.ensureDeferred
async def test_two_workers_serve_are_replaced_reload_and_drain(
    tmp_path: Path, caller: Caller
) -> None:
    """
    [server] workers = 2: both workers answer on the one port; a worker
    killed with SIGKILL is replaced by a new process while the other serves;
    SIGHUP reaches both; SIGTERM drains both and the master exits 0.
    """
    port = free_port()
    logfile = tmp_path / "octoplex.log"
    output = tmp_path / "output.txt"
    access = tmp_path / "access.log"
    config = tmp_path / "octoplex.toml"
    config.write_text("[server]\nworkers = 2\n")
    url = f"http://127.0.0.1:{port}"
    upstream = start_upstream()
    pids: list[int] = []
    try:
        process = spawn_twistd(
            port, logfile, output, "--config", str(config), "--access-log", str(access)
        )
        try:
            await wait_until_healthy(process, caller, url, output)
            first = await workers_seen(caller, url, 2)
            pids += first.values()
            assert process.pid not in pids
            # Each worker serves batches, and writes its own access log.
            for _ in range(6):
                batch = {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/hello"}]}
                status, _, body = await within(10.0, caller.post(url + "/multiplex", batch))
                assert status == 200
                assert body["responses"][0]["Success"]["content"] == "Hello world!"

            os.kill(first[0], signal.SIGKILL)
            replaced: int | None = None
            survivor_answered = False
            for _ in range(int(WORKER_TIMEOUT / 0.05)):
                answer = await worker_of(caller, url)
                if answer == (1, first[1]):
                    survivor_answered = True
                elif answer is not None and answer[0] == 0 and answer[1] != first[0]:
                    replaced = answer[1]
                if replaced is not None and survivor_answered:
                    break
                await sleep(0.05)
            assert survivor_answered
            assert replaced is not None, "worker 0 was not replaced"
            pids.append(replaced)
            assert not alive(first[0])

            process.send_signal(signal.SIGHUP)
            for _ in range(100):
                if logfile.read_text().count("configuration reloaded from") >= 2:
                    break
                await sleep(0.1)

            process.send_signal(signal.SIGTERM)
            returncode = await wait_for_exit(process, EXIT_TIMEOUT)
        finally:
            stop(process)
            for pid in pids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    finally:
        await upstream.stop()

    log = logfile.read_text()
    assert returncode == 0, log + output.read_text()
    assert not [pid for pid in pids if alive(pid)]
    assert re.search(r"master \(pid \d+\) starting 2 workers", log), log
    assert re.search(
        rf"worker 0 \(pid {first[0]}\) exited after [\d.]+ s: killed by SIGKILL; "
        r"restarting it in 1 s",
        log,
    ), log
    assert f"worker 0 started, pid {replaced}" in log
    assert log.count("configuration reloaded from") == 2, log
    assert "SIGHUP sent on to the workers" in log
    assert log.count("batches drained in") == 2, log
    assert re.search(rf"worker 1 \(pid {first[1]}\) exited: exit status 0", log), log
    assert re.search(rf"worker 0 \(pid {replaced}\) exited: exit status 0", log), log
    assert "master stopped" in log
    assert "Traceback" not in log
    # The master writes no access log; each worker its own.
    assert not access.exists() or access.read_text() == ""
    lines = [
        line
        for i in (0, 1)
        if (tmp_path / f"access.log.worker-{i}").exists()
        for line in (tmp_path / f"access.log.worker-{i}").read_text().splitlines()
    ]
    assert len(lines) == 6


def test_workers_need_plain_tcp_listeners(tmp_path: Path) -> None:
    """--workers 2 refuses a listener that SO_REUSEPORT cannot share, and --metrics-listen."""
    sock = str(tmp_path / "octoplex.sock")
    with pytest.raises(usage.UsageError, match="only plain tcp: listeners can"):
        parse("--workers", "2", "--listen", f"unix:{sock}")
    with pytest.raises(usage.UsageError, match=r"--metrics-listen .* not supported"):
        parse("--workers", "2", "--listen", "tcp:0", "--metrics-listen", "tcp:0")
    assert parse("--workers", "2", "--listen", "tcp:0:interface=127.0.0.1").is_master
    assert not parse("--listen", "tcp:0").is_master


def test_worker_log_files_are_suffixed(tmp_path: Path) -> None:
    """A worker writes --log-file and --access-log with .worker-ID added."""
    log, access = tmp_path / "octoplex.log", tmp_path / "access.log"
    options = parse(
        "--listen", "tcp:0", "--log-file", str(log), "--access-log", str(access),
        "--workers", "1", "--worker-id", "3",
    )  # fmt: skip
    assert options["log-file"] == f"{log}.worker-3"
    assert options["access-log"] == f"{access}.worker-3"
    assert not options.is_master
    options["logs"].close()


def test_worker_command_line_wins() -> None:
    """A worker runs the master's options, then --workers 1 and its id, which win."""
    argv = worker_argv(["--config", "x.toml", "--workers", "4"], 2)
    assert argv[argv.index("octoplex") + 1 :] == [
        "--config", "x.toml", "--workers", "4", "--workers", "1", "--worker-id", "2",
    ]  # fmt: skip


def test_usage_error_from_twistd() -> None:
    """twistd exits 1 with the reason for a listener that workers cannot share."""
    result = run_twistd(
        ["-n", "--pidfile=", "octoplex", "--workers", "2", "--listen", "unix:/tmp/nope.sock"]
    )
    assert result.returncode == 1
    assert "cannot be shared by --workers 2" in result.stdout
