#!/usr/bin/env python3
"""
The treq + Klein floor probe: Octoplex's peer in bench/peers.py.

The least a Twisted program must spend on a batch when every upstream
request goes through treq's ``HTTPClient.request`` and the inbound route is
a Klein route, with everything else as lean as it can be.  It speaks the
same JSON wire format as Octoplex (../shared/WIRE-FORMAT.md) on ``POST
/multiplex``, with ``{"healthy": true}`` on ``GET /`` and ``GET /healthz``,
and it does not import octoplex: it is a separate program.

- Inbound: a Klein app served by ``Site(app.resource())`` with no access
  log; the batch parsed and the answer written with stdlib ``json``.
- Each item: ``HTTPClient(agent, cookiejar=<a jar that never stores
  cookies>).request(method, url, headers=..., data=...,
  allow_redirects=False, unbuffered=True)`` (so treq's cookie and
  content-decoder agents are crossed), the body read by treq
  (``response.content()``).  The URLs are parsed once per distinct URI,
  into an ``EncodedURL`` already in URI form, so that treq's ``to_uri()``
  and ``to_text()`` on each request cost nothing.
- The batch: the items' Deferreds gathered with ``DeferredList``; a
  ``reactor.callLater`` at the deadline cancels what is left, which comes
  back as ``{"Failure": {"error": "timeout elapsed"}}``.
- Under treq, its own lean ``IAgent``: idle keep-alive connections per
  (host, port) in a list, a new TCP connection (TCP_NODELAY) when none is
  idle, each request written in one ``transport.write`` and its response
  parsed by ``httptools.HttpResponseParser`` (one parser per connection).
  The response is handed over once it is complete, as a minimal
  ``IResponse`` whose ``deliverBody`` replays the body to the protocol treq
  gives it.  Plain ``http://`` only.  No egress policy, limits, metrics or
  logs.

    python bench/peer_floor.py --port 8091 [--host 127.0.0.1]

It runs on Twisted's epoll reactor and needs treq, klein and httptools (in
the project's virtualenv).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import urlsplit

import httptools
from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.server import Site
from zope.interface import implementer

JSON = b"application/json; charset=utf-8"
HEALTHY = b'{"healthy":true}'
#: Headers about the connection rather than the content, kept out of the
#: response's headers as Twisted's own client keeps them.
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
#: How a finished body ends: one Failure for every response.
_BODY_DONE = Failure(ResponseDone("Response body fully received"))
#: Parsed URIs kept at most (then the caches start again).
_CACHE_SIZE = 10_000


def _encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------
# The agent under treq


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body that is all there (treq's ``data_to_body_producer``):
    the agent writes ``body`` with the head, in one write.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _NoCookies(DefaultCookiePolicy):
    """A multiplexer's callers are strangers: no cookie is kept or sent."""

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False

    def return_ok(self, cookie: Any, request: Any) -> bool:
        return False


class _Finished:
    """
    What a response's body protocol is connected to: the body is all in,
    so there is nothing to pause or stop.
    """

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass


_FINISHED = _Finished()


@implementer(IResponse)
class _Response:
    """A complete response: its head, and its body as received."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, code: int, phrase: bytes, headers: Headers, body: list[bytes]) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = sum(map(len, body))
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(_FINISHED)
        for chunk in self._body:
            protocol.dataReceived(chunk)
        protocol.connectionLost(_BODY_DONE)

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response


class _Connection(Protocol):
    """
    One keep-alive connection to an upstream, one request at a time; its
    own httptools parser reads every response on it.
    """

    transport: Any = None

    def __init__(self, agent: LeanAgent, key: tuple[str, int]) -> None:
        self.agent = agent
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        #: The request under way: its Deferred, and whether it is a HEAD.
        self.finished: Deferred[IResponse] | None = None
        self.head_only = False
        #: While connecting: the endpoint's Deferred and the request to write.
        self.connecting: Deferred[Any] | None = None
        self.pending = b""
        self.open = False
        self.idle = False
        self._new_response()

    def _new_response(self) -> None:
        self.phrase = b""
        self.headers = Headers()
        self.body: list[bytes] = []

    # Sending -----------------------------------------------------------

    def connectionMade(self) -> None:
        self.open = True
        self.transport.setTcpNoDelay(True)
        data, self.pending = self.pending, b""
        self.transport.write(data)

    def _connected(self, protocol: Any) -> None:
        self.connecting = None

    def _connect_failed(self, reason: Failure) -> None:
        self.connecting = None
        finished, self.finished = self.finished, None
        if finished is not None:
            finished.errback(reason)

    def send(self, data: bytes, finished: Deferred[IResponse], head_only: bool) -> None:
        self.finished = finished
        self.head_only = head_only
        self.transport.write(data)

    def cancel(self, finished: Deferred[IResponse]) -> None:
        # The deadline passed: this connection is given up with its request.
        self.finished = None
        if self.connecting is not None:
            self.connecting.cancel()
        elif self.open:
            self.open = False
            self.transport.abortConnection()

    # Receiving ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.open = False
            self.transport.abortConnection()
            finished, self.finished = self.finished, None
            if finished is not None:
                finished.errback(Failure(e))

    def on_status(self, phrase: bytes) -> None:
        self.phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _CONNECTION_HEADERS:
            self.headers.addRawHeader(name, value)

    def on_headers_complete(self) -> None:
        if self.head_only and self.parser.get_status_code() >= 200:
            # llhttp cannot be told that a HEAD's answer has no body: the
            # response ends here, and the connection with it.
            self._complete(keep=False)

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            self._new_response()  # an interim answer (100 Continue)
            return
        if self.finished is not None:
            self._complete(self.parser.should_keep_alive())

    def _complete(self, keep: bool) -> None:
        finished, self.finished = self.finished, None
        response = _Response(self.parser.get_status_code(), self.phrase, self.headers, self.body)
        self._new_response()
        if keep and self.open:
            self.agent.put_back(self)
        else:
            self.open = False
            self.transport.loseConnection()
        if finished is not None:
            finished.callback(response)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        if self.idle:
            self.agent.forget(self)
        finished, self.finished = self.finished, None
        if finished is not None:
            finished.errback(reason)


class _ThisConnection(Factory):
    """Builds the one protocol a new connection is made for."""

    noisy = False

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection

    def buildProtocol(self, addr: Any) -> _Connection:
        return self.connection


@implementer(IAgent)
class LeanAgent:
    """
    A keep-alive agent for plain ``http://``: the idle connections per
    (host, port) in a list (the most recently used first out), a new one
    when none is idle.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._endpoints: dict[tuple[str, int], TCP4ClientEndpoint] = {}
        #: URI -> ((host, port), request target, Host header).
        self._targets: dict[bytes, tuple[tuple[str, int], bytes, bytes]] = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        target = self._targets.get(uri)
        if target is None:
            try:
                target = self._parse(uri)
            except ValueError as e:
                return fail(e)
        key, path, host = target
        if bodyProducer is None:
            body = b""
        elif isinstance(bodyProducer, BytesProducer):
            body = bodyProducer.body
        else:
            return fail(TypeError("only BytesProducer bodies are supported"))
        data = _head(method, path, host, headers, body) + body
        head_only = method == b"HEAD"
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            connection.idle = False
            if connection.open:
                finished: Deferred[IResponse] = Deferred(connection.cancel)
                connection.send(data, finished, head_only)
                return finished
        connection = _Connection(self, key)
        finished = connection.finished = Deferred(connection.cancel)
        connection.head_only = head_only
        connection.pending = data
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = TCP4ClientEndpoint(self._reactor, key[0], key[1])
        connecting = connection.connecting = endpoint.connect(_ThisConnection(connection))
        connecting.addCallbacks(connection._connected, connection._connect_failed)
        return finished

    def put_back(self, connection: _Connection) -> None:
        connection.idle = True
        idle = self._idle.get(connection.key)
        if idle is None:
            idle = self._idle[connection.key] = []
        idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        connection.idle = False
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)

    def _parse(self, uri: bytes) -> tuple[tuple[str, int], bytes, bytes]:
        parts = urlsplit(uri)
        if parts.scheme != b"http" or not parts.hostname:
            raise ValueError(f"the probe only speaks plain http://, not {uri!r}")
        path = parts.path or b"/"
        if parts.query:
            path += b"?" + parts.query
        target = ((parts.hostname.decode("ascii"), parts.port or 80), path, parts.netloc)
        if len(self._targets) >= _CACHE_SIZE:
            self._targets.clear()
        self._targets[uri] = target
        return target


def _head(method: bytes, path: bytes, host: bytes, headers: Headers | None, body: bytes) -> bytes:
    lines = [method, b" ", path, b" HTTP/1.1\r\n"]
    has_host = False
    if headers is not None:
        for name, values in headers.getAllRawHeaders():
            if name.lower() == b"host":
                has_host = True
            for value in values:
                lines += (name, b": ", value, b"\r\n")
    if not has_host:
        lines += (b"Host: ", host, b"\r\n")
    if body or method in (b"POST", b"PUT"):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    return b"".join(lines)


# --------------------------------------------------------------------------
# The batch


class _URI(EncodedURL):
    """
    A URL already in URI form (ASCII host, percent-encoded), made once per
    distinct URI: treq calls ``to_uri()`` and ``to_text()`` on every
    request, and hyperlink's ``to_uri()`` runs IDNA over the host each
    time, so here the first is the URL itself and the second is kept.
    """

    def to_uri(self) -> _URI:
        return self

    def to_text(self, with_password: bool = False) -> str:
        if with_password:
            return super().to_text(True)
        text: str | None = self.__dict__.get("_text")
        if text is None:
            text = self.__dict__["_text"] = super().to_text()
        return text


def _uri(text: str) -> _URI:
    url = _URI.from_text(EncodedURL.from_text(text).to_uri().to_text())
    assert isinstance(url, _URI)
    return url


#: How an item's upstream request is made: (method, URI, headers or None,
#: body or None) -> Deferred[treq response].
Issue = Callable[[str, str, Any, Any], "Deferred[Any]"]


def lean_issue(reactor: Any) -> Issue:
    """
    The probe's requests: treq's HTTPClient over the lean agent, URLs parsed
    once per URI, no cookies, no redirects, the body read unbuffered.
    """
    client = HTTPClient(
        LeanAgent(reactor),
        cookiejar=IndexableCookieJar(policy=_NoCookies()),
        data_to_body_producer=BytesProducer,
    )
    urls: dict[str, _URI] = {}

    def issue(method: str, uri: str, headers: Any, data: Any) -> Deferred[Any]:
        url = urls.get(uri)
        if url is None:
            if len(urls) >= _CACHE_SIZE:
                urls.clear()
            url = urls[uri] = _uri(uri)
        return client.request(
            method, url, headers=headers, data=data, allow_redirects=False, unbuffered=True
        )

    return issue


def _success(body: bytes, response: Any, start: float) -> dict[str, Any]:
    headers = {
        name.decode("latin-1").lower(): values[-1].decode("utf-8", "replace")
        for name, values in response.headers.getAllRawHeaders()
    }
    if headers.get("content-encoding") == "":
        # treq's ContentDecoderAgent leaves an empty one where there was none.
        del headers["content-encoding"]
    return {
        "Success": {
            "headers": headers,
            "status": response.code,
            "content": body.decode("utf-8", "replace"),
            "duration_msec": int((time.monotonic() - start) * 1000),
        }
    }


def _read(response: Any, start: float) -> Deferred[dict[str, Any]]:
    return response.content().addCallback(_success, response, start)


def _failure(reason: Failure, start: float) -> dict[str, Any]:
    # Twisted's own client wraps it: ResponseNeverReceived([CancelledError]).
    wrapped = getattr(reason.value, "reasons", ())
    if reason.check(CancelledError) or any(r.check(CancelledError) for r in wrapped):
        error = "timeout elapsed"
    else:
        error = str(reason.value) or reason.type.__name__  # type: ignore[union-attr]
    return {"Failure": {"error": error, "duration_msec": int((time.monotonic() - start) * 1000)}}


def _cancel_left(calls: list[Deferred[Any]]) -> None:
    # A no-op for the items already answered; an item still waiting, even on
    # a Deferred it is chained to, fails with CancelledError.
    for d in calls:
        d.cancel()


def _answer(results: list[tuple[bool, Any]], timer: Any) -> bytes:
    if timer.active():
        timer.cancel()
    return _encode({"responses": [outcome for _, outcome in results]})


def run_batch(reactor: Any, issue: Issue, timeout_msec: int, items: list[Any]) -> Deferred[bytes]:
    start = time.monotonic()
    calls: list[Deferred[Any]] = []
    for item in items:
        try:
            body = item.get("body")
            d = issue(
                item.get("method", "GET"),
                item["uri"],
                item.get("headers") or None,
                body.encode("utf-8") if body is not None else None,
            )
        except Exception as e:
            # An item that cannot even be sent fails alone, at once.
            calls.append(succeed({"Failure": {"error": str(e), "duration_msec": 0}}))
            continue
        calls.append(d.addCallback(_read, start).addErrback(_failure, start))
    timer = reactor.callLater(timeout_msec / 1000, _cancel_left, calls)
    batch: Deferred[Any] = DeferredList(calls)
    return batch.addCallback(_answer, timer)


# --------------------------------------------------------------------------
# Inbound


class QuietSite(Site):
    """A Site with no access log and no start/stop lines."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


def make_site(reactor: Any, issue: Issue) -> QuietSite:
    """The Klein app on ``POST /multiplex``, with ``issue`` for each item."""
    from klein import Klein  # it imports the reactor: after main() chose one

    app = Klein()

    @app.route("/multiplex", methods=["POST"])
    def multiplex(request: Any) -> Any:
        request.setHeader(b"content-type", JSON)
        try:
            document = json.loads(request.content.read())
            timeout_msec = document["timeout_msec"]
            items = document["requests"]
            if not isinstance(timeout_msec, int) or timeout_msec < 0:
                raise ValueError("timeout_msec must be a non-negative integer")
            if not isinstance(items, list) or not items:
                raise ValueError("requests must be a non-empty array")
        except (ValueError, KeyError, TypeError) as e:
            request.setResponseCode(400)
            return _encode({"error": f"bad batch: {e}"})
        return run_batch(reactor, issue, timeout_msec, items)

    @app.route("/healthz", methods=["GET"])
    @app.route("/", methods=["GET"])
    def healthz(request: Any) -> bytes:
        request.setHeader(b"content-type", JSON)
        return HEALTHY

    return QuietSite(app.resource())


def serve(description: str, make_issue: Callable[[Any], Issue]) -> None:
    """
    Parse ``--host``/``--port``, install the epoll reactor and serve the
    Klein app with the requests ``make_issue(reactor)`` makes.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor as installed

    reactor: Any = installed
    site = make_site(reactor, make_issue(reactor))
    reactor.listenTCP(args.port, site, interface=args.host)
    reactor.run()


def main() -> None:
    serve(__doc__.split("\n\n")[0], lean_issue)


if __name__ == "__main__":
    main()
