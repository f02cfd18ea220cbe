"""
``--workers N``: the real daemon as a master of N worker processes that
share the listener (SO_REUSEPORT), replace a worker that dies, pass SIGHUP
on, and drain and exit 0 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.failure import Failure

from octoplex.metrics import Metrics, registry_stats, render_text, stats
from octoplex.tap import Options
from octoplex.totals import Carried, master_totals, render_totals_text, sum_stats
from octoplex.workers import Master, _remove_orphaned_sockets, usable_cpus, worker_argv

from .servers import Caller, start_upstream, wait_until
from .test_twistd import (
    EXIT_TIMEOUT,
    ROOT,
    environment,
    free_port,
    run_twistd,
    sleep,
    spawn_twistd,
    stop,
    twistd,
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


def whole_log(logfile: Path) -> str:
    """
    The log, with the part SIGUSR1 rotated out of it to PATH.1 first.
    """
    rotated = logfile.with_name(logfile.name + ".1")
    text = ""
    for path in (rotated, logfile):
        try:
            text += path.read_text()
        except FileNotFoundError:
            # Between twistd's rename of the log and its reopening.
            pass
    return text


def alive(pid: int) -> bool:
    """
    Whether ``pid`` runs (a zombie that no init reaps does not).
    """
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


@pytest_twisted.ensureDeferred
async def test_two_workers_serve_are_replaced_reload_and_drain(
    tmp_path: Path, caller: Caller
) -> None:
    """
    [server] workers = 2: both workers answer on the one port; a worker
    killed with SIGKILL is replaced by a new process while the other serves;
    SIGHUP reaches both; SIGTERM, with a slow batch in flight, drains both:
    that batch's answer arrives whole, and the master exits 0.
    """
    port = free_port()
    logfile = tmp_path / "octoplex.log"
    output = tmp_path / "output.txt"
    access = tmp_path / "access.log"
    config = tmp_path / "octoplex.toml"
    config.write_text("[server]\nworkers = 2\n")
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    url = f"http://127.0.0.1:{port}"
    upstream = start_upstream()
    pids: list[int] = []
    try:
        process = spawn_twistd(
            port,
            logfile,
            output,
            "--config",
            str(config),
            "--access-log",
            str(access),
            "--metrics-listen",
            f"tcp:{metrics_port}:interface=127.0.0.1",
            workers=None,
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
            # The master's statistics are the workers' sums.
            status, _, raw = await within(10.0, caller.get(metrics_url + "/stats"))
            assert status == 200, raw
            stats = json.loads(raw)
            assert stats["octoplex_workers_scraped"]["samples"][0]["value"] == 2
            (batches,) = [
                s
                for s in stats["octoplex_batches"]["samples"]
                if s["name"] == "octoplex_batches_total" and s["labels"] == {"status": "200"}
            ]
            assert batches["value"] == 6
            status, _, text = await within(10.0, caller.get(metrics_url + "/metrics"))
            assert status == 200
            assert b'octoplex_batches_total{status="200"} 6.0\n' in text
            assert b"octoplex_workers_scraped 2.0\n" in text
            assert b"octoplex_worker_restarts_total 0.0\n" in text
            # Workers serve no /metrics of their own on --listen.
            status, _, _ = await within(10.0, caller.get(url + "/metrics"))
            assert status == 404

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
            # The master counts the restart; its start time is the daemon's.
            status, _, text = await within(10.0, caller.get(metrics_url + "/metrics"))
            assert status == 200
            assert b"octoplex_worker_restarts_total 1.0\n" in text
            # What the dead worker counted (by the last scrape) stays in the sums.
            assert b'octoplex_batches_total{status="200"} 6.0\n' in text
            with open(f"/proc/{process.pid}/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/stat") as f:
                (boot,) = [int(line.split()[1]) for line in f if line.startswith("btime ")]
            started = boot + ticks / os.sysconf("SC_CLK_TCK")
            samples = {
                s.name: s.value
                for family in text_string_to_metric_families(text.decode())
                for s in family.samples
            }
            assert samples["process_start_time_seconds"] == pytest.approx(started, abs=0.02)

            process.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: logfile.read_text().count("configuration reloaded from") >= 2,
                "both workers to reload their configuration",
                timeout=WORKER_TIMEOUT,
            )

            process.send_signal(signal.SIGUSR1)
            await wait_until(
                lambda: whole_log(logfile).count("log files reopened") >= 2,
                "both workers to reopen their log files",
                timeout=WORKER_TIMEOUT,
            )

            # A slow batch in flight (its upstream has the request) when
            # SIGTERM comes: the worker that has it drains it, answered whole.
            slow = {
                "timeout_msec": 10000,
                "requests": [{"uri": upstream.url + "/delay/1500"} for _ in range(2)],
            }
            answer: Deferred[Any] = Deferred.fromCoroutine(
                within(EXIT_TIMEOUT, caller.post(url + "/multiplex", slow))
            )
            await wait_until(
                lambda: upstream.resource.active == 2,
                "the upstream to have both requests of the slow batch",
                timeout=WORKER_TIMEOUT,
            )
            process.send_signal(signal.SIGTERM)
            status, _, body = await answer
            assert status == 200, body
            assert len(body["responses"]) == 2, body
            for outcome in body["responses"]:
                assert "Success" in outcome, body
                assert outcome["Success"]["status"] == 200, body
                assert outcome["Success"]["content"] == "delayed 1500", body
            assert upstream.resource.finished_early == []
            returncode = await wait_for_exit(process, EXIT_TIMEOUT)
        finally:
            stop(process)
            for pid in pids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    finally:
        await upstream.stop()

    log = whole_log(logfile)
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
    assert re.search(r"master reloaded \S+octoplex.toml: applied \[\]", log), log
    # SIGUSR1: each worker reopens its access log; twistd rotates the master's --logfile.
    assert log.count("log files reopened") == 2, log
    assert "SIGUSR1 sent on to the workers" in log
    assert (tmp_path / "octoplex.log.1").exists()
    assert log.count("batches drained in") == 2, log
    assert len(re.findall(r"stopping: draining 1 batches in flight", log)) == 1, log
    assert len(re.findall(r"stopped: 1 batches drained in \d+ ms", log)) == 1, log
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
    assert len(lines) == 7


def test_workers_need_plain_tcp_listeners(tmp_path: Path) -> None:
    """--workers 2 refuses a listener that SO_REUSEPORT cannot share, and --metrics-listen."""
    sock = str(tmp_path / "octoplex.sock")
    with pytest.raises(usage.UsageError, match="only plain tcp: listeners can"):
        parse("--workers", "2", "--listen", f"unix:{sock}")
    assert parse("--workers", "2", "--listen", "tcp:0:interface=127.0.0.1").is_master
    assert not parse("--workers", "1", "--listen", "tcp:0").is_master


def test_workers_default_to_the_usable_cpus(tmp_path: Path) -> None:
    """--workers auto (the default) is one per usable CPU, or 1 for a listener it cannot share."""
    assert parse("--listen", "tcp:0")["workers"] == usable_cpus()
    assert parse("--workers", "auto", "--listen", "tcp:0")["workers"] == usable_cpus()
    sock = str(tmp_path / "octoplex.sock")
    assert parse("--listen", f"unix:{sock}")["workers"] == 1
    config = tmp_path / "octoplex.toml"
    config.write_text('[server]\nworkers = "auto"\n')
    assert parse("--config", str(config))["workers"] == usable_cpus()
    config.write_text('[server]\nworkers = "many"\n')
    with pytest.raises(usage.UsageError, match=r'workers must be a whole number or "auto"'):
        parse("--config", str(config))
    with pytest.raises(usage.UsageError, match="'none' is not a whole number, nor auto"):
        parse("--workers", "none")


def _cgroup(root: Path, groups: str, files: dict[str, str]) -> str:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(groups)
    for name, text in files.items():
        path = root / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_usable_cpus_follow_the_cgroup_quota(tmp_path: Path) -> None:
    """A container's CPU limit (cgroup v2 cpu.max up the tree, or v1 CFS quota) caps the count."""
    affinity = len(os.sched_getaffinity(0))
    v2 = _cgroup(
        tmp_path / "v2",
        "0::/kubepods/pod1/c1\n",
        {
            "cpu.max": "max 100000\n",
            "kubepods/cpu.max": "max 100000\n",
            "kubepods/pod1/cpu.max": "150000 100000\n",
            "kubepods/pod1/c1/cpu.max": "max 100000\n",
        },
    )
    assert usable_cpus(v2) == min(affinity, 2)  # 1.5 CPUs, rounded up
    tiny = _cgroup(tmp_path / "tiny", "0::/\n", {"cpu.max": "10000 100000\n"})
    assert usable_cpus(tiny) == 1
    v1 = _cgroup(
        tmp_path / "v1",
        "4:cpu,cpuacct:/\n",
        {"cpu,cpuacct/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
    )
    assert usable_cpus(v1) == 1
    unlimited = _cgroup(
        tmp_path / "none",
        "0::/\n",
        {
            "cpu.max": "max 100000\n",
            "cpu/cpu.cfs_quota_us": "-1\n",
            "cpu/cpu.cfs_period_us": "100000\n",
        },
    )
    assert usable_cpus(unlimited) == affinity
    assert usable_cpus(str(tmp_path / "nothing")) == affinity


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


class _FakeReactor(Clock):
    """
    A clock that records the processes it is asked to spawn.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[list[str]] = []
        self.triggers: list[tuple[str, str, Any]] = []
        self.stopped = False

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> Any:
        self.spawned.append(args)
        return SimpleNamespace(pid=1000 + len(self.spawned))

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        pass

    def addSystemEventTrigger(self, phase: str, event: str, f: Any, *args: Any) -> None:
        self.triggers.append((phase, event, f))

    def stop(self) -> None:
        self.stopped = True


def test_a_dead_worker_is_restarted_with_backoff() -> None:
    """1 s, doubling to 30 s while the worker keeps dying; back to 1 s after it lived 60 s."""
    reactor = _FakeReactor()
    master = Master(parse("--listen", "tcp:0", "--workers", "2"), reactor, 2)
    master.startService()
    assert [args[-1] for args in reactor.spawned] == ["0", "1"]
    for protocol in master.workers.values():
        protocol.childDataReceived(3, b"ready\n")
    delays = []
    for _ in range(7):
        protocol = master.workers[0]
        protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        assert 0 not in master.workers
        (call,) = reactor.getDelayedCalls()
        delays.append(call.getTime() - reactor.seconds())
        reactor.advance(delays[-1])
        assert master.workers[0] is not protocol
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert master.registry.get_sample_value("octoplex_worker_restarts_total") == 7
    reactor.advance(60)
    master.workers[0].processEnded(Failure(ProcessTerminated(exitCode=None, signal=9)))
    (call,) = reactor.getDelayedCalls()
    assert call.getTime() - reactor.seconds() == 1
    assert len(reactor.spawned) == 9
    # Stopping cancels a pending restart, and waits for the workers running.
    reactor.advance(1)
    master.workers[1].processEnded(Failure(ProcessTerminated(exitCode=1)))
    stopped = master.stopService()
    assert not stopped.called
    master.workers[0].processEnded(Failure(ProcessDone(0)))
    assert stopped.called
    assert not reactor.getDelayedCalls()
    assert len(reactor.spawned) == 10


def test_orphaned_metrics_socket_directories_are_removed(tmp_path: Path) -> None:
    """A directory left by a master that is gone goes; a running master's, and others, stay."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    left = tmp_path / f"octoplex-metrics-{gone.pid}-x1"
    running = tmp_path / f"octoplex-metrics-{os.getpid()}-x2"
    other = tmp_path / "octoplex-metrics-notapid"
    for directory in (left, running, other):
        directory.mkdir()
    (left / "worker-0.sock").write_text("")
    _remove_orphaned_sockets(str(tmp_path))
    assert not left.exists()
    assert running.exists() and other.exists()


def test_the_master_reloads_its_own_settings(tmp_path: Path) -> None:
    """On SIGHUP the master applies its own log level and drain timings; a bad file, nothing."""
    config = tmp_path / "octoplex.toml"
    config.write_text("[server]\ndrain_timeout = 30.0\n")
    master = Master(
        parse("--config", str(config), "--listen", "tcp:0", "--workers", "2"), _FakeReactor(), 2
    )
    config.write_text("[server]\ndrain_timeout = 5.0\ndrain_delay = 1.0\n")
    master.reload()
    assert (master.options["drain-timeout"], master.options["drain-delay"]) == (5.0, 1.0)
    config.write_text("[server]\ndrain_timeout = 'soon'\n")
    master.reload()
    assert master.options["drain-timeout"] == 5.0


def test_a_worker_that_cannot_start_stops_the_master() -> None:
    """A worker's first start ending before it is ready stops the master, which exits 1."""
    reactor = _FakeReactor()
    master = Master(parse("--listen", "tcp:0", "--workers", "2"), reactor, 2)
    exits: list[int] = []
    master.exit = exits.append
    master.startService()
    master.workers[1].childDataReceived(3, b"ready\n")
    master.workers[0].processEnded(Failure(ProcessTerminated(exitCode=1)))
    assert master.failed and reactor.stopped
    assert not reactor.getDelayedCalls()  # not restarted
    ((phase, event, exit_failed),) = reactor.triggers
    assert (phase, event) == ("after", "shutdown")
    stopped = master.stopService()
    master.workers[1].processEnded(Failure(ProcessDone(0)))
    assert stopped.called
    exit_failed()
    assert exits == [1]


@pytest_twisted.ensureDeferred
async def test_a_real_worker_that_cannot_start_stops_the_master(
    tmp_path: Path, caller: Caller
) -> None:
    """
    A worker that cannot open its own log file (a directory is in the way)
    stops the master at once, exit status 1, the worker's reason in the log.
    """
    port = free_port()
    logfile, output = tmp_path / "octoplex.log", tmp_path / "output.txt"
    (tmp_path / "octoplex.log.worker-1").mkdir()
    with output.open("wb") as out:
        process = subprocess.Popen(
            [
                *twistd(), "-n", "--pidfile=", "octoplex", "--workers", "2",
                "--listen", f"tcp:{port}:interface=127.0.0.1", "--log-file", str(logfile),
            ],
            cwd=ROOT, env=environment(), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        returncode = await wait_for_exit(process, EXIT_TIMEOUT)
    finally:
        stop(process)
    log = logfile.read_text() + output.read_text()
    assert returncode == 1, log
    assert "worker 1: " in log and "octoplex.log.worker-1" in log, log
    assert re.search(r"worker 1 \(pid \d+\) could not start: exit status 1", log), log
    assert "master stopped" in log


@pytest_twisted.ensureDeferred
async def test_workers_stop_when_the_master_is_killed(tmp_path: Path, caller: Caller) -> None:
    """A master killed with SIGKILL leaves no worker behind: each sees its pipe close."""
    port = free_port()
    logfile, output = tmp_path / "octoplex.log", tmp_path / "output.txt"
    url = f"http://127.0.0.1:{port}"
    process = spawn_twistd(port, logfile, output, workers=2)
    pids: list[int] = []
    try:
        await wait_until_healthy(process, caller, url, output)
        pids += (await workers_seen(caller, url, 2)).values()
        process.kill()
        await wait_for_exit(process, EXIT_TIMEOUT)
        await wait_until(
            lambda: not any(alive(pid) for pid in pids),
            f"the workers {pids} to exit",
            timeout=WORKER_TIMEOUT,
        )
    finally:
        stop(process)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_summed_statistics() -> None:
    """One worker's /stats, rendered by the master, is prometheus_client's /metrics less _created;
    two workers' samples add up."""
    metrics = Metrics()
    metrics.watch(lambda: 1, lambda: 3)
    metrics.batch(200, 0.01, 5)
    metrics.item_failed("dns")

    def families(text: str) -> set[Any]:
        return {
            (f.name, f.type, tuple((s.name, tuple(sorted(s.labels.items())), s.value)
                                   for s in f.samples))
            for f in text_string_to_metric_families(text)
            if not f.name.endswith("_created")
        }  # fmt: skip

    one = render_totals_text(sum_stats([stats(metrics)])).decode()
    assert families(one) == families(render_text(metrics).decode())
    two = sum_stats([stats(metrics), stats(metrics)])
    assert {"name": "octoplex_batches_total", "labels": {"status": "200"}, "value": 2} in two[
        "octoplex_batches"
    ]["samples"]
    (in_flight,) = two["octoplex_items_in_flight"]["samples"]
    assert in_flight["value"] == 6


def test_the_master_adds_its_own_statistics() -> None:
    """The master's process statistics add to its workers' but for its start time and fd limit,
    which are its own; its restart count is served."""
    workers = []
    for _ in range(2):
        metrics = Metrics()
        metrics.watch_process()
        workers.append(stats(metrics))
    master = Master(parse("--listen", "tcp:0", "--workers", "2"), _FakeReactor(), 2)
    own = registry_stats(master.registry)
    total = master_totals(workers, own)

    def value(document: dict[str, Any], family: str) -> float:
        (sample,) = document[family]["samples"]
        return float(sample["value"])

    assert value(total, "process_resident_memory_bytes") == sum(
        value(document, "process_resident_memory_bytes") for document in [*workers, own]
    )
    for family in ("process_start_time_seconds", "process_max_fds"):
        assert total[family] == own[family]
    assert value(total, "octoplex_worker_restarts") == 0
    assert value(total, "octoplex_batches_shed") == 0
    text = render_totals_text(total).decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert {"octoplex_worker_restarts_total", "process_cpu_seconds_total"} <= names


def test_the_sums_never_drop_when_a_worker_restarts() -> None:
    """
    A worker silent in a scrape counts as what it last reported, and a
    dead worker's counts stay in every later sum: the master's counters
    never drop. Gauges go with their worker.
    """

    def worker(batches: int, started: float) -> dict[str, Any]:
        metrics = Metrics()
        metrics.watch_process()
        metrics.watch(lambda: 1, lambda: 3)
        for _ in range(batches):
            metrics.batch(200, 0.01, 1)
        document = stats(metrics)
        document["process_start_time_seconds"]["samples"][0]["value"] = started
        return document

    def value(total: dict[str, Any], family: str, name: str) -> float:
        (sample,) = [s for s in total[family]["samples"] if s["name"] == name]
        return float(sample["value"])

    carried = Carried()
    a, b = "worker-0.sock", "worker-1.sock"
    scrapes = [
        {a: worker(5, 100.0), b: worker(2, 100.0)},
        # a is silent: its 5 stay.
        {a: None, b: worker(3, 100.0)},
        # a was replaced (another start time): 5 + 1 + 3.
        {a: worker(1, 200.0), b: worker(3, 100.0)},
        # b was replaced within the same clock tick: its count went down.
        {a: worker(4, 200.0), b: worker(0, 100.0)},
        {a: worker(4, 200.0), b: worker(2, 100.0)},
    ]
    totals = [sum_stats(carried.documents(answers)) for answers in scrapes]
    batches = [value(t, "octoplex_batches", "octoplex_batches_total") for t in totals]
    assert batches == [7, 8, 9, 12, 14]
    # The histograms carry too; the in-flight gauge is the answering workers' alone.
    counts = [value(t, "octoplex_batch_seconds", "octoplex_batch_seconds_count") for t in totals]
    assert counts == batches
    in_flight = [value(t, "octoplex_items_in_flight", "octoplex_items_in_flight") for t in totals]
    assert in_flight == [6, 3, 6, 6, 6]
