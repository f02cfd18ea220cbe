"""
gzip-encoded upstream bodies over real sockets: decoded for the caller,
counted against the response limit as decoded bytes, and never inflated
past it, so that a bomb fails its own request and nothing else.
"""

from __future__ import annotations

import gzip
import json
import socket
import tracemalloc
from typing import Any

import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent

from octoplex.limits import Limits

from .schema import check_answer
from .servers import Caller, Octoplex, Upstream, _QuietPool, start_octoplex


@pytest_twisted.ensureDeferred
async def test_gzip_body_is_decoded(octoplex: Octoplex, upstream: Upstream, caller: Caller) -> None:
    """A gzip body reaches the caller decoded, without the encoding headers of the wire."""
    batch = {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/gzip/5000"}]}
    _, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    success = body["responses"][0]["Success"]
    assert success["content"] == "x" * 5000
    assert "content-encoding" not in success["headers"]
    # The upstream's Content-Length counted compressed bytes: not reported.
    assert "content-length" not in success["headers"]


@pytest_twisted.ensureDeferred
async def test_gzip_bomb_fails_alone_without_inflating(upstream: Upstream, caller: Caller) -> None:
    """A 200 MB gzip bomb fails its request at the limit, allocating little; the rest succeed."""
    server = start_octoplex(Limits(max_response_bytes=1024 * 1024))
    batch = {
        "timeout_msec": 5000,
        "requests": [
            {"uri": upstream.url + "/gzip-bomb/200"},
            {"uri": upstream.url + "/gzip/1000"},
        ],
    }
    tracemalloc.start()
    try:
        _, _, body = await caller.post(server.url + "/multiplex", batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await server.stop()
    bomb, fine = body["responses"]
    assert bomb["Failure"]["error"] == (
        "upstream response body exceeded 1048576 bytes (--max-response-bytes)"
    )
    assert fine["Success"]["content"] == "x" * 1000
    # The upstream built the bomb in this process too (about 200 KB); an
    # unbounded inflate would have allocated 200 MB.
    assert peak < 32 * 1024 * 1024, peak


@pytest_twisted.ensureDeferred
async def test_bad_gzip_is_explained(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """A body declared gzip that does not decode is a Failure that says so."""
    batch = {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/bad-gzip"}]}
    _, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    error = body["responses"][0]["Failure"]["error"]
    assert error.startswith("upstream sent a gzip-encoded body that does not decode: "), error
    assert body["responses"][0]["Failure"]["kind"] == "protocol"


@pytest_twisted.ensureDeferred
async def test_compressed_response_is_reported(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    Asked for, a decoded body's Success says content_encoding gzip and a
    plain one has no such field; not asked for, neither has it (the
    original format never sent it).
    """
    requests = [{"uri": upstream.url + "/gzip/10"}, {"uri": upstream.url + "/hello"}]
    batch = {"timeout_msec": 2000, "requests": requests, "content_encoding": True}
    _, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    compressed, plain = (o["Success"] for o in body["responses"])
    assert compressed["content_encoding"] == "gzip"
    assert "content_encoding" not in plain
    _, _, body = await caller.post(
        octoplex.url + "/multiplex", {"timeout_msec": 2000, "requests": requests}
    )
    compressed, plain = (o["Success"] for o in body["responses"])
    assert "content_encoding" not in compressed and "content_encoding" not in plain


@pytest_twisted.ensureDeferred
async def test_item_body_sent_gzipped_on_request(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """An item with Content-Encoding: gzip has its text body compressed on the way out."""
    text = "bid request " * 200
    batch = {
        "timeout_msec": 2000,
        "requests": [
            {
                "method": "POST",
                "uri": upstream.url + "/inflate",
                "headers": {"Content-Encoding": "gzip"},
                "body": text,
            },
            {
                "method": "POST",
                "uri": upstream.url + "/inflate",
                "body": "x",
                "headers": {"Content-Encoding": "br"},
            },
        ],
    }
    _, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    sent, refused = body["responses"]
    assert sent["Success"]["content"] == "gzip: " + text
    assert "Octoplex can only gzip a body" in refused["Failure"]["error"]
    assert refused["Failure"]["duration_msec"] == 0


@pytest_twisted.ensureDeferred
async def test_batch_may_arrive_gzipped(upstream: Upstream, caller: Caller) -> None:
    """A gzip batch is decoded; one inflating past the limit is 413; bad gzip is 400."""
    server = start_octoplex(Limits(max_request_bytes=10_000))
    try:
        document = {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/hello"}]}
        packed = gzip.compress(json.dumps(document).encode())
        status, _, body = await _post_raw(server.url, packed, {"Content-Encoding": "gzip"})
        assert status == 200 and body["responses"][0]["Success"]["content"] == "Hello world!"

        bomb = gzip.compress(b" " * 1_000_000)
        assert len(bomb) < 10_000
        status, _, body = await _post_raw(server.url, bomb, {"Content-Encoding": "gzip"})
        assert (status, body["error"]) == (
            413,
            "request body inflates past 10000 bytes, the most allowed",
        )
        status, _, body = await _post_raw(server.url, b"nope", {"Content-Encoding": "gzip"})
        assert status == 400 and body["error"].startswith("request body is not valid gzip")
        status, _, body = await _post_raw(server.url, b"{}", {"Content-Encoding": "br"})
        assert (status, body["error"]) == (
            400,
            "Content-Encoding 'br' is not supported; send gzip or none",
        )
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_answer_is_gzipped_when_accepted(octoplex: Octoplex, upstream: Upstream) -> None:
    """A caller that accepts gzip gets a gzip answer that decodes to the same JSON."""
    document = {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/hello"}] * 5}
    raw = json.dumps(document).encode()
    port = octoplex.port.getHost().port
    head = (
        b"POST /multiplex HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(raw)
    )
    answer = await deferToThread(_exchange, port, head + raw)
    headers, _, payload = answer.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in headers
    assert b"Transfer-Encoding: chunked" in headers
    decoded = json.loads(gzip.decompress(_dechunk(payload)))
    check_answer(200, decoded)
    assert [o["Success"]["content"] for o in decoded["responses"]] == ["Hello world!"] * 5


async def _post_raw(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any, Any]:
    http = HTTPClient(Agent(reactor, pool=_QuietPool(reactor, persistent=False)))
    response = await http.post(url + "/multiplex", data=body, headers=headers)
    answer = json.loads(await treq.content(response))
    check_answer(response.code, answer)
    return response.code, response.headers, answer


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _dechunk(payload: bytes) -> bytes:
    out = b""
    while payload:
        size, _, rest = payload.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        out += rest[:length]
        payload = rest[length + 2 :]
    return out


class _Request:
    def __init__(self, accept: bytes | None) -> None:
        from twisted.web.http_headers import Headers

        self.requestHeaders = Headers({} if accept is None else {b"accept-encoding": [accept]})
        self.responseHeaders = Headers({b"content-length": [b"99"]})
        self.startedWriting = False


def test_the_answer_compressor_is_made_at_the_first_byte() -> None:
    """
    gzip only for callers that accept it; the zlib state (about 256 KiB)
    exists only once the answer is written, not while the batch runs; the
    stream decodes, even an empty one.
    """
    from octoplex.web import LazyGzipEncoderFactory

    factory = LazyGzipEncoderFactory()
    assert factory.encoderForRequest(_Request(None)) is None  # type: ignore[arg-type]
    assert factory.encoderForRequest(_Request(b"br, deflate")) is None  # type: ignore[arg-type]
    assert factory.encoderForRequest(_Request(b"gzipped")) is None  # type: ignore[arg-type]
    request = _Request(b"deflate, gzip;q=1.0")
    encoder = factory.encoderForRequest(request)  # type: ignore[arg-type]
    assert encoder is not None and encoder._compressor is None
    assert request.responseHeaders.getRawHeaders(b"content-encoding") == [b"gzip"]
    data = encoder.encode(b'{"responses": []}') + encoder.finish()
    assert gzip.decompress(data) == b'{"responses": []}'
    assert not request.responseHeaders.hasHeader(b"content-length")
    empty = factory.encoderForRequest(_Request(b"gzip"))  # type: ignore[arg-type]
    assert empty is not None and gzip.decompress(empty.finish()) == b""
