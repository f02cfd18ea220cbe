"""
The version 1 wire format: the JSON the original (Rust) Octoplex spoke.

This module turns a ``POST /multiplex`` body into a :class:`Batch` and turns
outcomes back into the JSON shapes old clients expect.  It knows nothing of
sockets or time.  ``shared/WIRE-FORMAT.md`` is the reference;
``docs/api.md`` documents the rules this module adds (which headers are
dropped, how repeated response headers fold into one value).

Two kinds of problem are told apart, as in the original:

- a batch that is malformed as a whole (not JSON, wrong types, unknown
  fields, too many requests, a deadline over the limit) raises
  :class:`BatchError`, answered with ``400``;
- one request that cannot be sent (a URI that does not parse, a scheme other
  than http/https, a header with a control character, a method that is not a
  token) becomes an :class:`InvalidRequest`, which fails alone with
  ``duration_msec`` 0 while the rest of the batch runs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
import ipaddress
import json
import re
import sys
from collections.abc import Callable
from typing import Any

import attr
from hyperlink import EncodedURL
from twisted.web.http_headers import Headers

from octoplex.limits import Limits

__all__ = [
    "JSON_OUTCOMES",
    "Batch",
    "BatchError",
    "InvalidRequest",
    "Options",
    "OutcomeFormat",
    "UpstreamRequest",
    "build_request",
    "encode",
    "error_body",
    "failure_outcome",
    "parse_batch",
    "success_outcome",
]

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"

_OPTION_FIELDS = ("content_base64", "header_list", "content_encoding", "timings")
_BATCH_FIELDS = ("timeout_msec", "requests", *_OPTION_FIELDS, "defaults", "max_parallel")
_DEFAULT_FIELDS = (
    "method",
    "headers",
    "body",
    "body_base64",
    "base_uri",
    "retry",
    "hedge",
    "hedge_unsafe",
)
_RETRY_FIELDS = ("times", "statuses", "connect_errors")
_HEDGE_FIELDS = ("after_msec", "after_percentile")
_REQUEST_FIELDS = (
    "id",
    "method",
    "uri",
    "headers",
    "body",
    "body_base64",
    "timeout_msec",
    "retry",
    "hedge",
    "hedge_unsafe",
)

#: The longest request ``id``, in characters.
MAX_ID_LENGTH = 256

#: The most retries one request may ask for.
MAX_RETRIES = 5

#: The methods a request may be hedged with unless it says
#: ``hedge_unsafe``: RFC 9110 section 9.2.2's idempotent methods, which
#: have the effect of one request however many times they are sent.
HEDGE_SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Field values may hold HTAB, visible ASCII and obs-text, never other
# controls: CR and LF would split the request (header injection), NUL
# truncates it in many servers.
_BAD_VALUE_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_URI_CHAR = re.compile(r"[\x00-\x20\x7f]")

# RFC 9110 section 7.6.1: a proxy must not forward these; the pool owns the
# connection, and Octoplex frames the body itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

_CHAR_NAMES = {"\r": "a carriage return (CR)", "\n": "a line feed (LF)", "\x00": "a NUL"}

#: How much of a bad value an error message quotes.
_QUOTE_LIMIT = 80


class BatchError(ValueError):
    """
    The batch as a whole is malformed.  The message is for the caller: it
    names the bad value and the rule or limit it broke.
    """


@attr.s(slots=True, frozen=True, auto_attribs=True)
class UpstreamRequest:
    """
    One request of a batch, checked and ready to send.

    :ivar method: the method token, as bytes.
    :ivar uri: the URI as the caller wrote it, for logs.
    :ivar url: the URI in its ASCII (URI, not IRI) form.
    :ivar headers: the headers to send.
    :ivar body: the body to send, or ``None`` for none.
    :ivar id: the caller's id for it, echoed in its outcome, if given.
    :ivar timeout_msec: its own deadline, counted like the batch's, if
        given; the batch's deadline still caps it.
    :ivar retry: when to send it again, if it asked to be.
    :ivar hedge: when to send a second, identical attempt alongside the
        first, if it asked for one (:mod:`octoplex.hedging`).
    """

    method: bytes
    uri: str
    url: EncodedURL
    headers: Headers
    body: bytes | None
    id: str | None = None
    timeout_msec: int | None = None
    retry: Retry | None = None
    hedge: Hedge | None = None


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Hedge:
    """
    When a request sends a second, identical attempt: once the first has
    had no response head for ``after_msec`` milliseconds, or for the
    ``after_percentile`` percentile of its host's recent times to a
    response head.  Exactly one of the two is set.
    """

    after_msec: int | None = None
    after_percentile: float | None = None


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Retry:
    """
    When a request is sent again, while its deadline leaves room.

    :ivar times: at most this many more attempts.
    :ivar statuses: the response statuses that call for another attempt.
    :ivar connect_errors: whether a failure to connect (kind ``connect``)
        does.
    """

    times: int
    statuses: frozenset[int] = frozenset()
    connect_errors: bool = False


@attr.s(slots=True, frozen=True, auto_attribs=True)
class InvalidRequest:
    """
    One request of a batch that cannot be sent; it fails alone.

    :ivar uri: the URI as the caller wrote it, if it was a string.
    :ivar error: why, naming the bad value.
    :ivar id: the caller's id for it, if given.
    """

    uri: str | None
    error: str
    id: str | None = None


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Options:
    """
    What a batch asks to be told beyond the original format (each is a
    boolean batch field named after the outcome field it adds).

    :ivar content_base64: every body as ``content_base64``, even one that is
        valid UTF-8.
    :ivar header_list: ``header_list`` in each ``Success``: every header line
        as received, in order, as ``[name, value]`` pairs.
    :ivar content_encoding: ``content_encoding`` in each ``Success`` whose
        body Octoplex decompressed.
    :ivar timings: ``timings`` in each outcome of a request that was sent:
        where its time went (:mod:`octoplex.timings`).
    """

    content_base64: bool = False
    header_list: bool = False
    content_encoding: bool = False
    timings: bool = False


#: What a batch that asks for nothing new gets: the original format.
ORIGINAL = Options()


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Batch:
    """
    A parsed ``POST /multiplex`` body.

    :ivar timeout_msec: the deadline, counted from the batch's arrival.
    :ivar requests: one entry per request, in the caller's order.
    :ivar options: what the answer should carry beyond the original format.
    :ivar max_parallel: how many of its requests may run at once, if capped;
        1 runs them one after the other, in order.
    """

    timeout_msec: int
    requests: list[UpstreamRequest | InvalidRequest]
    options: Options = ORIGINAL
    max_parallel: int | None = None


def _quote(value: Any) -> str:
    """
    Show a caller's value in an error message, cut short if it is long, so
    that a hostile megabyte is not echoed back.
    """
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > _QUOTE_LIMIT:
        text = text[:_QUOTE_LIMIT] + "…"
    return text


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # serde rejects a repeated field; json.loads would silently keep the
    # last, so two readers of one document could disagree on its meaning.
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BatchError(f"duplicate field {_quote(key)} in a JSON object")
            seen.add(key)
    return result


def _max_int_digits() -> int:
    # Python 3.10.7 and later; the limit did not exist before.
    return int(getattr(sys, "get_int_max_str_digits", lambda: 4300)())


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value: Any) -> bool:
    # A well-formed pair of escapes decodes to one character outside the
    # BMP, so any surrogate left in a string stands alone.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _reject_constant(name: str) -> None:
    raise BatchError(f"{name} is not valid JSON")


def _check_fields(obj: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise BatchError(
                f"unknown field {_quote(key)} in {where}; expected {', '.join(allowed)}"
            )


def parse_batch(body: bytes, limits: Limits) -> Batch:
    """
    Parse and check a ``POST /multiplex`` body.

    :param body: the raw request body.
    :param limits: the limits to hold the batch to.
    :raises BatchError: if the batch as a whole is malformed.
    :return: the batch, with each request either ready or invalid.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BatchError(f"request body is not UTF-8: bad byte at offset {e.start}") from None
    try:
        document = json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except json.JSONDecodeError as e:
        raise BatchError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BatchError("request body nests JSON too deeply") from None
    except BatchError:
        raise
    except ValueError:
        # Python refuses to read an integer of over 4,300 digits, which would
        # take quadratic time (CVE-2020-10735).
        raise BatchError(
            f"request body holds an integer of more than {_max_int_digits()} digits"
        ) from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(document):
        # JSON can escape half of a UTF-16 pair ("\ud800"), which is no
        # Unicode text: it could be neither sent nor quoted in an error.
        raise BatchError(
            "request body has a string with a lone UTF-16 surrogate escape (\\ud800-\\udfff); "
            "strings must be valid Unicode"
        )

    if not isinstance(document, dict):
        raise BatchError(f"request body must be a JSON object, got {_quote(document)}")
    _check_fields(document, _BATCH_FIELDS, "batch")

    if "timeout_msec" not in document:
        raise BatchError("missing field timeout_msec")
    timeout = document["timeout_msec"]
    if type(timeout) is not int or timeout < 0:
        raise BatchError(
            f"timeout_msec must be a whole number of milliseconds, got {_quote(timeout)}"
        )
    check_timeout(timeout, limits)

    if "requests" not in document:
        raise BatchError("missing field requests")
    items = document["requests"]
    if not isinstance(items, list):
        raise BatchError(f"requests must be an array, got {_quote(items)}")
    check_size(len(items), limits)

    flags = {}
    for name in _OPTION_FIELDS:
        value = document.get(name, False)
        if type(value) is not bool:
            raise BatchError(f"{name} must be true or false, got {_quote(value)}")
        flags[name] = value

    max_parallel = document.get("max_parallel")
    if max_parallel is not None and (type(max_parallel) is not int or max_parallel < 1):
        raise BatchError(
            f"max_parallel must be a whole number from 1 up, got {_quote(max_parallel)}"
        )

    defaults = document.get("defaults")
    if defaults is not None:
        defaults = _check_defaults(defaults)
        items = [_with_defaults(item, defaults) for item in items]
    requests = [_parse_request(item, index, limits) for index, item in enumerate(items)]
    check_unique_ids(requests)
    options = Options(**flags) if any(flags.values()) else ORIGINAL
    return Batch(
        timeout_msec=timeout, requests=requests, options=options, max_parallel=max_parallel
    )


# The checks of values that every frontend's batches go through (a
# frontend checks the types its own encoding can get wrong).


def check_timeout(timeout: int, limits: Limits, where: str = "") -> None:
    """
    A batch's (or, with ``where``, an item's) ``timeout_msec``, already a
    whole number, is within ``--max-timeout-msec``.
    """
    if timeout > limits.max_timeout_msec:
        raise BatchError(
            f"{where}timeout_msec is {timeout}; at most {limits.max_timeout_msec} is allowed"
        )


def check_size(size: int, limits: Limits) -> None:
    """A batch of ``size`` requests is within ``--max-batch-size``."""
    if not size:
        raise BatchError(f"batch has 0 requests; between 1 and {limits.max_batch_size} are allowed")
    if size > limits.max_batch_size:
        raise BatchError(f"batch has {size} requests; at most {limits.max_batch_size} are allowed")


def check_id(id_: str, where: str) -> None:
    """An item's ``id`` is between 1 and :data:`MAX_ID_LENGTH` characters long."""
    if not id_ or len(id_) > MAX_ID_LENGTH:
        raise BatchError(
            f"{where}.id is {len(id_)} characters long; between 1 and {MAX_ID_LENGTH} are allowed"
        )


def check_unique_ids(requests: list[UpstreamRequest | InvalidRequest]) -> None:
    """No two requests of a batch have the same ``id``."""
    seen: dict[str, int] = {}
    for index, request in enumerate(requests):
        if request.id is not None:
            if request.id in seen:
                raise BatchError(
                    f"requests[{index}].id {_quote(request.id)} is already the id of "
                    f"requests[{seen[request.id]}]; ids must be unique within a batch"
                )
            seen[request.id] = index


def check_base_uri(base: str) -> None:
    """The batch's ``defaults.base_uri`` is a URI Octoplex can send to."""
    try:
        _check_uri(base)
    except _InvalidValue as e:
        raise BatchError(f"defaults.base_uri: {e}") from None


def _check_defaults(defaults: Any) -> dict[str, Any]:
    """
    The batch's ``defaults``, its types checked as an item's are, its
    ``base_uri`` checked as a URI; errors name ``defaults``.
    """
    if not isinstance(defaults, dict):
        raise BatchError(f"defaults must be a JSON object, got {_quote(defaults)}")
    _check_fields(defaults, _DEFAULT_FIELDS, "defaults")
    method = defaults.get("method")
    if method is not None and not isinstance(method, str):
        raise BatchError(f"defaults.method must be a string, got {_quote(method)}")
    _header_pairs(defaults.get("headers"), "defaults")
    _body_fields(defaults, "defaults")
    _retry(defaults.get("retry"), "defaults")
    _hedge_fields(defaults, "defaults")
    base = defaults.get("base_uri")
    if base is not None:
        if not isinstance(base, str):
            raise BatchError(f"defaults.base_uri must be a string, got {_quote(base)}")
        check_base_uri(base)
    return defaults


def _with_defaults(item: Any, defaults: dict[str, Any]) -> Any:
    """
    ``item`` with the batch's defaults filled in; the item's own fields win,
    header by header (names compared without case).
    """
    if not isinstance(item, dict):
        return item
    merged = dict(item)
    if merged.get("method") is None and defaults.get("method") is not None:
        merged["method"] = defaults["method"]
    default_headers = defaults.get("headers")
    if default_headers:
        own = merged.get("headers")
        if own is None:
            merged["headers"] = default_headers
        elif isinstance(own, dict):
            names = {name.lower() for name in own}
            merged["headers"] = {
                **{k: v for k, v in default_headers.items() if k.lower() not in names},
                **own,
            }
    if merged.get("body") is None and merged.get("body_base64") is None:
        for field in ("body", "body_base64"):
            if defaults.get(field) is not None:
                merged[field] = defaults[field]
    for field in ("retry", "hedge", "hedge_unsafe"):
        if merged.get(field) is None and defaults.get(field) is not None:
            merged[field] = defaults[field]
    base = defaults.get("base_uri")
    uri = merged.get("uri")
    if base is not None and isinstance(uri, str):
        merged["uri"] = resolve(base, uri)
    return merged


def resolve(base: str, reference: str) -> str:
    """
    ``reference`` resolved against the batch's ``defaults.base_uri``.
    """
    # RFC 3986 section 5.2: a relative reference against the base; an
    # absolute URI stays as it is.  A reference that does not parse is left
    # for the item's own check to report.
    try:
        return str(EncodedURL.from_text(base).click(reference).to_text())
    except (ValueError, TypeError):
        return reference


def _retry(policy: Any, where: str) -> Retry | None:
    """
    A request's (or the defaults') ``retry``, checked; errors are the
    batch's, since they are about its shape.
    """
    if policy is None:
        return None
    if not isinstance(policy, dict):
        raise BatchError(f"{where}.retry must be a JSON object, got {_quote(policy)}")
    _check_fields(policy, _RETRY_FIELDS, f"{where}.retry")
    times = policy.get("times")
    if type(times) is not int:
        raise BatchError(
            f"{where}.retry.times must be a whole number from 1 to {MAX_RETRIES}, "
            f"got {_quote(times)}"
        )
    statuses = policy.get("statuses", [])
    if not isinstance(statuses, list) or not all(type(code) is int for code in statuses):
        raise BatchError(
            f"{where}.retry.statuses must be an array of statuses from 400 to 599, "
            f"got {_quote(statuses)}"
        )
    connect = policy.get("connect_errors", False)
    if type(connect) is not bool:
        raise BatchError(
            f"{where}.retry.connect_errors must be true or false, got {_quote(connect)}"
        )
    return retry_policy(times, statuses, connect, where)


def retry_policy(times: int, statuses: list[int], connect_errors: bool, where: str) -> Retry:
    """
    A ``retry`` policy, its values checked: from 1 to :data:`MAX_RETRIES`
    more attempts, on statuses from 400 to 599 and/or connect errors.
    """
    if not 1 <= times <= MAX_RETRIES:
        raise BatchError(
            f"{where}.retry.times must be a whole number from 1 to {MAX_RETRIES}, "
            f"got {_quote(times)}"
        )
    if not all(400 <= code <= 599 for code in statuses):
        raise BatchError(
            f"{where}.retry.statuses must be an array of statuses from 400 to 599, "
            f"got {_quote(statuses)}"
        )
    if not statuses and not connect_errors:
        raise BatchError(
            f"{where}.retry retries nothing; give statuses, connect_errors: true, or both"
        )
    return Retry(times=times, statuses=frozenset(statuses), connect_errors=connect_errors)


def _hedge_fields(item: dict[str, Any], where: str) -> tuple[Any, bool]:
    """
    A request's (or the defaults') ``hedge`` and ``hedge_unsafe``, their
    types checked (a wrong type fails the batch, as for ``retry``); their
    values are checked by :func:`hedge_policy`, for the request alone.
    """
    hedge = item.get("hedge")
    if hedge is not None:
        if not isinstance(hedge, dict):
            raise BatchError(f"{where}.hedge must be a JSON object, got {_quote(hedge)}")
        _check_fields(hedge, _HEDGE_FIELDS, f"{where}.hedge")
        after = hedge.get("after_msec")
        if after is not None and type(after) is not int:
            raise BatchError(
                f"{where}.hedge.after_msec must be a whole number of milliseconds, "
                f"got {_quote(after)}"
            )
        percentile = hedge.get("after_percentile")
        if percentile is not None and type(percentile) not in (int, float):
            raise BatchError(
                f"{where}.hedge.after_percentile must be a number, got {_quote(percentile)}"
            )
    unsafe = item.get("hedge_unsafe")
    if unsafe is not None and type(unsafe) is not bool:
        raise BatchError(f"{where}.hedge_unsafe must be true or false, got {_quote(unsafe)}")
    return hedge, bool(unsafe)


def hedge_policy(
    after_msec: int | None,
    after_percentile: float | None,
    unsafe: bool,
    method: str,
    limits: Limits,
) -> Hedge:
    """
    A request's ``hedge``, its values checked.

    :raises _InvalidValue: (the request fails alone, kind ``invalid``) for
        neither or both of ``after_msec`` and ``after_percentile``, a value
        out of its range, or a method that is not idempotent without
        ``hedge_unsafe``: a POST sent twice may act twice.
    """
    if (after_msec is None) == (after_percentile is None):
        raise _InvalidValue(
            "hedge needs exactly one of after_msec and after_percentile, "
            f"got {'both' if after_msec is not None else 'neither'}"
        )
    if after_msec is not None and not 1 <= after_msec <= limits.max_timeout_msec:
        raise _InvalidValue(
            f"hedge.after_msec is {after_msec}; it must be from 1 to "
            f"{limits.max_timeout_msec} (--max-timeout-msec)"
        )
    if after_percentile is not None and not 0 < after_percentile < 100:
        raise _InvalidValue(
            f"hedge.after_percentile is {_quote(after_percentile)}; "
            "it must be above 0 and below 100"
        )
    if not unsafe and method.upper().encode("ascii", "replace") not in HEDGE_SAFE_METHODS:
        raise _InvalidValue(
            f"method {_quote(method)} is not idempotent, so it is not hedged unless the "
            "request says hedge_unsafe: true (a second copy may act a second time)"
        )
    return Hedge(after_msec=after_msec, after_percentile=after_percentile)


def _header_pairs(headers: Any, where: str) -> list[tuple[str, str]]:
    """
    An item's (or the defaults') headers as (name, value) pairs, a list
    value giving one pair per element; a wrong type is a BatchError.
    """
    if headers is None:
        return []
    if not isinstance(headers, dict):
        raise BatchError(f"{where}.headers must be an object, got {_quote(headers)}")
    pairs: list[tuple[str, str]] = []
    for name, value in headers.items():
        if isinstance(value, str):
            pairs.append((name, value))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            # A list sends the header once per value, in order.
            pairs.extend((name, v) for v in value)
        else:
            raise BatchError(
                f"{where}.headers[{_quote(name)}] must be a string or an array of strings, "
                f"got {_quote(value)}"
            )
    return pairs


def _body_fields(item: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    body = item.get("body")
    if body is not None and not isinstance(body, str):
        raise BatchError(f"{where}.body must be a string or null, got {_quote(body)}")
    body_base64 = item.get("body_base64")
    if body_base64 is not None:
        if not isinstance(body_base64, str):
            raise BatchError(
                f"{where}.body_base64 must be a string or null, got {_quote(body_base64)}"
            )
        if body is not None:
            raise BatchError(f"{where} has both body and body_base64; give one at most")
    return body, body_base64


def _parse_request(item: Any, index: int, limits: Limits) -> UpstreamRequest | InvalidRequest:
    """
    Check one request's types (a type error fails the whole batch, as serde
    did) and then its values (a bad value fails this request alone).
    """
    where = f"requests[{index}]"
    if not isinstance(item, dict):
        raise BatchError(f"{where} must be a JSON object, got {_quote(item)}")
    _check_fields(item, _REQUEST_FIELDS, where)

    id_ = item.get("id")
    if id_ is not None:
        if not isinstance(id_, str):
            raise BatchError(f"{where}.id must be a string, got {_quote(id_)}")
        check_id(id_, where)
    timeout = item.get("timeout_msec")
    if timeout is not None:
        if type(timeout) is not int or timeout < 0:
            raise BatchError(
                f"{where}.timeout_msec must be a whole number of milliseconds, "
                f"got {_quote(timeout)}"
            )
        check_timeout(timeout, limits, f"{where}.")
    retry = _retry(item.get("retry"), where)
    hedge, unsafe = _hedge_fields(item, where)
    method = item.get("method", "GET")
    if not isinstance(method, str):
        raise BatchError(f"{where}.method must be a string, got {_quote(method)}")
    if "uri" not in item:
        raise BatchError(f"missing field uri in {where}")
    uri = item["uri"]
    if not isinstance(uri, str):
        raise BatchError(f"{where}.uri must be a string, got {_quote(uri)}")
    pairs = _header_pairs(item.get("headers"), where)
    body, body_base64 = _body_fields(item, where)
    hedging: Callable[[], Hedge] | None = None
    if hedge is not None:
        after, percentile = hedge.get("after_msec"), hedge.get("after_percentile")
        hedging = functools.partial(hedge_policy, after, percentile, unsafe, method, limits)
    if body_base64 is None:
        return build_request(uri, method, pairs, None, body, limits, id_, timeout, retry, hedging)
    try:
        decoded = _from_base64(body_base64)
    except _InvalidValue as e:
        return InvalidRequest(uri=uri, error=str(e), id=id_)
    return build_request(uri, method, pairs, decoded, None, limits, id_, timeout, retry, hedging)


def build_request(
    uri: str,
    method: str,
    pairs: list[tuple[str, str]],
    body: bytes | None,
    text: str | None,
    limits: Limits,
    id_: str | None = None,
    timeout: int | None = None,
    retry: Retry | None = None,
    hedge: Callable[[], Hedge] | None = None,
) -> UpstreamRequest | InvalidRequest:
    """
    One request, its values checked: a bad one fails this request alone.

    :param hedge: checks the request's ``hedge`` and gives it (see
        :func:`hedge_policy`), if it has one.

    :param body: a body sent as given (JSON's ``body_base64``), or ``None``.
    :param text: a text body (JSON's ``body``), sent as UTF-8 and gzipped
        by Octoplex if the headers say ``Content-Encoding: gzip``; or ``None``.
    """
    try:
        encoded = body if text is None else text.encode("utf-8")
        _check_header_size(pairs, limits)
        checked = _check_headers(pairs, 0 if encoded is None else len(encoded))
        if text is not None and _asks_for_gzip(checked):
            # A text body cannot already be gzip: the header asks Octoplex
            # to compress it.  A body given as bytes is sent as given.
            assert encoded is not None
            encoded = gzip.compress(encoded, compresslevel=6)
        return UpstreamRequest(
            method=_check_method(method),
            uri=uri,
            url=_check_uri(uri),
            headers=checked,
            body=encoded,
            id=id_,
            timeout_msec=timeout,
            retry=retry,
            hedge=None if hedge is None else hedge(),
        )
    except _InvalidValue as e:
        return InvalidRequest(uri=uri, error=str(e), id=id_)


def _from_base64(text: str) -> bytes:
    # Standard alphabet with padding (RFC 4648 section 4), strictly: a
    # stray character is an error, not skipped.
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _InvalidValue(f"body_base64 is not valid base64 ({e}): {_quote(text)}") from None


def _asks_for_gzip(headers: Headers) -> bool:
    values = headers.getRawHeaders(b"content-encoding") or []
    if not values:
        return False
    if [v.strip().lower() for v in values] != [b"gzip"]:
        raise _InvalidValue(
            f"header Content-Encoding is {_quote([v.decode('latin-1') for v in values])}; "
            "Octoplex can only gzip a body (Content-Encoding: gzip)"
        )
    return True


class _InvalidValue(ValueError):
    """One request's value is bad; the request fails alone."""


def _check_method(method: str) -> bytes:
    if not _TOKEN.match(method):
        raise _InvalidValue(f"method {_quote(method)} is not a valid HTTP method token")
    return method.encode("ascii")


class URI(EncodedURL):
    """
    A checked URL that is already in URI form (ASCII host, percent-encoded),
    as :func:`_check_uri` returns it: ``to_uri()`` is the URL itself and
    ``to_text()`` is computed once.  treq calls both on every request, and
    hyperlink's ``to_uri()`` runs IDNA over the host each time, a large
    share of a request's CPU.  Equal to the plain ``EncodedURL`` of the
    same parts.
    """

    def to_uri(self) -> URI:
        return self

    def to_text(self, with_password: bool = False) -> str:
        # A checked URI never carries credentials, so with_password changes
        # nothing.
        text: str | None = self.__dict__.get("_octoplex_text")
        if text is None:
            text = self.__dict__["_octoplex_text"] = super().to_text(with_password)
        return text


#: Distinct URIs whose check is remembered.  Each entry is small (the URL's
#: parts), and a batch API sees the same few URIs again and again.
URI_CACHE_SIZE = 4096


def _check_uri(uri: str) -> URI:
    """
    The URI form of ``uri``, checked; remembered per distinct text (the
    cache is keyed by the exact text, so URIs that differ in case or in
    escaping are checked apart).

    :raises _InvalidValue: for a URI that is not acceptable.
    """
    checked = _checked_uri(uri)
    if isinstance(checked, _InvalidValue):
        raise _InvalidValue(str(checked))
    return checked


@functools.lru_cache(maxsize=URI_CACHE_SIZE)
def _checked_uri(uri: str) -> URI | _InvalidValue:
    try:
        return _uri_of(uri)
    except _InvalidValue as e:
        return e


def _uri_of(uri: str) -> URI:
    bad = _BAD_URI_CHAR.search(uri)
    if bad:
        raise _InvalidValue(
            f"URI {_quote(uri)} contains whitespace or a control character "
            f"at position {bad.start()}"
        )
    bracketed = _BRACKETED_HOST.match(uri)
    if bracketed and "%" in bracketed.group(1):
        # RFC 6874: a zone ID names an interface of this host, meaningless
        # to any other (hyperlink fails it with a bare inet_pton error).
        raise _InvalidValue(
            f"URI {_quote(uri)} has an IPv6 zone ID ({_quote(bracketed.group(1))}); "
            "a zone names one of this host's interfaces and is not supported"
        )
    try:
        url = EncodedURL.from_text(uri)
    except ValueError as e:
        raise _InvalidValue(f"URI {_quote(uri)} does not parse: {e}") from None
    scheme = url.scheme.lower()
    if scheme not in ("http", "https"):
        shown = _quote(url.scheme) if url.scheme else "none"
        raise _InvalidValue(
            f"URI {_quote(uri)} has scheme {shown}; only http and https are supported"
        )
    if not url.host:
        raise _InvalidValue(f"URI {_quote(uri)} has no host")
    if url.userinfo:
        raise _InvalidValue(f"URI {_quote(uri)} carries credentials; send them in a header instead")
    if url.scheme != scheme:
        # The port stays: an explicit one is the caller's, and hyperlink
        # gives a missing one the lower-case scheme's default.
        url = url.replace(scheme=scheme)
    if url.port is not None and not 1 <= url.port <= 65535:
        raise _InvalidValue(f"URI {_quote(uri)} has port {url.port}; ports run from 1 to 65535")
    literal = _ipv6_literal(uri)
    if literal is not None:
        # hyperlink 21.0's to_uri() runs IDNA (uts46) over every non-empty
        # host (_url.py, URL.to_uri) and an IPv6 literal's ":" fails it:
        # encode the rest with no host, then put the literal back.  Its
        # canonical text makes one pool key and one Host value per address.
        url = url.replace(host="").to_uri().replace(host=literal)
    else:
        try:
            url = url.to_uri()
        except ValueError as e:
            raise _InvalidValue(f"URI {_quote(uri)} has an invalid host: {e}") from None
        address = _numeric_ipv4(url.host)
        if address is not None:
            url = url.replace(host=address)
    return URI(
        scheme=url.scheme,
        host=url.host,
        path=url.path,
        query=url.query,
        fragment=url.fragment,
        port=url.port,
        rooted=url.rooted,
        userinfo=url.userinfo,
        uses_netloc=url.uses_netloc,
    )


# The bracketed host of a URI with an authority: "[" and what it holds.
_BRACKETED_HOST = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@\[]*@)?\[([^\]/?#]*)\]")


def _ipv6_literal(uri: str) -> str | None:
    """
    The canonical text of ``uri``'s IPv6 literal host (``[2001:DB8::1]``
    gives ``2001:db8::1``), ``None`` where the host is not bracketed.

    :raises _InvalidValue: for brackets that hold no IPv6 address (an
        IPv4 address or an IPvFuture, RFC 3986 section 3.2.2).
    """
    bracketed = _BRACKETED_HOST.match(uri)
    if bracketed is None:
        return None
    try:
        return ipaddress.IPv6Address(bracketed.group(1)).compressed
    except ValueError:
        raise _InvalidValue(
            f"URI {_quote(uri)} has {_quote(bracketed.group(1))} in brackets, "
            "which is no IPv6 address"
        ) from None


def _numeric_ipv4(host: str) -> str | None:
    """
    The dotted-quad form of a host that is an IPv4 address in one of the
    other spellings that URL parsers and ``inet_aton`` accept (``2130706433``,
    ``0x7f.1``, ``0177.0.0.1``, ``127.1``), as the WHATWG URL standard reads
    them; ``None`` for a host name.  Octoplex dials (and its egress policy
    judges) the address every such spelling means.

    :raises _InvalidValue: for a host that ends in a number but is no valid
        IPv4 address (``1.2.3.4.5``, ``256.1.1.1``), which the URL standard
        rejects too.
    """
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if not _NUMBER.match(parts[-1]):
        return None
    numbers = [_ipv4_number(part) for part in parts]
    if len(parts) > 4 or None in numbers:
        raise _InvalidValue(
            f"host {_quote(host)} ends in a number, so it must be an IPv4 address, and is not one"
        )
    *leading, last = numbers
    assert last is not None
    if any(n is None or n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        raise _InvalidValue(f"host {_quote(host)} is an IPv4 address out of range")
    value = last
    for index, n in enumerate(leading):
        assert n is not None
        value += n << (8 * (3 - index))
    return ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0))


# The last label of a host that the URL standard reads as a number.
_NUMBER = re.compile(r"([0-9]+|0[xX][0-9a-fA-F]*)\Z")


def _ipv4_number(part: str) -> int | None:
    try:
        if part[:2] in ("0x", "0X"):
            return int(part[2:] or "0", 16)
        if len(part) > 1 and part.startswith("0"):
            return int(part[1:], 8)
        return int(part, 10)
    except ValueError:
        return None


def _check_header_size(headers: list[tuple[str, str]], limits: Limits) -> None:
    if len(headers) > limits.max_header_count:
        raise _InvalidValue(
            f"request has {len(headers)} headers; at most {limits.max_header_count} are allowed "
            "(--max-header-count)"
        )
    # As on the wire: "name: value" and CR LF.
    size = sum(len(name) + len(value.encode("utf-8")) + 4 for name, value in headers)
    if size > limits.max_header_bytes:
        raise _InvalidValue(
            f"request headers are {size} bytes; at most {limits.max_header_bytes} are allowed "
            "(--max-header-bytes)"
        )


def _check_headers(headers: list[tuple[str, str]], body_length: int) -> Headers:
    result = Headers()
    # RFC 9110 section 7.6.1: the headers a Connection header names are
    # hop-by-hop too.
    named = {
        token.strip().lower()
        for key, value in headers
        if key.lower() == "connection"
        for token in value.split(",")
    }
    for name, value in headers:
        if not _TOKEN.match(name):
            raise _InvalidValue(f"header name {_quote(name)} is not a valid HTTP token")
        bad = _BAD_VALUE_CHAR.search(value)
        if bad:
            what = _CHAR_NAMES.get(bad.group(), f"control character {bad.group()!r}")
            raise _InvalidValue(
                f"header {name} has a value with {what} at position {bad.start()}: {_quote(value)}"
            )
        lower = name.lower()
        if lower in _HOP_BY_HOP or lower.startswith("proxy-") or lower in named:
            continue
        if lower == "content-length":
            if value.strip() != str(body_length):
                raise _InvalidValue(
                    f"header Content-Length is {_quote(value)} but the body is "
                    f"{body_length} bytes; leave it out and Octoplex sets it"
                )
            continue
        result.addRawHeader(name.encode("ascii"), value.encode("utf-8"))
    return result


def success_outcome(
    status: int,
    headers: Headers,
    content: bytes,
    duration_msec: int,
    content_encoding: str | None = None,
    *,
    id: str | None = None,
    options: Options = ORIGINAL,
    raw_headers: list[tuple[bytes, bytes]] | None = None,
    attempts: int | None = None,
    timings: dict[str, Any] | None = None,
    hedged: bool | None = None,
    hedge_won: bool | None = None,
) -> dict[str, Any]:
    """
    The ``Success`` outcome of the original format, and what the batch
    asked for beyond it.

    Header names are lowercased; a repeated header keeps its last value (the
    original kept one value per name; ``header_list`` has them all).  A body
    that is valid UTF-8 is ``content``, as text.  One that is not, or any
    body when the batch asked for ``content_base64``, is ``content_base64``
    instead (the original decoded it lossily, replacing each invalid
    sequence with U+FFFD: binary bodies came back corrupted).
    ``content_encoding``, when asked for, says the upstream compressed the
    body that ``content`` holds decoded.
    """
    folded = {
        name.decode("ascii", "replace").lower(): values[-1].decode("utf-8", "replace")
        for name, values in headers.getAllRawHeaders()
    }
    success: dict[str, Any] = {"headers": folded, "status": status}
    if options.content_base64:
        success["content_base64"] = base64.b64encode(content).decode("ascii")
    else:
        try:
            success["content"] = content.decode("utf-8")
        except UnicodeDecodeError:
            success["content_base64"] = base64.b64encode(content).decode("ascii")
    success["duration_msec"] = duration_msec
    if options.header_list:
        success["header_list"] = [
            [name.decode("latin-1"), value.decode("latin-1")] for name, value in raw_headers or ()
        ]
    if content_encoding is not None and options.content_encoding:
        success["content_encoding"] = content_encoding
    _tag(success, attempts, timings, id)
    if hedged:
        _tag_hedge(success, hedge_won)
    return {"Success": success}


def failure_outcome(
    error: str,
    duration_msec: int,
    kind: str,
    *,
    id: str | None = None,
    attempts: int | None = None,
    timings: dict[str, Any] | None = None,
    hedged: bool | None = None,
    hedge_won: bool | None = None,
) -> dict[str, Any]:
    """
    The ``Failure`` outcome of the original format, with its ``kind``
    (:data:`octoplex.errors.KINDS`), the attempts made if the request could
    be retried, whether it was hedged, and its ``id`` if it had one.
    """
    failure: dict[str, Any] = {"error": error, "kind": kind, "duration_msec": duration_msec}
    _tag(failure, attempts, timings, id)
    if hedged:
        _tag_hedge(failure, hedge_won)
    return {"Failure": failure}


def _tag_hedge(outcome: dict[str, Any], hedge_won: bool | None) -> None:
    # A request whose hedge was sent says so, and, once an attempt's head
    # came first, whether that was the hedge's.
    outcome["hedged"] = True
    if hedge_won is not None:
        outcome["hedge_won"] = hedge_won


def _tag(
    outcome: dict[str, Any],
    attempts: int | None,
    timings: dict[str, Any] | None,
    id: str | None,
) -> None:
    # What either kind of outcome echoes of its request, when there is any.
    if attempts is not None:
        outcome["attempts"] = attempts
    if timings is not None:
        outcome["timings"] = timings
    if id is not None:
        outcome["id"] = id


@attr.s(slots=True, frozen=True, auto_attribs=True)
class OutcomeFormat:
    """
    How a frontend wants each item's outcome built: the multiplexer calls
    ``success`` and ``failure`` with the arguments of
    :func:`success_outcome` and :func:`failure_outcome`, and hands back
    whatever they return.
    """

    success: Callable[..., Any]
    failure: Callable[..., Any]


#: The HTTP frontend's outcomes: the JSON objects of the wire format.
JSON_OUTCOMES = OutcomeFormat(success_outcome, failure_outcome)


def encode(document: Any) -> bytes:
    """
    Serialise a response document compactly, with non-ASCII text as UTF-8,
    as serde_json did.
    """
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_body(message: str) -> bytes:
    """
    The body of a batch-level error: ``{"error": message}``.
    """
    return encode({"error": message})
