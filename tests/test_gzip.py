"""
gzip-encoded upstream bodies over real sockets: decoded for the caller,
counted against the response limit as decoded bytes, and never inflated
past it, so that a bomb fails its own request and nothing else.
"""

from __future__ import annotations

import tracemalloc

import pytest_twisted

from octoplex.limits import Limits

from .servers import Caller, Octoplex, Upstream, start_octoplex


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
