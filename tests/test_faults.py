"""
Fault injection over real sockets on 127.0.0.1: nothing lost, nothing
leaked, and the daemon keeps serving.

The daemon is the real ``twistd octoplex``, run once for the module as a
subprocess (started as :mod:`tests.test_twistd` starts it), so that the
open file descriptors (``/proc/PID/fd``) and resident memory (``VmRSS``)
measured are the daemon's alone. Every case mixes a faulty item with a
normal ``/hello`` item, or sends the daemon a faulty batch, and checks
three things:

1. the exact outcome of every item: the fault fails its own item with the
   sentence that names it, and the ``/hello`` beside it succeeds (or, for a
   faulty batch, the exact status and error, and that nothing was sent
   upstream);
2. the daemon then answers a normal batch;
3. its file descriptors come back to their baseline, exactly, and its
   memory stays within :data:`RSS_SLACK` of its baseline.

The baseline is taken after a warm-up batch. It includes the one pooled
keep-alive connection to the normal upstream: every batch here holds one
``/hello`` at most, so the pool never needs a second, and the daemon keeps
idle connections for :data:`POOL_IDLE` seconds, longer than the module
runs, so that one is not closed half-way either. Each faulty upstream
records its connections, and a case also checks that none is left open.

Callers misbehave too: bad JSON, wrong types, 100 MB bodies, a body cut
short, a caller hanging up mid-batch, slowloris heads and 1,000 idle
connections, against the daemon's short --header-timeout and
--idle-timeout and a --max-connections just above those 1,000.

A response that the parser (llhttp, through octoplex.http11) rejects reads
"upstream sent an invalid HTTP response: " with llhttp's reason and the
line it was reading; a 413 closes lingering, so a caller still writing its
body reads the answer rather than a reset.

The daemon asks a name server the module runs on 127.0.0.1
(``--dns-server``), never those of ``/etc/resolv.conf``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import attr
import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IPullProducer
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThread
from twisted.names import dns
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from .schema import check_answer
from .servers import Caller, Upstream, _CountingSite, _Upstream, full_backlog
from .test_twistd import (
    free_port,
    sleep,
    spawn_twistd,
    stop,
    wait_until_healthy,
    within,
)
from .test_upstream_tls import _leaf_options, _serve

#: The daemon's --max-response-bytes: small, so an endless body reaches it fast.
MAX_RESPONSE_BYTES = 1024 * 1024

#: The daemon's --max-request-bytes (the default, given so the tests can name it).
MAX_REQUEST_BYTES = 8 * 1024 * 1024

#: The daemon's --pool-idle-timeout: longer than the module runs, so the
#: pooled connection to the normal upstream (part of the fd baseline) stays.
POOL_IDLE = 600

#: The daemon's --pool-connect-grace: how long a connect cut off by a
#: deadline goes on in the background (a full backlog leaves one pending).
CONNECT_GRACE = 1.0

#: The daemon's --header-timeout: a slowloris caller is cut off after it.
HEADER_TIMEOUT = 1

#: The daemon's --idle-timeout: idle callers are closed after it.
IDLE_TIMEOUT = 3

#: How many idle connections a test holds open at once.
IDLE_CONNECTIONS = 1000

#: Connections opened at once, below the listen backlog (Twisted's default
#: of 50, which ``--listen tcp:PORT`` keeps): past it, Linux drops the SYNs
#: of a burst and each dropped connect waits a second to try again.
WAVE = 40

#: The daemon's --max-connections: the idle connections and one more.
MAX_CONNECTIONS = IDLE_CONNECTIONS + 1

#: How long the fd count may take to come back to its baseline.
SETTLE_TIMEOUT = 5.0

#: The resident memory a case may leave behind over the baseline. Python
#: keeps freed memory in its arenas and malloc does not always hand it back
#: to the system, so RSS is not expected to fall back exactly; 20 MiB is far
#: below what buffering a 100 MB body (or an endless response) would cost,
#: and above the few MiB that allocator slack and the first use of a code
#: path (TLS contexts, the chunked decoder) account for.
RSS_SLACK = 20 * 1024 * 1024

#: Honest slack over a batch's deadline for its answer, on a shared 2-core
#: machine.
SLACK = 0.5

#: 100 MB, the body a hostile caller streams.
HUGE = 100 * 1024 * 1024

# ---------------------------------------------------------------------------
# The daemon and its normal upstream.
# ---------------------------------------------------------------------------


class _RecordingUpstream(_Upstream):
    """
    The scriptable upstream of :mod:`tests.servers`, recording the path of
    every request it is sent.
    """

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def render(self, request: Request) -> Any:
        self.paths.append(request.path.decode())
        return super().render(request)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fds(pid: int) -> list[str]:
    """
    What ``pid``'s descriptors point at, for a failure message.
    """
    shown = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            shown.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return shown


def _rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "06": "TIME_WAIT", "08": "CLOSE_WAIT"}


def _tcp_states(pid: int, port: int) -> list[str]:
    """
    The states of ``pid``'s IPv4 TCP sockets to remote port ``port``.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match.group(1))
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if inode in inodes and int(remote.split(":")[1], 16) == port:
            states.append(_TCP_STATES.get(state, state))
    return states


async def eventually(check: Callable[[], bool], seconds: float, what: Callable[[], str]) -> None:
    """
    Poll ``check`` until it holds, failing with ``what()`` after ``seconds``.
    """
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what()}"
        await sleep(0.02)


def assert_hello(outcome: dict[str, Any]) -> None:
    assert list(outcome) == ["Success"], outcome
    assert outcome["Success"]["status"] == 200
    assert outcome["Success"]["content"] == "Hello world!"


def failure(outcome: dict[str, Any], kind: str) -> str:
    """
    The error of a Failure outcome of ``kind``; fail if it is not one.
    """
    assert list(outcome) == ["Failure"], outcome
    assert sorted(outcome["Failure"]) == ["duration_msec", "error", "kind"], outcome
    assert outcome["Failure"]["kind"] == kind, outcome
    assert isinstance(outcome["Failure"]["duration_msec"], int)
    error: str = outcome["Failure"]["error"]
    return error


@attr.s(auto_attribs=True)
class Watched:
    """
    An Octoplex whose process's fds and memory are checked after each case.

    :ivar pid: the process it runs in.
    :ivar url: its base URL.
    :ivar hello: the normal upstream's ``/hello`` URL.
    :ivar upstream: the normal upstream's resource, which records requests.
    :ivar logfile: its log, when it writes one.
    """

    pid: int
    url: str
    hello: str
    upstream: _RecordingUpstream
    caller: Caller = attr.Factory(Caller)
    logfile: Path | None = None
    baseline_fds: int = 0
    baseline_rss: int = 0
    _log_offset: int = 0

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def multiplex(self, *items: Any, timeout_msec: int = 3000) -> list[dict[str, Any]]:
        """
        POST a batch of ``items`` (URIs or request objects); return its
        outcomes, having checked that it was answered by its deadline.
        """
        requests = [{"uri": item} if isinstance(item, str) else item for item in items]
        document = {"timeout_msec": timeout_msec, "requests": requests}
        started = time.monotonic()
        status, _, body = await within(
            timeout_msec / 1000 + 5, self.caller.post(self.url + "/multiplex", document)
        )
        elapsed = time.monotonic() - started
        assert status == 200, body
        assert elapsed < timeout_msec / 1000 + SLACK, elapsed
        outcomes: list[dict[str, Any]] = body["responses"]
        assert len(outcomes) == len(items)
        return outcomes

    async def take_baseline(self) -> None:
        [hello] = await self.multiplex(self.hello)
        assert_hello(hello)
        # Let the caller's connection close on the server's side too: the
        # baseline is the count once it has stayed put for 0.2 s.
        deadline = time.monotonic() + SETTLE_TIMEOUT
        previous = -1
        while (count := _fd_count(self.pid)) != previous:
            assert time.monotonic() < deadline, "the fd count did not settle"
            previous = count
            await sleep(0.2)
        self.baseline_fds = count
        self.baseline_rss = _rss(self.pid)
        self._log_offset = self._log_size()

    def _log_size(self) -> int:
        return 0 if self.logfile is None else self.logfile.stat().st_size

    def new_log(self) -> str:
        """
        What the daemon logged since the last check.
        """
        if self.logfile is None:
            return ""
        with self.logfile.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("utf-8", "replace")

    async def check_recovered(self) -> None:
        """
        Checks 2 and 3: a normal batch succeeds, the fds come back to the
        baseline, memory stays within RSS_SLACK of its baseline, and the log
        holds no traceback.
        """
        [hello] = await self.multiplex(self.hello)
        assert_hello(hello)
        await eventually(
            lambda: _fd_count(self.pid) == self.baseline_fds,
            SETTLE_TIMEOUT,
            lambda: (
                f"{_fd_count(self.pid)} fds open, {self.baseline_fds} at the baseline: "
                f"{_fds(self.pid)}"
            ),
        )
        growth = _rss(self.pid) - self.baseline_rss
        assert growth < RSS_SLACK, f"RSS grew by {growth / 2**20:.1f} MiB"
        log = self.new_log()
        assert "Traceback" not in log, log
        assert "Unhandled" not in log, log
        self._log_offset = self._log_size()


@pytest.fixture(scope="module")
def normal_upstream() -> Iterator[tuple[Upstream, _RecordingUpstream]]:
    """
    The scriptable upstream, recording requests, for the whole module.
    """
    resource = _RecordingUpstream()
    site = _CountingSite(resource)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    upstream = Upstream(f"http://127.0.0.1:{port.getHost().port}", site, resource, port)
    yield upstream, resource
    pytest_twisted.blockon(upstream.stop())


class _NameServer(DatagramProtocol):
    """
    A UDP name server: ``ok.test`` is 127.0.0.1 (no AAAA), ``broken.test``
    gets SERVFAIL and every other name NXDOMAIN.

    :ivar asked: the names queried.
    """

    noisy = False

    def __init__(self) -> None:
        self.asked: list[str] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        query = dns.Message()
        query.fromStr(datagram)
        [question] = query.queries
        name = question.name.name.decode("ascii").lower()
        self.asked.append(name)
        answer = dns.Message(id=query.id, answer=1, opCode=query.opCode, recDes=1, recAv=1)
        answer.queries = query.queries
        if name == "ok.test":
            if question.type == dns.A:
                record = dns.Record_A("127.0.0.1", 60)
                answer.answers = [dns.RRHeader(name, dns.A, dns.IN, 60, record)]
        elif name == "broken.test":
            answer.rCode = dns.ESERVER
        else:
            answer.rCode = dns.ENAME
        assert self.transport is not None
        self.transport.write(answer.toStr(), addr)


@pytest.fixture(scope="module")
def name_server() -> Iterator[tuple[_NameServer, int]]:
    """
    The name server the daemon asks (--dns-server), on 127.0.0.1.
    """
    server = _NameServer()
    port = reactor.listenUDP(0, server, interface="127.0.0.1")
    yield server, port.getHost().port
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory,
    normal_upstream: tuple[Upstream, _RecordingUpstream],
    name_server: tuple[_NameServer, int],
) -> Iterator[Watched]:
    """
    ``twistd octoplex`` on a free port of 127.0.0.1, its baseline taken.
    """
    directory = tmp_path_factory.mktemp("faults")
    logfile = directory / "octoplex.log"
    output = directory / "output.txt"
    port = free_port()
    process = spawn_twistd(
        port,
        logfile,
        output,
        "--max-response-bytes",
        str(MAX_RESPONSE_BYTES),
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--pool-idle-timeout",
        str(POOL_IDLE),
        "--pool-connect-grace",
        str(CONNECT_GRACE),
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--idle-timeout",
        str(IDLE_TIMEOUT),
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--dns-server",
        f"127.0.0.1:{name_server[1]}",
    )
    try:
        upstream, resource = normal_upstream
        url = f"http://127.0.0.1:{port}"
        watched = Watched(process.pid, url, upstream.url + "/hello", resource, logfile=logfile)
        pytest_twisted.blockon(
            Deferred.fromCoroutine(wait_until_healthy(process, watched.caller, url, output))
        )
        pytest_twisted.blockon(Deferred.fromCoroutine(watched.take_baseline()))
        yield watched
        assert process.poll() is None, f"the daemon died: {output.read_text()}"
    finally:
        stop(process)


# ---------------------------------------------------------------------------
# Faulty upstreams: raw TCP servers on 127.0.0.1.
# ---------------------------------------------------------------------------


class _Fault(Protocol):
    """
    Wait for a request (or, with the factory's ``on_first_bytes``, for any
    bytes), then misbehave as the factory's ``behave`` says.

    :ivar lost: why the connection closed, once it has.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._answered = False
        self._calls: list[IDelayedCall] = []
        self.lost: Failure | None = None

    @property
    def _factory(self) -> _FaultFactory:
        return cast(_FaultFactory, self.factory)

    def connectionMade(self) -> None:
        self._factory.protocols.append(self)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self._answered:
            return
        if self._factory.on_first_bytes or b"\r\n\r\n" in self._buffer:
            self._answered = True
            self._factory.behave(self)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def later(self, seconds: float, f: Callable[[], None]) -> None:
        """
        Call ``f`` in ``seconds``, unless the connection is lost first.
        """
        self._calls.append(reactor.callLater(seconds, f))

    def reset(self) -> None:
        """
        Send an RST once what was written has had time to arrive and be
        read: an abort at once would discard it unsent.
        """
        transport: Any = self.transport
        self.later(0.1, transport.abortConnection)

    def close(self) -> None:
        """
        Send a FIN.
        """
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        for call in self._calls:
            if call.active():
                call.cancel()


class _FaultFactory(Factory):
    noisy = False
    protocol = _Fault

    def __init__(self, behave: Callable[[_Fault], None], on_first_bytes: bool) -> None:
        self.behave = behave
        self.on_first_bytes = on_first_bytes
        self.protocols: list[_Fault] = []


@attr.s(auto_attribs=True)
class FaultServer:
    """
    A running faulty upstream.

    :ivar url: a URL of it.
    """

    url: str
    factory: _FaultFactory
    port: IListeningPort

    async def check_all_closed(self) -> None:
        """
        The daemon made one connection, and it is closed now: by the server
        or, where the server leaves it open, by the daemon.
        """
        protocols = self.factory.protocols
        await eventually(
            lambda: all(p.lost is not None for p in protocols),
            SETTLE_TIMEOUT,
            lambda: f"{sum(p.lost is None for p in protocols)} connections still open",
        )
        assert len(protocols) == 1

    async def stop(self) -> None:
        for protocol in self.factory.protocols:
            transport: Any = protocol.transport
            if protocol.lost is None and transport is not None:
                transport.abortConnection()
        await self.port.stopListening()


def start_fault(
    behave: Callable[[_Fault], None], on_first_bytes: bool = False, scheme: str = "http"
) -> FaultServer:
    """
    Start a TCP server on 127.0.0.1 that answers a request by ``behave``.
    """
    factory = _FaultFactory(behave, on_first_bytes)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return FaultServer(f"{scheme}://127.0.0.1:{port.getHost().port}/fault", factory, port)


@contextlib.asynccontextmanager
async def faulty_upstream(
    daemon: Watched,
    behave: Callable[[_Fault], None],
    on_first_bytes: bool = False,
    scheme: str = "http",
) -> AsyncIterator[FaultServer]:
    """
    A faulty upstream (see :func:`start_fault`) for the block's batch.  Once
    the block has run, its connection must be closed; then it is stopped
    (whatever happened) and the daemon must have recovered.
    """
    server = start_fault(behave, on_first_bytes, scheme)
    try:
        yield server
        await server.check_all_closed()
    finally:
        await server.stop()
    await daemon.check_recovered()


@implementer(IPullProducer)
class _Endless:
    """
    Write 64 KiB each time the transport asks for more, for ever.
    """

    CHUNK = b"x" * 65536

    def __init__(self, protocol: _Fault) -> None:
        self._protocol = protocol

    def resumeProducing(self) -> None:
        self._protocol.write(self.CHUNK)

    def stopProducing(self) -> None:
        pass


def write_then(
    data: bytes, end: Callable[[_Fault], None] | None = None
) -> Callable[[_Fault], None]:
    """
    A fault that writes ``data`` (nothing if empty), then ends with ``end``
    (:meth:`_Fault.close` or :meth:`_Fault.reset`), or else leaves the
    connection open for the daemon to close.
    """

    def behave(p: _Fault) -> None:
        if data:
            p.write(data)
        if end is not None:
            end(p)

    return behave


def endless_body(p: _Fault) -> None:
    # No Content-Length and no chunking: the body runs until the connection
    # closes, which the server never does.
    p.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    assert p.transport is not None
    p.transport.registerProducer(_Endless(p), False)


def dribble(p: _Fault) -> None:
    p.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")

    def drip() -> None:
        p.write(b"x")
        p.later(1.0, drip)

    drip()


def never_answers(p: _Fault) -> None:
    pass


# ---------------------------------------------------------------------------
# Upstream faults.
# ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connection_refused(daemon: Watched) -> None:
    """A port nothing listens on fails its item at once; the /hello beside it succeeds."""
    refused = f"http://127.0.0.1:{free_port()}/"
    fault, hello = await daemon.multiplex(refused, daemon.hello)
    assert failure(fault, "connect") == "connection refused by upstream"
    assert fault["Failure"]["duration_msec"] < 1000
    assert_hello(hello)
    await daemon.check_recovered()


INVALID = "upstream sent an invalid HTTP response: "

#: Each faulty upstream speaking HTTP, and its item's exact error: a string,
#: or a pattern where the test asks for more than the daemon says today
#: (see the test's docstring).
UPSTREAM_FAULTS: dict[str, tuple[Callable[[_Fault], None], str | re.Pattern[str], str]] = {
    "reset-mid-headers": (
        write_then(b"HTTP/1.1 200 OK\r\nContent-Type: text/pl", _Fault.reset),
        "connection to upstream was lost or reset before finishing the response headers",
        "connection",
    ),
    "reset-mid-body": (
        write_then(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50, _Fault.reset),
        "connection to upstream was lost or reset while sending the response body",
        "connection",
    ),
    "eof-before-status-line": (
        write_then(b"", _Fault.close),
        "upstream closed the connection before sending a response",
        "connection",
    ),
    "garbage": (
        write_then(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02 not HTTP\r\n\r\n", _Fault.close),
        # llhttp's words vary by version: "Expected HTTP/" (httptools 0.6),
        # "Expected HTTP/, RTSP/ or ICE/" (0.9).
        re.compile(re.escape(INVALID + "Expected HTTP/") + ".* b'SSH-2.0-OpenSSH_9.6'\\Z"),
        "protocol",
    ),
    "status-line-only": (
        write_then(b"HTTP/1.1 200 OK\r\n", _Fault.close),
        "upstream closed the connection before finishing the response headers",
        "connection",
    ),
    "content-length-abc": (
        write_then(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello", _Fault.close),
        INVALID + "Invalid character in Content-Length b'Content-Length: abc'",
        "protocol",
    ),
    "content-length-past-eof": (
        write_then(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10, _Fault.close),
        "upstream closed the connection while sending the response body",
        "connection",
    ),
    "bad-chunk-size": (
        # The server leaves the connection open: the daemon must close it.
        write_then(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nmore\r\n"
        ),
        re.compile(re.escape(INVALID) + "(?i:.*chunk)"),
        "protocol",
    ),
    "endless-body": (
        endless_body,
        f"upstream response body exceeded {MAX_RESPONSE_BYTES} bytes (--max-response-bytes)",
        "too_large",
    ),
}


@pytest.mark.parametrize("name", list(UPSTREAM_FAULTS))
@pytest_twisted.ensureDeferred
async def test_upstream_fault(daemon: Watched, name: str) -> None:
    """
    Each broken upstream fails its own item with the sentence that names the
    fault, once (no retry on a fresh connection), and its connection closed.

    A response the HTTP parser rejects must read "upstream sent an invalid
    HTTP response: ..." as docs/api.md promises, whichever layer of Twisted
    rejected it, and quote what was wrong.
    """
    behave, expected, kind = UPSTREAM_FAULTS[name]
    async with faulty_upstream(daemon, behave) as server:
        fault, hello = await daemon.multiplex(server.url, daemon.hello)
        if isinstance(expected, str):
            assert failure(fault, kind) == expected
        else:
            assert expected.match(failure(fault, kind)), fault
        assert fault["Failure"]["duration_msec"] < 2000
        assert_hello(hello)


@pytest.mark.parametrize("behave", [dribble, never_answers], ids=["dribble", "never-answers"])
@pytest_twisted.ensureDeferred
async def test_slow_upstream_times_out_at_the_deadline(
    daemon: Watched, behave: Callable[[_Fault], None]
) -> None:
    """A body at a byte a second, or no answer at all, times out at the deadline, on time."""
    # The deadline closes the connection: the server never does.
    async with faulty_upstream(daemon, behave) as server:
        started = time.monotonic()
        fault, hello = await daemon.multiplex(server.url, daemon.hello, timeout_msec=1200)
        elapsed = time.monotonic() - started
        assert 1.2 <= elapsed < 1.2 + SLACK, elapsed
        assert failure(fault, "timeout") == "timeout elapsed"
        assert 1200 <= fault["Failure"]["duration_msec"] < 1200 + SLACK * 1000
        assert_hello(hello)


@pytest_twisted.ensureDeferred
async def test_full_backlog_times_out_at_the_deadline(daemon: Watched) -> None:
    """
    A server that never accepts, its backlog full: the daemon's SYN goes
    unanswered, the item times out at the deadline, and the connect still
    pending is given up within --pool-connect-grace.
    """
    with full_backlog() as port:
        await sleep(0.1)
        started = time.monotonic()
        fault, hello = await daemon.multiplex(
            f"http://127.0.0.1:{port}/fault", daemon.hello, timeout_msec=1000
        )
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 1.0 + SLACK, elapsed
        assert failure(fault, "timeout") == "timeout elapsed"
        assert_hello(hello)
        assert _tcp_states(daemon.pid, port) == ["SYN_SENT"]
        # The listener stays, so that the pending connect is given up by the
        # daemon rather than refused by a closed port.
        await daemon.check_recovered()
        assert _tcp_states(daemon.pid, port) == []


PLAIN_ANSWER = (
    "TLS error before sending a response: wrong version number "
    "(the upstream answered in plain text, not TLS: an http:// port?)"
)


@pytest_twisted.ensureDeferred
async def test_tls_handshake_answered_with_plain_http(daemon: Watched) -> None:
    """
    An https upstream that answers the ClientHello with plain HTTP fails
    with a TLS error at once, not at a timeout.
    """
    # The answer to a ClientHello: no TLS record at all. The connection is
    # left open for the daemon to close.
    plain_http = write_then(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    async with faulty_upstream(daemon, plain_http, on_first_bytes=True, scheme="https") as server:
        started = time.monotonic()
        fault, hello = await daemon.multiplex(server.url, daemon.hello, timeout_msec=30_000)
        elapsed = time.monotonic() - started
        assert failure(fault, "tls") == PLAIN_ANSWER
        assert_hello(hello)
        # At once: far from the deadline, or any timeout (slack for a busy machine).
        assert elapsed < 2.0, elapsed


@pytest_twisted.ensureDeferred
async def test_tls_handshake_to_octoplex_plain_listener(daemon: Watched) -> None:
    """
    https:// to an Octoplex plain listener (the daemon's own) fails at once
    with kind tls: the listener refuses a TLS hello as soon as it arrives
    rather than waiting --header-timeout for a request line's end.
    """
    plain = daemon.url.replace("http://", "https://", 1) + "/healthz"
    started = time.monotonic()
    fault, hello = await daemon.multiplex(plain, daemon.hello, timeout_msec=30_000)
    elapsed = time.monotonic() - started
    assert failure(fault, "tls") == PLAIN_ANSWER
    assert_hello(hello)
    # Not --header-timeout (10 s) later: at once (slack for a busy machine).
    assert elapsed < 2.0, elapsed
    await daemon.check_recovered()


@pytest_twisted.ensureDeferred
async def test_tls_untrusted_certificate(daemon: Watched) -> None:
    """An https upstream whose certificate the daemon does not trust fails with why."""
    upstream = _serve(_leaf_options(trustme.CA().issue_cert("127.0.0.1", "localhost")))
    try:
        fault, hello = await daemon.multiplex(upstream.url + "/hello", daemon.hello)
        assert re.fullmatch(
            r"TLS handshake failed: certificate of 127\.0\.0\.1 rejected: its issuer is not "
            r"trusted \(unable to get local issuer certificate\) \(subject OU=Testing cert "
            r"#[-\w]+,O=trustme v[\d.]+, chain depth 0\)",
            failure(fault, "tls"),
        ), fault
        assert_hello(hello)
        await eventually(
            lambda: len(upstream.site.lost) == len(upstream.site.connections) == 1,
            SETTLE_TIMEOUT,
            lambda: f"{upstream.site.connections} opened, {upstream.site.lost} closed",
        )
        # The handshake failed: no request reached the upstream.
        assert upstream.resource.finished_early == []
    finally:
        await upstream.stop()
    await daemon.check_recovered()


# ---------------------------------------------------------------------------
# DNS failures, in-process (see the module's docstring).
# ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_dns_failures(daemon: Watched, name_server: tuple[_NameServer, int]) -> None:
    """NXDOMAIN and SERVFAIL fail their own items with the reason; a good name beside works."""
    server, _ = name_server
    port = int(daemon.hello.split(":")[2].split("/")[0])
    # A name is a pool key of its own: its keep-alive connection, once
    # made, stays pooled (--pool-idle-timeout), so it joins the baseline.
    [warm] = await daemon.multiplex(f"http://ok.test:{port}/hello")
    assert_hello(warm)
    await daemon.take_baseline()
    nx, servfail, ok = await daemon.multiplex(
        f"http://nx.test:{port}/hello",
        f"http://broken.test:{port}/hello",
        f"http://ok.test:{port}/hello",
    )
    assert failure(nx, "dns") == "DNS lookup for nx.test failed: NXDOMAIN (the name does not exist)"
    assert (
        failure(servfail, "dns")
        == "DNS lookup for broken.test failed: SERVFAIL (the name server failed)"
    )
    assert_hello(ok)
    await daemon.check_recovered()
    # Every query went to the test's own name server.
    assert set(server.asked) == {"ok.test", "nx.test", "broken.test"}


# ---------------------------------------------------------------------------
# Client faults.
# ---------------------------------------------------------------------------


def _fill(template: Any, hello: str) -> Any:
    """
    ``template`` with every ``"HELLO"`` replaced by ``hello``.
    """
    if template == "HELLO":
        return hello
    if isinstance(template, list):
        return [_fill(item, hello) for item in template]
    if isinstance(template, dict):
        return {key: _fill(value, hello) for key, value in template.items()}
    return template


async def _rejected(daemon: Watched, body: bytes, status: int, error: str) -> None:
    """
    POST ``body``: it gets ``status`` with ``error``, and nothing is sent upstream.
    """
    sent = len(daemon.upstream.paths)
    answer = await within(5, daemon.caller.post(daemon.url + "/multiplex", body))
    assert (answer[0], answer[2]) == (status, {"error": error})
    await daemon.check_recovered()
    # Only check_recovered's own /hello went upstream.
    assert daemon.upstream.paths[sent:] == ["/hello"]


BAD_JSON = {
    "malformed": (
        b'{"timeout_msec": 1000, "requests": [}',
        "request body is not valid JSON: Expecting value: line 1 column 37 (char 36)",
    ),
    "truncated": (
        b'{"timeout_msec": 1000, "requests": [{"uri": "http://127.0.0.1/hello"}',
        "request body is not valid JSON: Expecting ',' delimiter: line 1 column 70 (char 69)",
    ),
    "nested-10000-deep": (
        b'{"timeout_msec": 1000, "requests": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        "request body nests JSON too deeply",
    ),
}


@pytest.mark.parametrize("name", list(BAD_JSON))
@pytest_twisted.ensureDeferred
async def test_bad_json_is_a_400(daemon: Watched, name: str) -> None:
    """Malformed, truncated and deeply nested JSON get 400 with what is wrong; nothing is sent."""
    body, error = BAD_JSON[name]
    await _rejected(daemon, body, 400, error)


#: A valid item, then one with a wrong type: the whole batch is refused.
WRONG_TYPES: dict[str, tuple[Any, str]] = {
    "timeout_msec-string": (
        {"timeout_msec": "1000", "requests": [{"uri": "HELLO"}]},
        'timeout_msec must be a whole number of milliseconds, got "1000"',
    ),
    "timeout_msec-float": (
        {"timeout_msec": 1000.5, "requests": [{"uri": "HELLO"}]},
        "timeout_msec must be a whole number of milliseconds, got 1000.5",
    ),
    "timeout_msec-bool": (
        {"timeout_msec": True, "requests": [{"uri": "HELLO"}]},
        "timeout_msec must be a whole number of milliseconds, got true",
    ),
    "timeout_msec-null": (
        {"timeout_msec": None, "requests": [{"uri": "HELLO"}]},
        "timeout_msec must be a whole number of milliseconds, got null",
    ),
    "requests-object": (
        {"timeout_msec": 1000, "requests": {"uri": "x"}},
        'requests must be an array, got {"uri": "x"}',
    ),
    "requests-string": (
        {"timeout_msec": 1000, "requests": "HELLO"},
        "requests must be an array, got ",
    ),
    "request-string": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, "x"]},
        'requests[1] must be a JSON object, got "x"',
    ),
    "method-number": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "method": 1}]},
        "requests[1].method must be a string, got 1",
    ),
    "method-null": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "method": None}]},
        "requests[1].method must be a string, got null",
    ),
    "uri-number": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": 80}]},
        "requests[1].uri must be a string, got 80",
    ),
    "uri-array": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": ["x"]}]},
        'requests[1].uri must be a string, got ["x"]',
    ),
    "headers-array": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "headers": []}]},
        "requests[1].headers must be an object, got []",
    ),
    "headers-string": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "headers": "a"}]},
        'requests[1].headers must be an object, got "a"',
    ),
    "header-value-number": (
        {
            "timeout_msec": 1000,
            "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "headers": {"X-A": 1}}],
        },
        'requests[1].headers["X-A"] must be a string or an array of strings, got 1',
    ),
    "header-value-null": (
        {
            "timeout_msec": 1000,
            "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "headers": {"X-A": None}}],
        },
        'requests[1].headers["X-A"] must be a string or an array of strings, got null',
    ),
    "header-value-list-of-numbers": (
        {
            "timeout_msec": 1000,
            "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "headers": {"X-A": ["a", 2]}}],
        },
        'requests[1].headers["X-A"] must be a string or an array of strings, got ["a", 2]',
    ),
    "id-number": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "id": 7}]},
        "requests[1].id must be a string, got 7",
    ),
    "id-empty": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "id": ""}]},
        "requests[1].id is 0 characters long; between 1 and 256 are allowed",
    ),
    "id-too-long": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "id": "i" * 257}]},
        "requests[1].id is 257 characters long; between 1 and 256 are allowed",
    ),
    "id-duplicate": (
        {
            "timeout_msec": 1000,
            "requests": [{"uri": "HELLO", "id": "a"}, {"uri": "HELLO", "id": "a"}],
        },
        'requests[1].id "a" is already the id of requests[0]; ids must be unique within a batch',
    ),
    "item-timeout-string": (
        {
            "timeout_msec": 1000,
            "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "timeout_msec": "5"}],
        },
        'requests[1].timeout_msec must be a whole number of milliseconds, got "5"',
    ),
    "item-timeout-over-the-limit": (
        {
            "timeout_msec": 1000,
            "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "timeout_msec": 3_600_001}],
        },
        "requests[1].timeout_msec is 3600001; at most 3600000 is allowed",
    ),
    "body-base64-number": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "body_base64": 5}]},
        "requests[1].body_base64 must be a string or null, got 5",
    ),
    "body-and-body-base64": (
        {
            "timeout_msec": 1000,
            "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "body": "a", "body_base64": "YQ=="}],
        },
        "requests[1] has both body and body_base64; give one at most",
    ),
    "defaults-not-an-object": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}], "defaults": []},
        "defaults must be a JSON object, got []",
    ),
    "defaults-unknown-field": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}], "defaults": {"uri": "x"}},
        'unknown field "uri" in defaults; expected method, headers, body, body_base64, base_uri, '
        "retry, hedge, hedge_unsafe",
    ),
    "defaults-header-number": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}], "defaults": {"headers": {"A": 1}}},
        'defaults.headers["A"] must be a string or an array of strings, got 1',
    ),
    "defaults-base-uri-ftp": (
        {
            "timeout_msec": 1000,
            "requests": [{"uri": "HELLO"}],
            "defaults": {"base_uri": "ftp://127.0.0.1/"},
        },
        'defaults.base_uri: URI "ftp://127.0.0.1/" has scheme "ftp"; only http and https '
        "are supported",
    ),
    "max-parallel-zero": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}], "max_parallel": 0},
        "max_parallel must be a whole number from 1 up, got 0",
    ),
    "max-parallel-boolean": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}], "max_parallel": True},
        "max_parallel must be a whole number from 1 up, got true",
    ),
    "retry-times-over-the-limit": (
        {
            "timeout_msec": 1000,
            "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "retry": {"times": 6}}],
        },
        "requests[1].retry.times must be a whole number from 1 to 5, got 6",
    ),
    "retry-status-200": (
        {
            "timeout_msec": 1000,
            "requests": [{"uri": "HELLO", "retry": {"times": 1, "statuses": [200]}}],
        },
        "requests[0].retry.statuses must be an array of statuses from 400 to 599, got [200]",
    ),
    "retry-nothing": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}], "defaults": {"retry": {"times": 1}}},
        "defaults.retry retries nothing; give statuses, connect_errors: true, or both",
    ),
    "option-not-a-boolean": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}], "header_list": 1},
        "header_list must be true or false, got 1",
    ),
    "body-number": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "body": 5}]},
        "requests[1].body must be a string or null, got 5",
    ),
    "body-object": (
        {"timeout_msec": 1000, "requests": [{"uri": "HELLO"}, {"uri": "HELLO", "body": {}}]},
        "requests[1].body must be a string or null, got {}",
    ),
}


@pytest.mark.parametrize("name", list(WRONG_TYPES))
@pytest_twisted.ensureDeferred
async def test_wrong_type_is_a_400(daemon: Watched, name: str) -> None:
    """A wrong type in any field refuses the whole batch with 400 naming it; nothing is sent."""
    template, error = WRONG_TYPES[name]
    document = _fill(template, daemon.hello)
    if name == "requests-string":
        error += json.dumps(daemon.hello)
    await _rejected(daemon, json.dumps(document).encode(), 400, error)


@attr.s(auto_attribs=True)
class Streamed:
    """
    What :func:`stream` saw.

    :ivar sent: the body bytes the connection took.
    :ivar send_error: why sending failed, if it did (a reset, a broken pipe).
    :ivar answer: what came back.
    """

    sent: int
    send_error: str | None
    answer: bytes

    def parsed(self) -> tuple[bytes, dict[str, str], Any]:
        """
        The answer's status line, headers and JSON body.
        """
        head, _, body = self.answer.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines)
        document = json.loads(body)
        check_answer(int(status.split()[1]), document)
        return status.encode(), headers, document


def stream(port: int, head: bytes, pieces: Iterator[bytes], deaf_for: float = 0.0) -> Streamed:
    """
    Send ``head``, then ``pieces`` (a body streamed, never built in memory),
    as a careful HTTP client does (RFC 9112 section 9.5): before each piece,
    look whether an answer has begun, and if so stop sending. Then half-close
    and read the answer to its end. For the first ``deaf_for`` seconds, do
    not look: a client busy writing. Blocking: run it in a thread.
    """
    sent = 0
    send_error = None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        listen_from = time.monotonic() + deaf_for
        for piece in pieces:
            if time.monotonic() >= listen_from and select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(piece)
            except OSError as e:
                send_error = type(e).__name__
                break
            sent += len(piece)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        answer = _recv_to_end(sock)
    return Streamed(sent, send_error, answer)


def _recv_to_end(sock: socket.socket, deadline: float | None = None) -> bytes:
    """
    What ``sock`` receives until the server closes it, and ``<Error>`` after
    it where receiving fails: by ``deadline`` (of :func:`time.monotonic`) if
    given, else within the socket's own timeout for each read. Blocking.
    """
    data = b""
    while True:
        if deadline is not None:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except OSError as e:
            return data + f"<{type(e).__name__}>".encode()
        if not chunk:
            return data
        data += chunk


def _post_head(*headers: str) -> bytes:
    lines = ["POST /multiplex HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode()


_PIECE = b" " * 65536


def _huge_body() -> Iterator[bytes]:
    return (_PIECE for _ in range(HUGE // len(_PIECE)))


def _huge_chunked_body() -> Iterator[bytes]:
    chunk = b"%x\r\n%s\r\n" % (len(_PIECE), _PIECE)
    return (chunk for _ in range(HUGE // len(_PIECE)))


@pytest_twisted.ensureDeferred
async def test_100_mb_body_with_content_length_is_refused_before_it_is_read(
    daemon: Watched,
) -> None:
    """A declared 100 MB body gets 413 at once, on its headers; memory does not follow."""
    sent = len(daemon.upstream.paths)
    streamed = await within(
        30, deferToThread(stream, daemon.port, _post_head(f"Content-Length: {HUGE}"), _huge_body())
    )
    status, headers, body = streamed.parsed()
    assert status == b"HTTP/1.1 413 Content Too Large"
    assert headers["connection"] == "close"
    assert body == {
        "error": f"request body is {HUGE} bytes; at most {MAX_REQUEST_BYTES} are allowed"
    }
    # Refused on its headers: what went before the answer came is what the
    # sockets' buffers took, a small part of the body.
    assert streamed.sent < MAX_REQUEST_BYTES, streamed
    await daemon.check_recovered()
    assert daemon.upstream.paths[sent:] == ["/hello"]


@pytest_twisted.ensureDeferred
async def test_100_mb_chunked_body_is_refused_past_the_limit(daemon: Watched) -> None:
    """A chunked 100 MB body gets 413 once past --max-request-bytes; memory does not follow."""
    sent = len(daemon.upstream.paths)
    head = _post_head("Transfer-Encoding: chunked")
    streamed = await within(30, deferToThread(stream, daemon.port, head, _huge_chunked_body()))
    status, headers, body = streamed.parsed()
    assert status == b"HTTP/1.1 413 Content Too Large"
    assert headers["connection"] == "close"
    assert body == {"error": f"request body exceeds {MAX_REQUEST_BYTES} bytes, the most allowed"}
    assert MAX_REQUEST_BYTES < streamed.sent < HUGE // 2, streamed
    await daemon.check_recovered()
    assert daemon.upstream.paths[sent:] == ["/hello"]


@pytest_twisted.ensureDeferred
async def test_413_is_not_followed_by_a_reset(daemon: Watched) -> None:
    """
    A caller still writing its body when the 413 is sent is not reset: the
    daemon half-closes and drains what the caller sends, for a bounded time,
    before it closes (RFC 9112 section 9.6). Closing at once, with the body
    unread, makes the kernel reset the connection; a client busy writing
    then fails on its next write, and one that does not read after a failed
    write (Twisted's own client among them) never sees the 413.
    """
    head = _post_head(f"Content-Length: {HUGE}")
    streamed = await within(30, deferToThread(stream, daemon.port, head, _huge_body(), 0.3))
    status, _, body = streamed.parsed()
    assert status == b"HTTP/1.1 413 Content Too Large"
    assert body == {
        "error": f"request body is {HUGE} bytes; at most {MAX_REQUEST_BYTES} are allowed"
    }
    assert streamed.send_error is None, streamed.send_error
    await daemon.check_recovered()


@pytest_twisted.ensureDeferred
async def test_body_cut_short_on_the_wire(daemon: Watched) -> None:
    """A caller that closes before its Content-Length is sent: nothing runs, nothing is left."""
    sent = len(daemon.upstream.paths)
    batch = json.dumps({"timeout_msec": 1000, "requests": [{"uri": daemon.hello}]}).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(_post_head(f"Content-Length: {len(batch)}") + batch[: len(batch) // 2])
        await sleep(0.1)
    await daemon.check_recovered()
    assert daemon.upstream.paths[sent:] == ["/hello"]


@pytest_twisted.ensureDeferred
async def test_caller_disconnect_cancels_its_requests(daemon: Watched) -> None:
    """A caller that hangs up mid-batch: its upstream requests are cancelled at once."""
    resource = daemon.upstream
    sent, early = len(resource.paths), len(resource.finished_early)
    delays = ["/delay/3000?n=1", "/delay/3000?n=2"]
    batch = {
        "timeout_msec": 5000,
        "requests": [{"uri": daemon.hello.replace("/hello", d)} for d in delays],
    }
    body = json.dumps(batch).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(_post_head(f"Content-Length: {len(body)}") + body)
        await eventually(
            lambda: len(resource.paths) == sent + 2,
            5,
            lambda: f"the upstream got {resource.paths[sent:]}",
        )
    started = time.monotonic()
    await eventually(
        lambda: len(resource.finished_early) == early + 2,
        2,
        lambda: f"cancelled so far: {resource.finished_early[early:]}",
    )
    assert time.monotonic() - started < 1
    assert resource.finished_early[early:] == ["/delay/3000", "/delay/3000"]
    assert "caller disconnected; cancelling 2 pending requests" in daemon.new_log()
    await daemon.check_recovered()


# ---------------------------------------------------------------------------
# Slow and idle callers.
# ---------------------------------------------------------------------------


class _Slowloris(Protocol):
    """
    Send the start of a request head, then one more byte of it every 0.25 s,
    never finishing it; stop once an answer comes.

    :ivar received: what came back.
    :ivar closed: fires with the seconds from the first byte to the close.
    """

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[float] = Deferred()
        self._started = 0.0
        self._drip: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._started = time.monotonic()
        self._send(b"POST /multiplex HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")

    def _send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self._drip = reactor.callLater(0.25, self._send, b"z")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self._drip is not None and self._drip.active():
            self._drip.cancel()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._drip is not None and self._drip.active():
            self._drip.cancel()
        self.closed.callback(time.monotonic() - self._started)


@pytest_twisted.ensureDeferred
async def test_slowloris_callers_get_408_at_the_header_timeout(daemon: Watched) -> None:
    """
    Callers that send their heads a byte at a time get 408 at
    --header-timeout and are closed; a normal batch is served meanwhile.
    """
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port)
    callers = [_Slowloris() for _ in range(5)]
    for caller in callers:
        await within(5, connectProtocol(endpoint, caller))
    started = time.monotonic()
    [hello] = await daemon.multiplex(daemon.hello)
    assert_hello(hello)
    assert time.monotonic() - started < HEADER_TIMEOUT / 2
    error = f"request headers did not arrive within {HEADER_TIMEOUT} s (--header-timeout)"
    for caller in callers:
        seconds = await within(HEADER_TIMEOUT + 5, caller.closed)
        assert HEADER_TIMEOUT <= seconds < HEADER_TIMEOUT + SLACK, seconds
        head, _, body = caller.received.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 408 Request Timeout", caller.received
        assert json.loads(body) == {"error": error}
    await daemon.check_recovered()


def _open_idle(port: int, count: int, pid: int) -> list[socket.socket]:
    """
    Open ``count`` connections to ``port`` that send nothing, in waves of
    :data:`WAVE`, each once process ``pid`` has accepted the last. Blocking:
    run it in a thread.
    """
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            expected = _fd_count(pid) + min(WAVE, count - len(sockets))
            for _ in range(min(WAVE, count - len(sockets))):
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while _fd_count(pid) < expected:
                assert time.monotonic() < deadline, "the daemon did not accept a wave"
                time.sleep(0.005)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _read_to_end(sockets: list[socket.socket], seconds: float) -> list[bytes]:
    """
    What each socket receives until the server closes it, waiting at most
    ``seconds`` in all. Blocking: run it in a thread.
    """
    deadline = time.monotonic() + seconds
    return [_recv_to_end(sock, deadline) for sock in sockets]


@pytest_twisted.ensureDeferred
async def test_1000_idle_connections(daemon: Watched) -> None:
    """
    With 1,000 idle connections open, the daemon serves a normal batch at
    once, answers one connection past --max-connections with 503, and
    closes the idle ones at --idle-timeout.
    """
    started = time.monotonic()
    idle = await within(30, deferToThread(_open_idle, daemon.port, IDLE_CONNECTIONS, daemon.pid))
    extra: list[socket.socket] = []
    try:
        await eventually(
            lambda: _fd_count(daemon.pid) == daemon.baseline_fds + IDLE_CONNECTIONS,
            SETTLE_TIMEOUT,
            lambda: f"{_fd_count(daemon.pid)} fds open, {daemon.baseline_fds} at the baseline",
        )
        # Opening them must leave the idle timeout ahead, or this test
        # measures nothing.
        assert time.monotonic() - started < IDLE_TIMEOUT / 2
        before = time.monotonic()
        [hello] = await daemon.multiplex(daemon.hello)
        assert_hello(hello)
        assert time.monotonic() - before < 0.5
        # The caller's connection has closed; one more fits, the next does not.
        await eventually(
            lambda: _fd_count(daemon.pid) == daemon.baseline_fds + IDLE_CONNECTIONS,
            SETTLE_TIMEOUT,
            lambda: f"{_fd_count(daemon.pid)} fds open",
        )
        extra = await within(5, deferToThread(_open_idle, daemon.port, 1, daemon.pid))
        extra.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=5))
        [refused] = await within(5, deferToThread(_read_to_end, extra[1:], 2))
        head, _, body = refused.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 503 Service Unavailable", refused
        assert b"\r\nretry-after: 1" in head
        assert json.loads(body) == {
            "error": f"too many connections: at most {MAX_CONNECTIONS} are open at once "
            "(--max-connections)"
        }
        # The idle ones are closed at the idle timeout, with nothing sent.
        closing = await within(
            IDLE_TIMEOUT + 10,
            deferToThread(_read_to_end, idle + extra[:1], IDLE_TIMEOUT + 5),
        )
        assert time.monotonic() - started < IDLE_TIMEOUT + 2
        assert set(closing) == {b""}, set(closing)
    finally:
        for sock in idle + extra:
            sock.close()
    await daemon.check_recovered()


def answer_late(p: _Fault) -> None:
    # A whole answer after the idle timeout, and a close: the daemon pools
    # no second upstream connection, so its fd count can return exactly.
    def answer() -> None:
        p.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlate")
        p.close()

    p.later(IDLE_TIMEOUT + 0.5, answer)


@pytest_twisted.ensureDeferred
async def test_batch_outlasting_the_idle_timeout_is_answered(daemon: Watched) -> None:
    """A caller waiting for a batch is not idle: --idle-timeout does not cut it off."""
    async with faulty_upstream(daemon, answer_late) as server:
        late, hello = await daemon.multiplex(
            server.url, daemon.hello, timeout_msec=IDLE_TIMEOUT * 2000
        )
        assert late["Success"]["content"] == "late"
        assert_hello(hello)
