"""
Inbound connections: how much a caller's connection may hold, and for how
long, before a request reaches the app.

twisted.web's ``HTTPChannel`` answers a head that is too large with a bare
``400`` and closes, and its only timer is an idle timeout that every byte
resets, so a client sending one byte every few seconds (slowloris) holds a
connection for ever.  :class:`OctoplexChannel` adds what a daemon facing
callers needs:

- a head (request line and headers) over ``max_header_bytes`` bytes or
  ``max_header_count`` lines gets ``431`` with a JSON error naming the
  limit;
- the headers must arrive within ``header_timeout`` seconds of the
  request's first byte, and the body within ``body_timeout`` seconds of the
  headers, else ``408``;
- any other malformed request gets ``400`` with a JSON error;
- an answer the caller does not read: once the connection's send buffer
  is full, its bytes count against the process's budget of buffered bytes
  (:mod:`octoplex.buffers`) until it drains, and if it has not drained
  within ``send_timeout`` seconds the connection is aborted.

Each answer is logged, and the connection is then closed, lingering (RFC
9112 section 9.6) so that a caller still sending reads the answer.  The cap on connections
open at once is the site's (:class:`octoplex.web.OctoplexSite`), which
answers past it with :class:`ConnectionRefuser`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IDelayedCall, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from octoplex.errors import tls_reasons
from octoplex.limits import Limits
from octoplex.wire import JSON_CONTENT_TYPE, error_body

__all__ = ["LINGER", "ConnectionRefuser", "OctoplexChannel", "raw_error"]

#: Seconds a connection is read and drained after an error answer before it
#: is closed, unless the caller closes it first.
LINGER = 2.0

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def raw_error(status: int, message: str, extra: bytes = b"") -> bytes:
    """
    A whole HTTP/1.1 response with a JSON error, for the connection to be
    closed after it; written straight to the transport, where no request
    object can answer.
    """
    body = error_body(message)
    return (
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
        + b"content-type: "
        + JSON_CONTENT_TYPE
        + b"\r\ncontent-length: %d\r\nconnection: close\r\n" % (len(body),)
        + extra
        + b"\r\n"
        + body
    )


#: What may begin a request's head: a method's first character (a token
#: character, RFC 9110 section 5.6.2), or the empty line RFC 9112 section
#: 2.2 lets a caller send before it.
_HEAD_START = frozenset(
    bytes([c])
    for c in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n"
)

#: The first byte of a TLS handshake record (RFC 8446 section 5.1).
_TLS_HANDSHAKE = b"\x16"


def _not_a_request_line(first: bytes) -> str:
    if first == _TLS_HANDSHAKE:
        return (
            "a TLS handshake arrived on a plain HTTP listener: call it with http://, "
            "or call an HTTPS listener (--listen-tls) with https://"
        )
    return f"a request line cannot begin with {first!r}: it must begin with a method (RFC 9112)"


class OctoplexChannel(HTTPChannel):
    """
    An ``HTTPChannel`` holding its caller to the site's limits on the head's
    size and on how long the head and body take to arrive.
    """

    log = Logger()

    _read_timer: IDelayedCall | None = None
    _send_timer: IDelayedCall | None = None
    _refused = False
    #: Bytes written since the send buffer filled, held of the budget.
    _unsent = 0

    @property
    def _limits(self) -> Limits:
        # HTTPFactory.buildProtocol gives every channel its site.
        return self.site.limits  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self._read_timer is None and self.line_mode and not self._handlingRequest:
            # The first byte of a request's head: its clock starts.
            if data[:1] not in _HEAD_START:
                # Nothing that follows could make it a request line: say so
                # now rather than wait for a line end that may never come
                # (a TLS client's hello has none, and its handshake would
                # wait for --header-timeout).
                self.refuse(400, _not_a_request_line(data[:1]))
                return
            limits = self._limits
            self._read_timer = self.callLater(
                limits.header_timeout,
                partial(
                    self._too_slow,
                    f"request headers did not arrive within {limits.header_timeout:g} s "
                    "(--header-timeout)",
                ),
            )
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self.refuse(
                431,
                f"request line and headers exceed {self.totalHeadersSize} bytes "
                "(--max-header-bytes)",
            )
            return
        if line[:1] in (b" ", b"\t") and not self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            # twisted.web would join it to the header before it; RFC 9112
            # section 5.2 lets a server refuse it, the safer choice (two
            # readers of one head could disagree on where a header ends).
            self.refuse(
                400,
                f"request header line {line[:40]!r} starts with white space: obsolete line "
                "folding (RFC 9112 section 5.2) is not accepted; send each header on one line",
            )
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(
            431, f"a request header line exceeds {self.MAX_LENGTH} bytes (--max-header-bytes)"
        )

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self.refuse(
                431, f"request has more than {self.maxHeaders} header lines (--max-header-count)"
            )
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        self._stop_timer()
        super().allHeadersReceived()
        if self.length != 0 and not self._refused and self.transport is not None:
            timeout = self._limits.body_timeout
            self._read_timer = self.callLater(
                timeout,
                partial(
                    self._too_slow,
                    f"request body did not arrive within {timeout:g} s (--body-timeout)",
                ),
            )

    def allContentReceived(self) -> None:
        self._stop_timer()
        super().allContentReceived()

    def connectionMade(self) -> None:
        limits = self._limits
        self.maxHeaders = limits.max_header_count
        self.totalHeadersSize = limits.max_header_bytes
        # The longest line LineReceiver buffers waiting for its end.
        self.MAX_LENGTH = limits.max_header_bytes
        # A connection closed for idling, whose caller does not read what
        # is left to send, is aborted after as long as an unread answer.
        self.abortTimeout = limits.send_timeout  # type: ignore[assignment]
        super().connectionMade()
        self.site.channels.add(self)  # type: ignore[attr-defined]

    def write(self, data: bytes) -> None:
        super().write(data)
        if self._waitingForTransport:
            self._hold(len(data))

    def writeSequence(self, iovec: list[bytes]) -> None:
        super().writeSequence(iovec)
        if self._waitingForTransport:
            self._hold(sum(map(len, iovec)))

    def _hold(self, count: int) -> None:
        """
        ``count`` bytes wait in a full send buffer: they count against the
        budget until it drains.  (Bytes written while the buffer is not
        full are not counted: the transport holds under 64 KiB of them.)
        """
        self._unsent += count
        buffers = self.site.buffers  # type: ignore[attr-defined]
        if buffers is not None:
            buffers.force(count)

    def pauseProducing(self) -> None:
        # The transport's send buffer is full: the caller is not reading
        # as fast as it is written to.
        super().pauseProducing()
        if self._send_timer is None and self.transport is not None:
            self._send_timer = self.callLater(self._limits.send_timeout, self._send_timed_out)

    def resumeProducing(self) -> None:
        # The send buffer is empty: every byte written has left the process.
        super().resumeProducing()
        self._drained()

    def _drained(self) -> None:
        if self._send_timer is not None:
            if self._send_timer.active():
                self._send_timer.cancel()
            self._send_timer = None
        if self._unsent:
            buffers = self.site.buffers  # type: ignore[attr-defined]
            if buffers is not None:
                buffers.give_back(self._unsent)
            self._unsent = 0

    def _send_timed_out(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is None:
            return
        client = _client(transport)
        timeout = self._limits.send_timeout
        self.log.warn(
            "answer to {client} not read within {send_timeout:g} s (--send-timeout); "
            "closing the connection with {unsent} bytes unsent",
            client=client,
            client_address=client,
            send_timeout=timeout,
            unsent=self._unsent,
            send_timed_out=True,
        )
        self.site.metrics.send_timeouts.inc()  # type: ignore[attr-defined]
        transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        self._drained()
        if reason.check(SSL.Error):
            # A failed handshake (no client certificate, an unknown CA, a
            # protocol version refused) ends here, with no request to log.
            self.log.info(
                "TLS with {client} failed: {error}",
                client=_client(self.transport) if self.transport is not None else "?",
                error=tls_reasons(reason.value),
                tls_failure=True,
            )
        super().connectionLost(reason)
        self.connection_ended()

    def connection_ended(self) -> None:
        """
        Tell the site this connection is gone: from here, or from the
        protocol switch when HTTP/2 took the connection over.
        """
        self.site.channels.discard(self)  # type: ignore[attr-defined]
        self.site.connection_closed()  # type: ignore[attr-defined]

    def _stop_timer(self) -> None:
        if self._read_timer is not None:
            if self._read_timer.active():
                self._read_timer.cancel()
            self._read_timer = None

    def _too_slow(self, message: str) -> None:
        self._read_timer = None
        self.refuse(408, message)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # HTTPChannel's answer to every other malformed request.
        self.refuse(400, "malformed HTTP request")

    def refuse(self, status: int, message: str) -> None:
        """
        Answer ``status`` with ``message``, read nothing more, and close
        the connection (lingering).
        """
        if self._refused:
            return
        self._refused = True
        self._stop_timer()
        transport = self.transport
        if transport is None:
            return
        client = _client(transport)
        self.log.info(
            "inbound request from {client} refused with {status}: {error}",
            client=client,
            client_address=client,
            status=status,
            error=message,
            # The access log has every answer, those before the app too.
            access=True,
        )
        self.site.metrics.inbound_refused.labels(str(status)).inc()  # type: ignore[attr-defined]
        transport.write(raw_error(status, message))
        self._linger(transport)

    def _linger(self, transport: Any) -> None:
        """
        Close after an error answer the way RFC 9112 section 9.6 asks: close
        the sending side, then read and drop what the caller still sends,
        for at most :data:`LINGER` seconds.  Closing at once with its body
        unread would make the kernel reset the connection, and a caller
        busy writing would lose the answer.
        """
        # Nothing more of this connection is parsed: not the rest of what was
        # read with the bad part, nor anything later.
        self.clearLineBuffer()
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.setTimeout(None)
        if ISSLTransport.providedBy(transport):
            # TLS has no half-close (its wrapper would pass the call to the
            # TCP connection underneath); the answer says "connection: close".
            self._read_timer = self.callLater(LINGER, self.loseConnection)
            return
        self._read_timer = self.callLater(LINGER, transport.abortConnection)
        transport.loseWriteConnection()


def _client(transport: Any) -> str:
    peer = transport.getPeer()
    return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"


class ConnectionRefuser(Protocol):
    """
    Answer a connection past the cap with ``503`` and close it.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def connectionMade(self) -> None:
        assert self.transport is not None
        message = (
            f"too many connections: at most {self._limit} are open at once (--max-connections)"
        )
        self.transport.write(raw_error(503, message, b"retry-after: 1\r\n"))
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass
