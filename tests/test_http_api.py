"""
The HTTP API of the original Octoplex, over real sockets: every route, every
batch-level 400, and the per-request problems that fail one request alone.
"""

from __future__ import annotations

import base64
import json
import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from octoplex.limits import Limits

from .schema import check_answer
from .servers import Caller, Octoplex, Upstream, start_octoplex


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", ["/", "/healthz"])
async def test_health_routes(octoplex: Octoplex, caller: Caller, path: str) -> None:
    """
    GET / and GET /healthz answer {"healthy": true} as JSON, and reveal
    nothing: no software version in a Server header, no other field.
    """
    status, headers, body = await caller.get(octoplex.url + path)
    assert status == 200
    assert headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
    assert json.loads(body) == {"healthy": True}
    assert headers.getRawHeaders(b"server") == [b"Octoplex"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("path", ["/nope", "/multiplex/extra", "/healthz/x"])
async def test_unknown_route_is_404(octoplex: Octoplex, caller: Caller, path: str) -> None:
    """Anything else is a 404 with the original's plain-text body."""
    status, headers, body = await caller.get(octoplex.url + path)
    assert status == 404
    assert body == b"not found\n"
    assert headers.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/multiplex", "POST"), ("PUT", "/multiplex", "POST"), ("POST", "/healthz", "GET")],
)
async def test_wrong_method_is_405(
    octoplex: Octoplex, caller: Caller, method: str, path: str, allowed: str
) -> None:
    """A wrong method on a known route is a 405 that names the allowed ones."""
    status, headers, body = await caller.get(octoplex.url + path, method=method)
    assert status == 405
    assert allowed in headers.getRawHeaders(b"allow")[0].decode()
    assert method in json.loads(body)["error"]


BAD_BATCHES: list[tuple[Any, str]] = [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    ({"requests": [{"uri": "http://127.0.0.1/"}]}, "missing field timeout_msec"),
    ({"timeout_msec": 100}, "missing field requests"),
    ({"timeout_msec": "100", "requests": []}, "timeout_msec must be a whole number"),
    ({"timeout_msec": 1.5, "requests": []}, "timeout_msec must be a whole number"),
    ({"timeout_msec": -1, "requests": []}, "timeout_msec must be a whole number"),
    ({"timeout_msec": True, "requests": []}, "timeout_msec must be a whole number"),
    (
        {"timeout_msec": 3_600_001, "requests": [{"uri": "http://a.test/"}]},
        "timeout_msec is 3600001; at most 3600000 is allowed",
    ),
    ({"timeout_msec": 100, "requests": {}}, "requests must be an array"),
    ({"timeout_msec": 100, "requests": []}, "batch has 0 requests"),
    (
        {"timeout_msec": 100, "requests": [{"uri": "http://a.test/"}] * 75},
        "batch has 75 requests; at most 50 are allowed",
    ),
    ({"timeout_msec": 100, "requests": [], "extra": 1}, 'unknown field "extra" in batch'),
    (
        {"timeout_msec": 100, "requests": [{"uri": "http://a.test/", "bdy": "x"}]},
        'unknown field "bdy" in requests[0]',
    ),
    ({"timeout_msec": 100, "requests": [{"method": "GET"}]}, "missing field uri in requests[0]"),
    ({"timeout_msec": 100, "requests": [{"uri": 5}]}, "requests[0].uri must be a string"),
    (
        {"timeout_msec": 100, "requests": [{"uri": "http://a.test/", "method": 1}]},
        "requests[0].method must be a string",
    ),
    (
        {"timeout_msec": 100, "requests": [{"uri": "http://a.test/", "headers": []}]},
        "requests[0].headers must be an object",
    ),
    (
        {"timeout_msec": 100, "requests": [{"uri": "http://a.test/", "headers": {"a": 1}}]},
        'requests[0].headers["a"] must be a string',
    ),
    (
        {"timeout_msec": 100, "requests": [{"uri": "http://a.test/", "body": {}}]},
        "requests[0].body must be a string or null",
    ),
    ({"timeout_msec": 100, "requests": ["http://a.test/"]}, "requests[0] must be a JSON object"),
    (b'{"timeout_msec": 100, "timeout_msec": 5, "requests": []}', "duplicate field"),
    (b'{"timeout_msec": NaN, "requests": []}', "NaN is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nests JSON too deeply"),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("document", "message"), BAD_BATCHES)
async def test_bad_batch_is_400(
    octoplex: Octoplex, caller: Caller, document: Any, message: str
) -> None:
    """Each malformed batch gets a 400 whose error names the bad value."""
    status, headers, body = await caller.post(octoplex.url + "/multiplex", document)
    assert status == 400
    assert headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
    assert list(body) == ["error"]
    assert message in body["error"]
    # The daemon keeps serving.
    status, _, _ = await caller.get(octoplex.url + "/healthz")
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_limits_are_configurable(upstream: Upstream, caller: Caller) -> None:
    """Both batch limits come from configuration, and their errors name the limit."""
    server = start_octoplex(Limits(max_batch_size=2, max_timeout_msec=500))
    try:
        url = server.url + "/multiplex"
        three = {"timeout_msec": 100, "requests": [{"uri": upstream.url + "/hello"}] * 3}
        status, _, body = await caller.post(url, three)
        assert (status, body["error"]) == (400, "batch has 3 requests; at most 2 are allowed")
        slow = {"timeout_msec": 501, "requests": [{"uri": upstream.url + "/hello"}]}
        status, _, body = await caller.post(url, slow)
        assert (status, body["error"]) == (400, "timeout_msec is 501; at most 500 is allowed")
        ok = {"timeout_msec": 500, "requests": [{"uri": upstream.url + "/hello"}] * 2}
        status, _, body = await caller.post(url, ok)
        assert status == 200 and len(body["responses"]) == 2
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_success_has_the_original_shape(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """A Success carries exactly headers (lowercase), status, content and duration_msec."""
    batch = {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/hello"}]}
    status, headers, body = await caller.post(octoplex.url + "/multiplex", batch)
    assert status == 200
    assert headers.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
    [outcome] = body["responses"]
    success = outcome["Success"]
    assert list(outcome) == ["Success"]
    assert list(success) == ["headers", "status", "content", "duration_msec"]
    assert success["status"] == 200
    assert success["content"] == "Hello world!"
    assert success["headers"]["content-type"] == "text/plain"
    assert success["headers"]["content-length"] == "12"
    assert all(name == name.lower() for name in success["headers"])
    assert "content-encoding" not in success["headers"]
    assert isinstance(success["duration_msec"], int) and success["duration_msec"] >= 0


@pytest_twisted.ensureDeferred
async def test_request_is_sent_as_given(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """Method, headers and UTF-8 body reach the upstream as the caller gave them."""
    batch = {
        "timeout_msec": 2000,
        "requests": [
            {
                "method": "PATCH",
                "uri": upstream.url + "/echo",
                "headers": {"X-Some-Header": "some value", "Content-Type": "application/json"},
                "body": '{"name":"Bruce Campbell","note":"café"}',
            },
            {"method": "PROPFIND", "uri": upstream.url + "/echo"},
        ],
    }
    status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    assert status == 200
    first = json.loads(body["responses"][0]["Success"]["content"])
    assert first["method"] == "PATCH"
    assert ["X-Some-Header", "some value"] in first["headers"]
    assert first["body"] == '{"name":"Bruce Campbell","note":"café"}'
    second = json.loads(body["responses"][1]["Success"]["content"])
    assert second["method"] == "PROPFIND"


@pytest_twisted.ensureDeferred
async def test_bad_items_fail_alone(octoplex: Octoplex, upstream: Upstream, caller: Caller) -> None:
    """Each per-request problem fails its request with duration 0; the others run."""
    good = {"uri": upstream.url + "/hello"}
    bad = [
        ({"uri": "not a uri"}, "whitespace"),
        ({"uri": "http://"}, "has no host"),
        ({"uri": "http://127.0.0.1:99999/"}, "port 99999"),
        ({"uri": "ftp://127.0.0.1/"}, 'scheme "ftp"'),
        ({"uri": "/relative"}, "scheme none"),
        (
            {"uri": upstream.url + "/hello", "headers": {"X-A": "a\r\nInjected: yes"}},
            "carriage return",
        ),
        ({"uri": upstream.url + "/hello", "headers": {"X-A": "a\nb"}}, "line feed"),
        ({"uri": upstream.url + "/hello", "headers": {"X-A": "a\x00b"}}, "NUL"),
        ({"uri": upstream.url + "/hello", "headers": {"X A": "b"}}, "header name"),
        ({"uri": upstream.url + "/hello", "method": "GET /x HTTP/1.1\r\n"}, "method"),
        ({"uri": upstream.url + "/hello", "method": ""}, "method"),
    ]
    requests = [good]
    for item, _ in bad:
        requests += [item, good]
    batch = {"timeout_msec": 2000, "requests": requests}
    status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    assert status == 200
    outcomes = body["responses"]
    assert len(outcomes) == len(requests)
    for index, (_, message) in enumerate(bad):
        failure = outcomes[2 * index + 1]["Failure"]
        assert message in failure["error"], failure
        assert failure["duration_msec"] == 0
    for outcome in outcomes[::2]:
        assert outcome["Success"]["content"] == "Hello world!"


@pytest_twisted.ensureDeferred
async def test_upstream_statuses_and_headers(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    A 503 and a 302 are Successes; a redirect is not followed; repeats keep
    the last value; a body that is not UTF-8 comes whole as content_base64.
    """
    batch = {
        "timeout_msec": 2000,
        "requests": [
            {"uri": upstream.url + "/status/503"},
            {"uri": upstream.url + "/redirect"},
            {"uri": upstream.url + "/repeat-header"},
            {"uri": upstream.url + "/binary"},
        ],
    }
    status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    assert status == 200
    unavailable, redirect, repeated, binary = (o["Success"] for o in body["responses"])
    assert unavailable["status"] == 503
    assert (redirect["status"], redirect["headers"]["location"]) == (302, "/hello")
    assert redirect["content"] == "moved"
    assert repeated["headers"]["x-multi"] == "last"
    assert "content" not in binary
    assert base64.b64decode(binary["content_base64"]) == b"ok \xff\xfe end"


def _raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_oversized_request_body_is_413(upstream: Upstream, caller: Caller) -> None:
    """A body over max-request-bytes gets 413 before it is read; the daemon serves on."""
    server = start_octoplex(Limits(max_request_bytes=1000))
    try:
        port = server.port.getHost().port
        head = (
            b"POST /multiplex HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = await deferToThread(_raw_exchange, port, head + b"x" * 100_000)
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert b"100 Continue" not in answer
        document = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        check_answer(413, document)
        error = document["error"]
        assert error == "request body is 5000000 bytes; at most 1000 are allowed"

        chunked = (
            b"POST /multiplex HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"200\r\n" + b"y" * 512 + b"\r\n" for _ in range(4))
        )
        answer = await deferToThread(_raw_exchange, port, chunked)
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert b"exceeds 1000 bytes" in answer

        ok = {"timeout_msec": 1000, "requests": [{"uri": upstream.url + "/hello"}]}
        status, _, body = await caller.post(server.url + "/multiplex", ok)
        assert status == 200 and "Success" in body["responses"][0]
    finally:
        await server.stop()
    assert reactor.running


@pytest_twisted.ensureDeferred
async def test_framing_headers_in_success(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """Content-Length is reported as the upstream sent it; hop-by-hop framing is not."""
    batch = {
        "timeout_msec": 2000,
        "requests": [
            {"uri": upstream.url + "/bytes/5"},
            {"uri": upstream.url + "/delay/1"},
            {"method": "HEAD", "uri": upstream.url + "/bytes/7"},
        ],
    }
    status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    assert status == 200
    fixed, chunked, head = (o["Success"] for o in body["responses"])
    assert fixed["headers"]["content-length"] == "5"
    assert "content-length" not in chunked["headers"]
    assert "transfer-encoding" not in chunked["headers"]
    assert chunked["content"] == "delayed 1"
    assert (head["headers"]["content-length"], head["content"]) == ("7", "")


@pytest_twisted.ensureDeferred
async def test_a_form_content_type_is_not_parsed_as_a_form(
    octoplex: Octoplex, upstream: Upstream
) -> None:
    """
    The body is read as a JSON batch whatever its Content-Type: twisted.web's
    form parsing is off, so a multipart type with no valid parts gets the
    JSON answer (a batch that runs), not twisted.web's bare 400 and a close.
    """
    port = octoplex.port.getHost().port
    body = json.dumps({"timeout_msec": 1000, "requests": [{"uri": upstream.url + "/hello"}]})
    for content_type in (
        b"multipart/form-data; boundary=nothere",
        b"application/x-www-form-urlencoded",
    ):
        request = (
            b"POST /multiplex HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
            + content_type
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body.encode()
        )
        answer = await deferToThread(_raw_exchange, port, request)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        document = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        check_answer(200, document)
        assert document["responses"][0]["Success"]["content"] == "Hello world!"
