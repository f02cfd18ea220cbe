"""
The HTTP/1.1 client protocol that the pool's connections speak: a request's
head and body go out in one write, and the response is parsed by httptools
(llhttp, in C).

It stands in for Twisted's ``HTTP11ClientProtocol`` and its pure-Python
``HTTPClientParser`` (about 66 us of CPU per request against 2 us for
httptools' parse, bench/floor.py), behind the interface that
``HTTPConnectionPool`` and its retry wrapper use: ``state``,
``request(Request) -> Deferred[IResponse]``, ``abort()``, and the quiescent
callback through which a connection goes back to the pool.  The response is
an ``IResponse`` of its own, :class:`UpstreamResponse`, which treq and
:mod:`octoplex.body` read as they read Twisted's, and failures are Twisted's: ``RequestNotSent``,
``RequestGenerationFailed``, ``ResponseNeverReceived`` (nothing received),
``ResponseFailed`` (the head cut short or invalid; a body cut short ends
with ``ResponseFailed([reason, _DataLoss])``); a body that runs until the
connection closes ends with ``PotentialDataLoss``, as in Twisted.

It uses Twisted's private ``TransportProxyProducer`` and ``_DataLoss``,
guarded by tests/test_private_api.py (setup.py pins Twisted below 27).

Differences from Twisted's parser, on purpose: llhttp is strict where
Twisted was lax, and refuses obsolete line folding, a repeated or invalid
Content-Length, Content-Length beside Transfer-Encoding, and bad chunk
sizes (response-splitting and smuggling defences); like Twisted, it takes
lines that end in a bare LF.  Each response head is held to
``head_limits``: header lines, and bytes of status line and headers.
"""

from __future__ import annotations

from typing import Any

import httptools
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IHandshakeListener, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    BadHeaders,
    ParseError,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    TransportProxyProducer,
    _ensureValidMethod,
    _ensureValidURI,
)
from twisted.web.http import PotentialDataLoss, _DataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

__all__ = ["RESPONSE_DONE", "HeadTooLarge", "UpstreamProtocol", "UpstreamResponse"]

#: How every body that was read whole ends.  One shared instance: Twisted's
#: ``Response`` builds a Failure per response, and its readers only check
#: its type (octoplex.body tests for this very object first).
RESPONSE_DONE = Failure(ResponseDone("Response body fully received"))

#: Headers about the connection rather than the content: kept out of the
#: response's headers, as Twisted's parser keeps them.
_CONNECTION_HEADERS = frozenset(
    {
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
_NO_BODY_CODES = frozenset({204, 304})
#: The connection headers of an exchange with no answer yet (never changed).
_NONE: dict[bytes, list[bytes]] = {}
_NO_LINES: list[tuple[bytes, bytes]] = []
_NO_HEAD: list[bytes] = []
_KEEP_ALIVE = [b"keep-alive"]
_VERSIONS = {"1.1": (b"HTTP", 1, 1), "1.0": (b"HTTP", 1, 0)}


class HeadTooLarge(Exception):
    """
    An upstream response's status line and headers pass a limit.
    """

    def __str__(self) -> str:
        return f"upstream response head {self.args[0]}"


@implementer(IResponse)
class UpstreamResponse:
    """
    An upstream's response, as ``IResponse``: what Twisted's ``Response``
    does for the one reader a response ever has, without its state
    machine's dispatch on every call, and with ``raw_headers``.

    The body's bytes are held until a protocol is given to
    :meth:`deliverBody` (the connection is paused meanwhile), then passed
    on as they come; once the body has ended, that protocol hears
    ``connectionLost`` with :data:`RESPONSE_DONE` or the failure that cut it
    short.

    :ivar raw_headers: every header line as received, names unchanged, in
        order (octoplex.client reads them).
    :ivar gzip: whether the body is gzip-encoded, for octoplex.body to
        decode: then ``Content-Encoding`` is taken out of ``headers``, so
        that treq's ``ContentDecoderAgent``, whose decoder inflates with no
        bound, leaves it alone.
    """

    __slots__ = (
        "_buffer",
        "_ended",
        "_protocol",
        "_transport",
        "code",
        "gzip",
        "headers",
        "length",
        "phrase",
        "previousResponse",
        "raw_headers",
        "request",
        "version",
    )

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        transport: TransportProxyProducer,
        request: Any,
        raw_headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length: int | object = UNKNOWN_LENGTH
        self.request = request
        self.previousResponse: IResponse | None = None
        self.raw_headers = raw_headers
        self.gzip = False
        self._transport = transport
        #: The body's bytes before a reader came, then None.
        self._buffer: list[bytes] | None = []
        self._protocol: Any = None
        #: How the body ended, until a reader has heard it; or None.
        self._ended: Failure | None = None

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        """
        Give the body to ``protocol``: what came so far at once, the rest as
        it comes, then ``connectionLost``.  A body has one reader only.
        """
        buffered = self._buffer
        if buffered is None:
            raise RuntimeError("the response body was already given to a reader")
        self._buffer = None
        protocol.makeConnection(self._transport)
        for data in buffered:
            protocol.dataReceived(data)
        ended, self._ended = self._ended, None
        if ended is not None:
            protocol.connectionLost(ended)
            return
        self._protocol = protocol
        self._transport.resumeProducing()

    def _bodyDataReceived(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
        elif self._buffer is not None:
            self._buffer.append(data)
        else:
            raise RuntimeError("body bytes after the body ended")

    def _bodyDataFinished(self, reason: Failure | None = None) -> None:
        if reason is None:
            reason = RESPONSE_DONE
        protocol = self._protocol
        if protocol is not None:
            self._protocol = None
            protocol.connectionLost(reason)
        elif self._buffer is not None and self._ended is None:
            # No reader yet: it hears the end when it comes.
            self._ended = reason
        else:
            raise RuntimeError("the response body ended twice")


class _Exchange:
    """
    The parser's callbacks for one response.  Once the response is over
    (or the connection given up) it is ``dead`` and ignores what llhttp
    still reports from the same bytes.
    """

    __slots__ = (
        "body_until_close",
        "conn",
        "count",
        "dead",
        "encoded",
        "fed",
        "head",
        "head_bytes",
        "headers",
        "informational",
        "parser",
        "phrase",
        "protocol",
        "proxy",
        "raw",
        "request",
        "response",
        "timings",
    )

    def __init__(self, protocol: UpstreamProtocol, request: Any) -> None:
        self.protocol = protocol
        self.request = request
        #: Marked with when the answer's first and last bytes came, if the
        #: request carries timings (octoplex.timings).
        # (octoplex.agent sets it on every request, None or not, so that
        # getattr's default is not reached, with the AttributeError it
        # raises and catches, for a request without timings.)
        self.timings: Any = getattr(request, "timings", None)
        # The parser and the head's containers come with the first byte of
        # the answer (begin()): a request waiting on a slow upstream holds
        # none of them (about 1 KB each).
        self.parser: Any = None
        self.headers: Any = None
        self.raw: list[tuple[bytes, bytes]] = _NO_LINES
        self.conn: dict[bytes, list[bytes]] = _NONE
        #: The bytes of the head received so far, to quote a bad one (a
        #: list of its own from the first byte of the answer, begin()).
        self.head: list[bytes] = _NO_HEAD
        self.phrase = b""
        self.count = 0
        self.head_bytes = 0
        self.fed = 0
        self.response: Any = None
        self.proxy: TransportProxyProducer | None = None
        self.body_until_close = False
        self.informational = False
        self.dead = False
        #: Whether the head has a Content-Encoding.
        self.encoded = False

    def begin(self) -> None:
        """
        The answer's first bytes are in: make the parser.
        """
        if self.timings is not None:
            self.timings.first_byte = self.timings.now()
        self.head = []
        self.parser = httptools.HttpResponseParser(self)
        self.parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
        self.headers = Headers()
        self.conn = {}
        #: Every header line as received, names unchanged, in order.
        self.raw = []

    # llhttp's callbacks ------------------------------------------------

    def on_status(self, phrase: bytes) -> None:
        self.phrase += phrase
        self.head_bytes += len(phrase) + 15

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.dead:
            return
        max_count, max_bytes = self.protocol.head_limits
        self.count += 1
        if self.count > max_count:
            raise HeadTooLarge(f"has more than {max_count} header lines (--max-header-count)")
        size = len(name) + len(value) + 4
        if size > max_bytes:
            raise HeadTooLarge(f"has a line over {max_bytes} bytes (--max-header-bytes)")
        self.head_bytes += size
        if self.head_bytes > max_bytes:
            raise HeadTooLarge(f"exceeds {max_bytes} bytes (--max-header-bytes)")
        self.raw.append((name, value))
        name = name.lower()
        if name in _CONNECTION_HEADERS and not (
            # The length of what a GET would have answered, not of this body.
            name == b"content-length" and self.request.method == b"HEAD"
        ):
            self.conn.setdefault(name, []).append(value)
        else:
            if name == b"content-encoding":
                self.encoded = True
            self.headers.addRawHeader(name, value)

    def on_headers_complete(self) -> None:
        if self.dead:
            return
        code = self.parser.get_status_code()
        if 100 <= code < 200:
            # An interim answer (100 Continue): ignored, as Twisted does.
            self.informational = True
            self.headers, self.conn, self.phrase, self.count = Headers(), {}, b"", 0
            self.raw = []
            self.encoded = False
            return
        self.protocol._head_received(self, code)

    def on_body(self, data: bytes) -> None:
        if not self.dead:
            self.response._bodyDataReceived(data)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if not self.dead:
            self.protocol._response_done(self)

    # -----------------------------------------------------------------

    def first_bad_line(self) -> bytes:
        """
        The head's line that llhttp was reading when it gave up: the status
        line, or the first header it had not passed on.
        """
        lines = b"".join(self.head).split(b"\n")
        index = 0 if not self.phrase and not self.count else self.count + 1
        line = lines[min(index, len(lines) - 1)] if lines else b""
        return line.rstrip(b"\r")[:60]


@implementer(IHandshakeListener)
class UpstreamProtocol(Protocol):
    """
    One keep-alive connection to an upstream, one request at a time.

    :param quiescentCallback: called with the protocol once a response is
        complete and the connection may carry another request.
    """

    _log = Logger()
    #: A TCP or TLS transport (typed loosely: pause, resume, abort, NODELAY).
    transport: Any = None

    #: The response head limits (count of header lines, bytes); the pool
    #: sets them on each connection it opens.
    head_limits = (100, 65536)
    #: When it connected, the pool generation it belongs to, and how many
    #: requests it has carried: the pool's retirement rules read them.
    born = 0.0
    generation = 0
    uses = 0
    #: The pool key it was opened for, which the pool sets.
    key: Any = None
    #: Its address's state, and the address's epoch when it opened, while
    #: outlier ejection is on (octoplex.outliers); the pool reads them.
    outlier: Any = None
    outlier_epoch = 0
    #: The address it reached (an IP, no port), which the endpoint sets: a
    #: hedge prefers a connection to another address than its first
    #: attempt's (octoplex.pool.Route).
    address: str | None = None
    #: When its TLS handshake was done, for a TLS connection, by ``clock``
    #: (which the pool sets).
    tls_done: float | None = None
    clock: Any = None
    #: Called with the protocol if it is lost while idle (the upstream
    #: closed it), which the pool sets: it drops it from its idle ones.
    lost_idle: Any = None

    def __init__(self, quiescentCallback: Any = lambda c: None) -> None:
        self._quiescentCallback = quiescentCallback
        self._state = "QUIESCENT"
        self._exchange: _Exchange | None = None
        self._finished: Deferred[Any] | None = None
        self._writing: Deferred[Any] | None = None
        self._received = False
        #: Who waits for abort() to be done; a list from the first one.
        self._abortDeferreds: list[Deferred[None]] | None = None

    @property
    def state(self) -> str:
        return self._state

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)

    # Sending -----------------------------------------------------------

    def request(self, request: Any, finished: Deferred[Any] | None = None) -> Deferred[Any]:
        """
        Send ``request``; a Deferred that fires with the response once its
        head is in: ``finished`` if given (the pool's, for a request that
        waited for this connection to open, whose canceller then calls
        :meth:`_cancel`), else a new one.
        """
        if self._state != "QUIESCENT":
            if finished is not None:
                finished.errback(Failure(RequestNotSent()))
                return finished
            return fail(RequestNotSent())
        self._state = "TRANSMITTING"
        self._exchange = _Exchange(self, request)
        self._received = False
        if finished is None:
            finished = Deferred(self._cancel)
        self._finished = finished
        producer = request.bodyProducer
        body = getattr(producer, "body", None) if producer is not None else b""
        if body is None:
            # A producer of its own (not Octoplex's bytes): Twisted writes it.
            self._write_with_producer(request)
            return finished
        try:
            self.transport.write(_head(request, body if producer is not None else None) + body)
        except Exception:
            self._state = "GENERATION_FAILED"
            self.transport.abortConnection()
            finished.errback(Failure(RequestGenerationFailed([Failure()])))
            return finished
        if self._state == "TRANSMITTING":
            self._state = "WAITING"
        timings = self._exchange.timings if self._exchange is not None else None
        if timings is not None:
            timings.sent = timings.now()
            if timings.connected is not None and self.tls_done is not None:
                timings.tls_done = self.tls_done
        return finished

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake is done (IHandshakeListener): the request written
        before it now goes out.
        """
        if self.clock is None:
            return
        self.tls_done = now = self.clock.seconds()
        exchange = self._exchange
        if exchange is not None and exchange.timings is not None:
            if exchange.timings.connected is not None:
                exchange.timings.tls_done = now

    def _write_with_producer(self, request: Any) -> None:
        try:
            writing = request.writeTo(self.transport)
        except Exception:
            writing = fail()
        self._writing = writing

        def written(_: Any) -> None:
            self._writing = None
            if self._state == "TRANSMITTING":
                self._state = "WAITING"

        def failed(reason: Failure) -> None:
            self._writing = None
            if self._state == "TRANSMITTING":
                self._state = "GENERATION_FAILED"
                self.transport.abortConnection()
                finished = self._finished
                self._end_exchange()
                if finished is not None and not finished.called:
                    finished.errback(Failure(RequestGenerationFailed([reason])))

        writing.addCallbacks(written, failed)

    def _cancel(self, finished: Deferred[Any]) -> None:
        # The caller gave up (a deadline): close the connection, which is
        # never pooled with a request half done.
        if self._writing is not None:
            self._writing.cancel()
            return
        self.transport.abortConnection()
        self._give_up(Failure(CancelledError()))

    # Receiving ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None or self._state not in ("WAITING", "TRANSMITTING"):
            # Bytes that answer no request: the connection cannot be trusted.
            self.transport.loseConnection()
            return
        self._received = True
        if exchange.parser is None:
            exchange.begin()
        if exchange.response is None:
            exchange.fed += len(data)
            exchange.head.append(data)
        try:
            exchange.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__ or e
            if exchange.dead and not isinstance(cause, HeadTooLarge):
                # Raised by whoever read the finished response, not by the
                # upstream: a bug to log; the exchange was over already.
                self._log.failure("while handing over a response", Failure(cause))
                return
            self._fail_exchange(exchange, Failure(cause))
            return
        except httptools.HttpParserUpgrade:
            self._fail_exchange(
                exchange, Failure(ParseError("upgrade is not supported", exchange.first_bad_line()))
            )
            return
        except httptools.HttpParserError as e:
            if exchange.response is None:
                error = ParseError(str(e), exchange.first_bad_line())
            else:
                error = ParseError(f"{e} in the response body", b"")
            self._fail_exchange(exchange, Failure(error))
            return
        if exchange.response is None and not exchange.dead:
            max_bytes = self.head_limits[1]
            if exchange.fed > max_bytes:
                self._fail_exchange(
                    exchange,
                    Failure(HeadTooLarge(f"exceeds {max_bytes} bytes (--max-header-bytes)")),
                )

    def _head_received(self, exchange: _Exchange, code: int) -> None:
        request = exchange.request
        version = _VERSIONS.get(exchange.parser.get_http_version(), (b"HTTP", 1, 1))
        proxy = exchange.proxy = TransportProxyProducer(self.transport)
        response = UpstreamResponse(
            version, code, exchange.phrase, exchange.headers, proxy, request, exchange.raw
        )
        exchange.head = []
        if exchange.encoded:
            response.gzip = _claim_gzip(exchange.headers)
        no_body = request.method == b"HEAD" or code in _NO_BODY_CODES
        lengths = exchange.conn.get(b"content-length")
        if no_body:
            response.length = 0
        elif b"transfer-encoding" not in exchange.conn:
            if lengths:
                response.length = int(lengths[0])
            else:
                exchange.body_until_close = True
        exchange.response = response
        finished, self._finished = self._finished, None
        if finished is not None and not finished.called:
            finished.callback(response)
        if exchange.dead:
            return
        if no_body or response.length == 0:
            self._response_done(exchange)
        elif response._protocol is None:
            # Nobody reads the body yet: hold the bytes in the kernel, as
            # Twisted does, until deliverBody resumes the transport.
            proxy.pauseProducing()

    def _response_done(self, exchange: _Exchange) -> None:
        """
        The whole response is in: the connection goes back to the pool (or
        is closed), then the body's reader hears that it ended.
        """
        self._end_exchange()
        if exchange.timings is not None:
            exchange.timings.body_done = exchange.timings.now()
        response, proxy = exchange.response, exchange.proxy
        keep = exchange.request.persistent and self._keep_alive(exchange, response)
        if self._state == "WAITING":
            self._state = "QUIESCENT"
        else:
            self._state = "TRANSMITTING_AFTER_RECEIVING_RESPONSE"
            keep = False
        if keep:
            self.transport.resumeProducing()
            try:
                self._quiescentCallback(self)
            except Exception:
                self._log.failure("while returning a connection to the pool")
                self.transport.loseConnection()
        else:
            self.transport.loseConnection()
        if proxy is not None:
            proxy.stopProxying()
        response._bodyDataFinished()

    @staticmethod
    def _keep_alive(exchange: _Exchange, response: Any) -> bool:
        values = exchange.conn.get(b"connection")
        if values == _KEEP_ALIVE and response.version == (b"HTTP", 1, 1):
            # What nearly every HTTP/1.1 upstream says, spared the parse.
            return True
        tokens = {
            token.strip().lower()
            for value in exchange.conn.get(b"connection", ())
            for token in value.split(b",")
        }
        if b"close" in tokens:
            return False
        return bool(response.version >= (b"HTTP", 1, 1) or b"keep-alive" in tokens)

    def _end_exchange(self) -> None:
        exchange = self._exchange
        if exchange is not None:
            exchange.dead = True
            # The parser holds the exchange's bound methods: without this
            # the pair, and the response hanging off the exchange, would be
            # a cycle that only the cyclic collector frees (about 29 objects
            # per response).  llhttp finishes the bytes it is feeding on its
            # own reference.
            exchange.parser = None
        self._exchange = None

    def _fail_exchange(self, exchange: _Exchange, reason: Failure) -> None:
        # A response that cannot be read leaves the connection unusable.
        self.transport.loseConnection()
        self._give_up(reason)

    def _give_up(self, reason: Failure) -> None:
        """
        End the exchange under way with ``reason``: fail the request, or the
        body being read.
        """
        exchange = self._exchange
        finished, self._finished = self._finished, None
        self._end_exchange()
        if exchange is not None and exchange.response is not None:
            response, proxy = exchange.response, exchange.proxy
            if proxy is not None:
                proxy.stopProxying()
            if exchange.body_until_close and not reason.check(CancelledError, ParseError):
                # Such a body ends when the connection does.
                response._bodyDataFinished(Failure(PotentialDataLoss()))
            else:
                response._bodyDataFinished(
                    Failure(ResponseFailed([reason, Failure(_DataLoss())], response))
                )
        elif finished is not None and not finished.called:
            kind = ResponseFailed if self._received else ResponseNeverReceived
            finished.errback(Failure(kind([reason])))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        state, self._state = self._state, "CONNECTION_LOST"
        if state == "ABORTING":
            reason = Failure(ConnectionAborted())
        if state == "TRANSMITTING" and self._writing is not None:
            finished, self._finished = self._finished, None
            self._end_exchange()
            if finished is not None and not finished.called:
                finished.errback(Failure(RequestTransmissionFailed([reason])))
        elif state in ("WAITING", "TRANSMITTING", "ABORTING"):
            self._give_up(reason)
        elif state == "QUIESCENT" and self.lost_idle is not None:
            self.lost_idle(self)
        aborts, self._abortDeferreds = self._abortDeferreds, None
        for d in aborts or ():
            d.callback(None)

    def abort(self) -> Deferred[None]:
        """
        Close the connection; the request under way fails.
        """
        if self._state == "CONNECTION_LOST":
            return succeed(None)
        self.transport.loseConnection()
        self._state = "ABORTING"
        d: Deferred[None] = Deferred()
        if self._abortDeferreds is None:
            self._abortDeferreds = []
        self._abortDeferreds.append(d)
        return d


def _claim_gzip(headers: Headers) -> bool:
    """
    Whether the body is gzip-encoded (``gzip`` or ``x-gzip``, alone), in
    which case ``Content-Encoding`` is taken out of ``headers``.
    """
    encodings = headers.getRawHeaders(b"content-encoding") or []
    tokens = [t.strip().lower() for t in b",".join(encodings).split(b",") if t.strip()]
    if tokens in ([b"gzip"], [b"x-gzip"]):
        headers.removeHeader(b"content-encoding")
        return True
    return False


def _head(request: Any, body: bytes | None) -> bytes:
    """
    The request line and headers, as Twisted's ``Request`` writes them.
    """
    headers = request.headers
    if len(headers.getRawHeaders(b"host", ())) != 1:
        raise BadHeaders("Exactly one Host header required")
    method = _ensureValidMethod(request.method)
    lines = [method, b" ", _ensureValidURI(request.uri), b" HTTP/1.1\r\n"]
    if not request.persistent:
        lines.append(b"Connection: close\r\n")
    if body is not None:
        lines.append(b"Content-Length: %d\r\n" % (len(body),))
    elif method in (b"PUT", b"POST"):
        # Methods whose semantics anticipate a body say it is empty.
        lines.append(b"Content-Length: 0\r\n")
    for name, values in headers.getAllRawHeaders():
        for value in values:
            lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
