"""
The connection pool's policy: which idle connection is reused, and when a
connection is retired.

Twisted's ``HTTPConnectionPool`` reuses idle connections first in, first
out, so under steady traffic every connection is touched before its idle
timeout and the pool never shrinks; and it keeps a connection for ever.
:class:`OctoplexPool` changes three things, by overriding the pool's private
``_newConnection`` and ``_putConnection`` (pinned by tests/test_pool.py):

- the most recently used idle connection is reused first, so the ones at
  the back idle out and the pool shrinks when load drops;
- a connection is retired after ``max_requests`` requests;
- a connection is retired once it is ``max_age`` seconds old, so traffic
  follows DNS changes and upstream deploys.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any
from weakref import WeakKeyDictionary

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

__all__ = ["OctoplexPool"]


class OctoplexPool(HTTPConnectionPool):
    """
    A persistent connection pool that reuses the newest idle connection and
    retires old or much-used ones.

    :param reactor: the reactor, for time and idle timeouts.
    :param max_requests: requests one connection carries before it is closed.
    :param max_age: seconds after which a connection is closed once idle.
    """

    log = Logger()

    def __init__(self, reactor: Any, max_requests: int, max_age: float) -> None:
        super().__init__(reactor, persistent=True)
        self._max_requests = max_requests
        self._max_age = max_age
        self._born: WeakKeyDictionary[Any, float] = WeakKeyDictionary()
        self._uses: WeakKeyDictionary[Any, int] = WeakKeyDictionary()
        #: Connections opened and retired, for tests and statistics.
        self.opened = 0
        self.retired = 0

    def _newConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        d = super()._newConnection(key, endpoint)

        def opened(protocol: Any) -> Any:
            self.opened += 1
            self._born[protocol] = self._reactor.seconds()
            return protocol

        return d.addCallback(opened)

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        """
        Retire the idle connections for ``key`` that have grown too old,
        then let Twisted hand out the newest of the rest, or a new one.
        """
        connections = self._connections.get(key, [])
        now = self._reactor.seconds()
        for connection in [c for c in connections if self._too_old(c, now)]:
            connections.remove(connection)
            self._timeouts.pop(connection).cancel()
            self._retire(connection)
        return super().getConnection(key, endpoint)

    def _too_old(self, connection: Any, now: float) -> bool:
        return now - self._born.get(connection, now) >= self._max_age

    def _retire(self, connection: Any) -> None:
        self.retired += 1
        connection.transport.loseConnection()

    def _putConnection(self, key: Hashable, connection: Any) -> None:
        uses = self._uses.get(connection, 0) + 1
        self._uses[connection] = uses
        if uses >= self._max_requests or self._too_old(connection, self._reactor.seconds()):
            self._retire(connection)
            return
        connections = self._connections.setdefault(key, [])
        if len(connections) >= self.maxPersistentPerHost:
            # Twisted would drop the front; here the front is the newest, so
            # drop the least recently used, at the back.
            dropped = connections.pop()
            self._timeouts.pop(dropped).cancel()
            dropped.transport.loseConnection()
        super()._putConnection(key, connection)
        if connection in connections:
            # getConnection takes from the front: put the newest there.
            connections.remove(connection)
            connections.insert(0, connection)
