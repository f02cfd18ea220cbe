"""
The gRPC frontend: ``octoplex.v1.Multiplexer`` (``octoplex/v1/multiplexer.proto``)
served by ``grpc.aio`` on the same asyncio loop as the rest of the daemon.

twistd runs Twisted's asyncio reactor (``twistd --reactor=asyncio``), whose
loop is asyncio's: grpc.aio's server runs on that loop, and each call is a
coroutine that awaits the multiplexer's Deferred through
``Deferred.asFuture``.  There is no second fan-out: a call goes through the
same :class:`~octoplex.admission.Admission`, the same
:class:`~octoplex.multiplexer.Multiplexer` (with its upstream client, pool,
egress policy and limits), the same statistics and the same log events as a
``POST /multiplex``; only the messages differ (:mod:`octoplex.grpc_wire`).

Status codes:

- ``INVALID_ARGUMENT``: the batch as a whole is malformed (the message is
  the one a JSON batch gets, naming the bad value and the limit);
- ``UNAUTHENTICATED``: tokens are configured and the ``authorization``
  metadata carries none of them;
- ``RESOURCE_EXHAUSTED``: the caller is over its share of the in-flight caps
  (counted as HTTP's ``429``), load is shed (the in-flight caps), or the
  batch is over ``--max-request-bytes`` (grpc's own check, which names both
  sizes);
- ``UNAVAILABLE``: the daemon is draining for shutdown;
- ``DEADLINE_EXCEEDED``: only for the whole call, when the caller's own gRPC
  deadline passes first (its upstream requests are then cancelled).  Items
  that miss the batch's ``timeout_msec`` are outcomes of kind
  ``KIND_TIMEOUT``, never a status.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any, NoReturn

import attr
import grpc
from cryptography import x509
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from octoplex.admission import DRAINING, Admission, Hold, client_key
from octoplex.auth import Tokens
from octoplex.events import answered, batch_answered
from octoplex.grpc_wire import GRPC_OUTCOMES, batch_of, batch_result
from octoplex.limits import Limits
from octoplex.metrics import Metrics
from octoplex.multiplexer import BatchResult, Multiplexer
from octoplex.tls import ServerPEM, certificate_identity
from octoplex.v1 import multiplexer_pb2 as pb
from octoplex.wire import Batch, BatchError

__all__ = [
    "SERVICE_NAME",
    "GRPCListener",
    "MultiplexerServicer",
    "check_reactor",
    "credentials",
    "split_address",
]

#: The service's full name, for health checks and reflection.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Multiplexer"].full_name

#: The HTTP status each way a call ends counts as, in the statistics and
#: the access log, so that both frontends' batches add up in one place.
_STATUS_OF = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

#: What the stream's queue holds after the last outcome.
_END = object()


def check_reactor(reactor: Any) -> None:
    """
    Refuse a reactor that cannot host grpc.aio, which needs Twisted's
    asyncio reactor (its loop is asyncio's).

    :raises ValueError: naming the reactor option to use.
    """
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if not isinstance(reactor, AsyncioSelectorReactor):
        raise ValueError(
            f"the gRPC listener needs Twisted's asyncio reactor, not {type(reactor).__name__}: "
            "start the daemon with twistd --reactor=asyncio octoplex ... (twistd's own option, "
            "before 'octoplex')"
        )


def split_address(address: str) -> tuple[str, int]:
    """
    The host and port of a ``HOST:PORT`` listener address (``[::1]:PORT``
    for IPv6).

    :raises ValueError: naming the address, if it is not one.
    """
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(
            f"{address!r} is not HOST:PORT (e.g. 127.0.0.1:50051, [::1]:50051, 0.0.0.0:50051)"
        )
    return host, int(port)


def credentials(pem: ServerPEM) -> grpc.ServerCredentials:
    """
    The gRPC listener's TLS: the HTTPS listener's certificate and key, and,
    if it has a client CA, client certificates required as there.
    """
    return grpc.ssl_server_credentials(
        [(pem.key, pem.chain)],
        root_certificates=pem.client_ca,
        require_client_auth=pem.client_ca is not None,
    )


def _address(peer: str) -> str:
    """``host:port`` of grpc's ``ipv4:1.2.3.4:5`` or ``ipv6:[::1]:5``."""
    kind, _, rest = peer.partition(":")
    return rest if kind in ("ipv4", "ipv6") else peer


def _host(address: str) -> str:
    """The host of :func:`_address`'s ``host:port`` (``[::1]:5``: ``::1``)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _tls_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The verified client certificate's identity, as on the HTTPS listener."""
    pem = list(context.auth_context().get("x509_pem_cert", ()))
    return _identity(pem[0]) if pem else None


@functools.lru_cache(maxsize=1024)
def _identity(pem: bytes) -> str | None:
    # A client's calls all carry its certificate: parsed once.
    return certificate_identity(x509.load_pem_x509_certificate(pem))


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


@attr.s(slots=True, auto_attribs=True)
class _Call:
    """One call's batch, once admitted, and the fields of its log events."""

    batch: Batch
    batch_id: str
    started: float
    who: dict[str, Any]
    #: Whose share of the in-flight caps it counts against.
    share: str
    #: Its hedges' hold on the in-flight counts.
    hold: Hold


class MultiplexerServicer:
    """
    The two RPCs, over the daemon's multiplexer.  Each takes its request as
    the bytes that came, and parses them itself, so that a malformed
    message is ``INVALID_ARGUMENT`` with its reason, logged like any other
    refused batch (grpcio would answer ``UNKNOWN``, unlogged).

    :param multiplexer: runs each batch.
    :param admission: the in-flight caps and draining flag every frontend
        shares; its ``limits`` are the ones batches are held to.
    :param clock: the time source for the elapsed time logged per batch.
    :param tokens: the API tokens; settable (a reload changes them).
    :param metrics: the daemon's statistics.
    """

    log = Logger()

    def __init__(
        self,
        multiplexer: Multiplexer,
        admission: Admission,
        clock: IReactorTime,
        tokens: Tokens,
        metrics: Metrics,
    ) -> None:
        self._multiplexer = multiplexer
        self._admission = admission
        self._clock = clock
        self.tokens = tokens
        self._metrics = metrics

    async def Multiplex(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Every outcome, in request order, by the batch's deadline."""
        call = await self._admit(request, context, "Multiplex")
        running = self._multiplexer.run(
            call.batch, call.batch_id, call.started, outcomes=GRPC_OUTCOMES, extra=call.hold
        )
        future = running.asFuture(asyncio.get_running_loop())
        try:
            result: BatchResult = await self._ending(future, call, context)
        finally:
            self._ended(call, future)
        answer = batch_result(result.outcomes)
        self._log_batch(call, result, len(answer))
        return answer

    async def MultiplexStream(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """
        Each outcome as soon as it is known, the last by the batch's
        deadline; the counts in the trailing metadata.
        """
        call = await self._admit(request, context, "MultiplexStream")
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(index: int, outcome: pb.Outcome) -> None:
            outcome.index = index
            queue.put_nowait(outcome)

        running = self._multiplexer.run(
            call.batch, call.batch_id, call.started, emit, GRPC_OUTCOMES, call.hold
        )
        future = running.asFuture(asyncio.get_running_loop())
        # Every outcome is handed to emit before the result fires.
        future.add_done_callback(lambda _: queue.put_nowait(_END))
        written = 0
        try:
            while (outcome := await self._ending(queue.get(), call, context)) is not _END:
                data = outcome.SerializeToString()
                written += len(data)
                await self._ending(context.write(data), call, context)
            result: BatchResult = future.result()
        finally:
            self._ended(call, future)
        context.set_trailing_metadata(
            (
                ("octoplex-batch-id", call.batch_id),
                ("octoplex-succeeded", str(result.succeeded)),
                ("octoplex-failed", str(result.failed)),
                ("octoplex-timed-out", str(result.timed_out)),
            )
        )
        self._log_batch(call, result, written, " (streamed)")

    async def _ending(
        self,
        awaitable: Any,
        call: _Call,
        context: grpc.aio.ServicerContext,
    ) -> Any:
        """
        Await ``awaitable``; if the call ends first (the caller cancelled
        it, or its own deadline passed), log how it ended.
        """
        try:
            return await awaitable
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                code, error = grpc.StatusCode.DEADLINE_EXCEEDED, "the call's own deadline passed"
            else:
                code, error = grpc.StatusCode.CANCELLED, "the caller cancelled the call"
            self.log.info(
                "batch {batch_id} from {client} ended early: {error}; its requests were cancelled",
                error=error,
                grpc_code=code.name,
                **call.who,
                **answered(
                    self._metrics,
                    self._clock.seconds() - call.started,
                    _STATUS_OF[code],
                    0,
                    size=len(call.batch.requests),
                ),
            )
            raise

    def _ended(self, call: _Call, future: asyncio.Future[Any]) -> None:
        """
        However a call ends: its batch, if still running (the call was
        cancelled, or writing to it failed), is cancelled with every request
        it has in flight; it leaves the in-flight counts.
        """
        if not future.done():
            future.cancel()
        call.hold.close()
        self._admission.leave(len(call.batch.requests), call.share)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's methods, for a server."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                # Requests and answers as bytes: parsed and serialized here.
                "Multiplex": grpc.unary_unary_rpc_method_handler(self.Multiplex),
                "MultiplexStream": grpc.unary_stream_rpc_method_handler(self.MultiplexStream),
            },
        )

    async def _admit(self, request: bytes, context: grpc.aio.ServicerContext, rpc: str) -> _Call:
        """
        Check the caller, the batch and the load, in that order; end the
        call with its status if one says no.
        """
        started = self._clock.seconds()
        bytes_in = len(request)
        self._metrics.bytes_received.inc(bytes_in)
        address = _address(context.peer())
        identity = _tls_identity(context)
        client = address if identity is None else f"{address} ({identity})"
        batch_id = os.urandom(8).hex()
        # The fields of the HTTP frontend's events, and which RPC it was.
        who: dict[str, Any] = {
            "access": True,
            "batch_id": batch_id,
            "client": client,
            "client_address": address,
            "tls_identity": identity,
            "token_name": None,
            "bytes_in": bytes_in,
            "frontend": "grpc",
            "rpc": rpc,
        }
        if self.tokens:
            authorization = _metadata(context, "authorization")
            token_name = self.tokens.identify(
                None if authorization is None else authorization.encode("latin-1")
            )
            if token_name is None:
                error = (
                    "this server needs authorization metadata: Bearer <token>"
                    if authorization is None
                    else "the bearer token is not one this server accepts"
                )
                await self._refuse(
                    context, who, started, grpc.StatusCode.UNAUTHENTICATED, error, "refused"
                )
            who["token_name"] = token_name
            who["client"] = f"{client} [token {token_name}]"
        try:
            try:
                message = pb.Batch.FromString(request)
            except DecodeError as e:
                raise BatchError(f"the request is not an octoplex.v1.Batch message: {e}") from None
            batch = batch_of(message, self._admission.limits)
        except BatchError as e:
            await self._refuse(
                context, who, started, grpc.StatusCode.INVALID_ARGUMENT, str(e), "rejected"
            )
        size = len(batch.requests)
        if self._admission.draining:
            await self._refuse(
                context, who, started, grpc.StatusCode.UNAVAILABLE, DRAINING, "refused", size
            )
        # Its share first, as on the HTTP frontend.
        share = client_key(who["token_name"], _host(address))
        over = self._admission.over_share(share, size)
        if over is not None:
            await self._refuse(
                context,
                who,
                started,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                over,
                "throttled",
                size,
                status=429,
                throttled_total=self._admission.throttled,
            )
        overload = self._admission.overload(size)
        if overload is not None:
            await self._refuse(
                context,
                who,
                started,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                overload,
                "shed",
                size,
                shed_total=self._admission.shed,
            )
        self._admission.enter(size, share)
        return _Call(batch, batch_id, started, who, share, self._admission.hold(share))

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext,
        who: dict[str, Any],
        started: float,
        code: grpc.StatusCode,
        error: str,
        how: str,
        size: int = 0,
        status: int | None = None,
        **extra: Any,
    ) -> NoReturn:
        """
        Log a batch refused with ``code`` (counted as ``status``, by default
        the HTTP status ``code`` stands for), and end the call with it.
        """
        emit = self.log.warn if code is not grpc.StatusCode.INVALID_ARGUMENT else self.log.info
        emit(
            "batch from {client}" + (" of {size} requests " if size else " ") + how + ": {error}",
            error=error,
            grpc_code=code.name,
            **extra,
            **who,
            **answered(
                self._metrics,
                self._clock.seconds() - started,
                _STATUS_OF[code] if status is None else status,
                0,
                size=size,
            ),
        )
        await context.abort(code, error)
        raise AssertionError("grpc.aio's abort returned")  # pragma: no cover

    def _log_batch(self, call: _Call, result: BatchResult, sent: int, how: str = "") -> None:
        """The event (and statistics) of a batch answered with ``sent`` bytes."""
        self.log.info(
            "batch {batch_id} from {client}: {size} requests, {succeeded} succeeded, "
            "{failed} failed, {timed_out} timed out, in {elapsed_ms} ms" + how,
            grpc_code=grpc.StatusCode.OK.name,
            **call.who,
            **batch_answered(self._metrics, self._clock.seconds() - call.started, sent, result),
        )


class GRPCListener(Service):
    """
    One grpc.aio server, on every ``--grpc-listen`` and ``--grpc-listen-tls``
    address: the ``octoplex.v1.Multiplexer`` service, the standard health
    service (``grpc.health.v1``) and server reflection.

    :param servicer: the Multiplexer service.
    :param addresses: each address with its TLS credentials, or ``None``
        for plain text.
    :param limits: ``max_request_bytes`` caps a call's message;
        ``idle_timeout`` closes idle connections.
    :param reuse_port: bind with ``SO_REUSEPORT``, as the workers of
        ``--workers`` do, sharing each address.
    :param grace: seconds the calls in flight get to finish once the
        listener stops, before they are cancelled.

    :ivar servicer: the Multiplexer service.
    :ivar ports: the ports bound, in the order of ``addresses`` (port 0
        binds a free one).
    :ivar stopped: after :meth:`stopService`, fires once every call has
        ended and the server is down.
    """

    log = Logger()

    def __init__(
        self,
        servicer: MultiplexerServicer,
        addresses: list[tuple[str, grpc.ServerCredentials | None]],
        limits: Limits,
        reuse_port: bool,
        grace: float,
    ) -> None:
        self.servicer = servicer
        self._addresses = addresses
        self._limits = limits
        self._reuse_port = reuse_port
        self._grace = grace
        self._server: Any = None
        self._health = health.aio.HealthServicer()
        self.ports: list[int] = []
        self.stopped: Deferred[None] | None = None

    def privilegedStartService(self) -> None:
        """
        Bind every address now, so that one that cannot be bound stops
        start-up with its name.
        """
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
                ("grpc.max_receive_message_length", self._limits.max_request_bytes),
                ("grpc.max_connection_idle_ms", int(self._limits.idle_timeout * 1000)),
            ]
        )
        server.add_generic_rpc_handlers((self.servicer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        for address, tls in self._addresses:
            try:
                if tls is None:
                    port = server.add_insecure_port(address)
                else:
                    port = server.add_secure_port(address, tls)
            except RuntimeError as e:
                raise SystemExit(f"octoplex: cannot listen on {address} (gRPC): {e}") from None
            self.ports.append(port)
        self._server = server
        super().privilegedStartService()

    def startService(self) -> None:
        if self._server is None:
            self.privilegedStartService()
        super().startService()
        Deferred.fromCoroutine(self._start()).addErrback(
            lambda failure: self.log.failure("the gRPC listener did not start", failure)
        )

    async def _start(self) -> None:
        await Deferred.fromFuture(asyncio.ensure_future(self._server.start()))
        await self.serving(True)
        self.log.info(
            "gRPC listening on {addresses} ({service}, health, reflection)",
            addresses=[address for address, _ in self._addresses],
            ports=self.ports,
            service=SERVICE_NAME,
        )

    async def serving(self, serving: bool) -> None:
        """Say, through the health service, whether batches are taken."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await Deferred.fromFuture(asyncio.ensure_future(self._health.set(name, status)))

    def stopService(self) -> Deferred[None]:
        """
        Refuse new calls at once; the calls in flight run on (the daemon
        drains them) for up to ``grace`` seconds, after which :attr:`stopped`
        fires.
        """
        super().stopService()
        self.stopped = Deferred.fromFuture(asyncio.ensure_future(self._stop()))
        return Deferred.fromCoroutine(self.serving(False))

    async def _stop(self) -> None:
        await self._server.stop(self._grace)
        self.log.info(
            "gRPC listener on {addresses} stopped",
            addresses=[address for address, _ in self._addresses],
        )
