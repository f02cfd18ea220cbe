"""
The gRPC wire format: the messages of ``octoplex/v1/multiplexer.proto`` to
and from the multiplexer's own types.

A ``Batch`` message becomes a :class:`~octoplex.wire.Batch` by the rules a
JSON batch is held to (:mod:`octoplex.wire`'s checks, with the same errors
and limits); what protobuf already types (numbers, bytes, lists) needs no
check here.  Each outcome is built straight into an ``Outcome`` message
(:data:`GRPC_OUTCOMES`): its body as bytes, every header line kept, nothing
encoded on the way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from twisted.web.http_headers import Headers

from octoplex.errors import KINDS
from octoplex.limits import Limits
from octoplex.v1 import multiplexer_pb2 as pb
from octoplex.wire import (
    Batch,
    BatchError,
    Hedge,
    InvalidRequest,
    Options,
    OutcomeFormat,
    Retry,
    UpstreamRequest,
    build_request,
    check_base_uri,
    check_id,
    check_size,
    check_timeout,
    check_unique_ids,
    hedge_policy,
    resolve,
    retry_policy,
)

__all__ = ["GRPC_OUTCOMES", "KIND_VALUES", "batch_of", "batch_result"]

#: The ``Kind`` enum's value of each error kind of :data:`~octoplex.errors.KINDS`.
KIND_VALUES: dict[str, Any] = {kind: pb.Kind.Value(f"KIND_{kind.upper()}") for kind in KINDS}

_TIMINGS = Options(timings=True)
_NO_TIMINGS = Options()


def batch_of(message: pb.Batch, limits: Limits) -> Batch:
    """
    The batch a ``Batch`` message asks for.

    :raises BatchError: if the batch as a whole is malformed (answered
        ``INVALID_ARGUMENT``); a request with a bad value becomes an
        :class:`~octoplex.wire.InvalidRequest`, which fails alone.
    """
    if not message.HasField("timeout_msec"):
        raise BatchError("missing field timeout_msec")
    check_timeout(message.timeout_msec, limits)
    check_size(len(message.requests), limits)
    max_parallel = None
    if message.HasField("max_parallel"):
        max_parallel = message.max_parallel
        if max_parallel < 1:
            raise BatchError("max_parallel must be a whole number from 1 up, got 0")
    defaults = message.defaults if message.HasField("defaults") else None
    default_retry = None
    # The defaults' header lines, read out of the message once for all items.
    default_headers: list[tuple[str, str]] = []
    if defaults is not None:
        if defaults.base_uri:
            check_base_uri(defaults.base_uri)
        if defaults.HasField("retry"):
            default_retry = _retry(defaults.retry, "defaults")
        default_headers = [(header.name, header.value) for header in defaults.headers]
    requests = [
        _request(item, index, defaults, default_headers, default_retry, limits)
        for index, item in enumerate(message.requests)
    ]
    check_unique_ids(requests)
    return Batch(
        timeout_msec=message.timeout_msec,
        requests=requests,
        options=_TIMINGS if message.timings else _NO_TIMINGS,
        max_parallel=max_parallel,
    )


def _retry(policy: pb.Retry, where: str) -> Retry:
    return retry_policy(policy.times, list(policy.statuses), policy.connect_errors, where)


def _request(
    item: pb.Request,
    index: int,
    defaults: pb.Defaults | None,
    default_headers: list[tuple[str, str]],
    default_retry: Retry | None,
    limits: Limits,
) -> UpstreamRequest | InvalidRequest:
    where = f"requests[{index}]"
    id_ = item.id or None
    if id_ is not None:
        check_id(id_, where)
    timeout = None
    if item.HasField("timeout_msec"):
        timeout = item.timeout_msec
        check_timeout(timeout, limits, f"{where}.")
    retry = _retry(item.retry, where) if item.HasField("retry") else default_retry
    if not item.uri:
        raise BatchError(f"missing field uri in {where}")
    uri, method = item.uri, item.method
    pairs = [(header.name, header.value) for header in item.headers]
    source: Any = item
    content = item.WhichOneof("content")
    if defaults is not None:
        if defaults.base_uri:
            uri = resolve(defaults.base_uri, uri)
        method = method or defaults.method
        if default_headers:
            # Header by header: the item's own win, names without case.
            own = {name.lower() for name, _ in pairs}
            pairs = [pair for pair in default_headers if pair[0].lower() not in own] + pairs
        if content is None:
            content = defaults.WhichOneof("content")
            source = defaults
    body = source.body if content == "body" else None
    text = source.text if content == "text" else None
    method = method or "GET"
    hedge = _hedge(item, defaults, method, limits)
    return build_request(uri, method, pairs, body, text, limits, id_, timeout, retry, hedge)


def _hedge(
    item: pb.Request, defaults: pb.Defaults | None, method: str, limits: Limits
) -> Callable[[], Hedge] | None:
    """
    What checks and gives the request's hedge (its own, else the
    defaults'), as :func:`~octoplex.wire.hedge_policy` does for JSON.
    """
    source: Any = item
    if not item.HasField("hedge"):
        if defaults is None or not defaults.HasField("hedge"):
            return None
        source = defaults
    hedge = source.hedge
    if item.HasField("hedge_unsafe"):
        unsafe = item.hedge_unsafe
    else:
        unsafe = defaults is not None and defaults.hedge_unsafe
    which = hedge.WhichOneof("after")
    after = hedge.after_msec if which == "after_msec" else None
    percentile = hedge.after_percentile if which == "after_percentile" else None
    return functools.partial(hedge_policy, after, percentile, unsafe, method, limits)


def _tagged(
    outcome: pb.Outcome,
    id: str | None,
    attempts: int | None,
    timings: dict[str, Any] | None,
    hedged: bool | None = None,
    hedge_won: bool | None = None,
) -> pb.Outcome:
    # What either kind of outcome echoes of its request, when there is any.
    if hedged:
        outcome.hedged = True
        if hedge_won is not None:
            outcome.hedge_won = hedge_won
    if id is not None:
        outcome.id = id
    if attempts is not None:
        outcome.attempts = attempts
    if timings is not None:
        outcome.timings.CopyFrom(
            pb.Timings(**{name: value for name, value in timings.items() if value is not None})
        )
    return outcome


def success(
    status: int,
    headers: Headers,
    content: bytes,
    duration_msec: int,
    content_encoding: str | None = None,
    *,
    id: str | None = None,
    options: Options = _NO_TIMINGS,
    raw_headers: list[tuple[bytes, bytes]] | None = None,
    attempts: int | None = None,
    timings: dict[str, Any] | None = None,
    hedged: bool | None = None,
    hedge_won: bool | None = None,
) -> pb.Outcome:
    """
    A ``Success`` outcome: the body as it came (decoded, if the upstream
    compressed it), every header line in order, each byte of a value read
    as Latin-1.
    """
    if not raw_headers:
        raw_headers = [
            (name, value) for name, values in headers.getAllRawHeaders() for value in values
        ]
    outcome = pb.Outcome()
    # Filled in place: about half the CPU of building each part and
    # copying it in.
    result = outcome.success
    result.status = status
    add = result.headers.add
    for name, value in raw_headers:
        add(name=name.decode("latin-1"), value=value.decode("latin-1"))
    result.content = content
    result.duration_msec = duration_msec
    if content_encoding is not None:
        result.content_encoding = content_encoding
    return _tagged(outcome, id, attempts, timings, hedged, hedge_won)


def failure(
    error: str,
    duration_msec: int,
    kind: str,
    *,
    id: str | None = None,
    attempts: int | None = None,
    timings: dict[str, Any] | None = None,
    hedged: bool | None = None,
    hedge_won: bool | None = None,
) -> pb.Outcome:
    """
    A ``Failure`` outcome, its kind the ``Kind`` of the JSON kind.
    """
    outcome = pb.Outcome()
    result = outcome.failure
    result.error = error
    result.kind = KIND_VALUES[kind]
    result.duration_msec = duration_msec
    return _tagged(outcome, id, attempts, timings, hedged, hedge_won)


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: The key of BatchResult's ``outcomes`` (field 1, length-delimited).
_OUTCOMES_KEY = b"\x0a"


def batch_result(outcomes: list[pb.Outcome]) -> bytes:
    """
    The ``BatchResult`` of ``outcomes``, serialized, each outcome given its
    index: the bytes protobuf would write, without first copying every
    outcome into a ``BatchResult`` message (a third of the time).
    """
    parts: list[bytes] = []
    for index, outcome in enumerate(outcomes):
        outcome.index = index
        data = outcome.SerializeToString()
        parts += (_OUTCOMES_KEY, _varint(len(data)), data)
    return b"".join(parts)


#: The gRPC frontend's outcomes: ``Outcome`` messages (their ``index`` is
#: set by the servicer).
GRPC_OUTCOMES = OutcomeFormat(success, failure)
