"""
octoplex.caller, the client for Python callers: its batches are the wire
format (checked against octoplex.schema and the daemon's own parser), its
outcomes parse what the daemon sends, and its four send functions work over
real sockets against the real daemon, in-process on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import attr
import pytest
import pytest_twisted
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Request as WebRequest
from twisted.web.server import Site

from octoplex import errors, timings, wire
from octoplex.auth import Tokens
from octoplex.caller import (
    KINDS,
    MAX_ID_LENGTH,
    MAX_RETRIES,
    BadAnswer,
    Batch,
    BatchRefused,
    Defaults,
    Outcome,
    Request,
    Retry,
    StreamReader,
    Summary,
    Timings,
    retry_after,
    send,
    send_blocking,
    send_streamed,
    send_streamed_blocking,
)
from octoplex.limits import Limits
from octoplex.multiplexer import _BatchRun

from .schema import check_batch
from .servers import Octoplex, Upstream, start_octoplex, wait_until
from .test_inbound_tls import HTTPSCaller, ServerPKI, running, tls_argv, write_leaf
from .test_twistd import ROOT, environment, free_port

#: How long any one call of these tests may take before it fails: far more
#: than any takes on a loaded 2-core machine.
CALL_TIMEOUT = 15.0

TOKEN = "s3cret-token-of-bidder-7"


def multiplex(octoplex: Octoplex) -> str:
    return octoplex.url + "/multiplex"


def in_thread(function: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    """
    Run a blocking function in the reactor's thread pool, so that the
    daemon and the upstream, in this process, keep running meanwhile.
    """
    return deferToThread(function, *args, **kwargs)


async def batches_settled() -> None:
    """Wait until the daemon has no batch deadline scheduled: every batch has settled."""
    await wait_until(
        lambda: (
            not any(
                isinstance(getattr(call.func, "__self__", None), _BatchRun)
                for call in reactor.getDelayedCalls()
            )
        ),
        "the daemon's batches to settle",
    )


# The batch, without sockets.


def test_constants_match_the_daemon() -> None:
    """The client's copies of the daemon's bounds and kinds are the daemon's."""
    assert MAX_ID_LENGTH == wire.MAX_ID_LENGTH
    assert MAX_RETRIES == wire.MAX_RETRIES
    assert KINDS == errors.KINDS
    names = [field.name for field in attr.fields(Timings)]
    assert names == [*timings.PHASES, "total_msec", "reused"]


def test_unset_fields_are_left_out() -> None:
    """A batch of bare URIs is the original format's JSON, nothing added."""
    batch = Batch(250, ["http://a.example/", Request("http://b.example/")])
    assert batch.to_json() == {
        "timeout_msec": 250,
        "requests": [{"uri": "http://a.example/"}, {"uri": "http://b.example/"}],
    }
    assert batch.to_bytes() == (
        b'{"timeout_msec":250,"requests":[{"uri":"http://a.example/"},{"uri":"http://b.example/"}]}'
    )


def test_every_field_is_the_wire_format() -> None:
    """Every field the schema has comes out under its wire name; bytes go as body_base64."""
    batch = Batch(
        timeout_msec=1000,
        requests=[
            Request(
                "https://api.example/users",
                method="POST",
                headers={"Content-Type": "application/json", "X-Seat": ["1", "2"]},
                body='{"name":"Bruce"}',
                id="create",
                timeout_msec=800,
                retry=Retry(2, [503, 429]),
            ),
            Request("users/1", body=b"\x89PNG\xff", retry=Retry(1, connect_errors=True)),
        ],
        content_base64=True,
        header_list=True,
        content_encoding=True,
        timings=True,
        max_parallel=1,
        defaults=Defaults(
            method="PUT",
            headers={"Authorization": "Bearer x"},
            body="default",
            base_uri="https://api.example/v1/",
            retry=Retry(1, [500], connect_errors=True),
        ),
    )
    document = batch.to_json()
    assert document == {
        "timeout_msec": 1000,
        "requests": [
            {
                "id": "create",
                "method": "POST",
                "uri": "https://api.example/users",
                "headers": {"Content-Type": "application/json", "X-Seat": ["1", "2"]},
                "body": '{"name":"Bruce"}',
                "timeout_msec": 800,
                "retry": {"times": 2, "statuses": [503, 429]},
            },
            {
                "uri": "users/1",
                "body_base64": "iVBOR/8=",
                "retry": {"times": 1, "connect_errors": True},
            },
        ],
        "content_base64": True,
        "header_list": True,
        "content_encoding": True,
        "timings": True,
        "max_parallel": 1,
        "defaults": {
            "method": "PUT",
            "headers": {"Authorization": "Bearer x"},
            "body": "default",
            "base_uri": "https://api.example/v1/",
            "retry": {"times": 1, "statuses": [500], "connect_errors": True},
        },
    }
    check_batch(document)
    wire.parse_batch(batch.to_bytes(), Limits())
    assert Batch.from_json(json.loads(batch.to_bytes())) == batch


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_TOKEN = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,8}", fullmatch=True)
_HEADERS = st.dictionaries(_TEXT, _TEXT | st.lists(_TEXT, max_size=3), max_size=3)
_BODY = st.none() | _TEXT | st.binary(max_size=12)
_MSEC = st.integers(0, Limits().max_timeout_msec)


@st.composite
def _retries(draw: st.DrawFn) -> Retry:
    statuses = draw(st.lists(st.integers(400, 599), max_size=3))
    connect = draw(st.booleans()) if statuses else True
    return Retry(draw(st.integers(1, MAX_RETRIES)), statuses, connect)


@st.composite
def _batches(draw: st.DrawFn) -> Batch:
    size = draw(st.integers(1, 5))
    ids = draw(st.lists(st.text(min_size=1, max_size=MAX_ID_LENGTH), max_size=size, unique=True))
    requests = [
        Request(
            draw(_TEXT),
            method=draw(st.none() | _TOKEN),
            headers=draw(_HEADERS),
            body=draw(_BODY),
            id=ids[index] if index < len(ids) else None,
            timeout_msec=draw(st.none() | _MSEC),
            retry=draw(st.none() | _retries()),
        )
        for index in range(size)
    ]
    defaults = draw(
        st.none()
        | st.builds(
            Defaults,
            method=st.none() | _TOKEN,
            headers=_HEADERS,
            body=_BODY,
            base_uri=st.none() | st.sampled_from(["http://a.example/", "https://b.example/v1/"]),
            retry=st.none() | _retries(),
        )
    )
    return Batch(
        draw(_MSEC),
        requests,
        content_base64=draw(st.booleans()),
        header_list=draw(st.booleans()),
        content_encoding=draw(st.booleans()),
        timings=draw(st.booleans()),
        max_parallel=draw(st.none() | st.integers(1, 100)),
        defaults=defaults,
    )


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_batches())
def test_every_batch_it_builds_is_one_the_daemon_takes(batch: Batch) -> None:
    """
    Whatever batch the classes let a caller build validates against the
    schema, parses in the daemon without a batch error, and reads back equal.
    """
    check_batch(batch.to_json())
    body = batch.to_bytes()
    parsed = wire.parse_batch(body, Limits())
    assert len(parsed.requests) == len(batch.requests)
    assert Batch.from_json(json.loads(body)) == batch


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: Batch(1.5, ["http://a/"]), TypeError, "timeout_msec must be a whole number"),
        (lambda: Batch(True, ["http://a/"]), TypeError, "timeout_msec must be a whole number"),
        (lambda: Batch(-1, ["http://a/"]), ValueError, "timeout_msec must be 0 or more"),
        (lambda: Batch(100, []), ValueError, "at least one request"),
        (lambda: Batch(100, "http://a/"), TypeError, "sequence of Request"),
        (lambda: Batch(100, ["http://a/"], max_parallel=0), ValueError, "max_parallel must be 1"),
        (lambda: Batch(100, ["http://a/"], timings=1), TypeError, "timings must be True or False"),
        (
            lambda: Batch(100, [Request("http://a/", id="x"), Request("http://b/", id="x")]),
            ValueError,
            "requests[1].id 'x' is already the id of requests[0]",
        ),
        (lambda: Request("http://a/", method="G T"), ValueError, "not an HTTP method token"),
        (lambda: Request("http://a/", method=""), ValueError, "not an HTTP method token"),
        (lambda: Request("http://a/", id=""), ValueError, "between 1 and 256"),
        (lambda: Request("http://a/", id="x" * 257), ValueError, "257 characters long"),
        (lambda: Request("http://a/", timeout_msec="5"), TypeError, "timeout_msec must be"),
        (lambda: Request("http://a/", body=5), TypeError, "body must be str"),
        (lambda: Request("http://a/", headers={"X": 1}), TypeError, "header X must be a str"),
        (lambda: Request("http://a/", headers={"X": b"v"}), TypeError, "header X must be a str"),
        (lambda: Request(b"http://a/"), TypeError, "Request.uri must be a str"),
        (lambda: Retry(0, [503]), ValueError, "times must be from 1 to 5"),
        (lambda: Retry(6, [503]), ValueError, "times must be from 1 to 5"),
        (lambda: Retry(1, [200]), ValueError, "statuses from 400 to 599"),
        (lambda: Retry(1), ValueError, "retries nothing"),
        (lambda: Defaults(base_uri="ftp://a/"), ValueError, "absolute http:// or https://"),
        (lambda: Defaults(base_uri="/v1/"), ValueError, "absolute http:// or https://"),
        (lambda: Defaults(base_uri="http:///v1/"), ValueError, "absolute http:// or https://"),
    ],
)
def test_values_the_format_refuses_are_refused_when_built(
    build: Any, error: type[Exception], message: str
) -> None:
    """A value the daemon would refuse the whole batch for fails at once, naming the field."""
    with pytest.raises(error) as caught:
        build()
    assert message in str(caught.value)


def test_what_a_daemon_limits_is_left_to_it() -> None:
    """Deadlines and batch sizes past the default limits build: a daemon sets its own."""
    batch = Batch(10 * Limits().max_timeout_msec, ["http://a/"] * (Limits().max_batch_size + 1))
    assert len(batch.to_json()["requests"]) == Limits().max_batch_size + 1


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"timeout_msec": 1}, "missing field requests"),
        ({"timeout_msec": 1, "requests": [{}]}, "missing field uri in requests[0]"),
        ({"timeout_msec": 1, "requests": [], "stream": True}, "unknown field 'stream' in batch"),
        (
            {"timeout_msec": 1, "requests": [{"uri": "u", "body": "a", "body_base64": "YQ=="}]},
            "has both body and body_base64",
        ),
        (
            {"timeout_msec": 1, "requests": [{"uri": "u", "body_base64": "not base64!"}]},
            "requests[0].body_base64 is not valid base64",
        ),
        (
            {"timeout_msec": 1, "requests": [{"uri": "u", "retry": {"times": 1, "on": [1]}}]},
            "unknown field 'on' in requests[0].retry",
        ),
    ],
)
def test_a_batch_file_is_read_strictly(document: Any, message: str) -> None:
    """Batch.from_json refuses what the daemon would refuse, naming where."""
    with pytest.raises((TypeError, ValueError)) as caught:
        Batch.from_json(document)
    assert message in str(caught.value)


# Outcomes, without sockets.

_SUCCESS = {
    "Success": {
        "headers": {"content-type": "application/json", "set-cookie": "b=2"},
        "status": 200,
        "content": '{"bid":1.5}',
        "duration_msec": 41,
        "header_list": [["Content-Type", "application/json"], ["Set-Cookie", "a=1"]],
        "content_encoding": "gzip",
        "attempts": 2,
        "timings": {
            "queued_msec": 0.028,
            "dns_msec": None,
            "connect_msec": None,
            "tls_msec": None,
            "ttfb_msec": 39.5,
            "body_msec": 0.25,
            "total_msec": 40.1,
            "reused": True,
        },
        "id": "bidder-b",
    }
}
_BINARY = {
    "Success": {"headers": {}, "status": 503, "content_base64": "b2sg//4=", "duration_msec": 3}
}
_FAILURE = {
    "Failure": {"error": "connection refused by upstream", "kind": "connect", "duration_msec": 1}
}


def test_a_success_parses_with_every_field() -> None:
    """A Success gives its status, headers, body as bytes, text and JSON, and its extras."""
    outcome = Outcome.from_json(_SUCCESS, 4)
    assert outcome.ok and not outcome.timed_out and not outcome.retry_safe
    assert (outcome.index, outcome.status, outcome.id, outcome.attempts) == (4, 200, "bidder-b", 2)
    assert outcome.body == b'{"bid":1.5}'
    assert outcome.text == '{"bid":1.5}'
    assert outcome.json() == {"bid": 1.5}
    assert outcome.header("Content-Type") == "application/json"
    assert outcome.header("X-Missing", "none") == "none"
    assert outcome.header_list == (("Content-Type", "application/json"), ("Set-Cookie", "a=1"))
    assert outcome.content_encoding == "gzip"
    assert outcome.timings is not None
    assert (outcome.timings.ttfb_msec, outcome.timings.dns_msec) == (39.5, None)
    assert outcome.timings.reused
    assert (outcome.error, outcome.kind) == (None, None)
    assert outcome.to_json() == _SUCCESS


def test_a_binary_body_and_a_failure_parse() -> None:
    """content_base64 is decoded to its exact bytes; a Failure has its error and kind."""
    binary = Outcome.from_json(_BINARY)
    assert binary.ok and binary.status == 503 and binary.as_base64
    assert binary.body == b"ok \xff\xfe"
    assert binary.text == "ok \ufffd\ufffd"
    assert binary.to_json() == _BINARY
    failure = Outcome.from_json(_FAILURE, 1)
    assert not failure.ok
    assert (failure.kind, failure.error, failure.status, failure.body) == (
        "connect",
        "connection refused by upstream",
        None,
        b"",
    )
    assert failure.retry_safe and not failure.timed_out
    assert failure.to_json() == _FAILURE
    timeout = Outcome.from_json(
        {"Failure": {"error": "t", "kind": "queue_timeout", "duration_msec": 9}}
    )
    assert timeout.timed_out


def test_a_streamed_line_parses_with_its_index_and_newer_fields_are_ignored() -> None:
    """A streamed line says its index; a field a newer daemon adds is no error."""
    outcome = Outcome.from_json(
        {"index": 3, "id": "x", "Failure": {**_FAILURE["Failure"], "id": "x", "hint": "new"}}
    )
    assert (outcome.index, outcome.id, outcome.kind) == (3, "x", "connect")


@pytest.mark.parametrize(
    "document",
    [
        [],
        {},
        {"Success": _BINARY["Success"], "Failure": _FAILURE["Failure"]},
        {"Success": {"headers": {}, "status": 200, "duration_msec": 1}},
        {"Success": {"headers": {}, "status": "200", "content": "", "duration_msec": 1}},
        {"Failure": {"kind": "connect", "duration_msec": 1}},
        {"Success": {**_BINARY["Success"], "header_list": [["Set-Cookie"]]}},
        {"Failure": {"error": "e", "kind": "connect", "duration_msec": True}},
    ],
)
def test_what_is_no_outcome_is_a_bad_answer(document: Any) -> None:
    """Anything but one well-formed Success or Failure is a BadAnswer."""
    with pytest.raises(BadAnswer):
        Outcome.from_json(document)


def test_a_stream_cut_short_is_a_bad_answer() -> None:
    """A stream that ends before every outcome and its summary is a BadAnswer."""
    arrived: list[int | None] = []
    reader = StreamReader(2, lambda outcome: arrived.append(outcome.index))
    line = json.dumps({"index": 1, **_FAILURE}).encode()
    reader.feed(line[:10])
    assert arrived == []
    reader.feed(line[10:] + b"\n")
    assert arrived == [1]
    with pytest.raises(BadAnswer, match="ended after 1 of 2 outcomes, without its summary"):
        reader.finish()
    reader.feed(json.dumps({"index": 0, **_FAILURE}).encode() + b"\n")
    with pytest.raises(BadAnswer, match="without its summary line"):
        reader.finish()
    summary = {
        "summary": {"size": 2, "succeeded": 0, "failed": 2, "timed_out": 0, "duration_msec": 4}
    }
    reader.feed(json.dumps(summary).encode())
    streamed = reader.finish()
    assert [o.index for o in streamed.outcomes] == [0, 1]
    assert streamed.summary == Summary(2, 0, 2, 0, 4)
    with pytest.raises(BadAnswer, match="index 0 twice"):
        StreamReader(2).feed(
            b'{"index":0,%s}\n{"index":0,%s}\n' % ((json.dumps(_FAILURE)[1:-1].encode(),) * 2)
        )
    with pytest.raises(BadAnswer, match="index 2 in a batch of 2"):
        StreamReader(2).line(json.dumps({"index": 2, **_FAILURE}).encode())


def test_retry_after_is_seconds_or_a_date() -> None:
    """Retry-After in seconds, or as an HTTP date (counted from now, never below 0)."""
    assert retry_after("1") == 1.0
    assert retry_after(None) is None
    assert retry_after("soon") is None
    now = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
    assert retry_after("Sun, 06 Nov 1994 08:49:57 GMT", lambda: now) == 20.0
    assert retry_after("Sun, 06 Nov 1994 08:49:00 GMT", lambda: now) == 0.0


def test_importing_it_imports_no_twisted() -> None:
    """octoplex.caller and octoplex.send load without Twisted or treq, for scripts."""
    code = (
        "import octoplex.caller, octoplex.send, sys; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('twisted', 'treq')]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# Over real sockets, against the daemon.


def _mixed(upstream: Upstream) -> Batch:
    """A success, a binary body, a refused port and a timeout."""
    return Batch(
        800,
        [
            Request(upstream.url + "/hello", id="hello"),
            Request(upstream.url + "/mirror", method="POST", body=b"\x00\xff bytes"),
            Request("http://127.0.0.1:1/"),
            Request(upstream.url + "/delay/5000", id="slow"),
        ],
        timings=True,
    )


def _check_mixed(outcomes: list[Outcome]) -> None:
    hello, mirror, refused, slow = outcomes
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    assert hello.ok and (hello.status, hello.text, hello.id) == (200, "Hello world!", "hello")
    assert hello.header("content-type") == "text/plain"
    assert hello.timings is not None and hello.timings.total_msec > 0
    assert mirror.ok and mirror.body == b"\x00\xff bytes" and mirror.as_base64
    assert (refused.ok, refused.kind, refused.status) == (False, "connect", None)
    assert refused.error == "connection refused by upstream"
    assert (slow.ok, slow.kind, slow.id, slow.timed_out) == (False, "timeout", "slow", True)
    assert slow.duration_msec >= 800


@pytest_twisted.ensureDeferred
async def test_send_returns_each_outcome_in_order(octoplex: Octoplex, upstream: Upstream) -> None:
    """send() posts a batch and returns a success, a binary body, a refused port and a timeout."""
    outcomes = await send(_mixed(upstream), multiplex(octoplex), timeout=CALL_TIMEOUT)
    _check_mixed(outcomes)


@pytest_twisted.ensureDeferred
async def test_send_blocking_returns_each_outcome_in_order(
    octoplex: Octoplex, upstream: Upstream
) -> None:
    """send_blocking(), on the standard library, gets the same outcomes (run in a thread)."""
    outcomes = await in_thread(
        send_blocking, _mixed(upstream), multiplex(octoplex), timeout=CALL_TIMEOUT
    )
    _check_mixed(outcomes)


def _streamed_batch(upstream: Upstream) -> Batch:
    return Batch(
        5000,
        [
            Request(upstream.url + "/delay/2000", id="slow"),
            Request(upstream.url + "/delay/20", id="fast"),
            Request("ftp://127.0.0.1/"),
        ],
    )


def _check_streamed(arrived: list[tuple[Outcome, int]], streamed: Any) -> None:
    # The slow one last, and the fast one while the slow one was still at
    # the upstream: it came as it completed, not with the rest.
    assert [o.index for o, _ in arrived][-1] == 0
    assert sorted(o.index for o, _ in arrived) == [0, 1, 2]
    (fast, active_then) = next((o, a) for o, a in arrived if o.index == 1)
    assert (fast.id, fast.text) == ("fast", "delayed 20")
    assert active_then >= 1
    assert [o.index for o in streamed.outcomes] == [0, 1, 2]
    assert streamed.outcomes[0].text == "delayed 2000"
    assert streamed.outcomes[2].kind == "invalid"
    assert streamed.summary is not None
    assert (streamed.summary.size, streamed.summary.succeeded, streamed.summary.failed) == (3, 2, 1)


@pytest_twisted.ensureDeferred
async def test_send_streamed_hands_over_each_outcome_as_it_arrives(
    octoplex: Octoplex, upstream: Upstream
) -> None:
    """send_streamed() calls back with each outcome as it completes, then returns them all."""
    arrived: list[tuple[Outcome, int]] = []
    streamed = await send_streamed(
        _streamed_batch(upstream),
        multiplex(octoplex),
        lambda outcome: arrived.append((outcome, upstream.resource.active)),
        timeout=CALL_TIMEOUT,
    )
    _check_streamed(arrived, streamed)


@pytest_twisted.ensureDeferred
async def test_send_streamed_blocking_hands_over_each_outcome_as_it_arrives(
    octoplex: Octoplex, upstream: Upstream
) -> None:
    """send_streamed_blocking() does the same on the standard library (run in a thread)."""
    arrived: list[tuple[Outcome, int]] = []
    # list.append is atomic; the upstream's count is read from the thread.
    streamed = await in_thread(
        send_streamed_blocking,
        _streamed_batch(upstream),
        multiplex(octoplex),
        lambda outcome: arrived.append((outcome, upstream.resource.active)),
        timeout=CALL_TIMEOUT,
    )
    _check_streamed(arrived, streamed)


@pytest_twisted.ensureDeferred
async def test_an_error_in_the_callback_ends_the_call(
    octoplex: Octoplex, upstream: Upstream
) -> None:
    """An exception from the callback is raised from send_streamed, which hangs up."""

    def explode(outcome: Outcome) -> None:
        raise RuntimeError(f"caller broke on {outcome.index}")

    batch = Batch(10_000, [upstream.url + "/hello", upstream.url + "/delay/10000"])
    with pytest.raises(RuntimeError, match="caller broke on 0"):
        await send_streamed(batch, multiplex(octoplex), explode, timeout=CALL_TIMEOUT)
    # The daemon saw the caller go and cancelled the slow request.
    await batches_settled()


@pytest_twisted.ensureDeferred
async def test_a_call_past_its_timeout_raises_timeout_error(
    octoplex: Octoplex, upstream: Upstream
) -> None:
    """send() gives up after its timeout with TimeoutError, and hangs up."""
    batch = Batch(10_000, [upstream.url + "/delay/10000"])
    started = reactor.seconds()
    with pytest.raises(TimeoutError, match=r"within 0\.3 s"):
        await send(batch, multiplex(octoplex), timeout=0.3)
    assert reactor.seconds() - started < CALL_TIMEOUT
    await batches_settled()


@pytest_twisted.ensureDeferred
async def test_a_malformed_batch_is_refused_with_the_daemons_message(
    octoplex: Octoplex, upstream: Upstream
) -> None:
    """A batch over the daemon's limits raises BatchRefused(400) with its error, both ways."""
    batch = Batch(Limits().max_timeout_msec + 1, [upstream.url + "/hello"])
    message = "timeout_msec is 3600001; at most 3600000 is allowed"
    with pytest.raises(BatchRefused) as caught:
        await send(batch, multiplex(octoplex), timeout=CALL_TIMEOUT)
    assert (caught.value.status, caught.value.message) == (400, message)
    assert caught.value.retry_after is None
    assert str(caught.value) == f"Octoplex refused the batch (400): {message}"
    blocking = in_thread(send_blocking, batch, multiplex(octoplex), timeout=CALL_TIMEOUT)
    with pytest.raises(BatchRefused) as caught:
        await blocking
    assert (caught.value.status, caught.value.message) == (400, message)


@pytest_twisted.ensureDeferred
async def test_a_client_over_its_share_is_refused_with_retry_after(upstream: Upstream) -> None:
    """A second batch past the client's share raises BatchRefused(429) with retry_after 1."""
    octoplex = start_octoplex(Limits(max_client_batches_in_flight=1))
    try:
        first = Deferred.fromCoroutine(
            send(Batch(5000, [upstream.url + "/delay/1000"]), multiplex(octoplex))
        )
        await wait_until(lambda: upstream.resource.arrivals, "the first batch at the upstream")
        with pytest.raises(BatchRefused) as caught:
            await send(Batch(5000, [upstream.url + "/hello"]), multiplex(octoplex))
        assert caught.value.status == 429
        assert caught.value.retry_after == 1.0
        assert "is over its share" in caught.value.message
        (outcome,) = await first.addTimeout(CALL_TIMEOUT, reactor)
        assert outcome.text == "delayed 1000"
    finally:
        await octoplex.stop()


@pytest_twisted.ensureDeferred
async def test_a_token_is_sent_as_a_bearer(upstream: Upstream) -> None:
    """Without a token a daemon with tokens answers 401 with its challenge; with one, 200."""
    octoplex = start_octoplex(tokens=Tokens({"bidder-7": TOKEN}))
    batch = Batch(5000, [upstream.url + "/hello"])
    try:
        with pytest.raises(BatchRefused) as caught:
            await send(batch, multiplex(octoplex), timeout=CALL_TIMEOUT)
        assert caught.value.status == 401
        assert caught.value.challenge == 'Bearer realm="octoplex"'
        (outcome,) = await send(batch, multiplex(octoplex), token=TOKEN, timeout=CALL_TIMEOUT)
        assert outcome.text == "Hello world!"
        (outcome,) = await in_thread(
            send_blocking, batch, multiplex(octoplex), token=TOKEN, timeout=CALL_TIMEOUT
        )
        assert outcome.text == "Hello world!"
    finally:
        await octoplex.stop()


@pytest_twisted.ensureDeferred
async def test_https_with_a_private_ca(tmp_path: Path, upstream: Upstream) -> None:
    """
    Over HTTPS: the blocking call trusts a cafile (and refuses the daemon
    without it), the Twisted call trusts what its treq client trusts.
    """
    ca = trustme.CA()
    pki = ServerPKI(ca, write_leaf(tmp_path, "server", ca.issue_cert("127.0.0.1")))
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(pki.ca_pem)
    port = free_port()
    url = f"https://127.0.0.1:{port}/multiplex"
    batch = Batch(5000, [upstream.url + "/hello"])
    async with running(*tls_argv(port, pki)):
        (outcome,) = await in_thread(
            send_blocking, batch, url, cafile=str(cafile), timeout=CALL_TIMEOUT
        )
        assert outcome.text == "Hello world!"
        context = ssl.create_default_context(cadata=pki.ca_pem.decode("ascii"))
        streamed = await in_thread(
            send_streamed_blocking, batch, url, ssl_context=context, timeout=CALL_TIMEOUT
        )
        assert streamed.outcomes[0].text == "Hello world!"
        with pytest.raises(ssl.SSLCertVerificationError):
            await in_thread(send_blocking, batch, url, timeout=CALL_TIMEOUT)
        client = HTTPSCaller(pki.ca_pem)._http
        (outcome,) = await send(batch, url, http=client, timeout=CALL_TIMEOUT)
        assert outcome.text == "Hello world!"


class _NotOctoplex(Resource):
    """
    ``/old/multiplex`` answers whole, as a daemon that predates streaming
    does; ``/cut/multiplex`` streams one line and ends.
    """

    isLeaf = True
    answer = {"responses": [_FAILURE, _BINARY]}

    def render_POST(self, request: WebRequest) -> bytes:
        if request.path == b"/old/multiplex":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(self.answer).encode()
        request.setHeader(b"content-type", b"application/x-ndjson")
        return json.dumps({"index": 1, **_BINARY}).encode() + b"\n"


@pytest_twisted.ensureDeferred
async def test_an_answer_in_one_piece_or_cut_short() -> None:
    """
    A streamed call to a daemon that answers whole still calls back, in
    order, with no summary; a stream cut short is a BadAnswer, both ways.
    """
    site = Site(_NotOctoplex())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    batch = Batch(1000, ["http://a.example/", "http://b.example/"])
    try:
        arrived: list[int | None] = []
        streamed = await send_streamed(
            batch, base + "/old/multiplex", lambda o: arrived.append(o.index), timeout=CALL_TIMEOUT
        )
        assert arrived == [0, 1]
        assert streamed.summary is None
        assert [o.kind for o in streamed.outcomes] == ["connect", None]
        blocking = await in_thread(
            send_streamed_blocking, batch, base + "/old/multiplex", timeout=CALL_TIMEOUT
        )
        assert blocking == streamed
        with pytest.raises(BadAnswer, match="ended after 1 of 2 outcomes"):
            await send_streamed(batch, base + "/cut/multiplex", timeout=CALL_TIMEOUT)
        with pytest.raises(BadAnswer, match="ended after 1 of 2 outcomes"):
            await in_thread(
                send_streamed_blocking, batch, base + "/cut/multiplex", timeout=CALL_TIMEOUT
            )
        with pytest.raises(BadAnswer, match="2 outcomes for 1 requests"):
            await send(Batch(1000, ["http://a/"]), base + "/old/multiplex", timeout=CALL_TIMEOUT)
    finally:
        await port.stopListening()


def test_connection_refused_is_an_os_error() -> None:
    """Nothing listening: the blocking call raises ConnectionRefusedError at once."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}/multiplex"
        with pytest.raises(ConnectionRefusedError):
            send_blocking(Batch(100, ["http://a/"]), url, timeout=CALL_TIMEOUT)
