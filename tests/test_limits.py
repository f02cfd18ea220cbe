"""
The hard limits, each over real sockets: what a caller's connection may
hold and for how long, how many connections may be open, how large each
item's request head and each upstream's response head may be, and how much
body one batch may read in all.  Each breach gets its own error naming the
limit, and nothing else is disturbed.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory

from octoplex.inbound import LINGER
from octoplex.limits import Limits
from octoplex.tls import server_options

from .schema import check_answer
from .servers import Caller, Octoplex, Upstream, start_octoplex, wait_until


def port_of(octoplex: Octoplex) -> int:
    return octoplex.port.getHost().port  # type: ignore[no-any-return]


def talk(
    port: int, chunks: list[bytes], pause: float = 0.0, wait: float = 5.0
) -> tuple[bytes, float]:
    """
    In a thread: connect, send ``chunks`` ``pause`` seconds apart (stopping
    once the server answers or closes), then read until the server closes (at most
    ``wait`` seconds).  Return what was read and the seconds until the close.
    """
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the answer (or the close) is in: stop sending
            try:
                sock.sendall(chunk)
            except OSError:
                break
            if pause:
                time.sleep(pause)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        except (TimeoutError, ConnectionResetError):
            pass
    return received, time.monotonic() - started


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    document = json.loads(body)
    check_answer(status, document)
    return status, {k.lower(): v for k, v in headers.items()}, document


@pytest.fixture
def limited() -> Iterator[Callable[..., Octoplex]]:
    started: list[Octoplex] = []

    def start(**limits: Any) -> Octoplex:
        octoplex = start_octoplex(Limits(**limits))
        started.append(octoplex)
        return octoplex

    yield start
    for octoplex in started:
        pytest_twisted.blockon(octoplex.stop())


async def still_serves(octoplex: Octoplex, upstream: Upstream, caller: Caller) -> None:
    batch = {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/hello"}]}
    status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    assert status == 200
    assert body["responses"][0]["Success"]["content"] == "Hello world!"


# ---------------------------------------------------------------------------
# The caller's connection.
# ---------------------------------------------------------------------------

REQUEST_LINE = b"POST /multiplex HTTP/1.1\r\nHost: octoplex\r\n"


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (
            REQUEST_LINE + b"".join(b"X-H%d: v\r\n" % n for n in range(21)) + b"\r\n",
            "request has more than 20 header lines (--max-header-count)",
        ),
        (
            REQUEST_LINE + b"X-Long: " + b"a" * 5000 + b"\r\n\r\n",
            "a request header line exceeds 4096 bytes (--max-header-bytes)",
        ),
        (
            REQUEST_LINE
            + b"".join(b"X-H%d: %s\r\n" % (n, b"b" * 300) for n in range(15))
            + b"\r\n",
            "request line and headers exceed 4096 bytes (--max-header-bytes)",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_heads_over_the_limits_get_431(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller, head: bytes, message: str
) -> None:
    """A head with too many lines, too long a line or too many bytes: 431 naming the limit."""
    octoplex = limited(max_header_count=20, max_header_bytes=4096)
    raw, _ = await deferToThread(talk, port_of(octoplex), [head])
    status, headers, body = parse(raw)
    assert (status, body) == (431, {"error": message})
    assert headers["connection"] == "close"
    registry = octoplex.site.metrics.registry
    assert registry.get_sample_value("octoplex_inbound_refused_total", {"status": "431"}) == 1
    await still_serves(octoplex, upstream, caller)


def flood(port: int, head: bytes, seconds: float) -> tuple[bytes, float, bool]:
    """
    In a thread: send ``head``, then keep writing a body without reading
    until the server ends the connection or ``seconds`` pass.  Return the
    answer read afterwards, the seconds the writes lasted, and whether the
    server ended them.
    """
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(1.0)
        sock.sendall(head)
        ended = False
        while time.monotonic() - started < seconds:
            try:
                sock.sendall(b"x" * 65536)
            except OSError:
                ended = True
                break
            except TimeoutError:
                continue
        lasted = time.monotonic() - started
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except OSError:
            pass
    return answer, lasted, ended


@pytest_twisted.ensureDeferred
async def test_error_answers_linger_a_bounded_time(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller
) -> None:
    """
    After a 413, the daemon drains what the caller still writes, so the
    caller can read the answer, but for no more than LINGER seconds.
    """
    octoplex = limited(max_request_bytes=1000)
    head = REQUEST_LINE + b"Content-Length: 100000000\r\n\r\n"
    answer, lasted, ended = await deferToThread(flood, port_of(octoplex), head, 10.0)
    assert ended
    assert LINGER - 0.5 < lasted < LINGER + 2.0
    assert parse(answer)[::2] == (
        413,
        {"error": "request body is 100000000 bytes; at most 1000 are allowed"},
    )
    assert octoplex.site.connections == 0
    await still_serves(octoplex, upstream, caller)


@pytest_twisted.ensureDeferred
async def test_malformed_request_gets_400(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller
) -> None:
    """A request line that does not parse: 400 with a JSON error, not a bare status line."""
    octoplex = limited()
    raw, _ = await deferToThread(talk, port_of(octoplex), [b"NOT-HTTP\r\n\r\n"])
    assert parse(raw)[::2] == (400, {"error": "malformed HTTP request"})
    await still_serves(octoplex, upstream, caller)


@pytest_twisted.ensureDeferred
async def test_tls_hello_on_the_plain_listener_gets_400_at_once(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller
) -> None:
    """
    A TLS ClientHello (or any head that no method can begin) is refused at
    its first byte with 400 naming what arrived, not left waiting for a
    line end until --header-timeout; the daemon serves on.
    """
    octoplex = limited(header_timeout=30.0)
    # A TLS record header and the start of a ClientHello: no line end in it.
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32, 64))
    raw, closed_after = await deferToThread(talk, port_of(octoplex), [hello])
    status, _, document = parse(raw)
    assert status == 400
    assert document["error"] == (
        "a TLS handshake arrived on a plain HTTP listener: call it with http://, "
        "or call an HTTPS listener (--listen-tls) with https://"
    )
    assert closed_after < LINGER + 2.0
    raw, _ = await deferToThread(talk, port_of(octoplex), [b"\x00\x01binary"])
    status, _, document = parse(raw)
    assert status == 400
    assert document["error"] == (
        "a request line cannot begin with b'\\x00': it must begin with a method (RFC 9112)"
    )
    # An empty line before the request line is still allowed (RFC 9112 section 2.2).
    raw, _ = await deferToThread(
        talk,
        port_of(octoplex),
        [b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"],
    )
    assert raw.startswith(b"HTTP/1.1 200 "), raw
    await still_serves(octoplex, upstream, caller)


@pytest_twisted.ensureDeferred
async def test_obsolete_line_folding_gets_400(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller
) -> None:
    """
    A header continued on a line that starts with white space (RFC 9112
    section 5.2) is refused with 400 naming the line, not joined to the
    header before it; the daemon serves on.
    """
    octoplex = limited()
    for fold in (b" folded", b"\tfolded"):
        request = (
            b"POST /multiplex HTTP/1.1\r\nHost: x\r\nX-One: 1\r\n"
            + fold
            + b"\r\nContent-Length: 2\r\n\r\n{}"
        )
        raw, _ = await deferToThread(talk, port_of(octoplex), [request])
        status, _, document = parse(raw)
        assert status == 400
        assert "obsolete line folding" in document["error"]
        assert repr(fold) in document["error"]
    await still_serves(octoplex, upstream, caller)


@pytest_twisted.ensureDeferred
async def test_slowloris_headers_time_out(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller
) -> None:
    """A caller that sends its head a byte at a time gets 408 once the header timeout passes."""
    octoplex = limited(header_timeout=0.5)
    # One header byte every 0.1 s, for up to 3 s: each byte would reset an
    # idle timeout, but not the header timeout.
    chunks = [REQUEST_LINE] + [b"X"] * 30
    raw, elapsed = await deferToThread(talk, port_of(octoplex), chunks, 0.1)
    assert parse(raw)[::2] == (
        408,
        {"error": "request headers did not arrive within 0.5 s (--header-timeout)"},
    )
    assert 0.45 <= elapsed < 2.0
    await still_serves(octoplex, upstream, caller)


@pytest_twisted.ensureDeferred
async def test_slow_body_times_out(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller
) -> None:
    """A caller that stops half-way through its body gets 408 once the body timeout passes."""
    octoplex = limited(body_timeout=0.5)
    head = REQUEST_LINE + b"Content-Length: 100\r\n\r\n"
    raw, elapsed = await deferToThread(talk, port_of(octoplex), [head + b'{"timeout_msec"'])
    assert parse(raw)[::2] == (
        408,
        {"error": "request body did not arrive within 0.5 s (--body-timeout)"},
    )
    assert 0.45 <= elapsed < 2.0
    await still_serves(octoplex, upstream, caller)


@pytest_twisted.ensureDeferred
async def test_idle_connections_are_closed(limited: Callable[..., Octoplex]) -> None:
    """A connection that sends nothing is closed, without an answer, after the idle timeout."""
    octoplex = limited(idle_timeout=0.5)
    raw, elapsed = await deferToThread(talk, port_of(octoplex), [])
    assert raw == b""
    assert 0.45 <= elapsed < 2.0
    assert octoplex.site.connections == 0


@pytest_twisted.ensureDeferred
async def test_connections_past_the_cap_get_503(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller
) -> None:
    """
    With 3 connections open, a 4th gets 503 with Retry-After; once one
    closes, a new one is served.
    """
    octoplex = limited(max_connections=3)
    port = port_of(octoplex)
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        await wait_until(lambda: octoplex.site.connections >= 3, "3 connections open")
        raw, _ = await deferToThread(talk, port, [])
        status, headers, body = parse(raw)
        assert (status, body) == (
            503,
            {"error": "too many connections: at most 3 are open at once (--max-connections)"},
        )
        assert headers["retry-after"] == "1"
        assert octoplex.site.refused_connections == 1
        registry = octoplex.site.metrics.registry
        assert registry.get_sample_value("octoplex_inbound_refused_total", {"status": "503"}) == 1
    finally:
        held.pop().close()
    await wait_until(lambda: octoplex.site.connections <= 2, "a held connection to close")
    # The test's own client is the third connection.
    await still_serves(octoplex, upstream, caller)
    for sock in held:
        sock.close()
    await wait_until(lambda: octoplex.site.connections == 0, "every connection to close")


# ---------------------------------------------------------------------------
# Each item's request head.
# ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_item_heads_over_the_limits_fail_alone(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller
) -> None:
    """An item with too many headers, or too many header bytes, fails alone; no request is sent."""
    # The caller's own request to Octoplex is held to the same limits.
    octoplex = limited(max_header_count=8, max_header_bytes=2000)
    hello = upstream.url + "/hello"
    batch = {
        "timeout_msec": 2000,
        "requests": [
            {"uri": hello, "headers": {f"X-{n}": "v" for n in range(9)}},
            {"uri": hello, "headers": {"X-Big": "x" * 2000}},
            {"uri": hello, "headers": {f"X-{n}": "v" for n in range(8)}},
        ],
    }
    status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    assert status == 200
    many, big, fine = body["responses"]
    assert many == {
        "Failure": {
            "error": "request has 9 headers; at most 8 are allowed (--max-header-count)",
            "kind": "invalid",
            "duration_msec": 0,
        }
    }
    assert big == {
        "Failure": {
            "error": "request headers are 2009 bytes; at most 2000 are allowed "
            "(--max-header-bytes)",
            "kind": "invalid",
            "duration_msec": 0,
        }
    }
    assert fine["Success"]["content"] == "Hello world!"
    assert len(upstream.site.connections) == 1


# ---------------------------------------------------------------------------
# Each upstream's response head.
# ---------------------------------------------------------------------------


class _Heads(Protocol):
    """
    Answer a request with a head as the factory's ``head`` says, then a
    small body.
    """

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        assert self.transport is not None
        self.transport.write(self.factory.head + b"Content-Length: 2\r\n\r\nok")  # type: ignore[attr-defined]


def upstream_sending(head: bytes) -> tuple[str, Any]:
    factory = Factory.forProtocol(_Heads)
    factory.noisy = False
    factory.head = head  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return f"http://127.0.0.1:{port.getHost().port}/", port


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (
            b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(51)),
            "upstream response head has more than 50 header lines (--max-header-count)",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 5000 + b"\r\n",
            "upstream response head has a line over 4096 bytes (--max-header-bytes)",
        ),
        (
            # Under the line count, over the bytes.
            b"HTTP/1.1 200 OK\r\n"
            + b"".join(b"X-H%d: " % n + b"v" * 200 + b"\r\n" for n in range(40)),
            "upstream response head exceeds 4096 bytes (--max-header-bytes)",
        ),
        (
            # Folded continuation lines (one header, ever longer, where
            # Twisted's parser grew without bound) are refused outright.
            b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n"
            + b"".join(b" " + b"c" * 100 + b"\r\n" for _ in range(60)),
            "upstream sent an invalid HTTP response: "
            "Unexpected whitespace after header value b'X-Folded: a'",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_upstream_heads_over_the_limits_fail_alone(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller, head: bytes, message: str
) -> None:
    """An upstream response head past a limit fails that item alone, with the limit named."""
    octoplex = limited(max_header_count=50, max_header_bytes=4096)
    url, port = upstream_sending(head)
    try:
        batch = {"timeout_msec": 2000, "requests": [{"uri": url}, {"uri": upstream.url + "/hello"}]}
        status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    finally:
        await port.stopListening()
    assert status == 200
    bad, good = body["responses"]
    assert bad["Failure"]["error"] == message
    kind = "protocol" if message.startswith("upstream sent an invalid") else "too_large"
    assert bad["Failure"]["kind"] == kind
    assert good["Success"]["content"] == "Hello world!"
    # Within the limits, the same server's answer passes.
    small, port = upstream_sending(b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * 49)
    try:
        batch = {"timeout_msec": 2000, "requests": [{"uri": small}]}
        status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    finally:
        await port.stopListening()
    assert body["responses"][0].get("Success", {}).get("content") == "ok", body


# ---------------------------------------------------------------------------
# All of a batch's response bodies.
# ---------------------------------------------------------------------------

BATCH_TOO_LARGE = (
    "upstream response bodies of this batch exceeded 25000 bytes in total "
    "(--max-batch-response-bytes)"
)


@pytest_twisted.ensureDeferred
async def test_batch_response_total_is_capped(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller
) -> None:
    """
    Past the batch's total, the item that passes it fails; those that fit
    succeed, and the next batch has the whole budget again.
    """
    octoplex = limited(max_batch_response_bytes=25_000)
    bytes_12k = upstream.url + "/bytes/12000"
    for _ in range(2):
        batch = {
            "timeout_msec": 3000,
            "requests": [{"uri": bytes_12k}] * 3 + [{"uri": upstream.url + "/hello"}],
        }
        status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
        assert status == 200
        *large, hello = body["responses"]
        assert hello["Success"]["content"] == "Hello world!"
        failed = [o["Failure"]["error"] for o in large if "Failure" in o]
        assert failed == [BATCH_TOO_LARGE]
        assert [o["Failure"]["kind"] for o in large if "Failure" in o] == ["too_large"]
        assert sorted(len(o["Success"]["content"]) for o in large if "Success" in o) == [
            12000,
            12000,
        ]
    # One body over the whole budget fails, and gives its bytes back.
    batch = {
        "timeout_msec": 3000,
        "requests": [{"uri": upstream.url + "/bytes/40000"}, {"uri": upstream.url + "/hello"}],
    }
    status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    big, hello = body["responses"]
    assert big["Failure"]["error"] == BATCH_TOO_LARGE
    assert big["Failure"]["kind"] == "too_large"
    assert hello["Success"]["content"] == "Hello world!"


def tls_listener(octoplex: Octoplex, tmp_path: Any) -> tuple[trustme.CA, Any]:
    """
    Serve ``octoplex``'s site over TLS on 127.0.0.1 too, as --listen-tls
    does, with a certificate from a new CA.
    """
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    options = server_options(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), None, None)
    secure = TLSMemoryBIOFactory(options, False, octoplex.site)
    return ca, reactor.listenTCP(0, secure, interface="127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_error_answers_over_tls(
    limited: Callable[..., Octoplex], upstream: Upstream, caller: Caller, tmp_path: Any
) -> None:
    """Over TLS too, a head past the limit gets its 431, and the connection then closes."""
    octoplex = limited(max_header_bytes=4096)
    ca, port = tls_listener(octoplex, tmp_path)

    def call() -> tuple[bytes, float]:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        started = time.monotonic()
        raw = socket.create_connection(("127.0.0.1", port.getHost().port))
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.settimeout(5)
            sock.sendall(REQUEST_LINE + b"X-Long: " + b"a" * 5000 + b"\r\n\r\n")
            answer = b""
            try:
                while data := sock.recv(65536):
                    answer += data
            except (OSError, ssl.SSLError):
                pass
        return answer, time.monotonic() - started

    try:
        answer, elapsed = await deferToThread(call)
    finally:
        await port.stopListening()
    assert parse(answer)[::2] == (
        431,
        {"error": "a request header line exceeds 4096 bytes (--max-header-bytes)"},
    )
    assert elapsed < LINGER + 2.0
    await still_serves(octoplex, upstream, caller)


@pytest_twisted.ensureDeferred
async def test_connection_count_survives_tls_failures(
    limited: Callable[..., Octoplex], tmp_path: Any
) -> None:
    """
    Behind TLS, connections that fail the handshake, or close before it,
    are counted out again, so they cannot use up --max-connections.
    """
    octoplex = limited()
    ca, port = tls_listener(octoplex, tmp_path)
    number = port.getHost().port

    def callers() -> list[bytes]:
        for _ in range(6):
            with socket.create_connection(("127.0.0.1", number)) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not TLS
                sock.settimeout(5)
                try:
                    sock.recv(100)
                except OSError:
                    pass
        for _ in range(6):
            socket.create_connection(("127.0.0.1", number)).close()
        context = ssl.create_default_context()
        ca.configure_trust(context)
        answers = []
        for _ in range(6):
            raw = socket.create_connection(("127.0.0.1", number))
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answers.append(sock.recv(12))
        return answers

    try:
        answers = await deferToThread(callers)
    finally:
        await port.stopListening()
    assert answers == [b"HTTP/1.1 200"] * 6
    await wait_until(lambda: octoplex.site.connections == 0, "every connection to close")
