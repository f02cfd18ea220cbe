"""
The connection pool's policy: which idle connection is reused, and when a
connection is retired.

Twisted's ``HTTPConnectionPool`` reuses idle connections first in, first
out, so under steady traffic every connection is touched before its idle
timeout and the pool never shrinks; it keeps a connection for ever; and it
arms a timer for every connection each time it goes back to the pool.
:class:`OctoplexPool` keeps Twisted's factory (one for the whole pool, where
Twisted's ``_newConnection`` makes one per connection), and replaces the
rest (``_newConnection``, ``getConnection``, ``_putConnection``,
``closeCachedConnections``; the private parts are pinned by
tests/test_private_api.py):

- the most recently used idle connection is reused first, so the ones at
  the back idle out and the pool shrinks when load drops;
- idle connections are closed after ``cachedConnectionTimeout`` seconds by
  one timer for the whole pool, armed for the oldest idle connection,
  rather than one timer per connection per request;
- a connection is retired after ``max_requests`` requests;
- a connection is retired once it is ``max_age`` seconds old, so traffic
  follows DNS changes and upstream deploys;
- a request on a pooled connection the upstream had closed is retried once
  on a new connection when its method is idempotent, PUT and requests with
  a (replayable) body included, or when it carries an ``Idempotency-Key``
  header, where Twisted retries only bodiless GET, HEAD, OPTIONS, DELETE
  and TRACE (twisted#7843);
- a connection still being opened (DNS, TCP, TLS) when its request is
  cancelled, by a batch deadline say, is finished in the background within
  ``connect_grace`` seconds and pooled for the next request, where Twisted
  throws that work away; how it went is told to the request's circuit
  (:mod:`octoplex.circuits`), if circuit breaking is on;
- its connections speak :class:`octoplex.http11.UpstreamProtocol` (one
  write per request, responses parsed by httptools) rather than Twisted's
  ``HTTP11ClientProtocol``, and each response head is held to
  ``max_header_count`` lines and ``max_header_bytes`` bytes, where
  Twisted's parser takes any number of header lines and closes a
  connection without a word on a line over 16 KiB;
- with outlier ejection on (:mod:`octoplex.outliers`), its connections
  report how their address does, and a connection to an address ejected
  since it opened is retired instead of reused;
- an idle connection the upstream closes leaves the pool at once (Twisted
  keeps it until it is next picked), so the idle count is true;
- a hedged request's second attempt (:mod:`octoplex.hedging`) goes to
  another address of the host than its first when it can: an idle
  connection there, else a new one, else the same address on another
  connection (:meth:`OctoplexPool.request`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.web._newclient import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

from octoplex.circuits import Ticket
from octoplex.hedging import Route
from octoplex.http11 import HeadTooLarge, UpstreamProtocol
from octoplex.metrics import Metrics
from octoplex.outliers import Outliers, TrackedUpstreamProtocol, usable

__all__ = ["HeadTooLarge", "OctoplexPool"]

#: RFC 9110 section 9.2.2: repeating these has the effect of sending once.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

#: The shortest wait, in seconds, between two passes of the idle sweep: a
#: connection idles out up to this much after its idle timeout.
SWEEP_INTERVAL = 1.0


class _Retrying:
    """
    A pooled connection, as :meth:`OctoplexPool.getConnection` hands it out
    for one request, which :meth:`OctoplexPool.retry` may send again.
    """

    __slots__ = ("_connection", "_endpoint", "_key", "_pool")

    def __init__(
        self, connection: Any, pool: OctoplexPool, key: Hashable, endpoint: IStreamClientEndpoint
    ) -> None:
        self._connection = connection
        self._pool = pool
        self._key = key
        self._endpoint = endpoint

    def request(self, request: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._connection.request(request)
        d.addErrback(self._pool.retry, self._key, self._endpoint, request)
        return d


def _should_retry(request: Any, exception: BaseException) -> bool:
    if request.method not in IDEMPOTENT and not request.headers.hasHeader(b"idempotency-key"):
        return False
    if not isinstance(
        exception, (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived)
    ):
        return False
    reasons = getattr(exception, "reasons", [])
    if any(reason.check(CancelledError) for reason in reasons):
        return False
    producer = request.bodyProducer
    return producer is None or getattr(producer, "replayable", False)


class _Opening:
    """
    A new connection being opened, for a request or for
    :meth:`OctoplexPool.getConnection`: the canceller of the Deferred that
    waits on it (``wanted``), and the callbacks of the connect.

    For a request, the one Deferred stands for the connect and then for the
    response: once the connection is open the request is sent on it, and
    the connection fires ``wanted`` with the response (as it fires a
    request's own Deferred), with no second Deferred chained behind it.
    Cancelling it while the connection opens lets the connect finish for
    the next request (:meth:`OctoplexPool._finish_unwanted`); once it is
    open, cancelling it cancels the request on the connection.
    """

    __slots__ = ("_connecting", "_key", "_pool", "_protocol", "_request", "_ticket", "_wanted")

    def __init__(
        self, pool: OctoplexPool, key: Hashable, request: Any, ticket: Ticket | None
    ) -> None:
        self._pool = pool
        self._key = key
        self._request = request
        self._connecting: Deferred[Any] | None = None
        self._protocol: Any = None
        self._wanted: Deferred[Any] | None = Deferred(self)
        #: The circuit ticket of the request it opens for, if any.
        self._ticket = ticket

    def __call__(self, wanted: Deferred[Any]) -> None:
        # The canceller of ``wanted``.
        if self._protocol is not None:
            # What cancelling the request's Deferred on the connection does.
            self._protocol._cancel(wanted)
        elif self._connecting is not None:
            if self._ticket is not None:
                # The connection, finished in the background, will say how
                # the upstream is.
                self._ticket.connecting()
            self._pool._finish_unwanted(self._key, self._connecting)

    def opened(self, protocol: Any) -> None:
        pool, key, wanted, request = self._pool, self._key, self._wanted, self._request
        ticket = self._ticket
        # It no longer needs the connect, and ``wanted`` (which holds this
        # as its canceller) no longer needs to be reached from here.
        self._connecting = self._wanted = self._request = self._ticket = None
        assert wanted is not None
        protocol.key = key
        if pool.outliers is not None:
            pool.outliers.attach(protocol, key)
        pool.opened += 1
        pool._metrics.upstream(key).opened.inc()
        protocol.born = pool._reactor.seconds()
        protocol.generation = pool._generation
        if wanted.called:
            # Its request was cancelled while it opened: keep it warm.
            if ticket is not None:
                ticket.connected()
            if pool._closed:
                protocol.transport.loseConnection()
                return
            pool.warmed += 1
            pool._idle(key, protocol)
        elif request is None:
            wanted.callback(protocol)
        else:
            self._protocol = protocol
            try:
                protocol.request(request, wanted)
            except Exception:
                if not wanted.called:
                    wanted.errback()

    def failed(self, failure: Any) -> None:
        wanted, ticket = self._wanted, self._ticket
        self._connecting = self._wanted = self._request = self._ticket = None
        if wanted is not None and not wanted.called:
            wanted.errback(failure)
        elif ticket is not None:
            # Its request was cancelled while it opened.
            if failure.check(CancelledError, ConnectingCancelledError):
                ticket.connect_given_up(self._pool._given_up())
            else:
                ticket.connect_failed(failure)


class OctoplexPool(HTTPConnectionPool):
    """
    A persistent connection pool that reuses the newest idle connection and
    retires old or much-used ones.

    :param reactor: the reactor, for time and idle timeouts.
    :param max_requests: requests one connection carries before it is closed.
    :param max_age: seconds after which a connection is closed once idle.
    :param connect_grace: seconds a connection whose request was cancelled
        may still take to open, to be pooled.
    :param max_header_count: header lines allowed in a response.
    :param max_header_bytes: bytes allowed in a response's status line and
        headers.
    :param metrics: counts connections opened, reused and retired per
        upstream, and reads the idle ones; a fresh one by default.
    """

    def __init__(
        self,
        reactor: Any,
        max_requests: int,
        max_age: float,
        connect_grace: float,
        max_header_count: int = 100,
        max_header_bytes: int = 65536,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(reactor, persistent=True)
        self._metrics = Metrics() if metrics is None else metrics
        self._metrics.idle_source = self._idle_counts
        #: The response head limits for connections opened from now on.
        self.head_limits = (max_header_count, max_header_bytes)
        pool = self

        class Factory(_HTTP11ClientFactory):
            # Twisted's factory is typed to build its own protocol; the pool
            # needs only the same interface (octoplex.http11).
            def buildProtocol(self, addr: Any) -> UpstreamProtocol:  # type: ignore[override]
                kind = UpstreamProtocol if pool.outliers is None else TrackedUpstreamProtocol
                protocol = kind(self._quiescentCallback)
                protocol.head_limits = pool.head_limits
                protocol.clock = pool._reactor
                protocol.lost_idle = pool._lost_idle
                return protocol

        self._factory = Factory
        #: The one factory of every connection the pool opens (Twisted's
        #: _newConnection makes a factory, a quiescent callback closure and
        #: the endpoint's repr for each, about 400 bytes a connection for as
        #: long as it is open): a protocol goes back to the pool under the
        #: key it carries.
        self._shared_factory = Factory(self._quiescent, "OctoplexPool")
        self._max_requests = max_requests
        self._max_age = max_age
        self._connect_grace = connect_grace
        # Connections opened before the last retire_all() are not reused.
        self._generation = 0
        #: Connections opened, retired, and finished after their request was
        #: cancelled: for tests and statistics.
        self.opened = 0
        self.retired = 0
        self.warmed = 0
        self._warming: set[Deferred[Any]] = set()
        self._closed = False
        #: The circuit ticket (octoplex.circuits) of the request being sent,
        #: set by the upstream client around its call to :meth:`request`
        #: (treq passes nothing else along): a connection opened for that
        #: request tells the ticket how it went if the request is cancelled
        #: while it opens.
        self.ticket: Ticket | None = None
        #: The addresses' states, while outlier ejection is on
        #: (octoplex.outliers): its connections report to them, and one to
        #: an address ejected since it opened is retired, not reused.
        self.outliers: Outliers | None = None
        #: Idle connections, by key, least recently used first.
        self._connections: dict[Hashable, list[Any]] = {}
        #: The one timer that closes connections idle too long.
        self._sweeper: IDelayedCall | None = None

    def _quiescent(self, protocol: Any) -> None:
        # What Twisted's per-connection quiescent callback did, with the key
        # the connection was opened for.
        self._putConnection(protocol.key, protocol)

    def _newConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        """
        What ``HTTPConnectionPool._newConnection`` does, with the pool's one
        factory: a Deferred of a new connection's protocol.
        """
        return self._open(key, endpoint, None)

    def _open(
        self,
        key: Hashable,
        endpoint: IStreamClientEndpoint,
        request: Any,
        ticket: Ticket | None = None,
    ) -> Deferred[Any]:
        """
        Open a new connection for ``key`` through ``endpoint``: a Deferred
        that fires with its protocol, or, given a ``request``, with the
        response to the request sent on it (see :class:`_Opening`), telling
        the request's circuit ``ticket``, if any, how the connection went
        should the request be cancelled while it opens.
        """
        opening = _Opening(self, key, request, ticket)
        wanted = opening._wanted
        assert wanted is not None
        connecting: Deferred[Any] = endpoint.connect(self._shared_factory)
        opening._connecting = connecting
        connecting.addCallbacks(opening.opened, opening.failed)
        return wanted

    def _given_up(self) -> str | None:
        """
        What a connection whose request was cancelled while it opened, and
        which the pool then gave up on, says of its upstream (for circuit
        breaking): that it did not open within the grace; nothing if the
        pool gave it no grace, or gave it up on closing.
        """
        if self._closed or not self._connect_grace:
            return None
        return (
            "connecting did not finish within the deadline and "
            f"{self._connect_grace:g} s more (--pool-connect-grace)"
        )

    def _finish_unwanted(self, key: Hashable, connecting: Deferred[Any]) -> None:
        """
        The request waiting on ``connecting`` was cancelled: let the
        connection open anyway, within the grace period, for the next one.
        """
        # A pool that is closing keeps nothing warm: give up on the next turn
        # (cancelling here, inside the canceller, would fail the request with
        # the connect's error instead of CancelledError).
        grace = 0 if self._closed else self._connect_grace
        give_up = self._reactor.callLater(grace, connecting.cancel)
        self._warming.add(connecting)

        def settled(result: Any) -> Any:
            self._warming.discard(connecting)
            if give_up.active():
                give_up.cancel()
            return result

        connecting.addBoth(settled)

    def closeCachedConnections(self) -> Deferred[Any]:
        """
        Close the idle connections, and give up those still opening.
        """
        self._closed = True
        for connecting in list(self._warming):
            connecting.cancel()
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        connections, self._connections = self._connections, {}
        closed = [connection.abort() for idle in connections.values() for connection in idle]
        return gatherResults(closed).addCallback(lambda _: None)

    def request(
        self,
        key: Hashable,
        endpoint: IStreamClientEndpoint,
        request: Any,
        route: Route | None = None,
    ) -> Deferred[Any]:
        """
        Send ``request`` on the newest idle connection for ``key``, or on a
        new one opened through ``endpoint``: what ``getConnection`` and the
        connection's ``request`` do, without a Deferred and a callback in
        between when an idle connection is at hand (the usual case).

        An attempt of a hedged request has a ``route``: the address of the
        connection it goes out on is noted there, and a hedge whose route
        avoids its first attempt's address goes out, in this order of
        preference, on the newest idle connection to another address; on a
        new connection, if the host has another address to dial (``endpoint``
        then dials the avoided address last); on the newest idle connection
        to the same address; on a new connection.

        :return: a Deferred that fires with the response once its head is
            in.  A request that fails on a pooled connection the upstream
            had closed is retried as :meth:`retry` says.
        """
        if route is None:
            connection = self._take_idle(key)
        else:
            connection = self._take_routed(key, endpoint, route)
        if connection is None:
            return self._open(key, endpoint, request, self.ticket)
        d: Deferred[Any] = connection.request(request)
        d.addErrback(self.retry, key, endpoint, request)
        return d

    def _take_routed(self, key: Hashable, endpoint: Any, route: Route) -> Any:
        """
        The idle connection for an attempt with ``route`` (see
        :meth:`request`), its address noted there; or ``None`` for a new one.
        """
        avoid = route.avoid
        connection = None
        if avoid is not None:
            connection = self._take_idle(key, avoid)
            if connection is None:
                elsewhere = getattr(endpoint, "elsewhere", None)
                if elsewhere is not None and elsewhere(avoid):
                    return None
        if connection is None:
            connection = self._take_idle(key)
        if connection is not None:
            route.address = connection.address
        return connection

    def retry(
        self, reason: Any, key: Hashable, endpoint: IStreamClientEndpoint, request: Any
    ) -> Any:
        """
        The errback of a request sent on a pooled connection: if the
        upstream had closed it and the request failed before any answer
        came, send it again once on a new connection, when its method is
        idempotent, when it carries an ``Idempotency-Key`` header (its
        sender opted in: the upstream de-duplicates it), and when its body,
        if any, can be produced again.  (Twisted's
        ``_RetryingHTTP11ClientProtocol`` allows bodiless GET, HEAD,
        OPTIONS, DELETE and TRACE only.)
        """
        if not _should_retry(request, reason.value):
            return reason
        return self._open(key, endpoint, request)

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        """
        ``HTTPConnectionPool``'s interface to :meth:`request`'s choice: the
        newest idle connection, wrapped to retry as :meth:`retry` says, or a
        new one.
        """
        connection = self._take_idle(key)
        if connection is None:
            return self._newConnection(key, endpoint)
        return succeed(_Retrying(connection, self, key, endpoint))

    def _take_idle(self, key: Hashable, avoid: str | None = None) -> Any:
        """
        The newest idle connection for ``key`` (the back of its list),
        retiring those found too old there first; or ``None``.  An old
        connection further in is retired when it comes to the back or when
        it idles out: it is never used, and the lookup stays O(1).

        With ``avoid`` (a hedge's), the newest idle connection to another
        address than ``avoid``, or ``None``: the list is searched from the
        back, and those passed over stay.
        """
        connections = self._connections.get(key)
        if avoid is not None:
            return self._take_idle_elsewhere(key, connections, avoid) if connections else None
        if connections:
            now = self._reactor.seconds()
            while connections:
                connection = connections.pop()
                if connection.state != "QUIESCENT":
                    # The upstream closed it while it was idle.
                    continue
                if self._too_old(connection, now):
                    self._retire(key, connection)
                    continue
                self._metrics.upstream(key).reused.inc()
                return connection
        return None

    def _take_idle_elsewhere(self, key: Hashable, connections: list[Any], avoid: str) -> Any:
        now = self._reactor.seconds()
        for index in range(len(connections) - 1, -1, -1):
            connection = connections[index]
            if connection.address == avoid:
                continue
            del connections[index]
            if connection.state != "QUIESCENT":
                continue
            if self._too_old(connection, now):
                self._retire(key, connection)
                continue
            self._metrics.upstream(key).reused.inc()
            return connection
        return None

    def _too_old(self, connection: Any, now: float) -> bool:
        """
        Whether ``connection`` is not to be used again: opened before the
        last :meth:`retire_all`, ``max_age`` old, or to an address ejected
        since (octoplex.outliers).
        """
        if connection.generation != self._generation:
            return True
        if connection.outlier is not None and not usable(connection):
            return True
        return bool(now - connection.born >= self._max_age)

    def retire_all(self) -> None:
        """
        Close every idle connection, and each busy one when its request is
        done: none opened until now is used again (the egress policy
        changed, and it is checked when a connection is opened).
        """
        self._generation += 1
        connections, self._connections = self._connections, {}
        for key, idle in connections.items():
            for connection in idle:
                self._retire(key, connection)

    def _retire(self, key: Hashable, connection: Any) -> None:
        self.retired += 1
        self._metrics.upstream(key).retired.inc()
        connection.transport.loseConnection()

    def _lost_idle(self, connection: Any) -> None:
        """
        An idle connection was closed by its upstream: drop it now, so the
        idle count is true and the pool holds no closed connection.
        """
        connections = self._connections.get(connection.key)
        if connections is None:
            return
        for index in range(len(connections) - 1, -1, -1):
            if connections[index] is connection:
                del connections[index]
                break
        if not connections:
            del self._connections[connection.key]

    def _idle_counts(self) -> list[tuple[Hashable, int]]:
        return [(key, len(idle)) for key, idle in self._connections.items() if idle]

    def _putConnection(self, key: Hashable, connection: Any) -> None:
        connection.uses += 1
        now = self._reactor.seconds()
        if connection.uses >= self._max_requests or self._too_old(connection, now):
            self._retire(key, connection)
            return
        self._idle(key, connection)

    def _idle(self, key: Hashable, connection: Any) -> None:
        """
        Pool an idle connection at the back (the newest), dropping the least
        recently used one, at the front, if the pool for ``key`` is full.
        """
        if connection.state != "QUIESCENT":
            self._log.error(
                "BUG: a connection in state {state} was offered to the pool", state=connection.state
            )
            connection.transport.loseConnection()
            return
        connections = self._connections.get(key)
        if connections is None:
            connections = self._connections[key] = []
        elif len(connections) >= self.maxPersistentPerHost:
            dropped = connections.pop(0)
            self._metrics.upstream(key).retired.inc()
            dropped.transport.loseConnection()
        connection.idle_since = self._reactor.seconds()
        connections.append(connection)
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self.cachedConnectionTimeout, self._sweep)

    def _sweep(self) -> None:
        """
        Close the connections idle for ``cachedConnectionTimeout`` seconds
        (each list holds its least recently used at the front), and arm the
        next pass for the oldest that remains.
        """
        self._sweeper = None
        now = self._reactor.seconds()
        timeout = self.cachedConnectionTimeout
        oldest: float | None = None
        for key, connections in list(self._connections.items()):
            while connections and now - connections[0].idle_since >= timeout:
                connections.pop(0).transport.loseConnection()
            if not connections:
                self._connections.pop(key, None)
            elif oldest is None or connections[0].idle_since < oldest:
                oldest = connections[0].idle_since
        if oldest is not None:
            wait = max(oldest + timeout - now, min(SWEEP_INTERVAL, timeout))
            self._sweeper = self._reactor.callLater(wait, self._sweep)
