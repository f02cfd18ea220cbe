"""
The ``IAgent`` that treq's ``HTTPClient`` is given: it sends each request
over a connection from the shared pool.

It does what ``twisted.web.client.Agent.usingEndpointFactory`` did here,
with less work per request:

- a request URI is parsed once per distinct URI (``Agent`` parses it with
  ``URI.fromBytes`` on every request), with its pool key, origin-form path
  and ``Host`` value;
- it takes gzip responses away from the ``ContentDecoderAgent`` that treq
  always adds, whose decoder inflates each chunk with no bound (a small bomb
  would exhaust memory), and leaves them to :func:`octoplex.body.read_body`,
  which decodes within the response size limit.  (This was a separate
  wrapping agent, one more Deferred per request.)

It uses public API (``HTTPConnectionPool.getConnection``,
``IAgentEndpointFactory.endpointForURI``, ``URI.fromBytes``) and one
private name, ``twisted.web._newclient.Request``, the request object that
``Agent._requestWithEndpoint`` built and the pool's protocol sends; it is
guarded by tests/test_private_api.py, and setup.py pins Twisted below 27.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.components import proxyForInterface
from twisted.web._newclient import Request
from twisted.web.client import URI, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from octoplex.timings import Timings

__all__ = ["TARGET_CACHE_SIZE", "UpstreamAgent"]

#: Distinct request URIs whose parsed form is kept.
TARGET_CACHE_SIZE = 4096


class _GzipResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """
    A response whose body is gzip-encoded and still to be decoded.
    """

    gzip = True


class _Target:
    """
    What a request URI says about where and how to send it.
    """

    __slots__ = ("host", "key", "path", "uri")

    def __init__(self, uri: bytes) -> None:
        parsed = URI.fromBytes(uri)
        self.uri = parsed
        self.key = (parsed.scheme, parsed.host, parsed.port)
        self.path = parsed.originForm
        host = parsed.host
        if b":" in host and not host.startswith(b"["):
            host = b"[" + host + b"]"
        if (parsed.scheme, parsed.port) in ((b"http", 80), (b"https", 443)):
            self.host = host
        else:
            self.host = b"%b:%d" % (host, parsed.port)


@implementer(IAgent)
class UpstreamAgent:
    """
    Send requests over ``pool``'s persistent connections, opened through
    ``endpoints``.

    :param pool: the shared connection pool.
    :param endpoints: makes the endpoint for a URI (egress policy, DNS, TLS).
    """

    def __init__(self, pool: HTTPConnectionPool, endpoints: IAgentEndpointFactory) -> None:
        self._pool = pool
        self._endpoints = endpoints
        self._targets: OrderedDict[bytes, _Target] = OrderedDict()
        #: The timings of the request about to come, set by the caller of
        #: treq around its call (treq passes nothing else along).
        self.next_timings: Timings | None = None

    def _target(self, uri: bytes) -> _Target:
        target = self._targets.get(uri)
        if target is None:
            target = self._targets[uri] = _Target(uri)
            if len(self._targets) > TARGET_CACHE_SIZE:
                self._targets.popitem(last=False)
        return target

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        timings, self.next_timings = self.next_timings, None
        try:
            target = self._target(uri)
            if timings is None:
                endpoint = self._endpoints.endpointForURI(target.uri)
            else:
                # octoplex.endpoints' factory marks the DNS lookup and the
                # connect of a new connection in them.
                timed: Any = self._endpoints
                endpoint = timed.endpointForURI(target.uri, timings)
        except Exception:
            return fail()
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            # treq's ContentDecoderAgent has copied them (to add
            # Accept-Encoding): ours to change.
            headers.addRawHeader(b"Host", target.host)
        request = Request(method, target.path, headers, bodyProducer, persistent=True)
        if timings is not None:
            request.timings = timings  # type: ignore[attr-defined]
        d: Deferred[Any] = self._pool.getConnection(target.key, endpoint)
        d.addCallback(_send, request)
        d.addCallback(_claim_gzip)
        return d


def _send(connection: Any, request: Request) -> Deferred[IResponse]:
    return connection.request(request)


def _claim_gzip(response: Any) -> IResponse:
    encodings = response.headers.getRawHeaders(b"content-encoding") or []
    if not encodings:
        return response
    tokens = [t.strip().lower() for t in b",".join(encodings).split(b",") if t.strip()]
    if tokens in ([b"gzip"], [b"x-gzip"]):
        response.headers.removeHeader(b"content-encoding")
        return _GzipResponse(response)
    return response
