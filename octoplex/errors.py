"""
Turning an upstream failure into the sentence a caller reads in
``Failure.error``.

Twisted reports one failed request in layers (``ResponseFailed`` wrapping a
list of ``Failure``s wrapping ``ConnectionLost``...).  A caller needs to know
what happened on the wire: the connection was refused, reset, closed early,
the upstream spoke something that is not HTTP, TLS failed, or a limit was hit.
"""

from __future__ import annotations

from OpenSSL.SSL import Error as TLSError
from twisted.internet import error
from twisted.python.failure import Failure
from twisted.web._newclient import (
    ParseError,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import _MalformedChunkedDataError

from octoplex.body import BadGzip, BodyTooLarge
from octoplex.buffers import BuffersExhausted
from octoplex.circuits import CircuitOpen
from octoplex.egress import EgressRefused
from octoplex.http11 import HeadTooLarge
from octoplex.tls import CertificateRejected

__all__ = ["KINDS", "TIMEOUT_ELAPSED", "cause", "describe", "kind_of"]

#: The original Octoplex's message for an item cut off by the deadline.
TIMEOUT_ELAPSED = "timeout elapsed"


def _cause(reasons: list[Failure]) -> Failure:
    # The first reason is the one that broke the exchange; later ones are
    # consequences (a lost connection after a parse error, say).
    return reasons[0] if reasons else Failure(error.ConnectionLost())


def _lost(cause: Failure, when: str) -> str:
    if cause.check(error.ConnectionDone):
        return f"upstream closed the connection {when}"
    if cause.check(HeadTooLarge):
        return str(cause.value)
    if cause.check(ParseError):
        return f"upstream sent an invalid HTTP response: {_parse_detail(cause.value)}"
    if cause.check(CertificateRejected):
        return f"TLS handshake failed: {cause.value}"
    if cause.check(TLSError):
        reasons = tls_reasons(cause.value)
        if reasons == "wrong version number":
            # What OpenSSL says of an answer that is not a TLS record.
            reasons += " (the upstream answered in plain text, not TLS: an http:// port?)"
        return f"TLS error {when}: {reasons}"
    if cause.check(error.ConnectionLost):
        return f"connection to upstream was lost or reset {when}"
    if cause.check(ValueError, _MalformedChunkedDataError):
        # What the parser raises on a bad Content-Length or chunk size.
        return f"upstream sent an invalid HTTP response: {cause.getErrorMessage()}"
    return f"{cause.getErrorMessage()} {when}"


def _parse_detail(exc: BaseException | None) -> str:
    assert exc is not None
    reason, data = exc.args[0], exc.args[1] if len(exc.args) > 1 else b""
    if not data:
        return str(reason)
    shown = data[:60] if isinstance(data, bytes) else data
    return f"{reason} {shown!r}"


def tls_reasons(exc: BaseException | None) -> str:
    """
    The reasons OpenSSL gives for a TLS error, e.g. ``certificate verify
    failed``.
    """
    assert exc is not None
    parts = []
    for entry in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            parts.append(str(entry[-1]))
    return "; ".join(parts) or str(exc)


def describe(failure: Failure) -> str:
    """
    Say why an upstream request failed, in a sentence for the caller.

    :param failure: the failure of the request or of reading its body.
    :return: a human-readable message.
    """
    value = failure.value
    if isinstance(value, (BodyTooLarge, BuffersExhausted, BadGzip, EgressRefused, CircuitOpen)):
        return str(value)
    if isinstance(value, ResponseNeverReceived):
        return _lost(_cause(value.reasons), "before sending a response")
    if isinstance(value, ResponseFailed):
        # Twisted attaches the response only once its headers were parsed.
        if value.response is None:
            return _lost(_cause(value.reasons), "before finishing the response headers")
        return _lost(_cause(value.reasons), "while sending the response body")
    if isinstance(value, (RequestTransmissionFailed, RequestGenerationFailed)):
        cause = _cause(value.reasons)
        return f"sending the request failed: {cause.getErrorMessage()}"
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused by upstream"
    if isinstance(value, error.DNSLookupError):
        # Twisted's message begins "DNS lookup failed:" itself.
        return str(value)
    if isinstance(value, error.TimeoutError):
        return "connecting to upstream timed out"
    if isinstance(value, error.ConnectError):
        return f"connecting to upstream failed: {value}"
    if isinstance(value, TLSError):
        return f"TLS error: {tls_reasons(value)}"
    if isinstance(value, (error.ConnectionLost, error.ConnectionDone)):
        return _lost(failure, "before sending a response")
    return f"{type(value).__name__}: {value}"


def _cause_kind(cause: Failure) -> str:
    if cause.check(HeadTooLarge):
        return "too_large"
    if cause.check(CertificateRejected, TLSError):
        return "tls"
    if cause.check(ParseError, ValueError, _MalformedChunkedDataError):
        return "protocol"
    return "connection"


def cause(failure: Failure) -> str:
    """
    The coarse cause of a failed upstream request, for statistics: one of
    the ``failure`` causes of :data:`octoplex.metrics.CAUSES`.
    """
    value = failure.value
    if isinstance(value, EgressRefused):
        return "forbidden"
    if isinstance(value, CircuitOpen):
        return "circuit_open"
    if isinstance(value, (BodyTooLarge, BuffersExhausted)):
        return "too_large"
    if isinstance(value, BadGzip):
        return "protocol"
    if isinstance(value, (ResponseNeverReceived, ResponseFailed)):
        return _cause_kind(_cause(value.reasons))
    if isinstance(value, RequestTransmissionFailed):
        return "connection"
    if isinstance(value, RequestGenerationFailed):
        return "invalid"
    if isinstance(value, error.DNSLookupError):
        return "dns"
    if isinstance(value, (error.ConnectError, error.TimeoutError)):
        # Refused, timed out, no route: the connection never opened.
        return "connect"
    if isinstance(value, TLSError):
        return "tls"
    if isinstance(value, (error.ConnectionLost, error.ConnectionDone)):
        return "connection"
    return "other"


#: The machine-readable ``kind`` of every ``Failure`` outcome: a stable,
#: documented set (docs/api.md, "Error kinds").
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

# The statistics' causes that the wire names differently.
_KIND_OF_CAUSE = {"deadline": "timeout", "other": "internal"}


def kind_of(cause_name: str) -> str:
    """
    The ``kind`` a caller reads for an item that failed for ``cause_name``,
    one of the causes of :data:`octoplex.metrics.CAUSES`.
    """
    return _KIND_OF_CAUSE.get(cause_name, cause_name)
