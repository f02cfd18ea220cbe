"""
Admission: which batches run now, whichever frontend they came in by.

Every frontend (the HTTP app, the gRPC servicer) asks the one
:class:`Admission` of the daemon before it runs a batch, so that the
in-flight caps (``--max-batches-in-flight``, ``--max-requests-in-flight``)
hold over all of them together, so that no one client takes more than its
share of them (``--max-client-batches-in-flight``,
``--max-client-requests-in-flight``), and so that a draining daemon refuses
new batches on every listener.
"""

from __future__ import annotations

from octoplex.limits import Limits
from octoplex.metrics import Metrics

__all__ = ["DRAINING", "Admission", "Hold", "client_key"]

#: The error of a batch refused while the daemon shuts down.
DRAINING = "shutting down: this instance takes no new batches; retry on another"


def client_key(token_name: str | None, host: str) -> str:
    """
    Who a batch's share is counted against: its token's name when tokens
    are on (``token NAME``), else the caller's address without its port, so
    that the many connections of one machine are one client.
    """
    return host if token_name is None else f"token {token_name}"


class Admission:
    """
    The batches in flight and their upstream requests, held to the caps,
    over all clients and per client.

    :ivar limits: the caps; settable (a reload changes them).
    :ivar ready: cleared when the daemon starts shutting down (``/readyz``
        and the gRPC health service say so).
    :ivar draining: set once the daemon drains: new batches are refused,
        while those in flight finish.
    :ivar shed: batches refused for load since start.
    :ivar throttled: batches refused since start because their client was
        over its share.
    """

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        self.limits = limits
        self._metrics = metrics
        self.batches_in_flight = 0
        self.requests_in_flight = 0
        self.shed = 0
        self.throttled = 0
        self.ready = True
        self.draining = False
        #: Per client with a batch in flight: [batches, requests].  An entry
        #: goes when its last batch does, so many addresses leave nothing.
        self.clients: dict[str, list[int]] = {}
        metrics.watch(lambda: self.batches_in_flight, lambda: self.requests_in_flight)

    def over_share(self, client: str, size: int) -> str | None:
        """
        Why a batch of ``size`` requests from ``client`` cannot run now,
        its client being over its share, naming the counts and the caps
        (and counted as throttled); ``None`` if it can.
        """
        limits = self.limits
        held = self.clients.get(client)
        batches, requests = (0, 0) if held is None else held
        if (
            batches < limits.max_client_batches_in_flight
            and requests + size <= limits.max_client_requests_in_flight
        ):
            return None
        self.throttled += 1
        self._metrics.throttled.inc()
        return (
            f"client {client} is over its share: {batches} batches with {requests} "
            f"requests in flight, and this one has {size} (at most "
            f"{limits.max_client_batches_in_flight} batches and "
            f"{limits.max_client_requests_in_flight} requests per client); "
            "retry once its batches are answered"
        )

    def overload(self, size: int) -> str | None:
        """
        Why a batch of ``size`` requests cannot run now for load, naming the
        caps (and counted as shed); ``None`` if it can.
        """
        limits = self.limits
        if (
            self.batches_in_flight < limits.max_batches_in_flight
            and self.requests_in_flight + size <= limits.max_requests_in_flight
        ):
            return None
        self.shed += 1
        self._metrics.shed.inc()
        return (
            f"overloaded: {self.batches_in_flight} batches with {self.requests_in_flight} "
            f"requests in flight (at most {limits.max_batches_in_flight} batches and "
            f"{limits.max_requests_in_flight} requests); retry shortly"
        )

    def enter(self, size: int, client: str) -> None:
        """A batch of ``size`` requests from ``client`` starts."""
        self.batches_in_flight += 1
        self.requests_in_flight += size
        held = self.clients.get(client)
        if held is None:
            self.clients[client] = [1, size]
        else:
            held[0] += 1
            held[1] += size

    def leave(self, size: int, client: str) -> None:
        """A batch of ``size`` requests from ``client`` is answered (or abandoned)."""
        self.batches_in_flight -= 1
        self.requests_in_flight -= size
        held = self.clients[client]
        if held[0] == 1:
            del self.clients[client]
        else:
            held[0] -= 1
            held[1] -= size

    def hold(self, client: str) -> Hold:
        """
        The hold of a batch from ``client``, just entered, on the in-flight
        counts, for the requests it sends beyond its size (hedges).
        """
        return Hold(self, client)


class Hold:
    """
    A running batch's extra requests in flight (hedges): each is one more
    request in flight, for its client and over all, while it runs.

    :ivar extra: those it holds now.
    """

    __slots__ = ("_admission", "_client", "extra")

    def __init__(self, admission: Admission, client: str) -> None:
        self._admission = admission
        self._client = client
        self.extra = 0

    def take(self) -> bool:
        """
        One more request in flight, if its client's share and the daemon's
        cap have room for it; ``False`` (and nothing taken) if not.
        """
        admission = self._admission
        limits = admission.limits
        held = admission.clients.get(self._client)
        if (
            held is None
            or held[1] >= limits.max_client_requests_in_flight
            or admission.requests_in_flight >= limits.max_requests_in_flight
        ):
            return False
        held[1] += 1
        admission.requests_in_flight += 1
        self.extra += 1
        return True

    @property
    def client(self) -> str:
        """The client whose share it takes from."""
        return self._client

    def give_back(self) -> None:
        """One extra request is over."""
        if self.extra:
            self.extra -= 1
            self._admission.requests_in_flight -= 1
            held = self._admission.clients.get(self._client)
            if held is not None:
                held[1] -= 1

    def close(self) -> None:
        """The batch is over: give back what it still holds (before it leaves)."""
        while self.extra:
            self.give_back()
