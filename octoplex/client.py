"""
The one outbound HTTP client: a shared keep-alive pool behind treq.

:class:`UpstreamClient` is a service that owns the daemon's single
``HTTPConnectionPool`` and the single ``treq.client.HTTPClient`` built on it.
Every request of every batch goes through :meth:`UpstreamClient.fetch`, and
stopping the service closes the pooled connections.

What a multiplexer needs that treq does not give by default:

- no cookie jar: treq's default jar stores an upstream's ``Set-Cookie`` and
  replays it on later requests of *other callers*;
- no redirects: a 3xx is the caller's answer, as in the original;
- a body reader with a size cap that a deadline can cancel (:mod:`body`);
- request bodies written in one go rather than through a cooperator.
"""

from __future__ import annotations

from http.cookiejar import Cookie, CookieJar, DefaultCookiePolicy
from typing import Any

import attr
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.client import Agent, HostnameCachingHTTPSPolicy, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from octoplex.body import read_body
from octoplex.dns import CachingResolver
from octoplex.endpoints import UpstreamEndpointFactory
from octoplex.tls import UpstreamTLSPolicy
from octoplex.wire import UpstreamRequest

__all__ = ["PoolSettings", "UpstreamClient", "UpstreamResponse"]

#: Upstream hosts whose TLS context is kept.
TLS_CONTEXT_HOSTS = 1000

# Twisted sets a length of 0 for these, whatever the upstream said.
_NO_BODY_CODES = frozenset({204, 304})


class _NoCookies(DefaultCookiePolicy):
    """
    A cookie policy that accepts no cookie and returns none, so nothing an
    upstream sets can reach another request.
    """

    def set_ok(self, cookie: Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: Cookie, request: Any) -> bool:
        return False


@implementer(IBodyProducer)
class _BytesProducer:
    """
    Write a body that is already in memory in one call.  treq's default
    ``FileBodyProducer`` feeds it through a cooperator, a reactor turn later.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@attr.s(slots=True, frozen=True, auto_attribs=True)
class UpstreamResponse:
    """
    A complete upstream response.

    :ivar status: the status code.
    :ivar headers: the response headers, as received.
    :ivar body: the body, decoded if it was gzip-encoded.
    """

    status: int
    headers: Headers
    body: bytes


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class PoolSettings:
    """
    How the shared connection pool behaves.

    :ivar max_idle_per_host: idle keep-alive connections kept per
        ``(scheme, host, port)``.  Twisted's default of 2 makes a batch of 40
        requests to one host reconnect 38 times on the next batch.
    :ivar idle_timeout: seconds an idle connection is kept.
    :ivar connect_timeout: seconds a TCP connect may take (a batch's
        deadline cuts it shorter).
    """

    max_idle_per_host: int = 32
    idle_timeout: float = 30.0
    connect_timeout: float = 10.0


class UpstreamClient(Service):
    """
    The service that owns the shared pool and client.

    :param reactor: the reactor to connect and time with (TCP, SSL, time).
    :param settings: the pool's policy.
    :param max_response_bytes: the most body bytes read from one response;
        a larger body fails that request.
    :param tls_policy: the TLS policy for ``https`` upstreams; by default an
        :class:`~octoplex.tls.UpstreamTLSPolicy` that verifies certificates
        against the platform's trust store.  One TLS context is kept per host.
    :param resolver: the caching resolver installed on ``reactor``, if any;
        it lets a failed lookup say why.
    """

    name = "upstream-client"

    def __init__(
        self,
        reactor: Any,
        settings: PoolSettings,
        max_response_bytes: int,
        tls_policy: IPolicyForHTTPS | None = None,
        resolver: CachingResolver | None = None,
    ) -> None:
        self._reactor = reactor
        self._max_response_bytes = max_response_bytes
        # One TLS context per upstream host, not one per connection (a new
        # context costs about 15 ms of CPU).
        tls_policy = HostnameCachingHTTPSPolicy(
            tls_policy or UpstreamTLSPolicy(), cacheSize=TLS_CONTEXT_HOSTS
        )
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = settings.max_idle_per_host
        # Typed int in Twisted, but it is only ever given to callLater.
        self._pool.cachedConnectionTimeout = settings.idle_timeout  # type: ignore[assignment]
        endpoints = UpstreamEndpointFactory(reactor, tls_policy, settings.connect_timeout, resolver)
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool)
        self._http = HTTPClient(
            agent,
            cookiejar=CookieJar(_NoCookies()),  # type: ignore[arg-type]
            data_to_body_producer=_BytesProducer,
        )

    def fetch(self, request: UpstreamRequest) -> Deferred[UpstreamResponse]:
        """
        Send one request and read its whole response.

        :param request: the request to send.
        :return: a Deferred that fires with the response, or fails with why
            it could not be had.  Cancelling it closes the connection, at
            whatever stage the exchange is.
        """
        d = self._http.request(
            request.method.decode("ascii"),
            request.url,
            headers=request.headers,
            data=request.body,
            allow_redirects=False,
            unbuffered=True,
            reactor=self._reactor,
        )
        return d.addCallback(self._read)

    def _read(self, response: IResponse) -> Deferred[UpstreamResponse]:
        headers = response.headers
        if headers.getRawHeaders(b"content-encoding") == [b""]:
            # ContentDecoderAgent (which treq always adds) sets an empty
            # Content-Encoding on a response that had none; the caller must
            # see only what the upstream sent.
            headers.removeHeader(b"content-encoding")
        if (
            isinstance(response.length, int)
            and response.code not in _NO_BODY_CODES
            and not headers.hasHeader(b"content-length")
        ):
            # Twisted's parser keeps Content-Length among the connection
            # headers, out of response.headers; the original reported it.
            headers.setRawHeaders(b"content-length", [b"%d" % (response.length,)])
        d = read_body(response, self._max_response_bytes)
        return d.addCallback(lambda body: UpstreamResponse(response.code, response.headers, body))

    def stopService(self) -> Deferred[None]:
        """
        Close every pooled connection.
        """
        super().stopService()
        return self._pool.closeCachedConnections()
