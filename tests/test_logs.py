"""
Octoplex's logs: the JSON Lines observer and the level filter in memory,
and the real ``twistd octoplex`` daemon writing ``--log-file`` and
``--access-log``, rotating them, reopening them on SIGUSR1, and logging as a
daemon without twistd's own log file beside its own.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.application.service import Application
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.log import LogPublisher as LegacyLogPublisher
from twisted.scripts.twistd import ServerOptions
from twisted.web.client import Agent

from octoplex.limits import Limits
from octoplex.logs import Logs, _Sink, json_line
from octoplex.tap import Options, makeService

from .schema import check_answer
from .servers import Upstream, _QuietPool
from .test_twistd import (
    EXIT_TIMEOUT,
    ROOT,
    environment,
    free_port,
    sleep,
    stop,
    twistd,
    wait_for_exit,
    within,
)

TOKEN = "s3cret-token-for-the-log-tests"
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
#: The fields every batch's access event carries.
ACCESS_FIELDS = {
    "time",
    "level",
    "namespace",
    "message",
    "access",
    "batch_id",
    "client",
    "client_address",
    "tls_identity",
    "token_name",
    "size",
    "succeeded",
    "failed",
    "timed_out",
    "bytes_in",
    "bytes_out",
    "elapsed_ms",
    "status",
}


class _Lines(_Sink):
    """
    A sink that keeps what is written, for the observer's unit tests.
    """

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def write(self, line: bytes) -> None:
        self.lines.append(line)


def _event(emit: Any) -> dict[str, Any]:
    """
    The one event that ``emit(log)`` logs.
    """
    events: list[dict[str, Any]] = []
    publisher = LogPublisher(events.append)
    emit(Logger(namespace="octoplex.test", observer=publisher))
    (event,) = events
    return event


def _record(event: dict[str, Any]) -> dict[str, Any]:
    line = json_line(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert isinstance(record, dict)
    return record


def test_json_line_has_the_standard_fields_and_the_events_own() -> None:
    """A JSON line has time (UTC, ms), level, namespace, message and the event's fields."""
    event = _event(lambda log: log.info("hello {who}", who="world", count=3, limits=Limits()))
    record = _record(event)
    assert TIME.match(record["time"]), record
    assert record["level"] == "info"
    assert record["namespace"] == "octoplex.test"
    assert record["message"] == "hello world"
    assert record["who"] == "world" and record["count"] == 3
    # An attrs instance is written as its fields.
    assert record["limits"]["max_batch_size"] == Limits().max_batch_size
    assert not [key for key in record if key.startswith("log_")]


def test_json_line_serialises_a_failure_as_its_traceback() -> None:
    """A failure's traceback text goes under ``failure``; the message stays one line."""
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        failure = Failure()
    record = _record(_event(lambda log: log.failure("it broke in {where}", failure, where="x")))
    assert record["level"] == "critical"
    assert record["message"] == "it broke in x"
    assert record["failure"].startswith("Traceback")
    assert "ZeroDivisionError" in record["failure"]
    assert "test_json_line_serialises_a_failure_as_its_traceback" in record["failure"]


def test_json_line_writes_what_json_cannot_hold_as_text() -> None:
    """Values JSON cannot hold (an object, bytes, NaN, tuple keys, a cycle) become strings."""
    cycle: list[Any] = []
    cycle.append(cycle)

    class Thing:
        def __str__(self) -> str:
            return "a thing"

    record = _record(
        _event(
            lambda log: log.warn(
                "odd values",
                thing=Thing(),
                data=b"\x00\xff",
                ratio=math.nan,
                pairs={(1, 2): "x"},
                cycle=cycle,
                names={"b"},
                text="caf\u00e9 \udcff",
            )
        )
    )
    assert record["thing"] == "a thing"
    assert record["data"] == "b'\\x00\\xff'"
    assert record["ratio"] == "nan"
    assert record["pairs"] == "{(1, 2): 'x'}"
    assert record["cycle"] == "[[...]]"
    assert record["names"] == ["b"]
    assert record["text"].startswith("caf\u00e9 ")


def test_json_line_of_a_legacy_event() -> None:
    """An old twisted.python.log event keeps its text and system, not its internal keys."""
    events: list[dict[str, Any]] = []
    legacy = LegacyLogPublisher(publishPublisher=LogPublisher(events.append))
    legacy.msg("Starting factory", system="HTTPChannel,3", port=80)
    record = _record(events[0])
    assert record["message"] == "Starting factory"
    assert record["system"] == "HTTPChannel,3"
    assert record["namespace"] == "log_legacy" and record["port"] == 80
    assert TIME.match(record["time"])
    assert not {"isError", "format"} & set(record)


def test_observer_filters_by_level_and_routes_batch_events() -> None:
    """The level filters the log only; every access=True event reaches the access log."""
    main, access = _Lines(), _Lines()
    logs = Logs(main, "json", "warn", access)
    publisher = LogPublisher(logs)
    log = Logger(namespace="octoplex.test", observer=publisher)
    log.debug("a debug event")
    log.info("an info event")
    log.info("batch {batch_id} answered", batch_id="b1", access=True)
    log.warn("batch {batch_id} refused", batch_id="b2", access=True)
    log.error("an error")
    log.critical("critical")
    messages = [json.loads(line)["message"] for line in main.lines]
    assert messages == ["batch b2 refused", "an error", "critical"]
    assert [json.loads(line)["batch_id"] for line in access.lines] == ["b1", "b2"]
    logs.set_level("debug")
    log.debug("now written")
    assert json.loads(main.lines[-1])["message"] == "now written"


def test_text_format() -> None:
    """--log-format text writes twistd's classic lines, and the access log stays JSON."""
    main, access = _Lines(), _Lines()
    logs = Logs(main, "text", "info", access)
    log = Logger(namespace="octoplex.test", observer=LogPublisher(logs))
    log.info("batch {batch_id} answered", batch_id="b1", access=True)
    (line,) = main.lines
    assert re.match(rb"^\d{4}-\d\d-\d\dT\S+ \[octoplex\.test#info\] batch b1 answered\n$", line)
    assert json.loads(access.lines[0])["batch_id"] == "b1"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """
    Run the test in its own directory, where a default twistd.log would land.
    """
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def _twistd_options(*argv: str) -> Options:
    config = ServerOptions()
    config.parseOptions(list(argv))
    options = config.subOptions
    assert isinstance(options, Options)
    return options


def test_where_the_log_goes_under_twistd(in_tmp: Path) -> None:
    """With -n the log is text to stdout; as a daemon, JSON in twistd.log; never both logs."""
    foreground = _twistd_options("-n", "octoplex")["logs"]
    assert foreground.files == []
    daemon = _twistd_options("octoplex")["logs"]
    try:
        assert [sink.path for sink in daemon.files] == [str(in_tmp / "twistd.log")]
    finally:
        daemon.close()
    # twistd's own log options leave its log to twistd, as before.
    assert _twistd_options("-n", "--logfile", "x.log", "octoplex")["logs"].files == []


def test_octoplex_and_twistd_log_options_conflict(in_tmp: Path) -> None:
    """--log-file with twistd's --logfile, or a bad path, stops start-up with a sentence."""
    with pytest.raises(usage.UsageError, match="--log-file is for Octoplex's own log"):
        _twistd_options("-n", "--logfile", "x.log", "octoplex", "--log-file", "y.log")
    with pytest.raises(usage.UsageError, match="--log-level is for"):
        _twistd_options("--syslog", "octoplex", "--log-level", "warn")
    with pytest.raises(usage.UsageError, match=re.escape("'/nonexistent/o.log' cannot be opened")):
        _twistd_options("-n", "octoplex", "--log-file", "/nonexistent/o.log")
    with pytest.raises(usage.UsageError, match="'loud' is not a log level"):
        _twistd_options("-n", "octoplex", "--log-level", "loud")
    assert not (in_tmp / "y.log").exists()


def test_the_root_service_gives_twistd_its_observer(in_tmp: Path) -> None:
    """The root service sets Octoplex's observer on twistd's Application, for its AppLogger."""
    options = _twistd_options(
        "-n", "octoplex", "--workers", "1", "--log-file", "o.log", "--listen", "tcp:0"
    )
    application = Application("octoplex")
    makeService(options).setServiceParent(application)
    logs = options["logs"]
    try:
        assert application.getComponent(ILogObserver) is logs
        assert logs.attached
    finally:
        logs.close()


# The real daemon.


def spawn(
    port: int, output: Path, *options: str, cwd: Path = ROOT, daemon: bool = False
) -> subprocess.Popen[bytes]:
    """
    Start ``twistd octoplex`` on ``port`` of 127.0.0.1 with ``options``,
    allowed to reach 127.0.0.0/8; its stdout and stderr go to ``output``.
    """
    with output.open("wb") as out:
        return subprocess.Popen(
            [
                *twistd(),
                *([] if daemon else ["-n"]),
                f"--pidfile={cwd / 'twistd.pid' if daemon else ''}",
                "octoplex",
                # One process, whatever the CPU count.
                "--workers",
                "1",
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
                "--allow-egress",
                "127.0.0.0/8",
                *options,
            ],
            cwd=cwd,
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


class Client:
    """
    Posts batches to the daemon, with a bearer token when asked.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._http = HTTPClient(Agent(reactor, pool=_QuietPool(reactor, persistent=False)))

    async def healthy(self, seconds: float = 30.0) -> None:
        waited = 0.0
        while True:
            try:
                response = await within(2.0, self._http.get(self.url + "/healthz"))
                await treq.content(response)
                return
            except ConnectError:
                assert waited < seconds, f"the daemon did not answer within {seconds} s"
                await sleep(0.1)
                waited += 0.1

    async def post(self, body: Any, token: str | None = TOKEN) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = await within(
            10.0, self._http.post(self.url + "/multiplex", data, headers=headers)
        )
        answer = json.loads(await treq.content(response))
        check_answer(response.code, answer)
        return response.code, answer


def _batch(upstream: Upstream) -> dict[str, Any]:
    return {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/hello"}]}


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """
    Every line of ``path``, each of which must be one JSON object.
    """
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        assert isinstance(record, dict), line
        records.append(record)
    return records


async def wait_for(predicate: Any, seconds: float = 5.0) -> None:
    """
    Poll ``predicate`` until it holds, at most ``seconds``.
    """
    waited = 0.0
    while not predicate():
        assert waited < seconds, "timed out waiting"
        await sleep(0.05)
        waited += 0.05


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def terminate(process: subprocess.Popen[bytes], output: Path) -> None:
    process.send_signal(signal.SIGTERM)
    assert await wait_for_exit(process, EXIT_TIMEOUT) == 0, output.read_text()


@pytest_twisted.ensureDeferred
async def test_daemon_writes_json_lines_and_an_access_log(
    tmp_path: Path, upstream: Upstream
) -> None:
    """--log-file and --access-log: JSON lines, with the start-up and every batch's fields."""
    port = free_port()
    log, access, output = tmp_path / "octoplex.log", tmp_path / "access.log", tmp_path / "out"
    process = spawn(
        port, output, "--log-file", str(log), "--access-log", str(access),
        "--api-token", f"bidder={TOKEN}",
    )  # fmt: skip
    client = Client(f"http://127.0.0.1:{port}")
    try:
        await client.healthy()
        assert (await client.post(_batch(upstream)))[0] == 200
        assert (await client.post(b"{not json"))[0] == 400
        assert (await client.post(_batch(upstream), token=None))[0] == 401
        await terminate(process, output)
    finally:
        stop(process)

    assert output.read_text() == ""
    records = read_json_lines(log)
    assert all(TIME.match(r["time"]) and r["level"] and r["namespace"] for r in records)
    (started,) = [r for r in records if "listening on" in r["message"]]
    assert started["version"] and started["listen"] == [f"tcp:{port}:interface=127.0.0.1"]
    assert any("twistd" in r["message"] and "starting up" in r["message"] for r in records)
    assert records[-1]["message"] == "Server Shut Down."
    assert TOKEN not in log.read_text()

    batches = read_json_lines(access)
    assert [b["status"] for b in batches] == [200, 400, 401]
    for batch in batches:
        assert ACCESS_FIELDS <= set(batch), ACCESS_FIELDS - set(batch)
        assert batch["access"] is True and re.fullmatch(r"[0-9a-f]{16}", batch["batch_id"])
        assert batch["client_address"].startswith("127.0.0.1:")
        assert batch["tls_identity"] is None
        assert batch["bytes_in"] > 0 and batch["bytes_out"] > 0 and batch["elapsed_ms"] >= 0
    answered, rejected, refused = batches
    assert (answered["size"], answered["succeeded"], answered["failed"]) == (1, 1, 0)
    assert answered["timed_out"] == 0 and answered["token_name"] == "bidder"
    assert (rejected["size"], rejected["token_name"]) == (0, "bidder")
    assert "not valid JSON" in rejected["error"]
    assert (refused["token_name"], refused["level"]) == (None, "warn")
    # The same events are in the log, once each.
    assert [r["batch_id"] for r in records if r.get("access")] == [b["batch_id"] for b in batches]


@pytest_twisted.ensureDeferred
async def test_logs_rotate_by_size_and_keep_a_bounded_number(
    tmp_path: Path, upstream: Upstream
) -> None:
    """With --log-max-bytes 1 and --log-keep 2, path, path.1 and path.2 remain, no more."""
    port = free_port()
    log, access, output = tmp_path / "octoplex.log", tmp_path / "access.log", tmp_path / "out"
    process = spawn(
        port, output, "--log-file", str(log), "--access-log", str(access),
        "--log-max-bytes", "1", "--log-keep", "2",
    )  # fmt: skip
    client = Client(f"http://127.0.0.1:{port}")
    try:
        await client.healthy()
        for _ in range(4):
            assert (await client.post(_batch(upstream)))[0] == 200
        await terminate(process, output)
    finally:
        stop(process)

    for path in (log, access):
        names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(path.name))
        assert names == [path.name, f"{path.name}.1", f"{path.name}.2"]
        for kept in (path, Path(f"{path}.1"), Path(f"{path}.2")):
            # Each write finds the file past 1 byte and rotates it first.
            assert len(read_json_lines(kept)) == 1


@pytest_twisted.ensureDeferred
async def test_sigusr1_reopens_the_logs_after_a_move(tmp_path: Path, upstream: Upstream) -> None:
    """After logrotate's move, SIGUSR1 makes the daemon write to new files at the paths."""
    port = free_port()
    log, access, output = tmp_path / "octoplex.log", tmp_path / "access.log", tmp_path / "out"
    process = spawn(port, output, "--log-file", str(log), "--access-log", str(access))
    client = Client(f"http://127.0.0.1:{port}")
    try:
        await client.healthy()
        assert (await client.post(_batch(upstream)))[0] == 200
        log.rename(tmp_path / "octoplex.log.moved")
        access.rename(tmp_path / "access.log.moved")
        process.send_signal(signal.SIGUSR1)
        await wait_for(lambda: log.exists() and "reopened" in log.read_text())
        assert access.exists()
        assert (await client.post(_batch(upstream)))[0] == 200
        await terminate(process, output)
    finally:
        stop(process)

    old = read_json_lines(tmp_path / "access.log.moved")
    new = read_json_lines(access)
    assert len(old) == 1 and len(new) == 1 and old[0]["batch_id"] != new[0]["batch_id"]
    records = read_json_lines(log)
    assert [r["batch_id"] for r in records if r.get("access")] == [new[0]["batch_id"]]
    assert records[-1]["message"] == "Server Shut Down."
    assert not [
        r for r in read_json_lines(tmp_path / "octoplex.log.moved") if "Shut" in r["message"]
    ]


@pytest_twisted.ensureDeferred
async def test_log_level_and_text_format(tmp_path: Path, upstream: Upstream) -> None:
    """--log-level warn keeps info out of the text log; the access log still has every batch."""
    port = free_port()
    log, access, output = tmp_path / "octoplex.log", tmp_path / "access.log", tmp_path / "out"
    process = spawn(
        port, output, "--log-file", str(log), "--access-log", str(access),
        "--log-level", "warn", "--log-format", "text", "--api-token", f"bidder={TOKEN}",
    )  # fmt: skip
    client = Client(f"http://127.0.0.1:{port}")
    try:
        await client.healthy()
        assert (await client.post(_batch(upstream)))[0] == 200
        assert (await client.post(_batch(upstream), token=None))[0] == 401
        await terminate(process, output)
    finally:
        stop(process)

    lines = log.read_text().splitlines()
    assert lines, "the warning is missing"
    assert all(re.match(r"^\d{4}-\d\d-\d\dT\S+ \[\S+#(warn|error|critical)\] ", x) for x in lines)
    assert any("refused: this server needs an Authorization" in x for x in lines)
    assert not [x for x in lines if "listening on" in x or "1 succeeded" in x]
    assert [b["status"] for b in read_json_lines(access)] == [200, 401]


@pytest_twisted.ensureDeferred
async def test_daemonized_twistd_logs_only_to_the_log_file(
    tmp_path: Path, upstream: Upstream
) -> None:
    """twistd without -n: the daemon logs JSON to --log-file, and no twistd.log appears."""
    port = free_port()
    log, output = tmp_path / "octoplex.log", tmp_path / "out"
    launcher = spawn(port, output, "--log-file", str(log), cwd=tmp_path, daemon=True)
    # The launcher exits once the daemon has started its services.
    assert await wait_for_exit(launcher, 30.0) == 0, output.read_text()
    pid = int((tmp_path / "twistd.pid").read_text())
    client = Client(f"http://127.0.0.1:{port}")
    try:
        await client.healthy()
        assert (await client.post(_batch(upstream), token=None))[0] == 200
        os.kill(pid, signal.SIGTERM)
        await wait_for(lambda: not _alive(pid), EXIT_TIMEOUT)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

    assert output.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["octoplex.log", "out"]
    records = read_json_lines(log)
    assert any("listening on" in r["message"] for r in records)
    assert [r["status"] for r in records if r.get("access")] == [200]
    assert records[-1]["message"] == "Server Shut Down."


@pytest_twisted.ensureDeferred
async def test_every_operator_event_is_in_the_log(tmp_path: Path, upstream: Upstream) -> None:
    """
    The JSON log holds, with their fields: start-up with the settings in
    force, a deadline expiry naming what was pending, an egress refusal, a
    shed batch, a reload, and the drained shutdown.
    """
    port = free_port()
    log, output = tmp_path / "octoplex.log", tmp_path / "out"
    config = tmp_path / "octoplex.toml"
    config.write_text("[limits]\nmax_batches_in_flight = 1\n")
    process = spawn(port, output, "--log-file", str(log), "--config", str(config))
    client = Client(f"http://127.0.0.1:{port}")
    try:
        await client.healthy()
        slow = {
            "timeout_msec": 300,
            "requests": [
                {"uri": upstream.url + "/delay/2000"},
                {"uri": "http://169.254.169.254/latest/meta-data/"},
            ],
        }
        first = Deferred.fromCoroutine(client.post(slow, token=None))
        # In flight once the upstream has its request: the next is shed.
        await wait_for(lambda: "/delay/2000" in upstream.resource.arrivals, 15.0)
        shed_status, _ = await client.post(_batch(upstream), token=None)
        status, answer = await first
        config.write_text("[limits]\nmax_batches_in_flight = 5\n")
        process.send_signal(signal.SIGHUP)
        await wait_for(lambda: "configuration reloaded" in log.read_text())
        await terminate(process, output)
    finally:
        stop(process)
    assert (shed_status, status) == (503, 200)
    assert answer["responses"][0]["Failure"]["error"] == "timeout elapsed"
    records = read_json_lines(log)

    def one(fragment: str) -> dict[str, Any]:
        found = [r for r in records if fragment in r["message"]]
        assert len(found) == 1, (fragment, [r["message"] for r in records])
        return found[0]

    start = one("listening on")
    assert start["version"] and start["listen"] == [f"tcp:{port}:interface=127.0.0.1"]
    assert start["configuration"]["max-batches-in-flight"] == 1
    assert start["config_file"] == str(config)
    expiry = one("deadline of 300 ms expired")
    assert expiry["level"] == "warn"
    assert expiry["pending_uris"] == [upstream.url + "/delay/2000"]
    refusal = one("egress refused")
    assert refusal["host"] == "169.254.169.254" and refusal["egress_refused"] is True
    shed = one("shed")
    assert shed["shed_total"] == 1 and shed["status"] == 503
    reload = one("configuration reloaded")
    assert reload["applied"] == ["max-batches-in-flight"] and reload["restart"] == []
    assert one("stopping: draining")["in_flight"] == 0
    assert "drained_ms" in one("stopped:")


def test_text_lines_are_twisteds_classic_lines_with_the_stamp_formatted_once_a_second() -> None:
    """The per-second timestamp cache writes exactly twistd's lines, across seconds."""
    from twisted.logger import formatEventAsClassicLogText, formatTime

    from octoplex.logs import _text_line

    base = 1_795_000_000.25
    for when in (base, base + 0.5, base + 1.0, base + 1.9, base + 3600, None):
        event = {
            "log_format": "batch {batch_id} answered",
            "log_level": LogLevel.info,
            "log_namespace": "octoplex.web.OctoplexApp",
            "log_time": when,
            "batch_id": "9e67",
        }
        assert _text_line(event) == formatEventAsClassicLogText(event).encode(), when
    # Other shapes, built here or left to Twisted: a system, no level, two
    # lines, non-ASCII, a conversion and a spec, a missing or called field,
    # an empty template, no template, a failure.
    failure = Failure(ZeroDivisionError("division by zero"))
    for more in (
        {"log_system": "worker 1"},
        {"log_level": None},
        {"log_format": "two\nlines {batch_id!r} {n:>5}", "n": 3},
        {"log_format": "caf\u00e9 \U0001f600 {batch_id}"},
        {"log_format": "{missing} field"},
        {"log_format": "{batch_id.upper()}"},
        {"log_format": ""},
        {"log_format": None, "message": ("legacy",)},
        {"log_failure": failure},
    ):
        event = {
            "log_format": "batch {batch_id} answered",
            "log_level": LogLevel.warn,
            "log_namespace": "octoplex.web.OctoplexApp",
            "log_time": base,
            "batch_id": "9e67",
            **more,
        }
        expected = formatEventAsClassicLogText(event, formatTime=formatTime)
        assert _text_line(event) == (
            None if expected is None else expected.encode("utf-8", "backslashreplace")
        ), more
