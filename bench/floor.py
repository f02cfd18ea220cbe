"""
The CPU floor of each layer an Octoplex sub-request passes through, with
no sockets: how many microseconds one request costs in treq alone, in
Twisted's HTTP/1.1 client protocol alone, in Octoplex's own
(octoplex.http11), and in a C parser, each timed in-process over in-memory
stubs (a null agent, a StringTransport).

These floors bound what any tuning below them can reach: a sub-request
cannot cost less CPU than the layers it must cross.  ``bench/run.py``
measures the whole daemon; this says where its time must go.

    python3 bench/floor.py            # about 10 s
    python3 bench/floor.py --json bench/results/floor.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from treq.client import HTTPClient
from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.web._newclient import HTTP11ClientProtocol, Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from octoplex.http11 import UpstreamProtocol
from octoplex.wire import _check_uri

#: nginx's answer in bench/run.py: its status line and headers, byte for byte.
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Sat, 28 Nov 2026 11:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Length: 12\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
    b"hello world\n"
)


@implementer(IResponse)
class _Response:
    version = (b"HTTP", 1, 1)
    code = 200
    phrase = b"OK"
    length = 12
    request = None
    previousResponse = None

    def __init__(self) -> None:
        self.headers = Headers({b"content-type": [b"text/plain"], b"server": [b"nginx"]})

    def deliverBody(self, protocol: Any) -> None:
        pass

    def setPreviousResponse(self, response: Any) -> None:
        pass


@implementer(IAgent)
class _NullAgent:
    """Answers every request at once with the same response: only treq's work is left."""

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Any:
        return succeed(_Response())


class _NoCookies(DefaultCookiePolicy):
    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False

    def return_ok(self, cookie: Any, request: Any) -> bool:
        return False


class _Sink(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)


def _treq() -> Callable[[], None]:
    client = HTTPClient(_NullAgent(), cookiejar=CookieJar(_NoCookies()))  # type: ignore[arg-type]
    url = _check_uri("http://127.0.0.1:8080/hello")

    def one() -> None:
        client.request(
            "GET",
            url,
            headers=Headers({b"x-request": [b"1"]}),
            allow_redirects=False,
            unbuffered=True,
        )

    return one


def _exchange(protocol: Any) -> Callable[[], None]:
    """
    One request written and nginx's response parsed by ``protocol``, an
    HTTP/1.1 client protocol on a StringTransport.
    """
    transport = StringTransport()
    protocol.makeConnection(transport)

    def one() -> None:
        request = Request(
            b"GET",
            b"/hello",
            Headers({b"host": [b"127.0.0.1:8080"], b"x-request": [b"1"]}),
            None,
            persistent=True,
        )
        d = protocol.request(request)
        responses: list[Any] = []
        d.addCallback(responses.append)
        transport.clear()
        protocol.dataReceived(RESPONSE)
        responses[0].deliverBody(_Sink())

    return one


def _httptools() -> Callable[[], None] | None:
    try:
        import httptools  # type: ignore[import-not-found]
    except ImportError:
        return None

    class Callbacks:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []
            self.body: list[bytes] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

    def one() -> None:
        callbacks = Callbacks()
        parser = httptools.HttpResponseParser(callbacks)
        parser.feed_data(RESPONSE)

    return one


class _Pending(StringTransport):
    """A connection whose writes are answered later, by the loop in _stack()."""

    answer: list[Any]

    def write(self, data: bytes) -> None:
        self.answer.append(self.protocol)

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def _stack() -> Callable[[], None]:
    """
    A batch of 10 through Octoplex's own stack in-process: the JSON parsed,
    the multiplexer, the client with its caps, treq, the agent, the pool,
    octoplex.http11 and the body reader, nginx's response fed back, the
    answer encoded.  Only sockets, the reactor and the inbound HTTP server
    are left out.  Per sub-request (a tenth of the batch).
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock

    from octoplex.client import PoolSettings, UpstreamClient
    from octoplex.egress import EgressPolicy
    from octoplex.limits import Limits
    from octoplex.multiplexer import Multiplexer
    from octoplex.wire import encode, parse_batch

    answer: list[Any] = []

    class Endpoint:
        def connect(self, factory: Any) -> Any:
            protocol = factory.buildProtocol(None)
            transport = _Pending(peerAddress=IPv4Address("TCP", "127.0.0.1", 8080))
            transport.answer = answer
            transport.protocol = protocol
            protocol.makeConnection(transport)
            return succeed(protocol)

    clock = Clock()
    client = UpstreamClient(
        clock, PoolSettings(), 1 << 20, egress=EgressPolicy.from_strings(allow=["127.0.0.0/8"])
    )
    # Every connection is an in-memory one (a bench-only shortcut).
    client._endpoints.endpointForURI = lambda uri: Endpoint()  # type: ignore[method-assign]
    multiplexer = Multiplexer(clock, client)
    body = json.dumps(
        {"timeout_msec": 5000, "requests": [{"uri": "http://127.0.0.1:8080/hello"}] * 10}
    ).encode()
    limits = Limits()

    def batch() -> None:
        outcomes: list[Any] = []
        multiplexer.run(parse_batch(body, limits), "b").addCallback(outcomes.append)
        while answer:
            answer.pop(0).dataReceived(RESPONSE)
        clock.advance(0)
        encode({"responses": outcomes[0].outcomes})

    return batch


def _inbound() -> Callable[[], None]:
    """
    twisted.web and Klein alone: one keep-alive POST of a batch of 10
    parsed by twisted.web's HTTPChannel, routed by Klein to a handler that
    answers a fixed JSON body at once, the answer written to a
    StringTransport.  The fixed inbound cost of every batch in this design.
    """
    from klein import Klein
    from twisted.web.server import Site

    app = Klein()
    answer = json.dumps({"responses": []}).encode()

    @app.route("/multiplex", methods=["POST"])
    def multiplex(request: Any) -> bytes:
        request.content.read()
        request.setHeader(b"content-type", b"application/json")
        return answer

    body = json.dumps(
        {"timeout_msec": 5000, "requests": [{"uri": "http://127.0.0.1:8080/hello"}] * 10}
    ).encode()
    post = (
        b"POST /multiplex HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    site = Site(app.resource())
    site.logFile = None  # no access log line (Octoplex writes its own)
    site.log = lambda request: None  # type: ignore[method-assign]
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)  # type: ignore[union-attr]

    def one() -> None:
        channel.dataReceived(post)  # type: ignore[union-attr]
        if b"200 OK" not in transport.value()[:20]:
            raise RuntimeError(f"unexpected answer: {transport.value()[:200]!r}")
        transport.clear()

    return one


def _request_bytes() -> Callable[[], None]:
    def one() -> None:
        headers = [(b"Host", b"127.0.0.1:8080"), (b"X-Request", b"1")]
        b"".join(
            [b"GET /hello HTTP/1.1\r\n"] + [n + b": " + v + b"\r\n" for n, v in headers] + [b"\r\n"]
        )

    return one


def measure(one: Callable[[], None], seconds: float) -> tuple[float, int]:
    """
    Microseconds per call of ``one``, the best of several rounds within
    ``seconds`` (the least disturbed by the rest of a shared machine).
    """
    for _ in range(200):
        one()
    best = float("inf")
    calls = 0
    deadline = time.perf_counter() + seconds
    gc.collect()
    while time.perf_counter() < deadline:
        n = 2000
        start = time.perf_counter()
        for _ in range(n):
            one()
        best = min(best, (time.perf_counter() - start) / n)
        calls += n
    return best * 1e6, calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per layer (default: 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    layers = [
        ("treq: HTTPClient.request over a null agent (its wrappers, URL, cookies)", _treq()),
        (
            "Twisted: HTTP11ClientProtocol, one request written and nginx's response parsed",
            _exchange(HTTP11ClientProtocol()),
        ),
        (
            "Octoplex: octoplex.http11.UpstreamProtocol, the same exchange (httptools)",
            _exchange(UpstreamProtocol()),
        ),
        ("httptools: nginx's response parsed in C", _httptools()),
        ("the request's bytes built by hand", _request_bytes()),
        (
            "twisted.web + Klein: a batch of 10 POSTed, routed to a handler that answers "
            "at once, per sub-request",
            _inbound(),
        ),
        (
            "Octoplex's client stack in-process, a batch of 10 (JSON in, multiplexer, "
            "client, treq, agent, pool, http11, body, JSON out), per sub-request",
            _stack(),
        ),
    ]
    rows = []
    for label, one in layers:
        if one is None:
            print(f"{label}: not installed, left out")
            continue
        micros, calls = measure(one, args.seconds)
        if "a batch of 10" in label:
            micros /= 10
        rows.append({"layer": label, "us_per_request": round(micros, 1), "calls": calls})
        print(f"  {label}: {micros:.1f} us ({calls} calls)", flush=True)
    print()
    print("| layer, per sub-request | CPU us (best round) | at most sub-requests/s on one core |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['layer']} | {row['us_per_request']} | {1e6 / row['us_per_request']:,.0f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"layers": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
