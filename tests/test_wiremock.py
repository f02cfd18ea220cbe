"""
Octoplex against WireMock, the original project's test target: a real
third-party HTTP server (Jetty) with stubbed answers, fixed delays and wire
faults, run from its standalone jar.

The jar comes from the npm package ``wiremock``; ``WIREMOCK_JAR`` names it
(tox sets it).  Without the jar or without ``java`` these tests fail, with
a message saying how to install them: they are never skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attr
import pytest
import pytest_twisted

from .servers import Caller, Octoplex

#: The mappings and ``__files`` WireMock serves: ``wiremock/mappings/*.json``.
ROOT_DIR = Path(__file__).parent / "wiremock"

WIREMOCK_VERSION = "3.13.2"

HOW_TO_INSTALL = (
    f"run `npm install wiremock@{WIREMOCK_VERSION}` and set WIREMOCK_JAR to "
    f"node_modules/wiremock/build/wiremock-standalone-{WIREMOCK_VERSION}.jar "
    "(tox does both; `java` 11 or later must be on PATH or in JAVA_HOME)"
)

#: JVM start-up is slow on a small shared machine.
STARTUP_TIMEOUT = 60.0

#: Honest slack over a batch's deadline for the whole answer to arrive.
SLACK = 0.4


@attr.s(auto_attribs=True)
class WireMock:
    """
    A running WireMock: its base URLs, or why it could not be started.

    Reading :attr:`url` or :attr:`https_url` fails the calling test when
    WireMock is not running, so a missing jar or ``java`` shows as a failed
    test, not a skipped one.
    """

    base_url: str | None
    problem: str | None = None
    https_base_url: str | None = None

    @property
    def url(self) -> str:
        if self.base_url is None:
            pytest.fail(f"WireMock is not running: {self.problem}", pytrace=False)
        return self.base_url

    @property
    def https_url(self) -> str:
        base_url = self.url
        if self.https_base_url is None:
            pytest.fail(f"WireMock at {base_url} was started without an HTTPS port", pytrace=False)
        return self.https_base_url


def _java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("java")


def _tail(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return text[-2000:] or "<no output>"


def _printed_port(log: Path, name: str) -> str | None:
    # With --port 0 (--https-port 0) WireMock prints the port it bound,
    # `port: 45417` (`https-port: 45749`).
    found = re.search(rf"^{name}:\s+(\d+)\s*$", log.read_text(errors="replace"), re.M)
    return found.group(1) if found else None


def _wait_until_ready(
    process: subprocess.Popen[bytes], log: Path, https: bool, deadline: float
) -> WireMock:
    """
    Wait for WireMock to print the port(s) it chose, then for its health
    check to answer.  Raise ``RuntimeError`` on a timeout or an early exit.
    """
    base_url = https_base_url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"WireMock exited with {process.returncode}:\n{_tail(log)}")
        if base_url is None:
            port = _printed_port(log, "port")
            if port is not None:
                base_url = f"http://127.0.0.1:{port}"
        if https and https_base_url is None:
            port = _printed_port(log, "https-port")
            if port is not None:
                https_base_url = f"https://127.0.0.1:{port}"
        if base_url is not None and (https_base_url is not None or not https):
            try:
                with urllib.request.urlopen(base_url + "/__admin/health", timeout=2) as answer:
                    if answer.status == 200:
                        return WireMock(base_url, https_base_url=https_base_url)
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.1)
    raise RuntimeError(
        f"WireMock was not ready within {STARTUP_TIMEOUT:.0f} s "
        f"(base URL {base_url}, HTTPS base URL {https_base_url}):\n{_tail(log)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _missing() -> str | None:
    """
    Why WireMock cannot be run here, or ``None`` if it can.
    """
    jar = os.environ.get("WIREMOCK_JAR")
    if not jar:
        return f"WIREMOCK_JAR is not set; {HOW_TO_INSTALL}"
    if not Path(jar).is_file():
        return f"WIREMOCK_JAR={jar} is not a file; {HOW_TO_INSTALL}"
    if _java() is None:
        return f"`java` was not found on PATH or in JAVA_HOME; {HOW_TO_INSTALL}"
    return None


@contextmanager
def running_wiremocks(*extra_arguments: Sequence[str]) -> Iterator[list[WireMock]]:
    """
    Start one WireMock on 127.0.0.1 with the mappings of ``tests/wiremock``
    for each list of extra command-line arguments, all at once (a JVM takes
    seconds to start), and always stop them all afterwards.  A WireMock
    started with ``--https-port`` gets its :attr:`WireMock.https_url`.

    A WireMock that could not be started is yielded with its problem.
    """
    problem = _missing()
    if problem is not None:
        yield [WireMock(None, problem) for _ in extra_arguments]
        return
    java, jar = _java(), os.environ["WIREMOCK_JAR"]
    assert java is not None
    with tempfile.TemporaryDirectory(prefix="wiremock-") as scratch:
        started: list[tuple[subprocess.Popen[bytes], Path, bool]] = []
        try:
            for index, extra in enumerate(extra_arguments):
                directory = Path(scratch) / str(index)
                directory.mkdir()
                log = directory / "wiremock.log"
                command = [
                    java,
                    "-jar",
                    jar,
                    "--port",
                    "0",
                    "--bind-address",
                    "127.0.0.1",
                    "--root-dir",
                    str(ROOT_DIR),
                    "--disable-banner",
                    "--no-request-journal",
                    "--disable-request-logging",
                    "--disable-extensions-scanning",
                    "--async-response-enabled",
                    "true",
                    *extra,
                ]
                with log.open("wb") as output:
                    process = subprocess.Popen(
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        cwd=directory,
                    )
                started.append((process, log, "--https-port" in extra))
            deadline = time.monotonic() + STARTUP_TIMEOUT
            servers = []
            for process, log, https in started:
                try:
                    servers.append(_wait_until_ready(process, log, https, deadline))
                except RuntimeError as e:
                    servers.append(WireMock(None, str(e)))
            yield servers
        finally:
            for process, _, _ in started:
                _stop(process)


@pytest.fixture(scope="module")
def wiremock() -> Iterator[WireMock]:
    """
    WireMock on 127.0.0.1 with the mappings of ``tests/wiremock``, started
    once for the module and always stopped after it.
    """
    with running_wiremocks([]) as [server]:
        yield server


def _batch(timeout_msec: int, uris: list[str]) -> dict[str, Any]:
    return {"timeout_msec": timeout_msec, "requests": [{"uri": uri} for uri in uris]}


def _success(outcome: dict[str, Any]) -> dict[str, Any]:
    assert list(outcome) == ["Success"], outcome
    return outcome["Success"]


def _failure(outcome: dict[str, Any]) -> dict[str, Any]:
    assert list(outcome) == ["Failure"], outcome
    return outcome["Failure"]


def _assert_hello(outcome: dict[str, Any]) -> None:
    success = _success(outcome)
    assert success["status"] == 200
    assert success["content"] == "Hello world!"


@pytest_twisted.ensureDeferred
async def test_hello(wiremock: WireMock, octoplex: Octoplex, caller: Caller) -> None:
    """WireMock's /hello comes back as a Success with its status, body and lowercase headers."""
    status, _, body = await caller.post(
        octoplex.url + "/multiplex", _batch(5000, [wiremock.url + "/hello"])
    )
    assert status == 200
    [outcome] = body["responses"]
    _assert_hello(outcome)
    headers = _success(outcome)["headers"]
    assert all(name == name.lower() for name in headers), headers
    assert headers["content-type"] == "text/plain"
    # Proof that WireMock's stub, not some other server, answered.
    assert "matched-stub-id" in headers
    assert 0 <= _success(outcome)["duration_msec"] < 5000


@pytest_twisted.ensureDeferred
async def test_fixed_delay_is_honoured(
    wiremock: WireMock, octoplex: Octoplex, caller: Caller
) -> None:
    """Given time, /slow succeeds after WireMock's 1000 ms fixed delay."""
    status, _, body = await caller.post(
        octoplex.url + "/multiplex", _batch(5000, [wiremock.url + "/slow"])
    )
    assert status == 200
    success = _success(body["responses"][0])
    assert (success["status"], success["content"]) == (200, "slow")
    assert 1000 <= success["duration_msec"] < 3000


@pytest_twisted.ensureDeferred
async def test_deadline_cuts_off_the_delayed_stub(
    wiremock: WireMock, octoplex: Octoplex, caller: Caller
) -> None:
    """With a 200 ms deadline, /slow times out, /hello succeeds, and the answer is on time."""
    url = octoplex.url + "/multiplex"
    started = time.monotonic()
    status, _, body = await caller.post(
        url, _batch(200, [wiremock.url + "/slow", wiremock.url + "/hello"])
    )
    elapsed = time.monotonic() - started
    assert status == 200
    assert 0.2 <= elapsed < 0.2 + SLACK, elapsed
    slow, hello = body["responses"]
    failure = _failure(slow)
    assert failure["error"] == "timeout elapsed"
    assert 200 <= failure["duration_msec"] < 200 + SLACK * 1000
    _assert_hello(hello)
    # Octoplex keeps serving, through the same pool, after the cut-off.
    status, _, body = await caller.post(url, _batch(5000, [wiremock.url + "/hello"]))
    assert status == 200
    _assert_hello(body["responses"][0])


@pytest_twisted.ensureDeferred
async def test_faults_are_failures_of_their_own_item(
    wiremock: WireMock, octoplex: Octoplex, caller: Caller
) -> None:
    """Each WireMock wire fault fails only its own item; a 503 is a Success with status 503."""
    uris = [
        wiremock.url + "/fault/reset",
        wiremock.url + "/hello",
        wiremock.url + "/fault/garbage",
        wiremock.url + "/fault/empty",
        wiremock.url + "/unavailable",
        wiremock.url + "/hello",
    ]
    status, _, body = await caller.post(octoplex.url + "/multiplex", _batch(5000, uris))
    assert status == 200
    reset, hello, garbage, empty, unavailable, hello2 = body["responses"]
    # CONNECTION_RESET_BY_PEER: an RST before any response.
    reset_error = _failure(reset)["error"]
    assert "lost or reset before sending a response" in reset_error, reset_error
    # RANDOM_DATA_THEN_CLOSE: 36 bytes with no line end (so never a status
    # line), then a FIN.  Twisted reports that as a ResponseFailed (data came,
    # then the connection closed), not as a parse error.
    garbage_error = _failure(garbage)["error"]
    assert (
        "upstream closed the connection" in garbage_error
        or "upstream sent an invalid HTTP response" in garbage_error
    ), garbage_error
    # EMPTY_RESPONSE: a FIN without a byte.
    empty_error = _failure(empty)["error"]
    assert "closed the connection before sending a response" in empty_error, empty_error
    assert len({reset_error, garbage_error, empty_error, "timeout elapsed"}) == 4
    for fault in (reset, garbage, empty):
        assert 0 <= _failure(fault)["duration_msec"] < 5000
    _assert_hello(hello)
    _assert_hello(hello2)
    unavailable_success = _success(unavailable)
    assert unavailable_success["status"] == 503
    assert unavailable_success["content"] == "Service Unavailable"


@pytest_twisted.ensureDeferred
async def test_twenty_in_one_batch(wiremock: WireMock, octoplex: Octoplex, caller: Caller) -> None:
    """A batch of 20 requests to one WireMock all succeed, in order, through the shared pool."""
    uris = [f"{wiremock.url}/hello?n={n}" for n in range(20)]
    status, _, body = await caller.post(octoplex.url + "/multiplex", _batch(10000, uris))
    assert status == 200
    assert len(body["responses"]) == 20
    for outcome in body["responses"]:
        _assert_hello(outcome)
