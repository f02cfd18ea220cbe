"""
Admission: which batches run now, whichever frontend they came in by.

Every frontend (the HTTP app, the gRPC servicer) asks the one
:class:`Admission` of the daemon before it runs a batch, so that the
in-flight caps (``--max-batches-in-flight``, ``--max-requests-in-flight``)
hold over all of them together, and so that a draining daemon refuses new
batches on every listener.
"""

from __future__ import annotations

from octoplex.limits import Limits
from octoplex.metrics import Metrics

__all__ = ["DRAINING", "Admission"]

#: The error of a batch refused while the daemon shuts down.
DRAINING = "shutting down: this instance takes no new batches; retry on another"


class Admission:
    """
    The batches in flight and their upstream requests, held to the caps.

    :ivar limits: the caps; settable (a reload changes them).
    :ivar ready: cleared when the daemon starts shutting down (``/readyz``
        and the gRPC health service say so).
    :ivar draining: set once the daemon drains: new batches are refused,
        while those in flight finish.
    :ivar shed: batches refused for load since start.
    """

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        self.limits = limits
        self._metrics = metrics
        self.batches_in_flight = 0
        self.requests_in_flight = 0
        self.shed = 0
        self.ready = True
        self.draining = False
        metrics.watch(lambda: self.batches_in_flight, lambda: self.requests_in_flight)

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

    def enter(self, size: int) -> None:
        """A batch of ``size`` requests starts."""
        self.batches_in_flight += 1
        self.requests_in_flight += size

    def leave(self, size: int) -> None:
        """A batch of ``size`` requests is answered (or abandoned)."""
        self.batches_in_flight -= 1
        self.requests_in_flight -= size
