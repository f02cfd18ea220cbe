"""
Property-based fuzzing of ``POST /multiplex`` over real sockets.

One Octoplex (in-process, :func:`~tests.servers.start_octoplex`) and one
upstream with a few misbehaving neighbours run on 127.0.0.1 for the whole
module.  Hypothesis generates batch bodies, from structurally valid batches
with junk values to arbitrary JSON and raw bytes, and each is POSTed over a
fresh TCP connection by a raw client that checks the answer byte by byte.

The properties, for every input:

- the answer is a complete HTTP/1.1 response with a ``Content-Length`` that
  matches its body: never a dropped connection, never a hang;
- its status is ``200`` or ``4xx``, never ``5xx``; its body is strict JSON
  (``application/json; charset=utf-8``);
- a ``4xx`` holds exactly ``{"error": "<non-empty string>"}``; a ``200``
  holds exactly ``{"responses": [...]}`` with one outcome per request, in
  order, each ``{"Success": ...}`` or ``{"Failure": ...}`` with the v1 fields
  (``shared/WIRE-FORMAT.md``), a Failure's ``kind`` one of the documented
  set, a body that is not UTF-8 as ``content_base64``;
- ``400`` exactly when :func:`octoplex.wire.parse_batch`, run here on the same
  bytes, refuses the batch (or crashes on it), ``200`` otherwise; a request
  it finds invalid fails alone, in its place, with that error, kind
  ``invalid`` and ``duration_msec`` 0;
- what the upstream answers arrives intact: ``/status/N`` gives N,
  ``/hello`` its text, ``/bytes/N`` N bytes or, past the response limit, a
  Failure; a request to the live upstream is never "refused";
- nothing is logged as an error, and afterwards a normal batch still works.

Only loopback is ever contacted: URIs name 127.0.0.1, and host names are
ones that fail IDNA (``.test`` names, nothing resolved).  Before anything is
sent, the example is parsed here, and one that would reach a host other than
a 127.0.0.0/8 literal is rejected, so no generated value can trigger a DNS
query or leave the machine.

Runs are repeatable (``derandomize``, no example database, a fixed number
of examples); the module takes about 20 s on 2 cores.  Hypothesis drives the ``async`` tests through
pytest-twisted, which runs each example on the reactor (``@given`` must be
the outermost decorator).
"""

from __future__ import annotations

import base64
import gzip
import ipaddress
import json
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, example, given, reject, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from octoplex.errors import KINDS
from octoplex.limits import Limits
from octoplex.wire import Batch, InvalidRequest, UpstreamRequest, parse_batch

from .schema import check_answer
from .servers import Octoplex, Upstream, start_misbehaving, start_octoplex, start_upstream

# Small limits, so that each limit is reachable and no example can run long:
# every accepted batch is answered within 200 ms of arriving.
LIMITS = Limits(max_batch_size=8, max_timeout_msec=200, max_response_bytes=4096)

#: How long one exchange may take before the test calls it a hang.
EXCHANGE_TIMEOUT = 10.0
#: Slack over a batch's deadline for its answer to arrive (a loaded CI box).
ANSWER_SLACK_S = 5.0

_FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)


def fuzz(examples: int) -> settings:
    """
    The module's settings, with ``examples`` examples (fixed: CI is repeatable).
    """
    return settings(_FUZZ, max_examples=examples)


# Placeholders for the servers' addresses, which are known only at run time;
# a reproducer that hypothesis prints keeps them.
UP = "@UP@"
RESET = "@RESET@"
CLOSE = "@CLOSE@"
GARBAGE = "@GARBAGE@"
REFUSED = "@REFUSED@"


class Servers:
    """
    What the module's tests talk to.
    """

    def __init__(
        self,
        octoplex: Octoplex,
        upstream: Upstream,
        others: list[IListeningPort],
        addresses: dict[str, str],
    ) -> None:
        self.octoplex = octoplex
        self.upstream = upstream
        self.others = others
        self.addresses = addresses

    @property
    def port(self) -> int:
        return self.octoplex.port.getHost().port

    def __repr__(self) -> str:
        return f"<Servers {self.addresses}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Short, in hypothesis's report of a failing example.
        printer.text(repr(self))

    def fill(self, text: bytes) -> bytes:
        for placeholder, address in self.addresses.items():
            text = text.replace(placeholder.encode(), address.encode())
        return text


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """
    Octoplex, the upstream and its misbehaving neighbours, for the module.
    """
    upstream = start_upstream()
    octoplex = start_octoplex(LIMITS)
    addresses = {UP: upstream.url.removeprefix("http://")}
    others = []
    for placeholder, mode in ((RESET, "reset"), (CLOSE, "close"), (GARBAGE, "garbage")):
        url, port = start_misbehaving(mode)
        others.append(port)
        addresses[placeholder] = url.removeprefix("http://")
    addresses[REFUSED] = f"127.0.0.1:{_refused_port()}"
    yield Servers(octoplex, upstream, others, addresses)
    pytest_twisted.blockon(octoplex.stop())
    pytest_twisted.blockon(upstream.stop())
    for port in others:
        pytest_twisted.blockon(port.stopListening())


# --------------------------------------------------------------------------
# The client: raw bytes out, raw bytes back, until the server closes.


class _Exchange(Protocol):
    def __init__(self, payload: bytes) -> None:
        self._payload = payload
        self._chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred(self._abort)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._payload)

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self._chunks))

    def _abort(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


async def exchange(port: int, body: bytes, extra_headers: bytes = b"") -> bytes:
    """
    POST ``body`` to /multiplex on a new connection; return every byte the
    server sent until it closed.
    """
    head = (
        b"POST /multiplex HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n" % (port, len(body))
    )
    protocol = _Exchange(head + extra_headers + b"\r\n" + body)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    return await protocol.done.addTimeout(EXCHANGE_TIMEOUT, reactor)


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3}) [^\r\n]*")


def parse_response(raw: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """
    Split a whole HTTP/1.1 response, failing unless it is complete and
    framed by a Content-Length.
    """
    head, separator, body = raw.partition(b"\r\n\r\n")
    assert separator, f"the connection closed before a whole response head: {raw[:300]!r}"
    status_line, *lines = head.split(b"\r\n")
    match = _STATUS_LINE.fullmatch(status_line)
    assert match, f"bad status line {status_line!r}"
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        assert colon and name and name == name.strip(), f"bad header line {line!r}"
        headers.setdefault(name.lower(), []).append(value.strip())
    lengths = headers.get(b"content-length", [])
    assert len(lengths) == 1, f"want one Content-Length, got {lengths}: {raw[:300]!r}"
    assert int(lengths[0]) == len(body), (
        f"Content-Length {lengths[0]!r} but {len(body)} bytes came: {raw[:300]!r}"
    )
    return int(match.group(1)), headers, body


def _no_constants(name: str) -> None:
    raise AssertionError(f"the answer holds {name}, which is not JSON")


def strict_json(body: bytes) -> Any:
    return json.loads(body.decode("utf-8"), parse_constant=_no_constants)


# --------------------------------------------------------------------------
# The checks


class _ErrorLog:
    """
    Collects the error events logged while one example runs.
    """

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("isError") or ("log_failure" in event and not event.get("expected_failure")):
            self.errors.append(event)

    def __enter__(self) -> _ErrorLog:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        globalLogPublisher.removeObserver(self)

    def describe(self) -> str:
        lines = []
        for event in self.errors:
            failure = event.get("log_failure") or event.get("failure")
            if isinstance(failure, Failure):
                lines.append(failure.getTraceback())
            else:
                lines.append(repr(event.get("log_format") or event))
        return "\n".join(lines)


def oracle(body: bytes) -> Batch | Exception:
    """
    What the daemon's own parser makes of ``body``: a batch, or the
    exception that refuses it (any exception: a crash is a refusal too, and
    the daemon must still answer it with a 4xx).
    """
    try:
        return parse_batch(body, LIMITS)
    except Exception as e:
        return e


def loopback_only(batch: Batch | Exception) -> None:
    """
    Reject the example unless every request that would be sent names an
    IPv4 literal in 127.0.0.0/8: no DNS query, no packet off the machine.
    """
    if not isinstance(batch, Batch):
        return
    for request in batch.requests:
        if isinstance(request, UpstreamRequest):
            try:
                address = ipaddress.IPv4Address(request.url.host)
            except ValueError:
                reject()
            if not address.is_loopback:
                reject()


#: How a body is sent: its Content-Encoding, the bytes on the wire, and
#: whether the daemon can decode them back (else it must answer 400).
ENCODINGS: dict[str, tuple[bytes | None, Callable[[bytes], bytes], bool]] = {
    "none": (None, lambda body: body, True),
    "identity": (b"identity", lambda body: body, True),
    "gzip": (b"gzip", gzip.compress, True),
    "x-gzip": (b"x-gzip", gzip.compress, True),
    "gzip, not encoded": (b"gzip", lambda body: body, False),
    "gzip, cut short": (b"gzip", lambda body: gzip.compress(body)[:-4], False),
    "br": (b"br", lambda body: body, False),
}


async def post_and_check(servers: Servers, body: bytes, encoding: str = "none") -> None:
    """
    POST ``body``, encoded as ``encoding`` says, and check every property
    of the answer.
    """
    content_encoding, encode, decodable = ENCODINGS[encoding]
    expected = oracle(body) if decodable else ValueError(f"undecodable {encoding}")
    loopback_only(expected)
    extra = b"" if content_encoding is None else b"Content-Encoding: " + content_encoding + b"\r\n"
    started = reactor.seconds()
    with _ErrorLog() as log:
        raw = await exchange(servers.port, encode(body), extra)
    elapsed = reactor.seconds() - started
    status, headers, payload = parse_response(raw)
    assert not log.errors, f"the daemon logged errors (answered {status}):\n{log.describe()}"
    assert status == 200 or 400 <= status < 500, f"status {status}: {raw[:500]!r}"
    assert headers.get(b"content-type") == [b"application/json; charset=utf-8"], headers
    document = strict_json(payload)
    check_answer(status, document)
    if isinstance(expected, Exception):
        assert status == 400, f"want 400 ({expected!r}), got {status}: {document!r}"
    else:
        assert status == 200, f"want 200, got {status}: {document!r}"
    if status != 200:
        assert isinstance(document, dict) and list(document) == ["error"], document
        assert isinstance(document["error"], str) and document["error"], document
        return
    assert isinstance(expected, Batch)
    assert isinstance(document, dict) and list(document) == ["responses"], document
    outcomes = document["responses"]
    assert isinstance(outcomes, list)
    assert len(outcomes) == len(expected.requests), (len(outcomes), len(expected.requests))
    assert elapsed < expected.timeout_msec / 1000 + ANSWER_SLACK_S, elapsed
    for index, (request, outcome) in enumerate(zip(expected.requests, outcomes, strict=True)):
        check_outcome(servers, expected.timeout_msec, request, outcome, index)


def _is_msec(value: Any, timeout_msec: int) -> bool:
    return type(value) is int and 0 <= value <= timeout_msec + ANSWER_SLACK_S * 1000


# Methods the upstream answers like GET, with a body.
_PLAIN = {"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}


def check_outcome(
    servers: Servers,
    timeout_msec: int,
    request: UpstreamRequest | InvalidRequest,
    outcome: Any,
    index: int,
) -> None:
    where = f"outcome {index} ({request.uri!r}): {outcome!r}"
    assert isinstance(outcome, dict) and len(outcome) == 1, where
    ((kind, value),) = outcome.items()
    assert isinstance(value, dict), where
    if kind == "Failure":
        assert set(value) == {"error", "kind", "duration_msec"}, where
        assert isinstance(value["error"], str) and value["error"], where
        assert value["kind"] in KINDS, where
        assert _is_msec(value["duration_msec"], timeout_msec), where
        if isinstance(request, InvalidRequest):
            assert value == {"error": request.error, "kind": "invalid", "duration_msec": 0}, where
        elif _at_upstream(servers, request):
            assert "refused" not in value["error"], f"the live upstream refused? {where}"
        return
    assert kind == "Success", where
    assert isinstance(request, UpstreamRequest), f"an invalid request succeeded: {where}"
    # A body that is not UTF-8 comes as content_base64 instead of content.
    assert set(value) in (
        {"headers", "status", "content", "duration_msec"},
        {"headers", "status", "content_base64", "duration_msec"},
    ), where
    assert isinstance(value["headers"], dict), where
    for name, header in value["headers"].items():
        assert isinstance(name, str) and name == name.lower(), where
        assert isinstance(header, str), where
    assert type(value["status"]) is int, where
    if "content" in value:
        assert isinstance(value["content"], str), where
    else:
        value["content"] = base64.b64decode(value["content_base64"], validate=True).decode(
            "latin-1"
        )
    assert _is_msec(value["duration_msec"], timeout_msec), where
    if not _at_upstream(servers, request):
        return
    path = "/" + "/".join(request.url.path)
    # treq sends the method upper-cased.
    method = request.method.decode("ascii").upper()
    status, content = value["status"], value["content"]
    if m := re.fullmatch(r"/status/([0-9]+)", path):
        assert status == int(m.group(1)), where
    elif path == "/hello" and method in _PLAIN:
        assert (status, content) == (200, "Hello world!"), where
    elif m := re.fullmatch(r"/bytes/([0-9]+)", path):
        count = int(m.group(1))
        assert count <= LIMITS.max_response_bytes, f"a body past the limit was kept: {where}"
        if method in _PLAIN:
            assert (status, content) == (200, "x" * count), where
    elif path == "/echo" and method in _PLAIN:
        assert status == 200, where
        assert json.loads(content)["method"] == method, where


def _at_upstream(servers: Servers, request: UpstreamRequest | InvalidRequest) -> bool:
    """
    Whether the caller's URI, as written, names the live upstream.
    """
    if request.uri is None:
        return False
    return f"//{servers.addresses[UP]}/" in request.uri.lower()


# --------------------------------------------------------------------------
# Strategies

_TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
tokens = st.text(alphabet=_TCHARS, min_size=1, max_size=12)

# Text with the characters that break HTTP: CR, LF, NUL, other controls,
# DEL, C1 controls, Unicode line separators, non-BMP characters.
_NASTY = ["\r", "\n", "\r\n", "\x00", "\t", " ", "\x0b", "\x1f", "\x7f", "\x85", "\u2028", ":"]
nasty_text = st.one_of(
    st.text(max_size=24),
    st.lists(
        st.sampled_from([*_NASTY, "a", "Z", "é", "😀", "%", "/", "\\", "@", "?", "#"]),
        max_size=12,
    ).map("".join),
    st.sampled_from(["", "a\r\nX-Injected: yes", "a\nb", "\x00", "gzip", "chunked", "close"]),
)

methods = st.one_of(
    st.sampled_from(
        ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "PROPFIND"]
    ),
    st.sampled_from(["get", "Post", "X-CUSTOM", "M-SEARCH", "G E T", "GET\r\n", ""]),
    tokens,
    nasty_text,
)

_ROUTES = st.one_of(
    st.just("/hello"),
    st.integers(200, 599).map(lambda n: f"/status/{n}"),
    st.just("/echo"),
    st.integers(0, 6000).map(lambda n: f"/bytes/{n}"),
    st.just("/no-such-route"),
)
_QUERIES = st.one_of(
    st.just(""),
    st.text(max_size=8).map(lambda text: "?q=" + text),
    st.just("#fragment"),
)
_SCHEMES = st.sampled_from(["http", "http", "http", "HTTP", "Http"])

# Unicode host names under .test that IDNA refuses (each holds a character
# it disallows), so they fail at parse and nothing is resolved.
_BAD_IDNA = st.builds(
    lambda before, bad, after: f"{before}{bad}{after}.test",
    st.text(alphabet="abcxyzäöüßéñжλ", max_size=5),
    st.sampled_from(["☃", "_", "\u0378", "!", "♥", "\u2488"]),
    st.text(alphabet="abcxyzäöüßéñжλ", max_size=5),
)


def _spoil(uri: str, bad: str, at: int) -> str:
    at = min(at, len(uri))
    return uri[:at] + bad + uri[at:]


good_uris = st.one_of(
    st.builds(lambda s, r, q: f"{s}://{UP}{r}{q}", _SCHEMES, _ROUTES, _QUERIES),
    st.sampled_from([RESET, CLOSE, GARBAGE, REFUSED]).map(lambda a: f"http://{a}/x"),
)
junk_uris = st.one_of(
    st.text(max_size=30),
    st.builds(lambda h, r: f"http://{h}{r}", _BAD_IDNA, _ROUTES),
    st.builds(lambda h: f"https://{h}:443/", _BAD_IDNA),
    st.sampled_from(
        [
            "",
            "/hello",
            "//127.0.0.1/hello",
            "127.0.0.1",
            "http:/127.0.0.1/",
            "http://",
            "http:///hello",
            "ftp://127.0.0.1/",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "gopher://127.0.0.1:70/",
            "ws://127.0.0.1/",
            "http://127.0.0.1:0/",
            "http://127.0.0.1:65536/",
            "http://127.0.0.1:-1/",
            "http://127.0.0.1:99999999999999999999/",
            "http://127.0.0.1:8o/",
            "http://127.0.0.1:/",
            "http://[::1]:1/",
            "http://[::1/",
            "http://user:pw@127.0.0.1:1/",
            "http://@127.0.0.1:1/",
            "http://xn--.test/",
            "http://-a.test/",
            "http://a..test/",
            "http://%41.test/",
        ]
    ),
    st.builds(lambda p: f"http://127.0.0.1:{p}/", st.integers(65536, 10**30)),
    st.builds(
        _spoil,
        good_uris,
        st.sampled_from(["\r\n", "\n", "\x00", " ", "\t", "\x7f", "\x01"]),
        st.integers(0, 40),
    ),
)
uris = st.one_of(good_uris, good_uris, junk_uris)

header_names = st.one_of(
    st.sampled_from(
        [
            "Connection",
            "Keep-Alive",
            "Proxy-Connection",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
            "Content-Length",
            "Content-Encoding",
            "Host",
            "Expect",
            "Accept-Encoding",
            "Cookie",
            "Authorization",
            "Idempotency-Key",
            "X-Forwarded-For",
        ]
    ),
    tokens,
    nasty_text,
)
header_values = st.one_of(
    nasty_text,
    st.sampled_from(["gzip", "GZIP", "br", "identity", "chunked", "close", "100-continue", "0"]),
    st.integers(-5, 5000).map(str),
)
headers = st.dictionaries(header_names, header_values, max_size=4)
bodies = st.one_of(st.text(max_size=200), st.text(alphabet="xé", min_size=500, max_size=3000))


@st.composite
def items(draw: st.DrawFn) -> dict[str, Any]:
    """
    One request of a batch, with the right types and any values.
    """
    item: dict[str, Any] = {"uri": draw(uris)}
    if draw(st.booleans()):
        item["method"] = draw(methods)
    if draw(st.booleans()):
        item["headers"] = draw(st.none() | headers)
    if draw(st.booleans()):
        item["body"] = draw(st.none() | bodies)
    return item


valid_timeouts = st.integers(0, LIMITS.max_timeout_msec)
invalid_timeouts = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=LIMITS.max_timeout_msec + 1),
    st.floats(),
    st.sampled_from([0.0, 1.0, 50.5, 1e3, True, False, None, "100", [], {}]),
)

#: Batches of the right shape: a deadline and 1 to the maximum of requests.
valid_documents = st.fixed_dictionaries(
    {
        "timeout_msec": valid_timeouts,
        "requests": st.lists(items(), min_size=1, max_size=LIMITS.max_batch_size),
    }
)


@st.composite
def structured_documents(draw: st.DrawFn) -> dict[str, Any]:
    """
    Mostly batches of the right shape; now and then one with a deadline or a
    request count out of range.
    """
    shape = draw(st.integers(0, 9))
    if shape < 7:
        document: dict[str, Any] = draw(valid_documents)
    elif shape < 9:
        document = {
            "timeout_msec": draw(invalid_timeouts),
            "requests": draw(st.lists(items(), min_size=1, max_size=3)),
        }
    else:
        size = draw(st.sampled_from([0, LIMITS.max_batch_size + 1, LIMITS.max_batch_size + 3]))
        document = {
            "timeout_msec": draw(valid_timeouts),
            "requests": draw(st.lists(items(), min_size=size, max_size=size)),
        }
    return document


_FIELDS = ["timeout_msec", "requests", "method", "uri", "headers", "body"]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=16),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def mutated_documents(draw: st.DrawFn) -> Any:
    """
    An arbitrary JSON value: the whole document, or put in place of (or
    beside, or instead of) any field of a valid batch.
    """
    document: dict[str, Any] = draw(valid_documents)
    value = draw(json_values)
    where = draw(
        st.sampled_from(
            [
                "document",
                "timeout_msec",
                "requests",
                "extra field",
                "drop field",
                "item",
                "item field",
                "item extra field",
                "item drop uri",
                "header value",
            ]
        )
    )
    item = draw(st.sampled_from(document["requests"]))
    if where == "document":
        return value
    if where in ("timeout_msec", "requests"):
        document[where] = value
    elif where == "extra field":
        document[draw(st.text(max_size=8))] = value
    elif where == "drop field":
        del document[draw(st.sampled_from(["timeout_msec", "requests"]))]
    elif where == "item":
        document["requests"][document["requests"].index(item)] = value
    elif where == "item field":
        item[draw(st.sampled_from(["method", "uri", "headers", "body"]))] = value
    elif where == "item extra field":
        item[draw(st.text(max_size=8))] = value
    elif where == "item drop uri":
        del item["uri"]
    else:
        item["headers"] = {**(item.get("headers") or {}), draw(header_names): value}
    return document


def dumps(document: Any, ensure_ascii: bool = True) -> bytes:
    return json.dumps(document, ensure_ascii=ensure_ascii).encode("utf-8")


_BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x00"]


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    text = dumps(draw(valid_documents))
    return text[: draw(st.integers(0, len(text) - 1))]


@st.composite
def spliced(draw: st.DrawFn) -> bytes:
    text = dumps(draw(valid_documents), ensure_ascii=draw(st.booleans()))
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(st.sampled_from(_BAD_UTF8)) + text[at:]


@st.composite
def duplicated(draw: st.DrawFn) -> bytes:
    document = draw(valid_documents)
    name = draw(st.sampled_from(["timeout_msec", "requests"]))
    return dumps(document)[:-1] + b", " + dumps(name) + b": " + dumps(document[name]) + b"}"


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 3000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    deep = opener * depth + b"0" + closer * depth
    template = draw(
        st.sampled_from(
            [
                b"%s",
                b'{"timeout_msec": %s, "requests": []}',
                b'{"timeout_msec": 5, "requests": %s}',
                b'{"timeout_msec": 5, "requests": [{"uri": "http://127.0.0.1:1/", "body": %s}]}',
            ]
        )
    )
    return template % deep


# Python refuses to turn more than 4300 digits into an int (CVE-2020-10735).
long_numbers = st.builds(
    lambda digits, where: where % (b"1" + b"0" * digits),
    st.integers(4250, 4400),
    st.sampled_from([b"%s", b'{"timeout_msec": %s, "requests": []}', b"[%s]"]),
)

raw_bodies = st.one_of(
    st.binary(max_size=300),
    long_numbers,
    truncated(),
    spliced(),
    duplicated(),
    nested(),
    st.sampled_from(
        [
            b"",
            b" ",
            b"{}",
            b"null",
            b"NaN",
            b"-Infinity",
            b'"\\u0000"',
            b"\xef\xbb\xbf{}",
            b'{"timeout_msec": NaN, "requests": [{"uri": "http://127.0.0.1:1/"}]}',
            b'{"timeout_msec": 1e999, "requests": [{"uri": "http://127.0.0.1:1/"}]}',
            b'{"timeout_msec": 5, "requests": [{"uri": "http://127.0.0.1:1/"}]} trailing',
            b'{"timeout_msec": 5, "requests": [{"uri": "http://127.0.0.1:1/"},]}',
            b"{'timeout_msec': 5}",
        ]
    ),
)


# --------------------------------------------------------------------------
# The tests


@given(document=structured_documents(), ensure_ascii=st.booleans())
@fuzz(500)
@example(
    # An upper-case scheme must not lose the port: this is the live upstream.
    document={"timeout_msec": LIMITS.max_timeout_msec, "requests": [{"uri": f"HTTP://{UP}/hello"}]},
    ensure_ascii=True,
)
@pytest_twisted.ensureDeferred
async def test_structured_batches(servers: Servers, document: Any, ensure_ascii: bool) -> None:
    """Batches of the right shape with junk methods, URIs, headers, bodies and deadlines."""
    await post_and_check(servers, servers.fill(dumps(document, ensure_ascii)))


@given(document=mutated_documents())
@fuzz(400)
@pytest_twisted.ensureDeferred
async def test_arbitrary_json(servers: Servers, document: Any) -> None:
    """Any JSON value, as the whole document or in place of any field."""
    await post_and_check(servers, servers.fill(dumps(document)))


@given(body=raw_bodies, encoding=st.sampled_from(list(ENCODINGS)))
@fuzz(300)
@example(
    # ValueError from int(): Python refuses to convert more than 4300 digits.
    body=b'{"timeout_msec": 1' + b"0" * 5000 + b', "requests": []}',
    encoding="none",
)
@pytest_twisted.ensureDeferred
async def test_raw_bytes(servers: Servers, body: bytes, encoding: str) -> None:
    """Bytes that are not a batch: arbitrary, truncated, invalid UTF-8, deep, gzip-encoded."""
    body = servers.fill(body)
    await post_and_check(servers, body, encoding)


def _with_surrogate(document: dict[str, Any], where: str, text: str) -> dict[str, Any]:
    item = document["requests"][0]
    if where == "timeout_msec":
        document["timeout_msec"] = text
    elif where == "field name":
        document[text] = 1
    elif where == "header name":
        item["headers"] = {text: "x"}
    elif where == "header value":
        item["headers"] = {"x-fuzz": text}
    else:
        item[where] = text
    return document


_SURROGATE_FIELDS = [
    "timeout_msec",
    "field name",
    "uri",
    "method",
    "body",
    "header name",
    "header value",
]


@given(
    where=st.sampled_from(_SURROGATE_FIELDS),
    text=st.builds(
        lambda a, s, b: a + s + b,
        st.text(max_size=4),
        st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"]),
        st.text(max_size=4),
    ),
)
@fuzz(50)
@example(where="timeout_msec", text="\ud800")
@example(where="uri", text="\ud800")
@example(where="method", text="\ud800")
@example(where="header value", text="\ud800")
@example(where="body", text="\ud800")
@pytest_twisted.ensureDeferred
async def test_lone_surrogates(servers: Servers, where: str, text: str) -> None:
    """JSON escapes of lone UTF-16 surrogates (valid JSON, not valid Unicode) in any string."""
    document = {"timeout_msec": 100, "requests": [{"uri": f"http://{UP}/hello"}]}
    await post_and_check(servers, servers.fill(dumps(_with_surrogate(document, where, text))))


@pytest_twisted.ensureDeferred
async def test_still_serving_after_the_fuzzing(servers: Servers) -> None:
    """After everything above, the same daemon still answers a normal batch in full."""
    document = {
        "timeout_msec": LIMITS.max_timeout_msec,
        "requests": [
            {"uri": f"http://{UP}/hello"},
            {"method": "POST", "uri": f"http://{UP}/echo", "body": "still here"},
            {"uri": f"http://{UP}/status/204"},
        ],
    }
    raw = await exchange(servers.port, servers.fill(dumps(document)))
    status, _, payload = parse_response(raw)
    assert status == 200, raw
    answer = strict_json(payload)
    check_answer(200, answer)
    hello, echo, no_content = (r["Success"] for r in answer["responses"])
    assert (hello["status"], hello["content"]) == (200, "Hello world!")
    assert json.loads(echo["content"])["body"] == "still here"
    assert no_content["status"] == 204
