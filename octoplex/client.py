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
- request bodies written in one go rather than through a cooperator;
- circuit breaking per upstream, when asked for (:mod:`circuits`): a
  request to an upstream whose circuit is open fails at once, before any
  queue, DNS lookup or connect, and every request let through tells its
  circuit how it went;
- outlier ejection across a host's addresses, when asked for
  (:mod:`outliers`): the pool and the dialler leave out an address that
  misbehaves while its siblings do not.
"""

from __future__ import annotations

from collections.abc import Callable
from http.cookiejar import Cookie, CookieJar, DefaultCookiePolicy
from typing import Any, cast

import attr
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.names import client as names_client
from twisted.python.failure import Failure
from twisted.web.client import HostnameCachingHTTPSPolicy
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from octoplex.agent import UpstreamAgent
from octoplex.body import BodyReader, ResponseBudget, reading
from octoplex.circuits import CLOSED, COUNTED_CAUSES, CircuitOpen, Circuits, CircuitSettings, Ticket
from octoplex.dns import CachingResolver, DNSSettings, nameservers
from octoplex.egress import EgressPolicy
from octoplex.endpoints import UpstreamEndpointFactory
from octoplex.errors import cause, describe
from octoplex.hedging import Route
from octoplex.limits import DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADER_COUNT
from octoplex.metrics import Metrics
from octoplex.outliers import Outliers, OutlierSettings
from octoplex.pool import OctoplexPool
from octoplex.timings import Timings
from octoplex.tls import UpstreamTLSPolicy
from octoplex.wire import UpstreamRequest

__all__ = ["PoolSettings", "QueueTimeout", "UpstreamClient", "UpstreamResponse"]


class QueueTimeout(Exception):
    """
    A request was cancelled (by its batch's deadline) while it still waited
    for a connection: the cap on connections in use was reached.
    """

    def __init__(self, what: str, cap: int) -> None:
        super().__init__(what, cap)
        self.what = what
        self.cap = cap

    def __str__(self) -> str:
        return (
            f"timeout elapsed before a connection to {self.what} was free "
            f"(all {self.cap} in use); the request was never sent"
        )


#: Seconds between the log events that count new connections per address
#: (and between the passes that forget idle hosts' circuits and outliers).
CONNECTION_REPORT_INTERVAL = 60.0

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


class _NoCookieJar(CookieJar):
    """
    The jar for treq's ``CookieAgent``, which treq puts on every request: it
    neither reads a response's cookies nor adds any to a request, so none
    can pass between callers, and the standard library's cookie machinery
    (a URL parse and header scans per request and per response) is not
    run.  Its policy refuses every cookie as well.
    """

    def __init__(self) -> None:
        super().__init__(_NoCookies())

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


@implementer(IBodyProducer)
class _BytesProducer:
    """
    Write a body that is already in memory in one call.  treq's default
    ``FileBodyProducer`` feeds it through a cooperator, a reactor turn later.
    """

    #: It can produce its body again, so a request may be retried.
    replayable = True

    def __init__(self, body: bytes) -> None:
        #: The bytes, which octoplex.http11 writes with the head at once.
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


# Not frozen: attrs' frozen __init__ sets each field through
# object.__setattr__, three times the cost, once per response.
@attr.s(slots=True, auto_attribs=True)
class UpstreamResponse:
    """
    A complete upstream response.

    :ivar status: the status code.
    :ivar headers: the response headers, as received.
    :ivar body: the body, decoded if it was gzip-encoded.
    :ivar content_encoding: ``"gzip"`` if it was, else ``None``.
    :ivar raw_headers: every header line as received, names unchanged, in
        order (connection headers such as ``Content-Length`` included).
    """

    status: int
    headers: Headers
    body: bytes
    content_encoding: str | None = None
    raw_headers: list[tuple[bytes, bytes]] = attr.Factory(list)


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
    :ivar max_per_host: requests in flight, and so connections in use, per
        ``(scheme, host, port)``; more wait in a queue that their batch's
        deadline can cancel.  Twisted caps only idle connections.
    :ivar max_total: requests in flight over all upstreams; more wait.
    :ivar max_requests: requests one connection carries before it is closed.
    :ivar max_age: seconds after which a connection is closed when idle.
    :ivar connect_grace: seconds a connection whose request was cancelled
        (by a deadline) may still take to open; it is then pooled, warm for
        the next batch.
    """

    max_idle_per_host: int = 128
    idle_timeout: float = 30.0
    connect_timeout: float = 10.0
    max_per_host: int = 128
    max_total: int = 512
    max_requests: int = 1000
    max_age: float = 120.0
    connect_grace: float = 5.0


class _Fetch(Deferred[UpstreamResponse]):
    """
    One request sent with both its slots taken at once, as the multiplexer
    holds it: it fires once the whole response is read (or with why it
    could not be), its slots freed just before.

    It stands for treq's Deferred of the response's head and then for the
    body's reader, so a response goes to the multiplexer with no Deferred
    chained in between.  Cancelling it cancels the request, or aborts the
    body's reader, whichever is under way.
    """

    def __init__(
        self,
        client: UpstreamClient,
        host: DeferredSemaphore,
        key: Any,
        overall: DeferredSemaphore,
        budget: ResponseBudget | None,
        timings: Timings | None,
    ) -> None:
        super().__init__(_cancel_fetch)
        #: Called once the response's head is in, if set (a hedged request).
        self.on_head: Callable[[], None] | None = None
        self._client = client
        self._slots: tuple[DeferredSemaphore, Any, DeferredSemaphore] | None = (
            host,
            key,
            overall,
        )
        self._budget = budget
        self._timings = timings
        self._sent: Deferred[Any] | None = None
        self._body: BodyReader | None = None

    def start(self, sent: Deferred[Any]) -> None:
        """Wait for ``sent``, treq's Deferred of the response's head."""
        self._sent = sent
        sent.addBoth(self._headed)

    def _headed(self, result: Any) -> None:
        self._sent = None
        if isinstance(result, Failure):
            self._end(result)
            return
        if self.on_head is not None:
            self.on_head()
        try:
            self._body = self._client._reader(result, self._budget, self._timings, self._end)
        except Exception:
            self._end(Failure())

    def _release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            self._client._release(*slots)

    def _end(self, result: UpstreamResponse | Failure) -> None:
        self._body = None
        self._release()
        if self.called:
            # Cancelled, and answered as such, before this came.
            return
        if isinstance(result, Failure):
            self.errback(result)
        else:
            self.callback(result)

    def _cancelled(self) -> None:
        if self._sent is not None:
            # The head is awaited: cancelling treq's Deferred ends it (the
            # connection is closed), and _headed hears how.
            self._sent.cancel()
        elif self._body is not None:
            self._body.abort()
            self._body = None
            self._release()


def _cancel_fetch(fetch: Deferred[Any]) -> None:
    # A _Fetch's canceller (a plain function: no bound method per request).
    cast(_Fetch, fetch)._cancelled()


class _GuardedFetch(_Fetch):
    """
    A :class:`_Fetch` let through its upstream's circuit: it tells its
    circuit ticket how it went.
    """

    def __init__(
        self,
        client: UpstreamClient,
        host: DeferredSemaphore,
        key: Any,
        overall: DeferredSemaphore,
        budget: ResponseBudget | None,
        timings: Timings | None,
        ticket: Ticket,
    ) -> None:
        super().__init__(client, host, key, overall, budget, timings)
        self._ticket = ticket

    def _end(self, result: UpstreamResponse | Failure) -> None:
        if isinstance(result, Failure):
            self._ticket.failed(result)
        else:
            self._ticket.answered(result.status)
        super()._end(result)

    def _cancelled(self) -> None:
        super()._cancelled()
        # Cut short (a deadline, or the caller left): it says nothing of the
        # upstream, unless the pool is finishing its connection, which then
        # tells the ticket (the ticket ignores this).
        self._ticket.neutral()


def _judge(failure: Failure) -> str | None:
    """
    Why a request's failure counts against its upstream's circuit (a few
    words, as its caller reads them), or ``None`` if it says nothing of the
    upstream: a cancellation (the caller's deadline or departure), or a
    cause outside :data:`~octoplex.circuits.COUNTED_CAUSES`.
    """
    if failure.check(CancelledError, QueueTimeout):
        return None
    reasons = getattr(failure.value, "reasons", None)
    if reasons and any(reason.check(CancelledError) for reason in reasons):
        return None
    if cause(failure) not in COUNTED_CAUSES:
        return None
    return describe(failure)


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
    :param resolver: the caching resolver that host names are dialled
        through, over all their addresses; by default a new one that asks
        the name servers of ``/etc/resolv.conf``.
    :param egress: which upstream addresses may be dialled; by default
        :class:`~octoplex.egress.EgressPolicy`'s, which refuses loopback,
        private, link-local and other internal ranges.
    :param max_header_count: header lines allowed in an upstream response.
    :param max_header_bytes: bytes allowed in its status line and headers.
    :param metrics: counts connections, the wait for one, egress refusals
        and body bytes; a fresh :class:`~octoplex.metrics.Metrics` by default.
    :param circuits: circuit breaking per upstream; off by default.
    :param outliers: outlier ejection across a host's addresses; off by
        default.
    """

    name = "upstream-client"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        settings: PoolSettings,
        max_response_bytes: int,
        tls_policy: IPolicyForHTTPS | None = None,
        resolver: CachingResolver | None = None,
        egress: EgressPolicy | None = None,
        max_header_count: int = DEFAULT_MAX_HEADER_COUNT,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        metrics: Metrics | None = None,
        circuits: CircuitSettings | None = None,
        outliers: OutlierSettings | None = None,
    ) -> None:
        self._reactor = reactor
        self._metrics = metrics = Metrics() if metrics is None else metrics
        self._max_response_bytes = max_response_bytes
        # One TLS context per upstream host, not one per connection (a new
        # context costs about 15 ms of CPU).
        tls_policy = HostnameCachingHTTPSPolicy(
            tls_policy or UpstreamTLSPolicy(), cacheSize=TLS_CONTEXT_HOSTS
        )
        self._settings = settings
        self._pool = OctoplexPool(
            reactor,
            settings.max_requests,
            settings.max_age,
            settings.connect_grace,
            max_header_count,
            max_header_bytes,
            metrics,
        )
        self._pool.maxPersistentPerHost = settings.max_idle_per_host
        # Typed int in Twisted, but it is only ever given to callLater.
        self._pool.cachedConnectionTimeout = settings.idle_timeout  # type: ignore[assignment]
        if resolver is None:
            resolver = CachingResolver(
                reactor,
                names_client.Resolver(servers=nameservers(), reactor=reactor),
                DNSSettings(),
            )
        self._endpoints = endpoints = UpstreamEndpointFactory(
            reactor,
            tls_policy,
            settings.connect_timeout,
            resolver,
            EgressPolicy() if egress is None else egress,
            metrics,
        )
        self._report = LoopingCall(self._every_minute)
        self._report.clock = reactor
        self._agent = UpstreamAgent(self._pool, endpoints)
        self._http = HTTPClient(
            self._agent,
            cookiejar=_NoCookieJar(),  # type: ignore[arg-type]
            data_to_body_producer=_BytesProducer,
        )
        self._all = DeferredSemaphore(settings.max_total)
        self._hosts: dict[tuple[str, str, int | None], DeferredSemaphore] = {}
        #: The circuits, if circuit breaking is on.
        self._circuits: Circuits | None = None
        self._circuit_settings = CircuitSettings()
        self._set_circuits(CircuitSettings() if circuits is None else circuits)
        metrics.circuit_source = self._circuit_states
        self._outlier_settings = OutlierSettings()
        self._set_outliers(OutlierSettings() if outliers is None else outliers)
        metrics.ejected_source = self._ejected

    def _set_outliers(self, settings: OutlierSettings) -> None:
        """
        Turn outlier ejection on or off, or change its settings; the
        addresses' states stand while it stays on.
        """
        outliers = self._pool.outliers
        if not settings.enabled:
            outliers = None
        elif outliers is None:
            outliers = Outliers(self._reactor, settings, self._metrics)
        else:
            outliers.reconfigure(settings)
        # The dialler and the pool share it.
        self._pool.outliers = self._endpoints.outliers = outliers
        self._outlier_settings = settings

    def _ejected(self) -> Any:
        outliers = self._pool.outliers
        return () if outliers is None else outliers.ejected()

    @property
    def outliers(self) -> Outliers | None:
        """The addresses' states, if outlier ejection is on."""
        return self._pool.outliers

    def _set_circuits(self, settings: CircuitSettings) -> None:
        """
        Turn circuit breaking on or off, or change its settings; the
        circuits' states stand while it stays on.
        """
        if not settings.enabled:
            self._circuits = None
        elif self._circuits is None:
            self._circuits = Circuits(self._reactor, settings, self._metrics, _judge)
        else:
            self._circuits.reconfigure(settings)
        self._circuit_settings = settings

    def _circuit_states(self) -> Any:
        circuits = self._circuits
        return () if circuits is None else circuits.states()

    @property
    def circuits(self) -> Circuits | None:
        """The circuits, if circuit breaking is on."""
        return self._circuits

    def reconfigure(
        self,
        max_response_bytes: int,
        max_header_count: int,
        max_header_bytes: int,
        egress: EgressPolicy,
        circuits: CircuitSettings | None = None,
        outliers: OutlierSettings | None = None,
    ) -> None:
        """
        Change the limits, the egress policy and, if given, the circuit
        breaking and outlier ejection settings, for the requests and connections to come (a
        reload).  A new egress policy retires every pooled connection, since
        each was checked when it was opened.  Circuits keep their states
        while circuit breaking stays on.
        """
        if circuits is not None and circuits != self._circuit_settings:
            self._set_circuits(circuits)
        if outliers is not None and outliers != self._outlier_settings:
            self._set_outliers(outliers)
        self._max_response_bytes = max_response_bytes
        self._pool.head_limits = (max_header_count, max_header_bytes)
        if egress != self._endpoints.egress:
            self._endpoints.egress = egress
            # Connections were checked against the old policy when opened.
            self._pool.retire_all()

    def fetch(
        self,
        request: UpstreamRequest,
        budget: ResponseBudget | None = None,
        timings: Timings | None = None,
        on_head: Callable[[], None] | None = None,
        route: Route | None = None,
    ) -> Deferred[UpstreamResponse]:
        """
        Send one request and read its whole response.

        :param request: the request to send.
        :param budget: the body bytes its batch may still read, if limited.
        :param timings: marked as the request goes, if its caller wants to
            know where its time went.
        :param on_head: called once the response's head is in, before its
            body is read (a hedged request's attempts race to it); it may
            cancel other fetches, not this one.
        :param route: a hedged request's attempt's route: where it went is
            noted there, and it stays away from the address it avoids if
            it can (:class:`~octoplex.hedging.Route`).
        :return: a Deferred that fires with the response, or fails with why
            it could not be had.  Cancelling it closes the connection, at
            whatever stage the exchange is; cancelling it while it waits for
            a connection fails it with :class:`QueueTimeout`.  With circuit
            breaking on, a request to an upstream whose circuit is open
            fails at once with :class:`~octoplex.circuits.CircuitOpen`.
        """
        url = request.url
        key = (url.scheme, url.host, url.port)
        ticket = None
        if self._circuits is not None:
            try:
                ticket = self._circuits.admit(key)
            except CircuitOpen as e:
                return fail(e)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = DeferredSemaphore(self._settings.max_per_host)
        overall = self._all
        if not (host.tokens and not host.waiting and overall.tokens and not overall.waiting):
            # A cap is reached: wait in its queue, which a deadline cancels.
            return Deferred.fromCoroutine(
                self._fetch(request, budget, host, key, timings, ticket, on_head, route)
            )
        # Both slots are free: take them at once, as acquire() would, without
        # a coroutine and its Deferreds (the usual case).
        host.tokens -= 1
        overall.tokens -= 1
        self._metrics.connection_wait.observe(0.0)
        fetch: _Fetch
        if ticket is None:
            fetch = _Fetch(self, host, key, overall, budget, timings)
            try:
                sent = self._send(request, timings, route)
            except Exception:
                sent = fail()
        else:
            fetch = _GuardedFetch(self, host, key, overall, budget, timings, ticket)
            try:
                sent = self._send_guarded(request, timings, ticket, route)
            except Exception:
                sent = fail()
        if on_head is not None:
            fetch.on_head = on_head
        fetch.start(sent)
        return fetch

    def may_hedge(self, request: UpstreamRequest) -> bool:
        """
        Whether a hedge of ``request`` may be sent as far as its upstream's
        circuit goes: not while it is half-open (its probes decide) or open.
        """
        circuits = self._circuits
        if circuits is None:
            return True
        url = request.url
        return circuits.state((url.scheme, url.host, url.port)) == CLOSED

    def _release(
        self, host: DeferredSemaphore, key: Any, overall: DeferredSemaphore | None
    ) -> None:
        """
        Free a request's slots: on the next reactor turn if a request waits
        for one (a deadline cancels all of a batch's requests in one go, and
        a slot freed by the first must not wake the next one of the same
        batch, only for it to be cancelled after it took a connection); at
        once, with no timer, if none does.
        """
        if host.waiting or self._all.waiting:
            self._reactor.callLater(0, self._released, host, key, overall)
        else:
            self._released(host, key, overall)

    async def _fetch(
        self,
        request: UpstreamRequest,
        budget: ResponseBudget | None,
        host: DeferredSemaphore,
        key: Any,
        timings: Timings | None,
        ticket: Ticket | None = None,
        on_head: Callable[[], None] | None = None,
        route: Route | None = None,
    ) -> UpstreamResponse:
        url = request.url
        # A request queued here holds nothing; the holder's release later
        # forgets the host's entry once nothing is in flight or queued.
        queued = self._reactor.seconds()
        try:
            await self._wait(host, f"{url.host}:{url.port}", self._settings.max_per_host)
            overall = None
            try:
                await self._wait(self._all, "any upstream", self._settings.max_total)
                overall = self._all
                self._metrics.connection_wait.observe(self._reactor.seconds() - queued)
                if ticket is None:
                    response = await self._send(request, timings, route)
                else:
                    response = await self._send_guarded(request, timings, ticket, route)
                if on_head is not None:
                    on_head()
                result = await self._read(response, budget, timings)
            finally:
                self._release(host, key, overall)
        except BaseException:
            if ticket is not None:
                ticket.failed(Failure())
            raise
        if ticket is not None:
            ticket.answered(result.status)
        return result

    def _released(
        self, host: DeferredSemaphore, key: Any, overall: DeferredSemaphore | None
    ) -> None:
        if overall is not None:
            overall.release()
        host.release()
        self._forget(key, host)

    def _forget(self, key: Any, semaphore: DeferredSemaphore) -> None:
        # A host with nothing in flight and nobody waiting needs no entry.
        if semaphore.tokens == semaphore.limit and not semaphore.waiting:
            if self._hosts.get(key) is semaphore:
                del self._hosts[key]

    @staticmethod
    async def _wait(semaphore: DeferredSemaphore, what: str, cap: int) -> None:
        try:
            await semaphore.acquire()
        except CancelledError:
            raise QueueTimeout(what, cap) from None

    def _send(
        self, request: UpstreamRequest, timings: Timings | None, route: Route | None = None
    ) -> Deferred[Any]:
        if timings is None and route is None:
            return self._request(request)
        if timings is not None:
            timings.slot = timings.now()
        # treq calls the agent at once, with no way to pass anything along:
        # the agent takes the timings and the route for the request it is
        # about to get.
        agent = self._agent
        agent.next_timings = timings
        agent.next_route = route
        try:
            return self._request(request)
        finally:
            agent.next_timings = None
            agent.next_route = None

    def _send_guarded(
        self,
        request: UpstreamRequest,
        timings: Timings | None,
        ticket: Ticket,
        route: Route | None = None,
    ) -> Deferred[Any]:
        """
        :meth:`_send`, with the request's circuit ticket handed to the pool
        for the connection it may open (treq passes nothing else along).
        """
        pool = self._pool
        pool.ticket = ticket
        try:
            return self._send(request, timings, route)
        finally:
            pool.ticket = None

    def _request(self, request: UpstreamRequest) -> Deferred[Any]:
        return self._http.request(
            request.method.decode("ascii"),
            request.url,
            headers=request.headers,
            data=request.body,
            allow_redirects=False,
            unbuffered=True,
            reactor=self._reactor,
        )

    def _read(
        self, response: IResponse, budget: ResponseBudget | None, timings: Timings | None = None
    ) -> Deferred[UpstreamResponse]:
        """
        Read ``response``'s body: a Deferred that fires with the whole
        response (the queued path's, :meth:`_fetch`).
        """
        return reading(lambda done: self._reader(response, budget, timings, done))

    def _reader(
        self,
        response: IResponse,
        budget: ResponseBudget | None,
        timings: Timings | None,
        done: Callable[[UpstreamResponse | Failure], None],
    ) -> BodyReader:
        """
        Start reading ``response``'s body, within the response size limit
        and ``budget``; ``done`` is called with the whole response, or why
        it could not be read.  The reader can be aborted.
        """
        headers = response.headers
        inner = getattr(response, "original", response)
        gzip = getattr(inner, "gzip", False)
        raw = getattr(inner, "raw_headers", None)
        if headers.getRawHeaders(b"content-encoding") == [b""]:
            # ContentDecoderAgent (which treq always adds) sets an empty
            # Content-Encoding on a response that had none; the caller must
            # see only what the upstream sent.
            headers.removeHeader(b"content-encoding")
        if (
            not gzip
            and isinstance(response.length, int)
            and response.code not in _NO_BODY_CODES
            and not headers.hasHeader(b"content-length")
        ):
            # Twisted's parser keeps Content-Length among the connection
            # headers, out of response.headers; the original reported it.
            headers.setRawHeaders(b"content-length", [b"%d" % (response.length,)])
        encoding = "gzip" if gzip else None
        received = self._metrics.upstream_bytes

        def complete(body: bytes | Failure) -> None:
            if isinstance(body, Failure):
                done(body)
                return
            if timings is not None:
                timings.done = timings.now()
            received.inc(len(body))
            done(UpstreamResponse(response.code, headers, body, encoding, raw or []))

        reader = BodyReader(complete, self._max_response_bytes, gzip, budget)
        response.deliverBody(reader)
        return reader

    def startService(self) -> None:
        super().startService()
        self._report.start(CONNECTION_REPORT_INTERVAL, now=False)

    def _every_minute(self) -> None:
        self._report_connections()
        if self._circuits is not None:
            self._circuits.prune()
        if self._pool.outliers is not None:
            self._pool.outliers.prune()

    def _report_connections(self) -> None:
        opened = self._endpoints.take_opened()
        if opened:
            self.log.info(
                "upstream connections opened in the last {interval:.0f} s, by address: "
                "{opened_by_address}",
                interval=CONNECTION_REPORT_INTERVAL,
                opened_by_address=dict(opened),
            )

    def stopService(self) -> Deferred[None]:
        """
        Close every pooled connection.
        """
        super().stopService()
        if self._report.running:
            self._report.stop()
        return self._pool.closeCachedConnections()
