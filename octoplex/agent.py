"""
The ``IAgent`` that treq's ``HTTPClient`` is given: it sends each request
over a connection from the shared pool.

It does what ``twisted.web.client.Agent.usingEndpointFactory`` did here,
with less work per request:

- a request URI is parsed once per distinct URI (``Agent`` parses it with
  ``URI.fromBytes`` on every request), with its pool key, origin-form path
  and ``Host`` value;
- the endpoint of a new connection (DNS, egress policy, TLS) is made only
  when a new connection is opened, not for every request: most go out on
  a pooled connection;
- a request on an idle pooled connection is written at once
  (:meth:`octoplex.pool.OctoplexPool.request`), with no Deferred between
  the pool and the connection.

gzip responses are taken away from the ``ContentDecoderAgent`` that treq
always adds, whose decoder inflates each chunk with no bound (a small bomb
would exhaust memory), by the pool's protocol (:mod:`octoplex.http11`), and
left to :mod:`octoplex.body`'s reader, which decodes within the response
size limit.

It uses public API (``IAgentEndpointFactory.endpointForURI``,
``URI.fromBytes``) and one private name, ``twisted.web._newclient.Request``,
the request object that ``Agent._requestWithEndpoint`` built and the pool's
protocol sends; it is guarded by tests/test_private_api.py, and setup.py
pins Twisted below 27.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.web._newclient import Request
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from octoplex.hedging import Route
from octoplex.pool import OctoplexPool
from octoplex.timings import Timings

__all__ = ["TARGET_CACHE_SIZE", "UpstreamAgent"]

#: Distinct request URIs whose parsed form is kept.
TARGET_CACHE_SIZE = 4096


class _Endpoint:
    """
    The endpoint of a new connection for one request, made only if the pool
    opens one (its ``connect`` is called).
    """

    __slots__ = ("_factory", "_route", "_timings", "_uri")

    def __init__(
        self,
        factory: IAgentEndpointFactory,
        uri: URI,
        timings: Timings | None,
        route: Route | None = None,
    ) -> None:
        self._factory = factory
        self._uri = uri
        self._timings = timings
        self._route = route

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        try:
            if self._timings is None and self._route is None:
                endpoint = self._factory.endpointForURI(self._uri)
            else:
                # octoplex.endpoints' factory marks the DNS lookup and the
                # connect of a new connection in the timings, and notes the
                # address dialled in the route (dialling its avoided one last).
                timed: Any = self._factory
                endpoint = timed.endpointForURI(self._uri, self._timings, self._route)
            return endpoint.connect(protocolFactory)
        except Exception:
            return fail()

    def elsewhere(self, avoid: str) -> bool:
        """
        Whether a new connection could go to another address than
        ``avoid`` (see :meth:`octoplex.pool.OctoplexPool.request`).
        """
        elsewhere = getattr(self._factory, "elsewhere", None)
        return elsewhere is not None and bool(elsewhere(self._uri, avoid))


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

    def __init__(self, pool: OctoplexPool, endpoints: IAgentEndpointFactory) -> None:
        self._pool = pool
        self._endpoints = endpoints
        self._targets: OrderedDict[bytes, _Target] = OrderedDict()
        #: The timings and the route (octoplex.hedging.Route) of the
        #: request about to come, set by the caller of treq around its call
        #: (treq passes nothing else along).
        self.next_timings: Timings | None = None
        self.next_route: Route | None = None

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
        route, self.next_route = self.next_route, None
        try:
            target = self._target(uri)
        except Exception:
            return fail()
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            # treq's ContentDecoderAgent has copied them (to add
            # Accept-Encoding): ours to change.
            headers.addRawHeader(b"Host", target.host)
        request = Request(method, target.path, headers, bodyProducer, persistent=True)
        # Set even when None: octoplex.http11 reads it as an attribute,
        # neither raising for its absence nor reading the instance's
        # __dict__ (which would make the request a dict of its own, 64
        # bytes for as long as it is in flight).
        request.timings = timings  # type: ignore[attr-defined]
        endpoint = _Endpoint(self._endpoints, target.uri, timings, route)
        return self._pool.request(target.key, endpoint, request, route)  # type: ignore[arg-type]
