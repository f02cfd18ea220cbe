"""
:class:`octoplex.http11.UpstreamProtocol`, the pool's client protocol, on a
StringTransport: it writes requests byte for byte as Twisted's ``Request``
does, and reads responses (whole or a byte at a time) as Twisted's parser
did, down to which failure a cut-short exchange ends with.  The same
protocol is exercised over real sockets by test_fanout, test_faults,
test_limits and test_pool.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web._newclient import (
    ParseError,
    Request,
    RequestNotSent,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss, _DataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from octoplex.client import _BytesProducer
from octoplex.http11 import HeadTooLarge, UpstreamProtocol

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nhello"


class _Body(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.ended = reason


def _connected() -> tuple[UpstreamProtocol, StringTransport, list[Any]]:
    pooled: list[Any] = []
    protocol = UpstreamProtocol(pooled.append)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, pooled


def _request(method: bytes = b"GET", body: bytes | None = None, persistent: bool = True) -> Request:
    headers = Headers({b"host": [b"a.test"], b"x-one": [b"1", b"2"], b"accept": [b"*/*"]})
    producer = None if body is None else _BytesProducer(body)
    return Request(method, b"/p?q=1", headers, producer, persistent=persistent)


def _results(d: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    d.addBoth(results.append)
    return results


@pytest.mark.parametrize(
    ("method", "body", "persistent"),
    [
        (b"GET", None, True),
        (b"POST", None, True),
        (b"PUT", b"data", True),
        (b"DELETE", b"", True),
        (b"GET", None, False),
    ],
)
def test_requests_are_written_as_twisted_writes_them(
    method: bytes, body: bytes | None, persistent: bool
) -> None:
    """The same bytes as Twisted's Request.writeTo, in one write."""
    protocol, transport, _ = _connected()
    protocol.request(_request(method, body, persistent))
    ours = transport.value()
    theirs = StringTransport()
    _request(method, body, persistent).writeTo(theirs)
    assert ours == theirs.value()
    assert transport.value().count(b"\r\n\r\n") == 1


@pytest.mark.parametrize("piece", [None, 1, 7])
def test_a_response_whole_or_in_pieces(piece: int | None) -> None:
    """Headers (connection ones kept apart), length and body; then the connection is pooled."""
    protocol, _, pooled = _connected()
    results = _results(protocol.request(_request()))
    chunks = [OK] if piece is None else [OK[i : i + piece] for i in range(0, len(OK), piece)]
    body = _Body()
    for chunk in chunks:
        protocol.dataReceived(chunk)
        if results and not body.data and body.ended is None:
            results[0].deliverBody(body)
    (response,) = results
    assert (response.code, response.phrase, response.version) == (200, b"OK", (b"HTTP", 1, 1))
    assert list(response.headers.getAllRawHeaders()) == [(b"X-Up", [b"1"])]
    assert response.length == 5
    assert b"".join(body.data) == b"hello"
    assert body.ended is not None and body.ended.check(ResponseDone)
    assert pooled == [protocol] and protocol.state == "QUIESCENT"


def test_a_request_awaiting_its_answer_holds_no_parser() -> None:
    """
    The parser and the head's containers (about 1 KB) come with the first
    byte of the answer, not with the request: a request held by a slow
    upstream does not carry them.  The next request gets fresh ones.
    """
    protocol, _, _ = _connected()
    for _ in range(2):
        results = _results(protocol.request(_request()))
        exchange: Any = protocol._exchange
        assert (exchange.parser, exchange.headers, exchange.conn) == (None, None, {})
        protocol.dataReceived(OK[:1])
        assert exchange.parser is not None and exchange.headers is not None
        protocol.dataReceived(OK[1:])
        body = _Body()
        results[0].deliverBody(body)
        assert b"".join(body.data) == b"hello"


def test_a_finished_exchange_leaves_no_cyclic_garbage() -> None:
    """
    A response read to its end is freed by reference counting alone: none of
    the exchange's objects (parser, head, response) wait for the cyclic
    collector, whose passes cost CPU in proportion to what it must trace.
    """
    protocol, _, pooled = _connected()

    def one() -> None:
        results = _results(protocol.request(_request()))
        protocol.dataReceived(OK)
        body = _Body()
        results[0].deliverBody(body)
        assert b"".join(body.data) == b"hello" and body.ended is not None

    one()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            one()
        gc.collect()
        garbage = [type(o).__qualname__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert garbage == []
    assert pooled == [protocol] * 21


def test_a_body_ended_before_its_reader_comes_is_delivered_whole_once() -> None:
    """
    A reader given the body after it ended gets every byte, then the end;
    the response, an IResponse of Octoplex's own, takes no second reader.
    """
    protocol, transport, pooled = _connected()
    results = _results(protocol.request(_request()))
    protocol.dataReceived(OK[:-3])
    # Nobody reads yet: the connection is paused, as Twisted pauses it.
    assert transport.producerState == "paused"
    protocol.dataReceived(OK[-3:])
    (response,) = results
    assert IResponse.providedBy(response) and pooled == [protocol]
    body = _Body()
    response.deliverBody(body)
    assert b"".join(body.data) == b"hello"
    assert body.ended is not None and body.ended.check(ResponseDone)
    with pytest.raises(RuntimeError, match="already given to a reader"):
        response.deliverBody(_Body())


def test_interim_answers_head_and_no_content() -> None:
    """100 Continue is skipped; HEAD and 204 have no body, HEAD keeps its Content-Length."""
    protocol, _, pooled = _connected()
    results = _results(protocol.request(_request()))
    protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert results[0].code == 200
    results.clear()
    d = protocol.request(_request(b"HEAD"))
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    (head,) = _results(d)
    assert head.length == 0 and head.headers.getRawHeaders(b"content-length") == [b"1234"]
    d = protocol.request(_request())
    protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    (empty,) = _results(d)
    body = _Body()
    empty.deliverBody(body)
    assert body.ended is not None and body.ended.check(ResponseDone)
    assert pooled == [protocol] * 3


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_connection_close_is_not_pooled(response: bytes) -> None:
    """Connection: close, or HTTP/1.0 without keep-alive: closed, not pooled."""
    protocol, transport, pooled = _connected()
    protocol.request(_request())
    protocol.dataReceived(response)
    assert pooled == [] and transport.disconnecting


def test_a_body_until_close_ends_with_potential_data_loss() -> None:
    """No length and no chunking: the body runs to the close, as Twisted reports it."""
    protocol, _, pooled = _connected()
    results = _results(protocol.request(_request()))
    body = _Body()
    protocol.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nsome")
    (response,) = results
    response.deliverBody(body)
    protocol.dataReceived(b" bytes")
    protocol.connectionLost(Failure(ConnectionDone()))
    assert b"".join(body.data) == b"some bytes"
    assert body.ended is not None and body.ended.check(PotentialDataLoss)
    assert pooled == []


def test_cut_short_exchanges_fail_as_twisted_failed_them() -> None:
    """Before any byte, mid-head, mid-body: ResponseNeverReceived, ResponseFailed, data loss."""
    protocol, _, _ = _connected()
    results = _results(protocol.request(_request()))
    assert results == []
    protocol.connectionLost(Failure(ConnectionDone()))
    assert results[0].check(ResponseNeverReceived)

    protocol, _, _ = _connected()
    results = _results(protocol.request(_request()))
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Ty")
    protocol.connectionLost(Failure(ConnectionLost()))
    assert results[0].check(ResponseFailed) and results[0].value.response is None
    assert results[0].value.reasons[0].check(ConnectionLost)

    protocol, _, _ = _connected()
    results = _results(protocol.request(_request()))
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    (response,) = results
    body = _Body()
    response.deliverBody(body)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert body.ended is not None and body.ended.check(ResponseFailed)
    assert body.ended.value.reasons[1].check(_DataLoss)
    assert protocol.state == "CONNECTION_LOST"


def test_cancel_before_the_head_aborts_the_connection() -> None:
    """A deadline's cancel closes the connection; the failure carries CancelledError (no retry)."""
    protocol, transport, pooled = _connected()
    d = protocol.request(_request())
    results = _results(d)
    d.cancel()
    assert transport.disconnecting or transport.disconnected
    assert results[0].check(ResponseNeverReceived)
    assert results[0].value.reasons[0].check(CancelledError)
    protocol.connectionLost(Failure(ConnectionLost()))
    assert pooled == []


def test_invalid_and_unsolicited_bytes_close_the_connection() -> None:
    """A head llhttp refuses fails with a ParseError quoting its line; stray bytes close."""
    protocol, transport, _ = _connected()
    results = _results(protocol.request(_request()))
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert results[0].check(ResponseFailed)
    error = results[0].value.reasons[0]
    assert error.check(ParseError)
    assert error.value.args == ("Duplicate Content-Length", b"Content-Length: 2")
    assert transport.disconnecting

    protocol, transport, _ = _connected()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.disconnecting
    # A second request while one is under way is not sent.
    protocol, transport, _ = _connected()
    protocol.request(_request())
    assert _results(protocol.request(_request()))[0].check(RequestNotSent)


def test_bare_lf_lines_are_read() -> None:
    """Lines ending in LF alone, which Twisted's parser took, still parse."""
    protocol, _, pooled = _connected()
    results = _results(protocol.request(_request()))
    protocol.dataReceived(b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: b\n\nok")
    (response,) = results
    assert response.headers.getRawHeaders(b"x-a") == [b"b"]
    assert pooled == [protocol]


@pytest.mark.parametrize("piece", [None, 100])
def test_head_limits_hold_whole_or_in_pieces(piece: int | None) -> None:
    """A long header arriving in pieces is stopped at the byte limit, not buffered on."""
    protocol, transport, _ = _connected()
    protocol.head_limits = (10, 1000)
    results = _results(protocol.request(_request()))
    head = b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 5000
    chunks = [head] if piece is None else [head[i : i + piece] for i in range(0, len(head), piece)]
    for chunk in chunks:
        if transport.disconnecting:
            break
        protocol.dataReceived(chunk)
    assert transport.disconnecting
    (failure,) = results
    assert failure.value.reasons[0].check(HeadTooLarge)
    assert str(failure.value.reasons[0].value) == (
        "upstream response head exceeds 1000 bytes (--max-header-bytes)"
    )


def test_a_reader_that_raises_is_logged_and_the_connection_kept(
    log_events: list[dict[str, Any]],
) -> None:
    """An exception from the body's reader is a logged bug, not the upstream's fault."""

    class Raising(_Body):
        def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
            raise RuntimeError("reader bug")

    protocol, transport, pooled = _connected()
    results = _results(protocol.request(_request()))
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    results[0].deliverBody(Raising())
    protocol.dataReceived(b"lo")
    assert pooled == [protocol] and not transport.disconnecting
    (logged,) = [e for e in log_events if "log_failure" in e]
    assert logged["log_failure"].check(RuntimeError)
    assert logged["log_format"] == "while handing over a response"
    # The check after each test fails on an error logged: this one is the point.
    logged["expected_failure"] = True
