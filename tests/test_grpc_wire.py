"""
octoplex.grpc_wire: a Batch message means what the same JSON batch means,
and outcomes are built into Outcome messages with nothing lost.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from octoplex.grpc_wire import batch_of, batch_result, failure, success
from octoplex.limits import Limits
from octoplex.v1 import multiplexer_pb2 as pb
from octoplex.wire import BatchError, InvalidRequest, UpstreamRequest, parse_batch


def both(document: dict, message: pb.Batch) -> tuple[list, list]:
    """The requests the JSON document and the message each parse to."""
    limits = Limits(max_batch_size=5)
    return (
        parse_batch(json.dumps(document).encode(), limits).requests,
        batch_of(message, limits).requests,
    )


def test_a_batch_means_the_same_in_json_and_protobuf() -> None:
    """Defaults, header lists, text and binary bodies, ids, timeouts, retries alike."""
    binary = bytes(range(256))
    document = {
        "timeout_msec": 500,
        "defaults": {
            "base_uri": "http://127.0.0.1:9/api/",
            "method": "POST",
            "headers": {"X-Auction": "42", "Content-Type": "application/json"},
            "body": "{}",
            "retry": {"times": 2, "statuses": [503]},
        },
        "requests": [
            {"id": "a", "uri": "bid"},
            {
                "uri": "http://127.0.0.1:9/other",
                "method": "PUT",
                "headers": {"content-type": "text/plain", "X-Many": ["1", "2"]},
                "body_base64": base64.b64encode(binary).decode(),
                "timeout_msec": 100,
                "retry": {"times": 1, "connect_errors": True},
            },
            {"uri": "nope://x", "id": "bad"},
        ],
    }
    message = pb.Batch(
        timeout_msec=500,
        defaults=pb.Defaults(
            base_uri="http://127.0.0.1:9/api/",
            method="POST",
            headers=[
                pb.Header(name="X-Auction", value="42"),
                pb.Header(name="Content-Type", value="application/json"),
            ],
            text="{}",
            retry=pb.Retry(times=2, statuses=[503]),
        ),
        requests=[
            pb.Request(id="a", uri="bid"),
            pb.Request(
                uri="http://127.0.0.1:9/other",
                method="PUT",
                headers=[
                    pb.Header(name="content-type", value="text/plain"),
                    pb.Header(name="X-Many", value="1"),
                    pb.Header(name="X-Many", value="2"),
                ],
                body=binary,
                timeout_msec=100,
                retry=pb.Retry(times=1, connect_errors=True),
            ),
            pb.Request(uri="nope://x", id="bad"),
        ],
    )
    from_json, from_message = both(document, message)
    assert from_message == from_json
    first, second, third = from_message
    assert isinstance(first, UpstreamRequest) and isinstance(second, UpstreamRequest)
    assert first.url.to_text() == "http://127.0.0.1:9/api/bid"
    assert second.body == binary
    assert second.headers.getRawHeaders(b"x-many") == [b"1", b"2"]
    assert second.headers.getRawHeaders(b"x-auction") == [b"42"]
    assert second.headers.getRawHeaders(b"content-type") == [b"text/plain"]
    assert isinstance(third, InvalidRequest) and third.id == "bad"


def test_a_text_body_asking_for_gzip_is_gzipped_and_a_binary_one_is_not() -> None:
    """``text`` is JSON's ``body``: gzipped on request; ``body`` is sent as given."""
    gzip = [pb.Header(name="Content-Encoding", value="gzip")]
    message = pb.Batch(
        timeout_msec=100,
        requests=[
            pb.Request(uri="http://127.0.0.1:9/", headers=gzip, text="hello"),
            pb.Request(uri="http://127.0.0.1:9/", headers=gzip, body=b"\x1f\x8b raw"),
        ],
    )
    text, raw = batch_of(message, Limits()).requests
    assert isinstance(text, UpstreamRequest) and isinstance(raw, UpstreamRequest)
    assert text.body is not None and text.body[:2] == b"\x1f\x8b" and text.body != b"hello"
    assert raw.body == b"\x1f\x8b raw"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (pb.Batch(requests=[pb.Request(uri="/")]), "missing field timeout_msec"),
        (
            pb.Batch(timeout_msec=1, requests=[pb.Request(uri="/")] * 6),
            "batch has 6 requests; at most 5 are allowed",
        ),
        (
            pb.Batch(timeout_msec=1, requests=[pb.Request(uri="/", id="x" * 257)]),
            "requests[0].id is 257 characters long; between 1 and 256 are allowed",
        ),
        (
            pb.Batch(timeout_msec=1, requests=[pb.Request(uri="/", timeout_msec=2000)]),
            "requests[0].timeout_msec is 2000; at most 1000 is allowed",
        ),
        (
            pb.Batch(
                timeout_msec=1,
                defaults=pb.Defaults(retry=pb.Retry(times=1)),
                requests=[pb.Request(uri="/")],
            ),
            "defaults.retry retries nothing",
        ),
        (
            pb.Batch(
                timeout_msec=1,
                requests=[pb.Request(uri="/", retry=pb.Retry(times=1, statuses=[200]))],
            ),
            "requests[0].retry.statuses must be an array of statuses from 400 to 599, got [200]",
        ),
        (
            pb.Batch(
                timeout_msec=1,
                defaults=pb.Defaults(base_uri="ftp://x/"),
                requests=[pb.Request(uri="/")],
            ),
            "defaults.base_uri: ",
        ),
    ],
)
def test_a_malformed_batch_is_refused_naming_the_value_and_limit(
    message: pb.Batch, error: str
) -> None:
    with pytest.raises(BatchError) as caught:
        batch_of(message, Limits(max_batch_size=5, max_timeout_msec=1000))
    assert error in str(caught.value)


def test_an_outcome_keeps_every_header_line_and_byte() -> None:
    """Header lines stay in order, values byte for byte (as Latin-1), the body as bytes."""
    raw = [(b"Set-Cookie", b"a=1"), (b"X-Bin", b"\xff\x80"), (b"Set-Cookie", b"b=2")]
    headers = Headers()
    for name, value in raw:
        headers.addRawHeader(name, value)
    outcome = success(200, headers, b"\x00\xff", 7, "gzip", id="x", raw_headers=raw, attempts=2)
    assert [(h.name, h.value.encode("latin-1")) for h in outcome.success.headers] == [
        (name.decode(), value) for name, value in raw
    ]
    assert (outcome.success.content, outcome.success.content_encoding) == (b"\x00\xff", "gzip")
    assert (outcome.id, outcome.attempts, outcome.success.duration_msec) == ("x", 2, 7)
    assert not outcome.HasField("timings")
    # Without the raw lines (a response not read by Octoplex's parser), the
    # Headers' own lines.
    fallback = success(204, headers, b"", 1)
    assert len(fallback.success.headers) == 3


def test_a_failure_has_its_kind_and_timings() -> None:
    timings = {"queued_msec": 0.1, "dns_msec": None, "total_msec": 3.5, "reused": True}
    outcome = failure("connect refused", 4, "connect", timings=timings)
    assert outcome.failure.kind == pb.KIND_CONNECT
    assert outcome.timings.total_msec == 3.5 and outcome.timings.reused
    assert not outcome.timings.HasField("dns_msec")
    assert outcome.id == "" and outcome.attempts == 0


_text = st.text(max_size=12)
_headers = st.lists(st.builds(pb.Header, name=_text, value=_text), max_size=3)
_retry = st.builds(
    pb.Retry,
    times=st.integers(0, 7),
    statuses=st.lists(st.integers(0, 700), max_size=3),
    connect_errors=st.booleans(),
)
_requests = st.builds(
    pb.Request,
    id=_text,
    method=st.sampled_from(["", "GET", "POST", "BAD METHOD", "\u00e9"]),
    uri=st.sampled_from(["", "/rel", "http://127.0.0.1:9/x", "nope://x", "http://[::1"]),
    headers=_headers,
    text=st.one_of(st.none(), _text),
    timeout_msec=st.one_of(st.none(), st.integers(0, 2000)),
    retry=st.one_of(st.none(), _retry),
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    requests=st.lists(_requests, max_size=7),
    timeout=st.one_of(st.none(), st.integers(0, 2000)),
    base=st.sampled_from(["", "http://127.0.0.1:9/api/", "not a uri"]),
    max_parallel=st.one_of(st.none(), st.integers(0, 3)),
)
def test_any_message_is_a_batch_or_a_batch_error(
    requests: list[pb.Request], timeout: int | None, base: str, max_parallel: int | None
) -> None:
    """Whatever a Batch message holds, it parses to one request per item or a BatchError."""
    message = pb.Batch(
        requests=requests,
        timeout_msec=timeout,
        defaults=pb.Defaults(base_uri=base),
        max_parallel=max_parallel,
    )
    # Through the bytes, as a call's message comes.
    message = pb.Batch.FromString(message.SerializeToString())
    try:
        batch = batch_of(message, Limits(max_batch_size=5, max_timeout_msec=1000))
    except BatchError as e:
        assert str(e)
    else:
        assert len(batch.requests) == len(requests)
        for request, item in zip(batch.requests, requests, strict=True):
            assert request.id == (item.id or None)
            if isinstance(request, InvalidRequest):
                assert request.error


@settings(max_examples=50, derandomize=True, deadline=None)
@given(sizes=st.lists(st.integers(0, 20000), max_size=6))
def test_a_batch_result_is_serialized_as_protobuf_would(sizes: list[int]) -> None:
    """batch_result's bytes are BatchResult's, whatever the outcomes' sizes (varint lengths)."""
    outcomes = [success(200, Headers(), b"x" * size, 1) for size in sizes]
    outcomes += [failure("no", 2, "dns", id="f")]
    data = batch_result(outcomes)
    parsed = pb.BatchResult.FromString(data)
    assert [o.index for o in parsed.outcomes] == list(range(len(outcomes)))
    assert data == pb.BatchResult(outcomes=outcomes).SerializeToString()
