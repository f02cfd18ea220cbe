"""
Real servers the tests start on 127.0.0.1: a scriptable HTTP upstream that
counts its connections, raw TCP servers that misbehave, and Octoplex itself.
"""

from __future__ import annotations

import gzip
import json
import socket
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attr
import treq
from treq.client import HTTPClient
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.names import client as names_client
from twisted.names import dns
from twisted.names.server import DNSServerFactory
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from octoplex.auth import Tokens
from octoplex.circuits import CircuitSettings
from octoplex.client import PoolSettings, UpstreamClient
from octoplex.dns import CachingResolver, DNSSettings
from octoplex.egress import EgressPolicy
from octoplex.hedging import HedgeBudgets
from octoplex.limits import Limits
from octoplex.metrics import Metrics
from octoplex.multiplexer import Multiplexer
from octoplex.outliers import OutlierSettings
from octoplex.web import OctoplexApp, OctoplexSite

from .schema import check_answer


class _CountingSite(Site):
    """
    A Site that records every connection it accepts and every one it loses.
    """

    noisy = False

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.connections: list[Any] = []
        self.lost: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections.append(protocol)
        original = protocol.connectionLost

        def connectionLost(reason: Any, _original: Callable[..., Any] = original) -> Any:
            self.lost.append(protocol)
            return _original(reason)

        protocol.connectionLost = connectionLost
        return protocol

    def log(self, request: Any) -> None:
        pass


class _Upstream(Resource):
    """
    The routes an upstream offers the tests:

    - ``/hello``: 200 ``Hello world!``;
    - ``/delay/<ms>``: 200 ``delayed <ms>`` after ``ms`` milliseconds;
    - ``/status/<code>``: that status;
    - ``/echo``: the request's method, headers and body as JSON;
    - ``/mirror``: the request's body, byte for byte;
    - ``/flaky/<key>/<n>[/<retry-after>]``: 503 (with that ``Retry-After``)
      the first ``n`` times for ``key``, then 200 ``ok after <n>``;
    - ``/set-cookie`` and ``/show-cookie``;
    - ``/redirect``: a 302;
    - ``/bytes/<n>``: ``n`` bytes of ``x``;
    - ``/binary``: bytes that are not UTF-8;
    - ``/repeat-header``: two ``Set-Cookie`` and two ``X-Multi`` lines;
    - ``/stall``: headers and half a body, then nothing;
    - ``/first-slow/<key>/<ms>``: the first request for ``key`` answers
      ``slow`` after ``ms`` milliseconds, every later one ``fast`` at once
      (a hedge's upstream).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.finished_early: list[str] = []
        #: Every request's path in the order they arrived, and the most
        #: that were ever being answered at once.
        self.arrivals: list[str] = []
        self.active = 0
        self.most_active = 0
        #: Requests seen per /flaky key, with when each arrived.
        self.flaky: dict[str, list[float]] = {}
        #: Every request's path, when it arrived (by the reactor's clock),
        #: and the connection it came on.
        self.timed: list[tuple[str, float, Any]] = []
        #: Requests seen per /first-slow key.
        self.first_slow: dict[str, int] = {}

    def render(self, request: Request) -> Any:
        self.arrivals.append(request.uri.decode())
        self.timed.append((request.uri.decode(), global_reactor.seconds(), request.channel))
        self.active += 1
        self.most_active = max(self.most_active, self.active)

        def done(_: Any) -> None:
            self.active -= 1

        request.notifyFinish().addBoth(done)
        parts = request.path.decode().strip("/").split("/")
        route = getattr(self, "route_" + parts[0].replace("-", "_"), None)
        if route is None:
            request.setResponseCode(404)
            return b"no such route\n"
        return route(request, *parts[1:])

    def route_hello(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"Hello world!"

    def route_delay(self, request: Request, msec: str) -> Any:
        call = global_reactor.callLater(int(msec) / 1000.0, self._late, request, msec)

        def gone(_: Any) -> None:
            if call.active():
                call.cancel()
                self.finished_early.append(request.path.decode())

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET

    @staticmethod
    def _late(request: Request, msec: str) -> None:
        request.write(f"delayed {msec}".encode())
        request.finish()

    def route_status(self, request: Request, code: str) -> bytes:
        request.setResponseCode(int(code))
        return f"status {code}".encode()

    def route_echo(self, request: Request) -> bytes:
        assert request.content is not None
        document = {
            "method": request.method.decode(),
            "headers": [
                [name.decode(), value.decode()]
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
            "body": request.content.read().decode("utf-8", "replace"),
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(document).encode()

    def route_flaky(self, request: Request, key: str, count: str, after: str = "") -> bytes:
        seen = self.flaky.setdefault(key, [])
        seen.append(global_reactor.seconds())
        if len(seen) <= int(count):
            request.setResponseCode(503)
            if after:
                request.setHeader(b"retry-after", after.encode())
            return b"try again"
        return f"ok after {count}".encode()

    def route_mirror(self, request: Request) -> bytes:
        assert request.content is not None
        request.setHeader(b"content-type", b"application/octet-stream")
        return request.content.read()

    def route_uri(self, request: Request, *rest: str) -> bytes:
        return request.uri

    def route_set_cookie(self, request: Request) -> bytes:
        request.setHeader(b"set-cookie", b"session=secret-of-caller-one; Path=/")
        return b"cookie set"

    def route_show_cookie(self, request: Request) -> bytes:
        return b"cookie: " + (request.getHeader(b"cookie") or b"<none>")

    def route_redirect(self, request: Request) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"location", b"/hello")
        return b"moved"

    def route_bytes(self, request: Request, count: str) -> bytes:
        return b"x" * int(count)

    def route_gzip(self, request: Request, count: str) -> bytes:
        request.setHeader(b"content-encoding", b"gzip")
        return gzip.compress(b"x" * int(count))

    def route_gzip_bomb(self, request: Request, megabytes: str) -> bytes:
        request.setHeader(b"content-encoding", b"gzip")
        squeeze = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        zeros = bytes(1024 * 1024)
        body = b"".join(squeeze.compress(zeros) for _ in range(int(megabytes)))
        return body + squeeze.flush()

    def route_inflate(self, request: Request) -> bytes:
        assert request.content is not None
        encoding = request.getHeader(b"content-encoding") or b"none"
        return encoding + b": " + gzip.decompress(request.content.read())

    def route_bad_gzip(self, request: Request) -> bytes:
        request.setHeader(b"content-encoding", b"gzip")
        return b"this is not gzip"

    def route_binary(self, request: Request) -> bytes:
        return b"ok \xff\xfe end"

    def route_repeat_header(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"set-cookie", [b"a=1", b"b=2"])
        request.responseHeaders.setRawHeaders(b"x-multi", [b"first", b"last"])
        return b"repeated"

    def route_first_slow(self, request: Request, key: str, msec: str) -> Any:
        seen = self.first_slow[key] = self.first_slow.get(key, 0) + 1
        if seen > 1:
            return b"fast"
        call = global_reactor.callLater(int(msec) / 1000.0, self._slow, request)

        def gone(_: Any) -> None:
            if call.active():
                call.cancel()
                self.finished_early.append(request.path.decode())

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET

    @staticmethod
    def _slow(request: Request) -> None:
        request.write(b"slow")
        request.finish()

    def route_stall(self, request: Request) -> Any:
        request.setHeader(b"content-length", b"100")
        request.write(b"x" * 50)

        def gone(_: Any) -> None:
            self.finished_early.append(request.path.decode())

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET


@attr.s(auto_attribs=True)
class Upstream:
    """
    A running upstream: its base URL, its connection log, its port.
    """

    url: str
    site: _CountingSite
    resource: _Upstream
    port: IListeningPort

    def stop(self) -> Deferred[Any]:
        for protocol in self.site.connections:
            # The generic HTTP channel proxies to the real one, which holds
            # the transport.
            transport = getattr(getattr(protocol, "_channel", protocol), "transport", None)
            if transport is not None and protocol not in self.site.lost:
                transport.abortConnection()
        return self.port.stopListening()


def start_upstream(port_number: int = 0) -> Upstream:
    """
    Start the scriptable upstream on 127.0.0.1, on ``port_number`` if given.
    """
    resource = _Upstream()
    site = _CountingSite(resource)
    port = global_reactor.listenTCP(port_number, site, interface="127.0.0.1")
    return Upstream(f"http://127.0.0.1:{port.getHost().port}", site, resource, port)


class _Misbehave(Protocol):
    """
    Read a request, then misbehave as the factory says.
    """

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        mode = self.factory.mode  # type: ignore[attr-defined]
        assert self.transport is not None
        if mode == "reset":
            self.transport.abortConnection()  # type: ignore[attr-defined]
        elif mode == "close":
            self.transport.loseConnection()
        elif mode == "garbage":
            self.transport.write(b"this is not HTTP at all\r\n\r\n")
            self.transport.loseConnection()


def start_misbehaving(mode: str) -> tuple[str, IListeningPort]:
    """
    Start a TCP server on 127.0.0.1 that answers a request by ``mode``:
    ``reset`` (an RST), ``close`` (a FIN, no response), ``garbage``, or
    ``hang`` (nothing at all, the connection left open).
    """
    factory = Factory.forProtocol(_Misbehave)
    factory.noisy = False
    factory.mode = mode  # type: ignore[attr-defined]
    port = global_reactor.listenTCP(0, factory, interface="127.0.0.1")
    return f"http://127.0.0.1:{port.getHost().port}", port


@attr.s(auto_attribs=True)
class Octoplex:
    """
    A running Octoplex: its base URL, its upstream client (and so its pool),
    its site and port.
    """

    url: str
    client: UpstreamClient
    site: OctoplexSite
    port: IListeningPort

    def stop(self) -> Deferred[Any]:
        return DeferredList(
            [self.port.stopListening(), self.client.stopService()],  # type: ignore[list-item]
            fireOnOneErrback=True,
        )


#: The egress policy of the tests' Octoplex: its upstreams are local, as
#: with ``--allow-egress 127.0.0.0/8`` (and ``::1``).
LOOPBACK = EgressPolicy.from_strings(allow=["127.0.0.0/8", "::1/128"])


def local_resolver(
    reactor: Any = global_reactor, metrics: Metrics | None = None
) -> CachingResolver:
    """
    A resolver that answers from /etc/hosts (``localhost``) and sends any
    other query to a closed port on 127.0.0.1, never to the machine's name
    servers.
    """
    dead = names_client.Resolver(servers=[("127.0.0.1", 9)], reactor=reactor)
    return CachingResolver(reactor, dead, DNSSettings(timeouts=(0.2,)), metrics=metrics)


def start_octoplex(
    limits: Limits | None = None,
    pool: PoolSettings | None = None,
    tls_policy: IPolicyForHTTPS | None = None,
    egress: EgressPolicy = LOOPBACK,
    metrics: Metrics | None = None,
    tokens: Tokens | None = None,
    resolver: CachingResolver | None = None,
    circuits: CircuitSettings | None = None,
    outliers: OutlierSettings | None = None,
    hedge_budgets: HedgeBudgets | None = None,
) -> Octoplex:
    """
    Start Octoplex on 127.0.0.1, wired as the tap wires it; with
    ``metrics``, every piece counts in it; host names are dialled through
    ``resolver``, by default one that answers only from /etc/hosts; with
    ``circuits``, circuit breaking as they say, with ``outliers``, outlier
    ejection as they say (both off by default); with ``hedge_budgets``,
    those budgets of hedges (the defaults' by default).
    """
    limits = limits or Limits()
    metrics = Metrics() if metrics is None else metrics
    client = UpstreamClient(
        global_reactor,
        pool or PoolSettings(),
        limits.max_response_bytes,
        tls_policy,
        local_resolver(metrics=metrics) if resolver is None else resolver,
        egress,
        limits.max_header_count,
        limits.max_header_bytes,
        metrics,
        circuits,
        outliers,
    )
    client.startService()
    multiplexer = Multiplexer(
        global_reactor,
        client,
        limits.max_batch_response_bytes,
        metrics,
        hedge_budgets=hedge_budgets,
    )
    app = OctoplexApp(multiplexer, limits, global_reactor, tokens or Tokens({}), metrics)
    site = OctoplexSite(app, global_reactor)
    port = global_reactor.listenTCP(0, site, interface="127.0.0.1")
    return Octoplex(f"http://127.0.0.1:{port.getHost().port}", client, site, port)


def serve_dns(zone: Any) -> IListeningPort:
    """
    Serve ``zone`` (a ``twisted.names`` resolver holding the test's records)
    as a DNS server on a UDP port of 127.0.0.1.
    """
    factory = DNSServerFactory(clients=[zone])
    factory.noisy = False
    protocol = dns.DNSDatagramProtocol(controller=factory)
    protocol.noisy = False
    return global_reactor.listenUDP(0, protocol, interface="127.0.0.1")


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


class _QuietPool(HTTPConnectionPool):
    # So that a test can check that Octoplex's own connections log nothing.
    _factory = _QuietFactory


class Caller:
    """
    The test's own HTTP client, on a non-persistent pool so that it leaves
    no connection behind.

    :param bind: the local address its connections come from (another
        loopback address, such as ``127.0.0.2``, is another client); the
        kernel's choice by default.
    """

    def __init__(self, bind: str | None = None) -> None:
        pool = _QuietPool(global_reactor, persistent=False)
        self._http = HTTPClient(
            Agent(global_reactor, pool=pool, bindAddress=None if bind is None else (bind, 0))
        )

    async def post(
        self, url: str, document: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        """
        POST ``document`` as JSON, with ``headers`` too; return the status,
        headers and parsed JSON.
        """
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        response = await self._http.post(
            url, data=body, headers={"content-type": "application/json", **(headers or {})}
        )
        content = await treq.content(response)
        answer = json.loads(content)
        if url.endswith("/multiplex"):
            check_answer(response.code, answer)
        return response.code, response.headers, answer

    async def get(self, url: str, method: str = "GET") -> tuple[int, Any, bytes]:
        """
        Send a bodiless request; return the status, headers and raw body.
        """
        response = await self._http.request(method, url)
        return response.code, response.headers, await treq.content(response)


@contextmanager
def full_backlog() -> Iterator[int]:
    """
    A port on 127.0.0.1 whose listener never accepts and whose backlog is
    full: a connect to it gets no answer at all (its SYN is dropped).
    """
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        # Linux queues one connection on a backlog of 0 and drops the SYNs
        # of the rest.
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


#: How long a test waits for an event before it fails, by default: far
#: beyond what any event takes on a loaded 2-core machine.
WAIT_TIMEOUT = 15.0


async def wait_until(
    condition: Callable[[], Any], what: str, timeout: float = WAIT_TIMEOUT, every: float = 0.01
) -> None:
    """
    Let the reactor run until ``condition()`` is true, checking every
    ``every`` seconds; fail naming ``what`` was awaited if it is still false
    after ``timeout`` seconds.
    """
    deadline = global_reactor.seconds() + timeout
    while not condition():
        if global_reactor.seconds() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}, in vain")
        d: Deferred[None] = Deferred()
        global_reactor.callLater(every, d.callback, None)
        await d
