"""
The API beyond the original format (issue 8), over real sockets: request
ids, per-request timeouts, binary bodies both ways, repeated headers both
ways, typed error kinds, and an original-format batch answered exactly as
the original answered it (plus the documented ``kind``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import zlib
from typing import Any

import jsonschema
import pytest
import pytest_twisted
import treq
import trustme
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from octoplex.client import PoolSettings
from octoplex.errors import KINDS
from octoplex.schema import SCHEMA
from octoplex.timings import PHASES, Timings
from octoplex.tls import UpstreamTLSPolicy

from .schema import check_batch, check_stream
from .servers import Caller, Octoplex, Upstream, _QuietPool, full_backlog, start_octoplex
from .test_upstream_tls import _leaf_options, _serve, _trusting


async def _multiplex(octoplex: Octoplex, caller: Caller, batch: dict[str, Any]) -> list[Any]:
    # Every batch here is one the schema describes (and Caller.post checks
    # the answer against it).
    check_batch(batch)
    status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    assert status == 200, body
    responses: list[Any] = body["responses"]
    return responses


@pytest_twisted.ensureDeferred
async def test_ids_are_echoed_in_every_kind_of_outcome(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """An id comes back in its Success or Failure; an item without one has none."""
    outcomes = await _multiplex(
        octoplex,
        caller,
        {
            "timeout_msec": 2000,
            "requests": [
                {"id": "bidder-a", "uri": upstream.url + "/hello"},
                {"id": "bidder-b", "uri": "ftp://127.0.0.1/"},
                {"uri": upstream.url + "/hello"},
                {"id": "bidder-ü", "uri": "http://127.0.0.1:1/"},
            ],
        },
    )
    ok, invalid, anonymous, refused = outcomes
    assert ok["Success"]["id"] == "bidder-a"
    assert (invalid["Failure"]["id"], invalid["Failure"]["kind"]) == ("bidder-b", "invalid")
    assert "id" not in anonymous["Success"]
    assert (refused["Failure"]["id"], refused["Failure"]["kind"]) == ("bidder-ü", "connect")


@pytest_twisted.ensureDeferred
async def test_a_duplicate_id_is_a_400(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """Two items with one id refuse the batch, naming both; nothing is sent."""
    status, _, body = await caller.post(
        octoplex.url + "/multiplex",
        {
            "timeout_msec": 1000,
            "requests": [
                {"id": "x", "uri": upstream.url + "/hello"},
                {"id": "y", "uri": upstream.url + "/hello"},
                {"id": "x", "uri": upstream.url + "/hello"},
            ],
        },
    )
    assert (status, body) == (
        400,
        {
            "error": 'requests[2].id "x" is already the id of requests[0]; '
            "ids must be unique within a batch"
        },
    )


@pytest_twisted.ensureDeferred
async def test_a_request_timeout_shorter_than_the_batch_fails_that_request_alone(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    A request's own timeout_msec cuts it off (and cancels it at the
    upstream) while the batch goes on to its other answers; the batch is
    answered when those are in, long before its own deadline.
    """
    started = time.monotonic()
    slow, fine = await _multiplex(
        octoplex,
        caller,
        {
            "timeout_msec": 5000,
            "requests": [
                {"id": "slow", "uri": upstream.url + "/delay/3000", "timeout_msec": 150},
                {"uri": upstream.url + "/delay/400", "timeout_msec": 4000},
            ],
        },
    )
    elapsed = time.monotonic() - started
    assert slow["Failure"] == {
        "error": "timeout elapsed (the request's own timeout_msec of 150)",
        "kind": "timeout",
        "duration_msec": slow["Failure"]["duration_msec"],
        "id": "slow",
    }
    # Never early; late by no more than honest slack on a shared machine.
    assert 150 <= slow["Failure"]["duration_msec"] < 1000
    assert fine["Success"]["content"] == "delayed 400"
    assert 0.4 <= elapsed < 2.5, elapsed
    assert upstream.resource.finished_early == ["/delay/3000"]


@pytest_twisted.ensureDeferred
async def test_binary_bodies_round_trip_both_ways(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    Every byte value, sent as body_base64 and mirrored by the upstream,
    comes back whole as content_base64; a UTF-8 body comes back as content
    unless the batch asks for base64 always.
    """
    payload = bytes(range(256)) + os.urandom(4096)
    text = "déjà vu ✓"
    requests = [
        {
            "method": "POST",
            "uri": upstream.url + "/mirror",
            "body_base64": base64.b64encode(payload).decode(),
        },
        {"method": "POST", "uri": upstream.url + "/mirror", "body": text},
    ]
    binary, utf8 = await _multiplex(octoplex, caller, {"timeout_msec": 3000, "requests": requests})
    assert "content" not in binary["Success"]
    assert base64.b64decode(binary["Success"]["content_base64"]) == payload
    assert utf8["Success"]["content"] == text and "content_base64" not in utf8["Success"]

    binary, utf8 = await _multiplex(
        octoplex, caller, {"timeout_msec": 3000, "requests": requests, "content_base64": True}
    )
    assert base64.b64decode(binary["Success"]["content_base64"]) == payload
    assert base64.b64decode(utf8["Success"]["content_base64"]) == text.encode()
    assert "content" not in utf8["Success"]


@pytest_twisted.ensureDeferred
async def test_invalid_base64_fails_that_request_alone(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """A body_base64 that does not decode fails its item, kind invalid, quoting it."""
    bad, ok = await _multiplex(
        octoplex,
        caller,
        {
            "timeout_msec": 2000,
            "requests": [
                {"method": "POST", "uri": upstream.url + "/mirror", "body_base64": "not*base64"},
                {"uri": upstream.url + "/hello"},
            ],
        },
    )
    assert bad["Failure"]["kind"] == "invalid"
    assert bad["Failure"]["duration_msec"] == 0
    assert bad["Failure"]["error"].startswith("body_base64 is not valid base64 (")
    assert bad["Failure"]["error"].endswith(': "not*base64"')
    assert ok["Success"]["content"] == "Hello world!"


@pytest_twisted.ensureDeferred
async def test_repeated_headers_reach_the_upstream_and_the_caller(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    A header given as a list is sent once per value, in order; asked for,
    header_list carries both Set-Cookie lines (and every other line) as
    received, while headers keeps the original's last-value rule.
    """
    echo, repeated = await _multiplex(
        octoplex,
        caller,
        {
            "timeout_msec": 2000,
            "header_list": True,
            "requests": [
                {"uri": upstream.url + "/echo", "headers": {"X-Tag": ["one", "two"], "X-B": "b"}},
                {"uri": upstream.url + "/repeat-header"},
            ],
        },
    )
    sent = json.loads(echo["Success"]["content"])["headers"]
    assert [value for name, value in sent if name.lower() == "x-tag"] == ["one", "two"]
    lines = repeated["Success"]["header_list"]
    assert [v for n, v in lines if n.lower() == "set-cookie"] == ["a=1", "b=2"]
    assert [v for n, v in lines if n.lower() == "x-multi"] == ["first", "last"]
    # Connection headers too: every line as received.
    assert ["Content-Length", "8"] in lines
    assert all(isinstance(n, str) and isinstance(v, str) for n, v in lines)
    assert repeated["Success"]["headers"]["set-cookie"] == "b=2"


@pytest_twisted.ensureDeferred
async def test_an_original_batch_gets_the_original_fields(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    A batch in the original format gets every field, and only the fields,
    the original sent, with their types; the one addition is each Failure's
    kind, one of the documented set.
    """
    outcomes = await _multiplex(
        octoplex,
        caller,
        {
            "timeout_msec": 300,
            "requests": [
                {"uri": upstream.url + "/hello", "headers": {"X-Some-Header": "some value"}},
                {"method": "POST", "uri": upstream.url + "/echo", "body": '{"name":"Bruce"}'},
                {"uri": upstream.url + "/gzip/10"},
                {"uri": upstream.url + "/delay/2000"},
                {"uri": "http://127.0.0.1:1/"},
            ],
        },
    )
    for outcome in outcomes[:3]:
        assert list(outcome) == ["Success"]
        success = outcome["Success"]
        assert list(success) == ["headers", "status", "content", "duration_msec"], success
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in success["headers"].items())
        assert type(success["status"]) is int and type(success["duration_msec"]) is int
        assert isinstance(success["content"], str)
    for outcome in outcomes[3:]:
        assert list(outcome) == ["Failure"]
        failure = outcome["Failure"]
        assert list(failure) == ["error", "kind", "duration_msec"], failure
        assert isinstance(failure["error"], str) and type(failure["duration_msec"]) is int
        assert failure["kind"] in KINDS
    assert [o["Failure"]["kind"] for o in outcomes[3:]] == ["timeout", "connect"]
    assert outcomes[2]["Success"]["content"] == "x" * 10


@pytest_twisted.ensureDeferred
async def test_a_connect_timeout_is_of_kind_connect(caller: Caller) -> None:
    """
    A server that never accepts (its backlog full): with a connect timeout
    shorter than the deadline, the item fails as ``connect``, not as a
    timeout of the batch.
    """
    octoplex = start_octoplex(pool=PoolSettings(connect_timeout=0.3))
    try:
        with full_backlog() as port:
            [outcome] = await _multiplex(
                octoplex,
                caller,
                {"timeout_msec": 3000, "requests": [{"uri": f"http://127.0.0.1:{port}/"}]},
            )
    finally:
        await octoplex.stop()
    assert outcome["Failure"]["error"] == "connecting to upstream timed out"
    assert outcome["Failure"]["kind"] == "connect"
    assert 300 <= outcome["Failure"]["duration_msec"] < 2000


@pytest_twisted.ensureDeferred
async def test_defaults_are_merged_into_each_request_and_its_own_fields_win(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    The batch's method, headers, body and base URI reach every request;
    a request's own method, body and headers (by name, whatever the case)
    win, and an absolute URI ignores the base.
    """
    shared = "x" * 5000
    outcomes = await _multiplex(
        octoplex,
        caller,
        {
            "timeout_msec": 3000,
            "defaults": {
                "method": "POST",
                "base_uri": upstream.url + "/",
                "headers": {"X-Auction": "a1", "X-Seat": "default"},
                "body": shared,
            },
            "requests": [
                {"uri": "echo"},
                {"uri": "/echo", "headers": {"x-seat": "own"}, "body": "mine"},
                {"uri": upstream.url + "/echo", "method": "PUT"},
            ],
        },
    )
    first, second, third = (json.loads(o["Success"]["content"]) for o in outcomes)

    def named(echo: dict[str, Any], name: str) -> list[str]:
        return [v for n, v in echo["headers"] if n.lower() == name]

    assert (first["method"], first["body"]) == ("POST", shared)
    assert named(first, "x-auction") == ["a1"] and named(first, "x-seat") == ["default"]
    assert (second["method"], second["body"]) == ("POST", "mine")
    assert named(second, "x-auction") == ["a1"] and named(second, "x-seat") == ["own"]
    assert (third["method"], third["body"]) == ("PUT", shared)


@pytest_twisted.ensureDeferred
async def test_max_parallel_1_is_sequential_at_the_upstream(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    With max_parallel 1 the upstream never sees two of the batch's requests
    at once, and sees them in order; without it, all at once.
    """
    uris = [upstream.url + f"/delay/{ms}" for ms in (120, 30, 60)]
    started = time.monotonic()
    outcomes = await _multiplex(
        octoplex,
        caller,
        {"timeout_msec": 3000, "max_parallel": 1, "requests": [{"uri": u} for u in uris]},
    )
    elapsed = time.monotonic() - started
    assert [o["Success"]["content"] for o in outcomes] == [
        "delayed 120",
        "delayed 30",
        "delayed 60",
    ]
    assert upstream.resource.arrivals == ["/delay/120", "/delay/30", "/delay/60"]
    assert upstream.resource.most_active == 1
    assert elapsed >= 0.21, elapsed
    # Each duration counts from the batch's arrival: they add up.
    durations = [o["Success"]["duration_msec"] for o in outcomes]
    assert durations == sorted(durations) and durations[2] >= 210, durations

    upstream.resource.most_active = 0
    await _multiplex(
        octoplex, caller, {"timeout_msec": 3000, "requests": [{"uri": u} for u in uris]}
    )
    assert upstream.resource.most_active == 3


@pytest_twisted.ensureDeferred
async def test_requests_still_waiting_their_turn_at_the_deadline_were_never_sent(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """Under max_parallel, what has not had its turn by the deadline fails as queue_timeout."""
    slow, waiting = await _multiplex(
        octoplex,
        caller,
        {
            "timeout_msec": 200,
            "max_parallel": 1,
            "requests": [{"uri": upstream.url + "/delay/2000"}, {"uri": upstream.url + "/hello"}],
        },
    )
    assert slow["Failure"]["kind"] == "timeout"
    assert waiting["Failure"] == {
        "error": "timeout elapsed before its turn came (max_parallel 1); "
        "the request was never sent",
        "kind": "queue_timeout",
        "duration_msec": waiting["Failure"]["duration_msec"],
    }
    assert upstream.resource.arrivals == ["/delay/2000"]


@pytest_twisted.ensureDeferred
async def test_the_schema_is_served_and_tells_batches_apart(
    octoplex: Octoplex, caller: Caller
) -> None:
    """
    GET /schema.json serves the schema the tests check every answer with;
    it accepts a batch with every new field and refuses an unknown one.
    """
    status, headers, body = await caller.get(octoplex.url + "/schema.json")
    assert status == 200
    assert headers.getRawHeaders(b"content-type") == [b"application/schema+json"]
    assert json.loads(body) == SCHEMA
    check_batch(
        {
            "timeout_msec": 10,
            "max_parallel": 2,
            "header_list": True,
            "defaults": {"base_uri": "http://127.0.0.1/", "headers": {"A": ["1", "2"]}},
            "requests": [{"id": "a", "uri": "x", "body_base64": "AA==", "timeout_msec": 5}],
        }
    )
    with pytest.raises(jsonschema.ValidationError):
        check_batch({"timeout_msec": 10, "requests": [{"uri": "x", "retries": 3}]})


@pytest_twisted.ensureDeferred
async def test_a_retry_succeeds_on_the_third_attempt(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """Two 503s, then a 200: the outcome is the 200, after 3 attempts; a neighbour has none."""
    flaky, plain = await _multiplex(
        octoplex,
        caller,
        {
            "timeout_msec": 3000,
            "defaults": {"retry": {"times": 3, "statuses": [502, 503]}},
            "requests": [
                {"uri": upstream.url + "/flaky/a/2"},
                {"uri": upstream.url + "/hello", "retry": None},
            ],
        },
    )
    assert (flaky["Success"]["status"], flaky["Success"]["content"]) == (200, "ok after 2")
    assert flaky["Success"]["attempts"] == 3
    assert len(upstream.resource.flaky["a"]) == 3
    # The defaults' retry reaches it too (null is "not given"): it says 1.
    assert plain["Success"]["attempts"] == 1


@pytest_twisted.ensureDeferred
async def test_retries_honour_retry_after_and_stop_where_the_deadline_leaves_no_room(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    A Retry-After of 1 s is waited for when the deadline allows it, and not
    tried at all when it does not: the 503 is then the answer, at once.
    """
    started = time.monotonic()
    waited, no_room = await _multiplex(
        octoplex,
        caller,
        {
            "timeout_msec": 2500,
            "requests": [
                {
                    "uri": upstream.url + "/flaky/b/1/1",
                    "retry": {"times": 2, "statuses": [503]},
                },
                {
                    "uri": upstream.url + "/flaky/c/1/5",
                    "retry": {"times": 2, "statuses": [503]},
                },
            ],
        },
    )
    elapsed = time.monotonic() - started
    assert (waited["Success"]["status"], waited["Success"]["attempts"]) == (200, 2)
    first, second = upstream.resource.flaky["b"]
    assert second - first >= 1.0
    assert (no_room["Success"]["status"], no_room["Success"]["attempts"]) == (503, 1)
    assert len(upstream.resource.flaky["c"]) == 1
    assert no_room["Success"]["duration_msec"] < 1000
    assert elapsed < 2.5, elapsed


@pytest_twisted.ensureDeferred
async def test_connect_errors_are_retried_when_asked(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """A refused connection is tried times + 1 times, and reported with its attempts."""
    refused, not_asked = await _multiplex(
        octoplex,
        caller,
        {
            "timeout_msec": 3000,
            "requests": [
                {"uri": "http://127.0.0.1:1/", "retry": {"times": 2, "connect_errors": True}},
                {"uri": "http://127.0.0.1:1/", "retry": {"times": 2, "statuses": [503]}},
            ],
        },
    )
    assert refused["Failure"]["kind"] == "connect"
    assert refused["Failure"]["attempts"] == 3
    assert (not_asked["Failure"]["kind"], not_asked["Failure"]["attempts"]) == ("connect", 1)


async def _stream(
    octoplex: Octoplex, batch: dict[str, Any], accept_encoding: str | None = None
) -> tuple[float, list[tuple[float, Any]], Any]:
    """
    POST ``batch`` asking for NDJSON; each line with the seconds after the
    POST at which it arrived, and the response.
    """
    check_batch(batch)
    headers = Headers(
        {b"content-type": [b"application/json"], b"accept": [b"application/x-ndjson"]}
    )
    if accept_encoding:
        headers.addRawHeader(b"accept-encoding", accept_encoding.encode())
    # A bare Agent: treq would ask for gzip and decode it out of sight.
    agent = Agent(reactor, pool=_QuietPool(reactor, persistent=False))
    started = reactor.seconds()
    response = await agent.request(
        b"POST",
        (octoplex.url + "/multiplex").encode(),
        headers,
        FileBodyProducer(io.BytesIO(json.dumps(batch).encode())),
    )
    gzipped = response.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    lines: list[tuple[float, Any]] = []
    buffer = b""

    def chunk(data: bytes) -> None:
        nonlocal buffer
        buffer += inflate.decompress(data) if gzipped else data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            lines.append((reactor.seconds() - started, json.loads(line)))

    await treq.collect(response, chunk)
    assert buffer == b""
    check_stream([line for _, line in lines])
    return started, lines, response


@pytest.mark.parametrize("accept_encoding", [None, "gzip"])
@pytest_twisted.ensureDeferred
async def test_a_streamed_answer_sends_each_outcome_as_it_completes(
    octoplex: Octoplex, upstream: Upstream, accept_encoding: str | None
) -> None:
    """
    With Accept: application/x-ndjson, the fast outcome arrives long before
    the slow one finishes, each tagged with its index and id; a summary line
    ends it, and the deadline still cuts off what runs past it.  Gzipped,
    each line still arrives on its own.
    """
    _, lines, response = await _stream(
        octoplex,
        {
            "timeout_msec": 1500,
            "requests": [
                {"id": "slow", "uri": upstream.url + "/delay/800"},
                {"id": "fast", "uri": upstream.url + "/delay/20"},
                {"uri": upstream.url + "/delay/5000"},
                {"uri": "ftp://127.0.0.1/"},
            ],
        },
        accept_encoding,
    )
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/x-ndjson"]
    encoding = [b"gzip"] if accept_encoding else None
    assert response.headers.getRawHeaders(b"content-encoding") == encoding
    by_index = {line["index"]: (at, line) for at, line in lines[:-1]}
    assert sorted(by_index) == [0, 1, 2, 3]
    # The invalid one at once, the fast one next, long before the slow one.
    assert [line["index"] for _, line in lines[:-1]] == [3, 1, 0, 2]
    fast_at, fast = by_index[1]
    slow_at, slow = by_index[0]
    assert fast["id"] == "fast" and fast["Success"]["content"] == "delayed 20"
    assert slow["id"] == "slow" and slow["Success"]["content"] == "delayed 800"
    assert fast_at < 0.5 < 0.8 <= slow_at, (fast_at, slow_at)
    cut_at, cut = by_index[2]
    assert cut["Failure"]["kind"] == "timeout" and "id" not in cut
    assert 1.5 <= cut_at < 2.5
    summary_at, summary = lines[-1]
    assert summary == {
        "summary": {
            "size": 4,
            "succeeded": 2,
            "failed": 1,
            "timed_out": 1,
            "duration_msec": summary["summary"]["duration_msec"],
        }
    }
    assert summary_at >= cut_at


def _timings(outcome: dict[str, Any]) -> dict[str, Any]:
    ((_, value),) = outcome.items()
    timings: dict[str, Any] = value["timings"]
    # The phases follow one another: together they never exceed the total,
    # and leave little of it unaccounted for (Octoplex's own work between
    # them; honest slack on a shared machine).
    parts = sum(timings[name] or 0 for name in PHASES)
    assert parts <= timings["total_msec"] + 0.01, timings
    assert timings["total_msec"] - parts < 25, timings
    assert timings["total_msec"] <= value["duration_msec"] + 1, (timings, value)
    return timings


@pytest_twisted.ensureDeferred
async def test_timings_add_up_and_show_a_reused_connection(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    Asked for, each outcome says where its time went: the first request to
    an upstream pays DNS and connect, the next one reuses the connection;
    the upstream's 60 ms shows as time to first byte.  Not asked for,
    there are none.
    """
    batch = {
        "timeout_msec": 3000,
        "timings": True,
        "requests": [{"uri": upstream.url + "/delay/60"}],
    }
    [first] = await _multiplex(octoplex, caller, batch)
    [second] = await _multiplex(octoplex, caller, batch)
    new, reused = _timings(first), _timings(second)
    assert new["reused"] is False and reused["reused"] is True
    assert new["dns_msec"] is not None and new["connect_msec"] is not None
    assert new["tls_msec"] is None
    assert reused["dns_msec"] is reused["connect_msec"] is reused["tls_msec"] is None
    for timings in (new, reused):
        assert timings["queued_msec"] < 5
        assert 60 <= timings["ttfb_msec"] < 1000
        assert timings["body_msec"] is not None
    [refused] = await _multiplex(
        octoplex,
        caller,
        {"timeout_msec": 3000, "timings": True, "requests": [{"uri": "http://127.0.0.1:1/"}]},
    )
    failed = _timings(refused)
    assert failed["reused"] is False and failed["ttfb_msec"] is None
    [plain] = await _multiplex(
        octoplex, caller, {"timeout_msec": 3000, "requests": [{"uri": upstream.url + "/hello"}]}
    )
    assert "timings" not in plain["Success"]


def test_timings_count_a_failed_phase_up_to_the_failure() -> None:
    """
    A request that fails in its connect (refused), its DNS lookup, its
    queue or its body spent the time up to the failure in that phase: the
    phases still add up to the total, however long the reactor took to see
    the failure (60 ms here, as under a CPU hog).
    """
    clock = Clock()

    def failed_after(*marks: str) -> dict[str, Any]:
        timings = Timings(clock)
        for mark in marks:
            clock.advance(0.001)
            setattr(timings, mark, timings.now())
        clock.advance(0.060)
        timings.done = timings.now()
        return timings.report()

    refused = failed_after("slot", "dns_start", "dns_done")
    assert refused["connect_msec"] == 60.0 and refused["ttfb_msec"] is None
    assert failed_after("slot", "dns_start")["dns_msec"] == 60.0
    assert failed_after()["queued_msec"] == 60.0
    cut = failed_after("slot", "dns_start", "dns_done", "connected", "sent", "first_byte")
    assert cut["body_msec"] == 60.0
    # What no phase holds is the 1 ms between the marks (Octoplex's own
    # work: here between the slot and the DNS lookup), not the 60 ms.
    parts = sum(refused[name] or 0 for name in PHASES)
    assert refused["total_msec"] - parts == pytest.approx(1.0), refused


@pytest_twisted.ensureDeferred
async def test_timings_over_tls_show_the_handshake(tmp_path: Any, caller: Caller) -> None:
    """A new HTTPS connection's TLS handshake is its own phase; a reused one has none."""
    ca = trustme.CA()
    upstream = _serve(_leaf_options(ca.issue_cert("127.0.0.1", "localhost")))
    octoplex = start_octoplex(tls_policy=UpstreamTLSPolicy(_trusting(tmp_path, ca)))
    batch = {
        "timeout_msec": 3000,
        "timings": True,
        "requests": [{"uri": upstream.url + "/hello"}],
    }
    try:
        [first] = await _multiplex(octoplex, caller, batch)
        [second] = await _multiplex(octoplex, caller, batch)
    finally:
        await octoplex.stop()
        await upstream.stop()
    new, reused = _timings(first), _timings(second)
    assert new["tls_msec"] is not None and new["tls_msec"] > 0
    assert new["reused"] is False
    assert reused["reused"] is True and reused["tls_msec"] is None
