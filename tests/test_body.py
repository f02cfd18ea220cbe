"""
The response body reader, on a StringTransport: the cap, cancellation, and
how a body may end.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss

from octoplex.body import BodyTooLarge, read_body


class _Response:
    """
    Just enough of an IResponse: it connects the body protocol to a transport.
    """

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.protocol: Protocol | None = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


def _read(limit: int = 10) -> tuple[_Response, Protocol, list[Any]]:
    response = _Response()
    results: list[Any] = []
    read_body(response, limit).addBoth(results.append)  # type: ignore[arg-type]
    assert response.protocol is not None
    return response, response.protocol, results


def test_whole_body_is_returned() -> None:
    """Chunks up to the limit are joined and returned when the body ends."""
    _, protocol, results = _read(limit=10)
    protocol.dataReceived(b"hello ")
    protocol.dataReceived(b"word")
    assert results == []
    protocol.connectionLost(Failure(ResponseDone()))
    assert results == [b"hello word"]


def test_body_ended_by_close_is_complete() -> None:
    """A body that ends when the connection closes (no length) is still a whole body."""
    _, protocol, results = _read()
    protocol.dataReceived(b"abc")
    protocol.connectionLost(Failure(PotentialDataLoss()))
    assert results == [b"abc"]


def test_body_over_the_limit_fails_and_closes() -> None:
    """One byte over the limit fails with BodyTooLarge and closes the connection."""
    response, protocol, results = _read(limit=10)
    protocol.dataReceived(b"x" * 10)
    assert not response.transport.disconnecting
    protocol.dataReceived(b"y")
    assert response.transport.disconnecting
    [failure] = results
    assert failure.check(BodyTooLarge)
    assert str(failure.value) == "upstream response body exceeded 10 bytes (--max-response-bytes)"
    # What comes after changes nothing.
    protocol.dataReceived(b"z")
    protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert len(results) == 1


def test_cancel_closes_the_connection() -> None:
    """Cancelling the read closes the connection and fails with CancelledError, once."""
    response = _Response()
    results: list[Any] = []
    d = read_body(response, 100)  # type: ignore[arg-type]
    d.addBoth(results.append)
    assert response.protocol is not None
    response.protocol.dataReceived(b"partial")
    d.cancel()
    assert response.transport.disconnecting
    response.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
    [failure] = results
    assert failure.check(CancelledError)


def test_lost_connection_mid_body_fails() -> None:
    """A connection lost before the body ends is a failure, not a short body."""
    _, protocol, results = _read()
    protocol.dataReceived(b"abc")
    protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
    [failure] = results
    assert failure.check(ResponseFailed)
