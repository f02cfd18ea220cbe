"""
A client for Python callers of Octoplex: a batch and its outcomes as typed
objects, and functions that send a batch to a daemon and hand its outcomes
back.

- :class:`Batch`, :class:`Request`, :class:`Defaults` and :class:`Retry`
  build a ``POST /multiplex`` body; :meth:`Batch.to_json` gives exactly
  the wire JSON (``shared/WIRE-FORMAT.md``, ``octoplex.schema``), leaving
  out every optional field that is not set.
- :class:`Outcome` is one item of the answer, parsed from its ``Success``
  or ``Failure`` object; :class:`Summary` ends a streamed answer.
- :func:`send` and :func:`send_streamed` are coroutines for Twisted
  programs (treq); :func:`send_blocking` and :func:`send_streamed_blocking`
  use only the standard library, for scripts.
- :class:`BatchRefused` is raised when the daemon refuses the batch as a
  whole (``400``, ``401``, ``413``, ``429``, ``503`` ...), and
  :class:`BadAnswer` when what came back is not an Octoplex answer.

Importing this module imports neither Twisted nor treq: the Twisted
functions import them (through :mod:`octoplex._caller_twisted`) when
called, so that a script on the blocking path stays light.

The objects check, when they are built, what the wire format holds every
daemon to: the types, ids unique and at most :data:`MAX_ID_LENGTH`
characters, the retry bounds, a ``base_uri`` with a scheme and host (the
daemon refuses a batch that breaks one whole), and a method that is an HTTP
token (the daemon would fail that request alone).  A daemon's own limits
(``--max-batch-size``, ``--max-timeout-msec`` ...) are its to enforce.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import http.client
import json
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attr

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = [
    "DEFAULT_URL",
    "KINDS",
    "MAX_ID_LENGTH",
    "MAX_RETRIES",
    "BadAnswer",
    "Batch",
    "BatchRefused",
    "Defaults",
    "OctoplexError",
    "Outcome",
    "Request",
    "Retry",
    "Streamed",
    "Summary",
    "Timings",
    "send",
    "send_blocking",
    "send_streamed",
    "send_streamed_blocking",
]

#: Where ``twistd octoplex`` listens in the README's quick start.
DEFAULT_URL = "http://127.0.0.1:8080/multiplex"

#: The longest request ``id``, in characters (``octoplex.wire.MAX_ID_LENGTH``).
MAX_ID_LENGTH = 256

#: The most retries one request may ask for (``octoplex.wire.MAX_RETRIES``).
MAX_RETRIES = 5

#: Every ``Failure.kind`` docs/api.md lists (``octoplex.errors.KINDS``).  The
#: set is stable, but a newer daemon may announce another kind, so a kind
#: outside it is kept as it came, not refused.
KINDS = (
    "timeout",
    "queue_timeout",
    "cancelled",
    "invalid",
    "forbidden",
    "dns",
    "connect",
    "tls",
    "connection",
    "protocol",
    "too_large",
    "internal",
    "circuit_open",
)

#: The kinds after which nothing reached the upstream, so that sending the
#: request again is safe (docs/api.md, "Error kinds"); after
#: ``circuit_open``, safe but pointless before the time its error names.
RETRY_SAFE_KINDS = frozenset({"connect", "dns", "queue_timeout", "circuit_open"})

#: Seconds added to a batch's deadline for the default client-side timeout:
#: the daemon answers by the deadline at the latest, and this leaves room
#: for the network and a loaded daemon.
GRACE_SECONDS = 30.0

JSON_CONTENT_TYPE = "application/json"
NDJSON_CONTENT_TYPE = "application/x-ndjson"

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")

#: How much of a bad value an error message quotes.
_QUOTE_LIMIT = 80


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "…"


# Checks of the values a batch is built from.  Each raises TypeError for a
# wrong type and ValueError for a wrong value, naming the field.


def _is_int(value: Any) -> bool:
    # JSON has no booleans-as-numbers: True is not 1 here, as in the daemon.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_msec(where: str, value: Any) -> None:
    if not _is_int(value):
        raise TypeError(
            f"{where} must be a whole number of milliseconds (an int), got {_quote(value)}"
        )
    if value < 0:
        raise ValueError(f"{where} must be 0 or more milliseconds, got {value}")


def _check_bool(where: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{where} must be True or False, got {_quote(value)}")


def _check_str(where: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a str, got {_quote(value)}")


def _check_method(where: str, value: Any) -> None:
    _check_str(where, value)
    if not _TOKEN.match(value):
        raise ValueError(
            f"{where} {_quote(value)} is not an HTTP method token "
            "(letters, digits and !#$%&'*+-.^_`|~ only, e.g. GET or PROPFIND)"
        )


def _check_body(where: str, value: Any) -> None:
    if value is not None and not isinstance(value, (str, bytes)):
        raise TypeError(
            f"{where} must be str (sent as UTF-8 text), bytes (sent as body_base64) or None, "
            f"got {_quote(value)}"
        )


def _headers(
    value: Mapping[str, str | Sequence[str]] | None,
) -> Mapping[str, str | tuple[str, ...]]:
    """
    The headers of a request, read-only: a name to a value, or to a
    sequence of values (sent as repeated header lines, in order).
    """
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise TypeError(f"headers must be a mapping of name to value, got {_quote(value)}")
    result: dict[str, str | tuple[str, ...]] = {}
    for name, item in value.items():
        if not isinstance(name, str):
            raise TypeError(f"header name {_quote(name)} must be a str")
        if isinstance(item, str):
            result[name] = item
        elif (
            isinstance(item, Sequence)
            and not isinstance(item, (bytes, bytearray))
            and all(isinstance(v, str) for v in item)
        ):
            result[name] = tuple(item)
        else:
            raise TypeError(f"header {name} must be a str or a sequence of str, got {_quote(item)}")
    return MappingProxyType(result)


def _headers_json(headers: Mapping[str, str | tuple[str, ...]]) -> dict[str, Any]:
    return {name: list(v) if isinstance(v, tuple) else v for name, v in headers.items()}


def _body_json(document: dict[str, Any], body: str | bytes | None) -> None:
    # Text goes as "body" (sent as UTF-8, and gzipped by the daemon under
    # Content-Encoding: gzip); bytes go as "body_base64", sent as they are.
    if isinstance(body, str):
        document["body"] = body
    elif isinstance(body, bytes):
        document["body_base64"] = base64.b64encode(body).decode("ascii")


def _check_fields(document: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise TypeError(f"{where} must be a JSON object, got {_quote(document)}")
    for key in document:
        if key not in allowed:
            raise ValueError(
                f"unknown field {_quote(key)} in {where}; expected {', '.join(allowed)}"
            )
    return document


def _body_of(document: dict[str, Any], where: str) -> str | bytes | None:
    body = document.get("body")
    encoded = document.get("body_base64")
    if encoded is None:
        return body
    if body is not None:
        raise ValueError(f"{where} has both body and body_base64; give one at most")
    if not isinstance(encoded, str):
        raise TypeError(f"{where}.body_base64 must be a string, got {_quote(encoded)}")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where}.body_base64 is not valid base64 ({e})") from None


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Retry:
    """
    When the daemon sends a request again, while its deadline leaves room.

    :ivar times: at most this many more attempts, 1 to :data:`MAX_RETRIES`.
    :ivar statuses: the upstream statuses (400 to 599) that call for another
        attempt.
    :ivar connect_errors: whether a failure to connect (kind ``connect``)
        does.  A retry needs ``statuses``, ``connect_errors`` or both.
    """

    times: int
    statuses: tuple[int, ...] = attr.ib(default=(), converter=tuple)
    connect_errors: bool = False

    def __attrs_post_init__(self) -> None:
        if not _is_int(self.times):
            raise TypeError(f"Retry.times must be an int, got {_quote(self.times)}")
        if not 1 <= self.times <= MAX_RETRIES:
            raise ValueError(f"Retry.times must be from 1 to {MAX_RETRIES}, got {self.times}")
        for code in self.statuses:
            if not _is_int(code) or not 400 <= code <= 599:
                raise ValueError(
                    f"Retry.statuses must be statuses from 400 to 599, got {_quote(code)}"
                )
        _check_bool("Retry.connect_errors", self.connect_errors)
        if not self.statuses and not self.connect_errors:
            raise ValueError("Retry retries nothing; give statuses, connect_errors=True, or both")

    def to_json(self) -> dict[str, Any]:
        """The ``retry`` object of the wire format."""
        document: dict[str, Any] = {"times": self.times}
        if self.statuses:
            document["statuses"] = list(self.statuses)
        if self.connect_errors:
            document["connect_errors"] = True
        return document

    @classmethod
    def from_json(cls, document: Any, where: str = "retry") -> Retry:
        """
        A ``retry`` object of the wire format.

        :raises TypeError, ValueError: naming the field that is wrong.
        """
        document = _check_fields(document, ("times", "statuses", "connect_errors"), where)
        if "times" not in document:
            raise ValueError(f"missing field times in {where}")
        statuses = document.get("statuses", [])
        if not isinstance(statuses, list):
            raise TypeError(f"{where}.statuses must be an array, got {_quote(statuses)}")
        return cls(document["times"], statuses, document.get("connect_errors", False))


def _retry_of(document: dict[str, Any], where: str) -> Retry | None:
    policy = document.get("retry")
    return None if policy is None else Retry.from_json(policy, f"{where}.retry")


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Request:
    """
    One request of a batch.

    :ivar uri: an absolute ``http://`` or ``https://`` URI, or one relative
        to the batch's ``Defaults.base_uri``.
    :ivar method: the method, any HTTP token; the daemon sends ``GET`` (or
        the defaults' method) when it is ``None``.
    :ivar headers: a name to a value, or to a sequence of values sent as
        repeated header lines; names as the upstream should see them.
    :ivar body: ``str``, sent as UTF-8 text (JSON's ``body``; gzipped by
        the daemon under ``Content-Encoding: gzip``), or ``bytes``, sent as
        they are (JSON's ``body_base64``); ``None`` for no body.
    :ivar id: 1 to :data:`MAX_ID_LENGTH` characters, unique in the batch,
        echoed in the request's outcome.
    :ivar timeout_msec: the request's own deadline, counted from the
        batch's arrival; the batch's deadline still caps it.
    :ivar retry: when the daemon sends it again.
    """

    uri: str
    method: str | None = None
    headers: Mapping[str, str | tuple[str, ...]] = attr.ib(
        default=None, converter=_headers, hash=False
    )
    body: str | bytes | None = None
    id: str | None = None
    timeout_msec: int | None = None
    retry: Retry | None = None

    def __attrs_post_init__(self) -> None:
        _check_str("Request.uri", self.uri)
        if self.method is not None:
            _check_method("Request.method", self.method)
        _check_body("Request.body", self.body)
        if self.id is not None:
            _check_str("Request.id", self.id)
            if not 1 <= len(self.id) <= MAX_ID_LENGTH:
                raise ValueError(
                    f"Request.id is {len(self.id)} characters long; between 1 and "
                    f"{MAX_ID_LENGTH} are allowed"
                )
        if self.timeout_msec is not None:
            _check_msec("Request.timeout_msec", self.timeout_msec)
        if self.retry is not None and not isinstance(self.retry, Retry):
            raise TypeError(f"Request.retry must be a Retry, got {_quote(self.retry)}")

    def to_json(self) -> dict[str, Any]:
        """The request's object in the wire format, without the fields not set."""
        document: dict[str, Any] = {}
        if self.id is not None:
            document["id"] = self.id
        if self.method is not None:
            document["method"] = self.method
        document["uri"] = self.uri
        if self.headers:
            document["headers"] = _headers_json(self.headers)
        _body_json(document, self.body)
        if self.timeout_msec is not None:
            document["timeout_msec"] = self.timeout_msec
        if self.retry is not None:
            document["retry"] = self.retry.to_json()
        return document

    @classmethod
    def from_json(cls, document: Any, where: str = "request") -> Request:
        """
        A request's object in the wire format; a null field is one not set.

        :raises TypeError, ValueError: naming the field that is wrong.
        """
        fields = ("id", "method", "uri", "headers", "body", "body_base64", "timeout_msec", "retry")
        document = _check_fields(document, fields, where)
        if "uri" not in document:
            raise ValueError(f"missing field uri in {where}")
        return cls(
            uri=document["uri"],
            method=document.get("method"),
            headers=document.get("headers"),
            body=_body_of(document, where),
            id=document.get("id"),
            timeout_msec=document.get("timeout_msec"),
            retry=_retry_of(document, where),
        )


def _request(item: Request | str) -> Request:
    return item if isinstance(item, Request) else Request(item)


def _requests(items: Iterable[Request | str]) -> tuple[Request, ...]:
    """A batch's requests; a bare string is a GET of that URI."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"Batch.requests must be a sequence of Request, got {_quote(items)}")
    return tuple(_request(item) for item in items)


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Defaults:
    """
    What every request of a batch gets unless it says otherwise; a
    request's own field wins, and headers merge name by name (names compared
    without case).

    :ivar method: the method of the requests that give none.
    :ivar headers: headers added to every request's.
    :ivar body: the body of the requests that give none (``str`` or ``bytes``,
        as :attr:`Request.body`).
    :ivar base_uri: an absolute ``http://`` or ``https://`` URI that
        relative request URIs are resolved against (RFC 3986).
    :ivar retry: the retry of the requests that give none.
    """

    method: str | None = None
    headers: Mapping[str, str | tuple[str, ...]] = attr.ib(
        default=None, converter=_headers, hash=False
    )
    body: str | bytes | None = None
    base_uri: str | None = None
    retry: Retry | None = None

    def __attrs_post_init__(self) -> None:
        if self.method is not None:
            _check_method("Defaults.method", self.method)
        _check_body("Defaults.body", self.body)
        if self.base_uri is not None:
            _check_str("Defaults.base_uri", self.base_uri)
            parts = urllib.parse.urlsplit(self.base_uri)
            if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
                raise ValueError(
                    f"Defaults.base_uri {_quote(self.base_uri)} must be an absolute http:// "
                    "or https:// URI"
                )
        if self.retry is not None and not isinstance(self.retry, Retry):
            raise TypeError(f"Defaults.retry must be a Retry, got {_quote(self.retry)}")

    def to_json(self) -> dict[str, Any]:
        """The ``defaults`` object of the wire format, without the fields not set."""
        document: dict[str, Any] = {}
        if self.method is not None:
            document["method"] = self.method
        if self.headers:
            document["headers"] = _headers_json(self.headers)
        _body_json(document, self.body)
        if self.base_uri is not None:
            document["base_uri"] = self.base_uri
        if self.retry is not None:
            document["retry"] = self.retry.to_json()
        return document

    @classmethod
    def from_json(cls, document: Any, where: str = "defaults") -> Defaults:
        """
        A ``defaults`` object of the wire format.

        :raises TypeError, ValueError: naming the field that is wrong.
        """
        fields = ("method", "headers", "body", "body_base64", "base_uri", "retry")
        document = _check_fields(document, fields, where)
        return cls(
            method=document.get("method"),
            headers=document.get("headers"),
            body=_body_of(document, where),
            base_uri=document.get("base_uri"),
            retry=_retry_of(document, where),
        )


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Batch:
    """
    A ``POST /multiplex`` body: requests sent at once, answered by a deadline.

    :ivar timeout_msec: the batch's deadline in milliseconds, from its
        arrival at the daemon (which caps it at its ``--max-timeout-msec``).
    :ivar requests: at least one; a bare ``str`` stands for ``Request(uri)``.
    :ivar content_base64: every body comes back as bytes in base64, even text.
    :ivar header_list: each ``Success`` also carries every header line as
        received (:attr:`Outcome.header_list`).
    :ivar content_encoding: a ``Success`` whose body the daemon decompressed
        says ``gzip`` (:attr:`Outcome.content_encoding`).
    :ivar timings: each outcome of a request that was sent says where its
        time went (:attr:`Outcome.timings`).
    :ivar max_parallel: at most this many of the requests run at once.
    :ivar defaults: what every request gets unless it says otherwise.
    """

    timeout_msec: int
    requests: tuple[Request, ...] = attr.ib(converter=_requests)
    content_base64: bool = False
    header_list: bool = False
    content_encoding: bool = False
    timings: bool = False
    max_parallel: int | None = None
    defaults: Defaults | None = None

    def __attrs_post_init__(self) -> None:
        _check_msec("Batch.timeout_msec", self.timeout_msec)
        if not self.requests:
            raise ValueError("Batch.requests is empty; a batch has at least one request")
        for name in ("content_base64", "header_list", "content_encoding", "timings"):
            _check_bool(f"Batch.{name}", getattr(self, name))
        if self.max_parallel is not None:
            if not _is_int(self.max_parallel):
                raise TypeError(f"Batch.max_parallel must be an int, got {self.max_parallel!r}")
            if self.max_parallel < 1:
                raise ValueError(f"Batch.max_parallel must be 1 or more, got {self.max_parallel}")
        if self.defaults is not None and not isinstance(self.defaults, Defaults):
            raise TypeError(f"Batch.defaults must be a Defaults, got {_quote(self.defaults)}")
        seen: dict[str, int] = {}
        for index, request in enumerate(self.requests):
            if request.id is not None:
                if request.id in seen:
                    raise ValueError(
                        f"requests[{index}].id {_quote(request.id)} is already the id of "
                        f"requests[{seen[request.id]}]; ids must be unique within a batch"
                    )
                seen[request.id] = index

    def to_json(self) -> dict[str, Any]:
        """
        The batch as the wire format's JSON document (``json.dumps`` it to
        send it), without the optional fields that are not set.
        """
        document: dict[str, Any] = {
            "timeout_msec": self.timeout_msec,
            "requests": [request.to_json() for request in self.requests],
        }
        for name in ("content_base64", "header_list", "content_encoding", "timings"):
            if getattr(self, name):
                document[name] = True
        if self.max_parallel is not None:
            document["max_parallel"] = self.max_parallel
        if self.defaults is not None:
            document["defaults"] = self.defaults.to_json()
        return document

    def to_bytes(self) -> bytes:
        """The body to POST: :meth:`to_json`, compact, in UTF-8."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, document: Any) -> Batch:
        """
        A batch from its wire-format JSON document (as ``json.load`` reads a
        batch file), checked as the constructor checks it.

        :raises TypeError, ValueError: naming the field that is wrong.
        """
        fields = (
            "timeout_msec",
            "requests",
            "content_base64",
            "header_list",
            "content_encoding",
            "timings",
            "max_parallel",
            "defaults",
        )
        document = _check_fields(document, fields, "batch")
        for name in ("timeout_msec", "requests"):
            if name not in document:
                raise ValueError(f"missing field {name} in batch")
        items = document["requests"]
        if not isinstance(items, list):
            raise TypeError(f"batch.requests must be an array, got {_quote(items)}")
        defaults = document.get("defaults")
        return cls(
            timeout_msec=document["timeout_msec"],
            requests=[Request.from_json(item, f"requests[{i}]") for i, item in enumerate(items)],
            content_base64=document.get("content_base64", False),
            header_list=document.get("header_list", False),
            content_encoding=document.get("content_encoding", False),
            timings=document.get("timings", False),
            max_parallel=document.get("max_parallel"),
            defaults=None if defaults is None else Defaults.from_json(defaults),
        )


# The answer.


class OctoplexError(Exception):
    """What went wrong talking to Octoplex, beyond the network itself."""


class BadAnswer(OctoplexError, ValueError):
    """
    What came back is not an Octoplex answer: not JSON, the wrong shape, the
    wrong number of outcomes, or a streamed answer cut short.
    """


class BatchRefused(OctoplexError):
    """
    The daemon refused the batch as a whole: a ``400`` (the message names
    the bad value and the rule it broke), ``401`` (no accepted token),
    ``413`` (too large), ``429`` (this client is over its share; wait for
    its batches), ``503`` (the daemon is full or shutting down), or any
    other status than ``200``.

    :ivar status: the HTTP status.
    :ivar message: the daemon's ``error``, or the start of the body if it
        sent no JSON error.
    :ivar retry_after: seconds to wait before sending it again, from the
        ``Retry-After`` header, if there was one.
    :ivar challenge: the ``WWW-Authenticate`` header of a ``401``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        retry_after: float | None = None,
        challenge: str | None = None,
    ) -> None:
        super().__init__(status, message, retry_after, challenge)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.challenge = challenge

    def __str__(self) -> str:
        text = f"Octoplex refused the batch ({self.status}): {self.message}"
        if self.retry_after is not None:
            text += f" (retry after {self.retry_after:g} s)"
        return text


def _get(document: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = document.get(name)
    wrong = not isinstance(value, kind) or (isinstance(value, bool) and kind is int)
    if value is not None and wrong:
        raise BadAnswer(f"{where}.{name} is {_quote(value)}, not what the wire format holds")
    return value


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Timings:
    """
    Where a request's latest attempt spent its time, in fractional
    milliseconds; ``None`` for a phase it did not go through (no DNS,
    connect or TLS on a reused connection).

    :ivar queued_msec: waiting for a connection slot.
    :ivar dns_msec: the DNS lookup.
    :ivar connect_msec: the TCP connect.
    :ivar tls_msec: the TLS handshake.
    :ivar ttfb_msec: from the request being sent to the answer's first byte.
    :ivar body_msec: from the first byte to the last.
    :ivar total_msec: from when the daemon took the request up to its body
        being read.
    :ivar reused: whether it went over a connection opened before it.
    """

    queued_msec: float | None
    dns_msec: float | None
    connect_msec: float | None
    tls_msec: float | None
    ttfb_msec: float | None
    body_msec: float | None
    total_msec: float
    reused: bool

    @classmethod
    def from_json(cls, document: Any) -> Timings:
        """A ``timings`` object of an outcome."""
        if not isinstance(document, dict):
            raise BadAnswer(f"timings is {_quote(document)}, not an object")
        try:
            return cls(**{field.name: document[field.name] for field in attr.fields(cls)})
        except KeyError as e:
            raise BadAnswer(f"timings has no {e.args[0]}") from None

    def to_json(self) -> dict[str, Any]:
        """The ``timings`` object, as the daemon sent it."""
        return attr.asdict(self)


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Outcome:
    """
    One request's outcome: the upstream's answer (a ``Success``, whatever
    its status) or why there was none (a ``Failure``).

    :ivar index: the request's place in the batch, from 0.
    :ivar status: the upstream's status; ``None`` for a failure.
    :ivar headers: the upstream's response headers, names in lower case, a
        repeated header's last value.
    :ivar body: the upstream's body, exactly (decoded from base64 if that is
        how it came); empty for a failure.
    :ivar duration_msec: whole milliseconds the request took, or took to fail.
    :ivar error: why it failed, a sentence; ``None`` for a success.
    :ivar kind: what kind of failure (:data:`KINDS`); ``None`` for a success.
    :ivar id: the request's ``id``, if it had one.
    :ivar attempts: how many times it was sent, if it had a ``retry``.
    :ivar timings: where its time went, if the batch asked for ``timings``.
    :ivar header_list: every header line as received, if the batch asked
        for ``header_list``.
    :ivar content_encoding: ``"gzip"`` when the daemon decompressed the
        body, if the batch asked for ``content_encoding``.
    :ivar as_base64: whether the body came as ``content_base64`` (it is not
        UTF-8, or the batch asked for that).
    """

    index: int | None
    status: int | None = None
    headers: Mapping[str, str] = attr.ib(factory=dict, converter=MappingProxyType, hash=False)
    body: bytes = b""
    duration_msec: int = 0
    error: str | None = None
    kind: str | None = None
    id: str | None = None
    attempts: int | None = None
    timings: Timings | None = None
    header_list: tuple[tuple[str, str], ...] | None = None
    content_encoding: str | None = None
    as_base64: bool = False

    @property
    def ok(self) -> bool:
        """
        Whether the upstream answered (a ``Success``): a ``404`` or ``503``
        is an answer too; check :attr:`status` for what it said.
        """
        return self.error is None

    @property
    def text(self) -> str:
        """The body as text: UTF-8, a byte that is not shown as U+FFFD."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """
        The body parsed as JSON.

        :raises ValueError: if it is not JSON.
        """
        return json.loads(self.body)

    def header(self, name: str, default: str | None = None) -> str | None:
        """A response header's value, the name in any case; ``default`` if absent."""
        return self.headers.get(name.lower(), default)

    @property
    def timed_out(self) -> bool:
        """Whether its deadline (the batch's or its own) cut it off."""
        return self.kind in ("timeout", "queue_timeout")

    @property
    def retry_safe(self) -> bool:
        """
        Whether the failure happened before anything reached the upstream
        (``connect``, ``dns``, ``queue_timeout``), so sending it again is safe.
        """
        return self.kind in RETRY_SAFE_KINDS

    @classmethod
    def from_json(cls, document: Any, index: int | None = None) -> Outcome:
        """
        An outcome of the wire format: ``{"Success": {...}}`` or
        ``{"Failure": {...}}``, or a streamed line, which also has ``index``
        (and ``id``).  Fields a newer daemon adds are ignored.

        :param index: the outcome's place in the batch, if ``document``
            does not say.
        :raises BadAnswer: if it is not an outcome.
        """
        if not isinstance(document, dict):
            raise BadAnswer(f"an outcome must be a JSON object, got {_quote(document)}")
        if "index" in document:
            index = _get(document, "index", int, "outcome")
        success, failure = document.get("Success"), document.get("Failure")
        if (success is None) == (failure is None):
            raise BadAnswer(f"an outcome has Success or Failure, got {_quote(document)}")
        value = success if failure is None else failure
        where = "Success" if failure is None else "Failure"
        if not isinstance(value, dict):
            raise BadAnswer(f"{where} must be a JSON object, got {_quote(value)}")
        duration = _get(value, "duration_msec", int, where)
        if duration is None:
            raise BadAnswer(f"{where} has no duration_msec")
        timings = value.get("timings")
        common: dict[str, Any] = {
            "index": index,
            "duration_msec": duration,
            "id": _get(value, "id", str, where),
            "attempts": _get(value, "attempts", int, where),
            "timings": None if timings is None else Timings.from_json(timings),
        }
        if failure is not None:
            error = _get(value, "error", str, where)
            if error is None:
                raise BadAnswer("Failure has no error")
            return cls(error=error, kind=_get(value, "kind", str, where), **common)
        status = _get(value, "status", int, where)
        headers = _get(value, "headers", dict, where)
        if status is None or headers is None:
            raise BadAnswer(f"Success has no {'status' if status is None else 'headers'}")
        content = _get(value, "content", str, where)
        encoded = _get(value, "content_base64", str, where)
        if (content is None) == (encoded is None):
            raise BadAnswer("Success has content or content_base64, one of them")
        if encoded is not None:
            try:
                body = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as e:
                raise BadAnswer(f"Success.content_base64 is not valid base64 ({e})") from None
        else:
            body = content.encode("utf-8", "surrogatepass")
        header_list = _get(value, "header_list", list, where)
        if header_list is not None and not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
            for pair in header_list
        ):
            raise BadAnswer(
                f"Success.header_list is not [name, value] pairs: {_quote(header_list)}"
            )
        return cls(
            status=status,
            headers=headers,
            body=body,
            header_list=None if header_list is None else tuple((n, v) for n, v in header_list),
            content_encoding=_get(value, "content_encoding", str, where),
            as_base64=encoded is not None,
            **common,
        )

    def to_json(self) -> dict[str, Any]:
        """The outcome in the wire format, as the daemon sent it."""
        value: dict[str, Any]
        if self.error is not None:
            value = {"error": self.error, "kind": self.kind, "duration_msec": self.duration_msec}
        else:
            value = {"headers": dict(self.headers), "status": self.status}
            if self.as_base64:
                value["content_base64"] = base64.b64encode(self.body).decode("ascii")
            else:
                value["content"] = self.body.decode("utf-8", "surrogatepass")
            value["duration_msec"] = self.duration_msec
            if self.header_list is not None:
                value["header_list"] = [list(pair) for pair in self.header_list]
            if self.content_encoding is not None:
                value["content_encoding"] = self.content_encoding
        if self.attempts is not None:
            value["attempts"] = self.attempts
        if self.timings is not None:
            value["timings"] = self.timings.to_json()
        if self.id is not None:
            value["id"] = self.id
        return {"Failure" if self.error is not None else "Success": value}


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Summary:
    """
    The last line of a streamed answer.

    :ivar size: the batch's requests.
    :ivar succeeded: those the upstream answered.
    :ivar failed: those that failed otherwise than by timing out.
    :ivar timed_out: those a deadline cut off (kinds ``timeout`` and
        ``queue_timeout``).
    :ivar duration_msec: from the batch's arrival to the last outcome.
    """

    size: int
    succeeded: int
    failed: int
    timed_out: int
    duration_msec: int

    @classmethod
    def from_json(cls, document: Any) -> Summary:
        """A ``{"summary": {...}}`` line."""
        value = document.get("summary") if isinstance(document, dict) else None
        if not isinstance(value, dict):
            raise BadAnswer(f'a summary line must be {{"summary": {{...}}}}, got {document!r}')
        counts = {f.name: _get(value, f.name, int, "summary") for f in attr.fields(cls)}
        if None in counts.values():
            raise BadAnswer(f"the summary line is incomplete: {_quote(value)}")
        return cls(**counts)


@attr.s(slots=True, frozen=True, auto_attribs=True)
class Streamed:
    """
    A streamed answer, once whole.

    :ivar outcomes: every outcome, in the batch's order (each was handed to
        the callback as it arrived).
    :ivar summary: the daemon's summary line; ``None`` when the daemon did
        not stream (one that predates streaming answers in one piece).
    """

    outcomes: tuple[Outcome, ...]
    summary: Summary | None


# Reading answers, for both transports.


def _parse_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except ValueError as e:
        raise BadAnswer(f"{what} is not JSON ({e}): {_quote(body[:200])}") from None


def answer_outcomes(body: bytes, size: int) -> list[Outcome]:
    """
    The outcomes of a ``200`` answer, ``{"responses": [...]}``, in the
    batch's order.

    :param size: how many requests the batch had.
    :raises BadAnswer: if it is not an answer to a batch of ``size``.
    """
    document = _parse_json(body, "the answer")
    responses = document.get("responses") if isinstance(document, dict) else None
    if not isinstance(responses, list):
        raise BadAnswer(f"the answer has no responses array: {_quote(document)}")
    if len(responses) != size:
        raise BadAnswer(f"the answer has {len(responses)} outcomes for {size} requests")
    return [Outcome.from_json(item, index) for index, item in enumerate(responses)]


def retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """
    Seconds to wait from a ``Retry-After`` header: its number of seconds, or
    the time until its HTTP date (0 if past); ``None`` without one that parses.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now())


def refusal(
    status: int,
    body: bytes,
    retry_after_header: str | None = None,
    challenge: str | None = None,
    reason: str = "",
) -> BatchRefused:
    """
    The :class:`BatchRefused` for an answer other than ``200``: its JSON
    ``error``, or the start of whatever body it had.
    """
    message = None
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        message = document["error"]
    if message is None:
        text = body.decode("utf-8", "replace").strip()
        message = (text[:200] + "…" if len(text) > 200 else text) or reason or "no reason given"
    return BatchRefused(status, message, retry_after(retry_after_header), challenge)


@attr.s(auto_attribs=True)
class StreamReader:
    """
    Reads a streamed (NDJSON) answer as its bytes arrive: each outcome line
    is parsed and handed to ``on_outcome`` at once, then the summary line
    ends it.

    :ivar size: how many requests the batch had.
    :ivar on_outcome: called with each outcome, in the order they arrive.
    """

    size: int
    on_outcome: Callable[[Outcome], object] | None = None
    _outcomes: list[Outcome | None] = attr.ib(init=False)
    _summary: Summary | None = attr.ib(default=None, init=False)
    _buffer: bytes = attr.ib(default=b"", init=False)

    def __attrs_post_init__(self) -> None:
        self._outcomes = [None] * self.size

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the answer."""
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self.line(line)

    def line(self, line: bytes) -> None:
        """Take one whole line of the answer."""
        if not line.strip():
            return
        if self._summary is not None:
            raise BadAnswer(f"the streamed answer goes on after its summary: {_quote(line)}")
        document = _parse_json(line, "a streamed line")
        if isinstance(document, dict) and "summary" in document:
            self._summary = Summary.from_json(document)
            return
        if not isinstance(document, dict) or "index" not in document:
            raise BadAnswer(f"a streamed line has no index: {_quote(line)}")
        outcome = Outcome.from_json(document)
        index = outcome.index
        if index is None or not 0 <= index < self.size:
            raise BadAnswer(f"a streamed line has index {index} in a batch of {self.size}")
        if self._outcomes[index] is not None:
            raise BadAnswer(f"the streamed answer has index {index} twice")
        self._outcomes[index] = outcome
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def finish(self) -> Streamed:
        """
        The whole answer, once its last byte is in.

        :raises BadAnswer: if it ended before every outcome and its summary.
        """
        if self._buffer:
            line, self._buffer = self._buffer, b""
            self.line(line)
        got = sum(1 for outcome in self._outcomes if outcome is not None)
        if got < self.size or self._summary is None:
            raise BadAnswer(
                f"the streamed answer ended after {got} of {self.size} outcomes, "
                + ("without its summary line" if self._summary is None else "and its summary")
            )
        return Streamed(tuple(o for o in self._outcomes if o is not None), self._summary)


def whole_answer_streamed(
    body: bytes, size: int, on_outcome: Callable[[Outcome], object] | None
) -> Streamed:
    """
    A streamed call's answer from a daemon that sent it whole (one that
    does not stream): each outcome goes to ``on_outcome`` in the batch's order.
    """
    outcomes = answer_outcomes(body, size)
    if on_outcome is not None:
        for outcome in outcomes:
            on_outcome(outcome)
    return Streamed(tuple(outcomes), None)


def request_headers(
    token: str | None, headers: Mapping[str, str] | None, accept: str
) -> dict[str, str]:
    """The headers of a ``POST /multiplex``: JSON, what it accepts, the token."""
    result = {"Content-Type": JSON_CONTENT_TYPE, "Accept": accept}
    if token is not None:
        result["Authorization"] = f"Bearer {token}"
    result.update(headers or {})
    return result


def default_timeout(batch: Batch) -> float:
    """How long a caller waits by default: the batch's deadline and :data:`GRACE_SECONDS`."""
    return batch.timeout_msec / 1000 + GRACE_SECONDS


def is_ndjson(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == NDJSON_CONTENT_TYPE


# The blocking transport: the standard library alone.


def _connection(
    url: str, timeout: float, ssl_context: ssl.SSLContext | None, cafile: str | None
) -> tuple[http.client.HTTPConnection, str]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"URL {url!r} must be an absolute http:// or https:// URL")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if scheme == "http":
        if ssl_context is not None or cafile is not None:
            raise ValueError(f"ssl_context and cafile are for https URLs; {url!r} is http")
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout), target
    context = ssl_context if ssl_context is not None else ssl.create_default_context(cafile=cafile)
    connection = http.client.HTTPSConnection(
        parts.hostname, parts.port, timeout=timeout, context=context
    )
    return connection, target


def _post_blocking(
    batch: Batch,
    url: str,
    accept: str,
    token: str | None,
    headers: Mapping[str, str] | None,
    timeout: float | None,
    ssl_context: ssl.SSLContext | None,
    cafile: str | None,
    read: Callable[[http.client.HTTPResponse], Any],
) -> Any:
    connection, target = _connection(
        url, default_timeout(batch) if timeout is None else timeout, ssl_context, cafile
    )
    try:
        connection.request(
            "POST", target, batch.to_bytes(), request_headers(token, headers, accept)
        )
        response = connection.getresponse()
        if response.status != 200:
            raise refusal(
                response.status,
                response.read(),
                response.getheader("Retry-After"),
                response.getheader("WWW-Authenticate"),
                response.reason,
            )
        return read(response)
    except http.client.HTTPException as e:
        if isinstance(e, OSError):
            # RemoteDisconnected: the connection was reset or closed.
            raise
        # Not HTTP, or cut short (IncompleteRead): no answer either way.
        raise BadAnswer(f"the answer from {url} is not whole HTTP: {e!r}") from e
    finally:
        connection.close()


def send_blocking(
    batch: Batch,
    url: str = DEFAULT_URL,
    *,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
    ssl_context: ssl.SSLContext | None = None,
    cafile: str | None = None,
) -> list[Outcome]:
    """
    Send ``batch`` and wait for its answer, on the standard library alone.

    :param url: the daemon's ``/multiplex``, ``http://`` or ``https://``.
    :param token: sent as ``Authorization: Bearer``, for a daemon with tokens.
    :param headers: more headers for the ``POST``.
    :param timeout: seconds the socket may wait at each step (the connect,
        each read); by default the batch's deadline and :data:`GRACE_SECONDS`.
    :param ssl_context: the TLS context of an https URL (to present a
        client certificate, say); by default the system's trusted CAs.
    :param cafile: a PEM file of the CAs to trust instead, for an https URL.
    :return: one outcome per request, in the batch's order.
    :raises BatchRefused: if the daemon refused the batch.
    :raises BadAnswer: if the answer is not an Octoplex answer.
    :raises OSError: if the daemon cannot be reached (``ConnectionRefusedError``,
        ``TimeoutError``, ``ssl.SSLError`` ...).
    """

    def read(response: http.client.HTTPResponse) -> list[Outcome]:
        return answer_outcomes(response.read(), len(batch.requests))

    result: list[Outcome] = _post_blocking(
        batch, url, JSON_CONTENT_TYPE, token, headers, timeout, ssl_context, cafile, read
    )
    return result


def send_streamed_blocking(
    batch: Batch,
    url: str = DEFAULT_URL,
    on_outcome: Callable[[Outcome], object] | None = None,
    *,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
    ssl_context: ssl.SSLContext | None = None,
    cafile: str | None = None,
) -> Streamed:
    """
    Send ``batch`` asking for a streamed answer (``Accept:
    application/x-ndjson``), and hand each outcome to ``on_outcome`` as soon
    as it arrives: in the order the requests complete, each with its
    :attr:`Outcome.index`.  The parameters are :func:`send_blocking`'s.

    An exception that ``on_outcome`` raises ends the call (and closes the
    connection) and is raised from it.

    :return: every outcome, in the batch's order, and the summary.
    """

    def read(response: http.client.HTTPResponse) -> Streamed:
        if not is_ndjson(response.getheader("Content-Type")):
            return whole_answer_streamed(response.read(), len(batch.requests), on_outcome)
        reader = StreamReader(len(batch.requests), on_outcome)
        while line := response.readline():
            reader.line(line)
        return reader.finish()

    result: Streamed = _post_blocking(
        batch, url, NDJSON_CONTENT_TYPE, token, headers, timeout, ssl_context, cafile, read
    )
    return result


# The Twisted transport: treq, imported only when it is used.


async def send(
    batch: Batch,
    url: str,
    *,
    http: Any = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
    reactor: IReactorTime | None = None,
) -> list[Outcome]:
    """
    Send ``batch`` from a Twisted program and return its outcomes.  A
    coroutine: await it in another, or wrap it in ``Deferred.fromCoroutine``.

    :param url: the daemon's ``/multiplex``.
    :param http: what sends the ``POST``: a ``treq.client.HTTPClient`` (an
        HTTPS URL needs one whose agent trusts the daemon's certificate, if
        the system's CAs do not), a ``treq.testing.StubTreq``, or the ``treq``
        module; by default a client of its own on a pool that keeps no
        connection open.
    :param token: sent as ``Authorization: Bearer``, for a daemon with tokens.
    :param headers: more headers for the ``POST``.
    :param timeout: seconds to wait for the whole answer before the call is
        cancelled (``twisted.internet.defer.TimeoutError``); by default the
        batch's deadline and :data:`GRACE_SECONDS`.
    :param reactor: the reactor that times it (and runs the default
        client); the global one by default.
    :return: one outcome per request, in the batch's order.
    :raises BatchRefused: if the daemon refused the batch.
    :raises BadAnswer: if the answer is not an Octoplex answer.
    """
    from octoplex import _caller_twisted

    return await _caller_twisted.send(batch, url, http, token, headers, timeout, reactor)


async def send_streamed(
    batch: Batch,
    url: str,
    on_outcome: Callable[[Outcome], object] | None = None,
    *,
    http: Any = None,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float | None = None,
    reactor: IReactorTime | None = None,
) -> Streamed:
    """
    Send ``batch`` from a Twisted program asking for a streamed answer
    (``Accept: application/x-ndjson``), and hand each outcome to
    ``on_outcome`` as soon as it arrives: in the order the requests
    complete, each with its :attr:`Outcome.index`.  The parameters are
    :func:`send`'s.

    An exception that ``on_outcome`` raises ends the call (and closes the
    connection) and is raised from it.

    :return: every outcome, in the batch's order, and the summary.
    """
    from octoplex import _caller_twisted

    return await _caller_twisted.send_streamed(
        batch, url, on_outcome, http, token, headers, timeout, reactor
    )
