"""
The HTTP front: the Klein app that serves ``/multiplex`` and the health
routes, and the ``Site`` it runs in.

A batch enters at :meth:`OctoplexApp.multiplex`, is parsed by
:mod:`octoplex.wire`, fanned out by :mod:`octoplex.multiplexer` and answered
here, with one structured log event per batch.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from io import BytesIO
from typing import Any, ClassVar, cast

import attr
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import _GenericHTTPChannelProtocol
from twisted.web.iweb import IRequest, _IRequestEncoder, _IRequestEncoderFactory
from twisted.web.resource import EncodingResourceWrapper
from twisted.web.server import Request, Site
from werkzeug.exceptions import MethodNotAllowed, NotFound
from zope.interface import implementer

from octoplex.admission import DRAINING, Admission, Hold, client_key
from octoplex.auth import Tokens
from octoplex.buffers import BufferBudget
from octoplex.endpoints import set_tcp_nodelay
from octoplex.events import answered, batch_answered
from octoplex.inbound import ConnectionRefuser, OctoplexChannel
from octoplex.limits import Limits
from octoplex.metrics import TEXT_CONTENT_TYPE, Metrics, render_json, render_text
from octoplex.multiplexer import BatchResult, Multiplexer
from octoplex.schema import PATH as SCHEMA_PATH
from octoplex.schema import SCHEMA_BYTES
from octoplex.tls import peer_identity
from octoplex.wire import JSON_CONTENT_TYPE, Batch, BatchError, encode, error_body, parse_batch

__all__ = ["MetricsApp", "MetricsSite", "OctoplexApp", "OctoplexSite", "format_address"]

_HEALTHY = encode({"healthy": True})
_READY = encode({"ready": True})
_DRAINING = encode({"ready": False})

#: zlib level for answers: 6 costs a third of 9's CPU for nearly its ratio.
GZIP_LEVEL = 6
_NOT_FOUND = b"not found\n"


def _connection_transport(request: IRequest) -> Any:
    """
    The caller's connection under ``request``: its channel's transport over
    HTTP/1.1; over HTTP/2 the stream has none, and it is the connection's
    (Twisted's private ``H2Stream._conn``, guarded by
    tests/test_private_api.py).
    """
    channel: Any = request.channel  # type: ignore[attr-defined]
    transport = getattr(channel, "transport", None)
    if transport is None:
        transport = getattr(getattr(channel, "_conn", None), "transport", None)
    return transport


#: The content type of a streamed answer, one JSON document per line.
NDJSON_CONTENT_TYPE = b"application/x-ndjson"


def _wants_stream(request: IRequest) -> bool:
    """Whether the caller asked for the answer as NDJSON lines."""
    accept = b",".join(request.requestHeaders.getRawHeaders(b"accept", []))
    return any(
        part.split(b";")[0].strip().lower() == NDJSON_CONTENT_TYPE for part in accept.split(b",")
    )


def _respond(request: IRequest, content_type: bytes, body: bytes) -> bytes:
    """
    Set the headers for a whole, known body; a Content-Length spares the
    caller chunked decoding.
    """
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % (len(body),))
    return body


class _TooLarge(BatchError):
    """
    A gzip-encoded batch inflates past the request size limit.
    """


def _decode(encoding: bytes | None, body: bytes, limits: Limits) -> bytes:
    """
    The batch a caller sent, gzip-decoded if it was encoded, never inflated
    past ``limits.max_request_bytes``.
    """
    if encoding is None or encoding.strip().lower() in (b"", b"identity"):
        return body
    if encoding.strip().lower() not in (b"gzip", b"x-gzip"):
        shown = encoding.decode("latin-1")[:40]
        raise BatchError(f"Content-Encoding {shown!r} is not supported; send gzip or none")
    limit = limits.max_request_bytes
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        decoded = inflate.decompress(body, limit + 1)
    except zlib.error as e:
        raise BatchError(f"request body is not valid gzip: {e}") from None
    if inflate.unconsumed_tail or len(decoded) > limit:
        raise _TooLarge(f"request body inflates past {limit} bytes, the most allowed")
    if not inflate.eof:
        raise BatchError("request body is not valid gzip: it ends early")
    return decoded


def format_address(address: IAddress) -> str:
    """
    ``host:port`` for an IP address, its ``repr`` for anything else.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return repr(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _challenge(request: IRequest) -> tuple[str, bytes]:
    """
    The error and ``WWW-Authenticate`` challenge for a request without an
    accepted bearer token.
    """
    if request.getHeader(b"authorization") is not None:
        return (
            "the bearer token is not one this server accepts",
            b'Bearer realm="octoplex", error="invalid_token"',
        )
    return "this server needs an Authorization: Bearer <token> header", b'Bearer realm="octoplex"'


@attr.s(auto_attribs=True)
class OctoplexApp:
    """
    The routes of the HTTP API.

    :ivar multiplexer: runs each batch.
    :ivar limits: the limits each batch is held to.
    :ivar clock: the time source for the elapsed time logged per batch.
    :ivar tokens: the API tokens; when there are any, ``/multiplex`` needs
        one as ``Authorization: Bearer``, and so do ``/metrics`` and ``/stats``.
    :ivar metrics: the daemon's statistics, served at ``/metrics`` and
        ``/stats``.
    :ivar metrics_routes: whether ``/metrics`` and ``/stats`` are served
        here; not when a separate listener (``--metrics-listen``) serves them.
    :ivar admission: which batches run now, shared with the other
        frontends; one of its own by default.
    """

    router: ClassVar[Klein] = Klein()
    log: ClassVar[Logger] = Logger()

    multiplexer: Multiplexer
    limits: Limits
    clock: IReactorTime
    tokens: Tokens = attr.Factory(lambda: Tokens({}))
    metrics: Metrics = attr.Factory(Metrics)
    metrics_routes: bool = True
    admission: Admission = attr.ib(default=None)
    #: "ID:PID" of a worker process (--workers), sent on /healthz as
    #: X-Octoplex-Worker; None for a single process.
    worker: str | None = attr.ib(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.admission is None:
            self.admission = Admission(self.limits, self.metrics)

    @property
    def batches_in_flight(self) -> int:
        """Batches being answered now, by every frontend."""
        return self.admission.batches_in_flight

    @property
    def ready(self) -> bool:
        """Cleared when the daemon starts shutting down: /readyz turns 503."""
        return self.admission.ready

    @property
    def draining(self) -> bool:
        """Set once the daemon drains: new batches are refused."""
        return self.admission.draining

    @router.route("/", methods=["GET"])
    @router.route("/healthz", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        """
        ``{"healthy": true}``, for load balancers and probes.
        """
        if self.worker is not None:
            request.setHeader(b"x-octoplex-worker", self.worker.encode("ascii"))
        return _respond(request, JSON_CONTENT_TYPE, _HEALTHY)

    @router.route(SCHEMA_PATH, methods=["GET"])
    def schema(self, request: IRequest) -> bytes:
        """
        The API's JSON Schema (:mod:`octoplex.schema`): public, like the
        health check.
        """
        return _respond(request, b"application/schema+json", SCHEMA_BYTES)

    @router.route("/readyz", methods=["GET"])
    def readiness(self, request: IRequest) -> bytes:
        """
        ``200 {"ready": true}`` while batches are taken, ``503 {"ready":
        false}`` once the daemon drains for shutdown, so that a load
        balancer stops sending before the listeners close.
        """
        if self.draining or not self.ready:
            request.setResponseCode(503)
            request.setHeader(b"connection", b"close")
            return _respond(request, JSON_CONTENT_TYPE, _DRAINING)
        return _respond(request, JSON_CONTENT_TYPE, _READY)

    @router.route("/metrics", methods=["GET"])
    def prometheus(self, request: IRequest) -> bytes:
        """
        The statistics in Prometheus' text format.
        """
        refusal = self._metrics_refusal(request)
        if refusal is not None:
            return refusal
        return _respond(request, TEXT_CONTENT_TYPE, render_text(self.metrics))

    @router.route("/stats", methods=["GET"])
    def stats(self, request: IRequest) -> bytes:
        """
        The statistics as a JSON document.
        """
        refusal = self._metrics_refusal(request)
        if refusal is not None:
            return refusal
        return _respond(request, JSON_CONTENT_TYPE, render_json(self.metrics))

    def _metrics_refusal(self, request: IRequest) -> bytes | None:
        """
        ``404`` if a separate listener serves the statistics, ``401`` if a
        token is needed and not given; ``None`` to serve them.
        """
        if not self.metrics_routes:
            raise NotFound()
        if self.tokens and self.tokens.identify(request.getHeader(b"authorization")) is None:
            error, challenge = _challenge(request)
            self.log.warn(
                "statistics request from {client} refused: {error}",
                client=format_address(request.getClientAddress()),
                path=request.path.decode("ascii", "replace"),
                error=error,
                status=401,
            )
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", challenge)
            return _respond(request, JSON_CONTENT_TYPE, error_body(error))
        return None

    @router.route("/multiplex", methods=["POST"])
    def multiplex(self, request: Request) -> Any:
        """
        Run one batch and answer with every outcome, in request order.
        """
        started = self.clock.seconds()
        assert request.content is not None
        body = request.content.read()
        bytes_in = len(body)
        self.metrics.bytes_received.inc(bytes_in)
        peer = request.getClientAddress()
        address = format_address(peer)
        client = address
        identity = peer_identity(_connection_transport(request))
        if identity is not None:
            client = f"{client} ({identity})"
        token_name = None
        if self.tokens:
            token_name = self.tokens.identify(request.getHeader(b"authorization"))
            if token_name is not None:
                client = f"{client} [token {token_name}]"
        batch_id = os.urandom(8).hex()
        # Every answer's event carries these, and access=True marks it for
        # the access log (octoplex.logs).
        who = {
            "access": True,
            "batch_id": batch_id,
            "client": client,
            "client_address": address,
            "tls_identity": identity,
            "token_name": token_name,
            "bytes_in": bytes_in,
        }
        if self.tokens and token_name is None:
            return self._unauthorized(request, who, started)
        try:
            body = _decode(request.getHeader(b"content-encoding"), body, self.limits)
            batch = parse_batch(body, self.limits)
        except BatchError as e:
            status = 413 if isinstance(e, _TooLarge) else 400
            answer = error_body(str(e))
            self.log.info(
                "batch from {client} rejected: {error}",
                error=str(e),
                **who,
                **self._answered(started, status, answer),
            )
            request.setResponseCode(status)
            return _respond(request, JSON_CONTENT_TYPE, answer)
        size = len(batch.requests)
        if self.draining:
            return self._draining(request, who, size, started)
        # Its share first: a client over it is told so (429) even when the
        # daemon is also full, and its batches count in no shed total.
        share = client_key(token_name, getattr(peer, "host", None) or address)
        over = self.admission.over_share(share, size)
        if over is not None:
            return self._throttle(request, who, size, started, over)
        overload = self.admission.overload(size)
        if overload is not None:
            return self._shed(request, who, size, started, overload)
        self.admission.enter(size, share)
        hold = self.admission.hold(share)

        def done(result: Any) -> Any:
            hold.close()
            self.admission.leave(size, share)
            return result

        if _wants_stream(request):
            return self._stream(request, batch, batch_id, who, started, hold).addBoth(done)
        d = self.multiplexer.run(batch, batch_id, started, extra=hold).addBoth(done)
        d.addCallback(self._answer, request, who, started)
        return d

    def _stream(
        self,
        request: IRequest,
        batch: Batch,
        batch_id: str,
        who: dict[str, Any],
        started: float,
        hold: Hold,
    ) -> Deferred[bytes]:
        """
        Answer as NDJSON: each outcome on its own line as soon as it is
        known, tagged with its index (and id), then a summary line, all
        within the batch's deadline.
        """
        request.setHeader(b"content-type", NDJSON_CONTENT_TYPE)
        # Each line goes out as it is written, even gzipped (a sync flush).
        request.streaming = True  # type: ignore[attr-defined]
        written = [0]

        def emit(index: int, outcome: dict[str, Any]) -> None:
            line: dict[str, Any] = {"index": index}
            item_id = batch.requests[index].id
            if item_id is not None:
                line["id"] = item_id
            line.update(outcome)
            data = encode(line) + b"\n"
            written[0] += len(data)
            request.write(data)

        def summary(result: BatchResult) -> bytes:
            elapsed = self.clock.seconds() - started
            last = (
                encode(
                    {
                        "summary": {
                            "size": len(result.outcomes),
                            "succeeded": result.succeeded,
                            "failed": result.failed,
                            "timed_out": result.timed_out,
                            "duration_msec": int(elapsed * 1000),
                        }
                    }
                )
                + b"\n"
            )
            written[0] += len(last)
            self._log_batch(result, who, started, written[0], " (streamed)")
            return last

        return self.multiplexer.run(
            batch, batch_id, started, on_outcome=emit, extra=hold
        ).addCallback(summary)

    def _answered(
        self,
        started: float,
        status: int,
        answer: bytes | int,
        size: int = 0,
        succeeded: int = 0,
        failed: int = 0,
        timed_out: int = 0,
    ) -> dict[str, Any]:
        """
        The fields that end every batch's event: how it was answered.
        ``bytes_out`` counts the JSON answer (``answer``, or its length),
        before any gzip.  Counts the
        batch in the statistics.
        """
        sent = answer if isinstance(answer, int) else len(answer)
        elapsed = self.clock.seconds() - started
        return answered(self.metrics, elapsed, status, sent, size, succeeded, failed, timed_out)

    def _draining(self, request: IRequest, who: dict[str, Any], size: int, started: float) -> bytes:
        """
        ``503`` for a batch that arrives, on a kept-alive connection, while
        the daemon shuts down; the caller should go to another instance.
        """
        error = DRAINING
        answer = error_body(error)
        self.log.info(
            "batch from {client} of {size} requests refused: {error}",
            error=error,
            **who,
            **self._answered(started, 503, answer, size=size),
        )
        request.setResponseCode(503)
        request.setHeader(b"retry-after", b"1")
        request.setHeader(b"connection", b"close")
        return _respond(request, JSON_CONTENT_TYPE, answer)

    def _shed(
        self, request: IRequest, who: dict[str, Any], size: int, started: float, error: str
    ) -> bytes:
        """
        ``503`` with ``Retry-After`` at once: past the in-flight caps a batch
        is refused rather than queued without bound.
        """
        answer = error_body(error)
        self.log.warn(
            "batch from {client} of {size} requests shed: {error}",
            error=error,
            shed_total=self.admission.shed,
            **who,
            **self._answered(started, 503, answer, size=size),
        )
        request.setResponseCode(503)
        request.setHeader(b"retry-after", b"1")
        return _respond(request, JSON_CONTENT_TYPE, answer)

    def _throttle(
        self, request: IRequest, who: dict[str, Any], size: int, started: float, error: str
    ) -> bytes:
        """
        ``429`` with ``Retry-After`` at once: the client is over its share
        of the in-flight caps; other clients are still served.
        """
        answer = error_body(error)
        self.log.warn(
            "batch from {client} of {size} requests throttled: {error}",
            error=error,
            throttled_total=self.admission.throttled,
            **who,
            **self._answered(started, 429, answer, size=size),
        )
        request.setResponseCode(429)
        request.setHeader(b"retry-after", b"1")
        return _respond(request, JSON_CONTENT_TYPE, answer)

    def _unauthorized(self, request: IRequest, who: dict[str, Any], started: float) -> bytes:
        """
        ``401`` with a JSON error and a ``WWW-Authenticate`` challenge; the
        token presented, if any, is never logged.
        """
        error, challenge = _challenge(request)
        answer = error_body(error)
        self.log.warn(
            "batch from {client} refused: {error}",
            error=error,
            **who,
            **self._answered(started, 401, answer),
        )
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", challenge)
        return _respond(request, JSON_CONTENT_TYPE, answer)

    def _answer(
        self, result: BatchResult, request: IRequest, who: dict[str, Any], started: float
    ) -> bytes:
        answer = encode({"responses": result.outcomes})
        if self.draining:
            # The caller should not send its next batch on this connection.
            request.setHeader(b"connection", b"close")
        self._log_batch(result, who, started, len(answer))
        return _respond(request, JSON_CONTENT_TYPE, answer)

    def _log_batch(
        self,
        result: BatchResult,
        who: dict[str, Any],
        started: float,
        sent: int,
        how: str = "",
    ) -> None:
        """The event (and statistics) of a batch answered ``200`` with ``sent`` bytes."""
        self.log.info(
            "batch {batch_id} from {client}: {size} requests, {succeeded} succeeded, "
            "{failed} failed, {timed_out} timed out, in {elapsed_ms} ms" + how,
            **who,
            **batch_answered(self.metrics, self.clock.seconds() - started, sent, result),
        )

    @router.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        """
        ``404`` with ``not found``, as the original answered.
        """
        request.setResponseCode(404)
        return _respond(request, b"text/plain; charset=utf-8", _NOT_FOUND)

    @router.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        """
        ``405`` naming the methods the route takes.
        """
        error = cast(MethodNotAllowed, failure.value)
        allowed = sorted(error.valid_methods or ())
        request.setResponseCode(405)
        request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("ascii", "replace")
        return _respond(
            request,
            JSON_CONTENT_TYPE,
            error_body(f"method {method} is not allowed on {path}; use {' or '.join(allowed)}"),
        )


@implementer(_IRequestEncoderFactory)
class LazyGzipEncoderFactory:
    """
    gzip for callers that accept it (``Accept-Encoding: gzip``), at
    :data:`GZIP_LEVEL`, as twisted.web's ``GzipEncoderFactory`` does, except
    that the compressor (about 256 KiB of zlib state) is made at the
    answer's first byte rather than when the request arrives: a batch
    waiting on its upstreams holds none.
    """

    _accepts = re.compile(rb"(?:^|[\s,])gzip(?:$|[\s,;])")

    def encoderForRequest(self, request: IRequest) -> _LazyGzipEncoder | None:
        accepted = b",".join(request.requestHeaders.getRawHeaders(b"accept-encoding", []))
        if not self._accepts.search(accepted):
            return None
        encoding = request.responseHeaders.getRawHeaders(b"content-encoding")
        value = b",".join([*encoding, b"gzip"]) if encoding else b"gzip"
        request.responseHeaders.setRawHeaders(b"content-encoding", [value])
        return _LazyGzipEncoder(request)


@implementer(_IRequestEncoder)
class _LazyGzipEncoder:
    def __init__(self, request: IRequest) -> None:
        self._request = request
        self._compressor: Any = None

    def _zlib(self) -> Any:
        if self._compressor is None:
            self._compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return self._compressor

    def encode(self, data: bytes) -> bytes:
        if not self._request.startedWriting:  # type: ignore[attr-defined]
            # The length is the uncompressed body's; the answer is chunked.
            self._request.responseHeaders.removeHeader(b"content-length")
        compressed = self._zlib().compress(data)
        if getattr(self._request, "streaming", False):
            # A streamed line must reach the caller now, not when zlib's
            # buffer fills.
            compressed += self._zlib().flush(zlib.Z_SYNC_FLUSH)
        return bytes(compressed)

    def finish(self) -> bytes:
        remain = bytes(self._zlib().flush())
        self._compressor = None
        return remain


class OctoplexRequest(Request):
    """
    A request that sets TCP_NODELAY on its connection and refuses a body
    over ``max_request_bytes`` before buffering it.

    twisted.web buffers a whole request body, with no limit, before any
    resource sees it; so the limit is enforced here, as the bytes arrive.
    """

    _received = 0
    _refused = False

    def _limits(self) -> Limits:
        # HTTPFactory.buildProtocol gives every channel its site.
        site: OctoplexSite = self.channel.site  # type: ignore[attr-defined]
        return site.limits

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        if name in (b"Server", b"server"):
            # twisted.web would announce its name and version to anyone.
            value = b"Octoplex"
        super().setHeader(name, value)

    def gotLength(self, length: int | None) -> None:
        set_tcp_nodelay(self.channel.transport)
        limit = self._limits().max_request_bytes
        if length is not None and length > limit:
            self._refuse(f"request body is {length} bytes; at most {limit} are allowed")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        limit = self._limits().max_request_bytes
        if self._received > limit:
            self._refuse(f"request body exceeds {limit} bytes, the most allowed")
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self._refused:
            super().process()

    def _refuse(self, message: str) -> None:
        """
        Answer ``413`` at once and close the connection, so the rest of the
        body is never read.
        """
        self._refused = True
        # Without this, the channel would answer "100 Continue" after us.
        self.requestHeaders.removeHeader(b"expect")
        if isinstance(self.channel, OctoplexChannel):
            self.channel.refuse(413, message)
            return
        # An HTTP/2 stream: answer on it (on the next turn: the length can
        # come before the stream is registered to write), and drop the rest
        # of its body; the connection's other streams carry on.
        if self.content is None:
            # twisted.web reads its length when the stream ends.
            self.content = BytesIO()
        site: OctoplexSite = self.channel.site  # type: ignore[attr-defined]
        site._reactor.callLater(0, self._answer_refusal, message)

    def _answer_refusal(self, message: str) -> None:
        if self.finished or self._disconnected:
            return
        client = format_address(self.getClientAddress())
        OctoplexApp.log.info(
            "inbound request from {client} refused with {status}: {error}",
            client=client,
            client_address=client,
            status=413,
            error=message,
            access=True,
        )
        self.setResponseCode(413)
        self.setHeader(b"content-type", JSON_CONTENT_TYPE)
        self.write(error_body(message))
        self.finish()


def goaway_frame(last_stream_id: int, error_code: int = 0) -> bytes:
    """
    An HTTP/2 GOAWAY frame (RFC 9113 section 6.8): its 9-byte frame header
    (length 8, type 0x7, no flags, stream 0), then the last stream id and
    the error code (0: NO_ERROR).
    """
    return (
        struct.pack(">I", 8)[1:]
        + b"\x07\x00"
        + struct.pack(">III", 0, last_stream_id & 0x7FFFFFFF, error_code)
    )


class _Channel(_GenericHTTPChannelProtocol):
    """
    twisted.web's protocol switch (as its ``_genericHTTPChannelProtocolFactory``
    builds it) around Octoplex's HTTP/1.1 channel: a TLS connection that
    negotiated h2 is handed to twisted.web's HTTP/2 channel instead.  Then
    the HTTP/1.1 channel never hears that the connection ended, so the site's
    count of open connections is kept here.
    """

    def __init__(self) -> None:
        self._http11 = OctoplexChannel()
        # The site knows the HTTP/1.1 channel; through it, this switch.
        self._http11.switch = self  # type: ignore[attr-defined]
        super().__init__(self._http11)

    def go_away(self) -> None:
        """
        On an HTTP/2 connection, send GOAWAY (NO_ERROR, naming the last
        stream the client opened), so that the client knows the close that
        follows is a clean one and that every stream it opened was answered.

        For shutdown, once no batch is in flight: a client built on the h2
        library (httpx, for one) fails the streams it still has open when a
        GOAWAY arrives, where the RFC lets them finish.  The frame is written
        straight to the connection, between the whole frames Twisted
        writes, leaving the h2 state machine open for a straggler's answer.
        (Twisted's ``H2Connection.conn`` is guarded by
        tests/test_private_api.py.)
        """
        h2: Any = self._channel
        if h2 is self._http11 or getattr(h2, "transport", None) is None:
            return
        h2.transport.write(goaway_frame(h2.conn.highest_inbound_stream_id))

    def connectionLost(self, reason: Failure) -> None:
        current: object = self._channel
        switched = current is not self._http11
        super().connectionLost(reason)
        if switched:
            self._http11.connection_ended()


def _channel(factory: Any) -> Any:
    return _Channel()


class OctoplexSite(Site):
    """
    The ``Site`` for the app: no per-request access log (the app writes one
    structured event per batch) and no "Starting factory" line; its
    channels hold callers to the limits of :mod:`octoplex.inbound`, and at
    most ``max_connections`` are open at once.

    :param app: the app to serve.
    :param reactor: the reactor, for the channel's timers.
    :param buffers: the process's budget of buffered bytes, which answers
        waiting in a full send buffer count against; none by default.
    """

    noisy = False
    displayTracebacks = False
    requestFactory = OctoplexRequest
    protocol = _channel

    def __init__(self, app: OctoplexApp, reactor: Any, buffers: BufferBudget | None = None) -> None:
        # A caller that sends Accept-Encoding: gzip gets its answers gzipped.
        gzip = LazyGzipEncoderFactory()
        super().__init__(
            EncodingResourceWrapper(app.router.resource(), [gzip]),
            reactor=reactor,
            timeout=app.limits.idle_timeout,
            # Bodies are JSON batches, never forms: twisted.web would parse
            # every POST's Content-Type with the email package (about a
            # quarter of a batch of one's CPU) and a form body into args.
            parsePOSTFormSubmission=False,
        )
        self.limits = app.limits
        self.metrics = app.metrics
        self.buffers = buffers
        self._reactor = reactor
        #: Inbound connections open now, counted as they are accepted.
        self.connections = 0
        #: Their channels, once connected.
        self.channels: set[OctoplexChannel] = set()
        #: Connections refused because ``max_connections`` were open.
        self.refused_connections = 0

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.connections >= self.limits.max_connections:
            self.refused_connections += 1
            client = "?" if addr is None else format_address(addr)
            OctoplexApp.log.warn(
                "connection from {client} refused: {open} connections open, the most allowed "
                "(refused so far: {refused})",
                client=client,
                client_address=client,
                open=self.connections,
                refused=self.refused_connections,
                status=503,
                access=True,
            )
            self.metrics.inbound_refused.labels("503").inc()
            return ConnectionRefuser(self.limits.max_connections)
        self.connections += 1
        return super().buildProtocol(addr)

    def connection_closed(self) -> None:
        """
        One of this site's channels lost its connection.
        """
        self.connections -= 1

    async def close_connections(self, grace: float) -> None:
        """
        Close every inbound connection once what was written to it has been
        sent (an HTTP/2 one after a GOAWAY); abort those still open after
        ``grace`` seconds.  For shutdown, once no batch is in flight: the
        reactor's own shutdown drops connections with their last answers
        unsent.
        """
        for channel in list(self.channels):
            switch = getattr(channel, "switch", None)
            if switch is not None:
                switch.go_away()
            channel.loseConnection()
        waited = 0.0
        while self.channels and waited < grace:
            await deferLater(self._reactor, 0.05, lambda: None)
            waited += 0.05
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.abortConnection()  # type: ignore[attr-defined]

    def log(self, request: Any) -> None:
        """
        Write nothing: twisted.web's access line per request halves
        throughput, and the app's batch event says more.
        """


@attr.s(auto_attribs=True)
class MetricsApp:
    """
    The routes of the separate statistics listener (``--metrics-listen``):
    ``/metrics`` and ``/stats``, with no authentication.
    """

    router: ClassVar[Klein] = Klein()
    metrics: Metrics

    @router.route("/metrics", methods=["GET"])
    def prometheus(self, request: IRequest) -> bytes:
        """
        The statistics in Prometheus' text format.
        """
        return _respond(request, TEXT_CONTENT_TYPE, render_text(self.metrics))

    @router.route("/stats", methods=["GET"])
    def stats(self, request: IRequest) -> bytes:
        """
        The statistics as a JSON document.
        """
        return _respond(request, JSON_CONTENT_TYPE, render_json(self.metrics))

    @router.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        """
        ``404`` with ``not found``.
        """
        request.setResponseCode(404)
        return _respond(request, b"text/plain; charset=utf-8", _NOT_FOUND)


class MetricsSite(Site):
    """
    The ``Site`` of the statistics listener: quiet, with no access log.
    """

    noisy = False
    displayTracebacks = False

    def __init__(self, metrics: Metrics, reactor: Any) -> None:
        super().__init__(MetricsApp(metrics).router.resource(), reactor=reactor)

    def log(self, request: Any) -> None:
        """
        Write nothing: a scrape every few seconds is not worth a line.
        """
