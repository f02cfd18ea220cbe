"""
Where one upstream request's time went, for the callers that ask for it
(a batch's ``"timings": true``).

A :class:`Timings` is made per attempt and marked, by the clock, by each
layer the request crosses: the client when it has its slots, the endpoint
around the DNS lookup and the TCP connect, the connection when its TLS
handshake is done, the HTTP/1.1 protocol when the request is written and
the answer's first and last bytes arrive, and the client when the body is
read.  :meth:`Timings.report` turns the marks into the outcome's
``timings`` object, in fractional milliseconds.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PHASES", "Timings"]

#: The phases a report times one after the other (``total_msec`` spans them
#: all), in the order a request goes through them.
PHASES = ("queued_msec", "dns_msec", "connect_msec", "tls_msec", "ttfb_msec", "body_msec")


class Timings:
    """
    The marks of one attempt, each a clock reading or ``None`` if the
    request never got that far (or, for a reused connection, never needed
    to: no DNS, connect or TLS).
    """

    __slots__ = (
        "body_done",
        "clock",
        "connected",
        "dns_done",
        "dns_start",
        "done",
        "first_byte",
        "sent",
        "slot",
        "start",
        "tls_done",
    )

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.start: float = clock.seconds()
        self.slot: float | None = None
        self.dns_start: float | None = None
        self.dns_done: float | None = None
        self.connected: float | None = None
        self.tls_done: float | None = None
        self.sent: float | None = None
        self.first_byte: float | None = None
        self.body_done: float | None = None
        self.done: float | None = None

    def now(self) -> float:
        """The clock's reading, to mark with."""
        return float(self.clock.seconds())

    def report(self) -> dict[str, Any]:
        """
        The outcome's ``timings``: each phase in milliseconds (3 decimals),
        ``None`` for one the request did not go through, and whether it
        went over a connection opened before it.
        """
        end = self.done if self.done is not None else self.now()
        ready = self.tls_done or self.connected
        # The answer is awaited from when the request could go out: after
        # the TLS handshake on a new connection (the bytes wait for it).
        awaiting = None if self.sent is None else max(self.sent, ready or 0.0)
        # A request that failed or was cancelled in the queue, the DNS
        # lookup, the connect (refused, say) or the body spent the time up
        # to its end in that phase, so that the phases still add up to the
        # total. (Not so the wait for the first byte, which on a new HTTPS
        # connection cannot be told apart from an unfinished handshake.)
        return {
            "queued_msec": _span(self.start, _until(self.start, self.slot, end)),
            "dns_msec": _span(self.dns_start, _until(self.dns_start, self.dns_done, end)),
            "connect_msec": _span(self.dns_done, _until(self.dns_done, self.connected, end)),
            "tls_msec": _span(self.connected, self.tls_done),
            "ttfb_msec": _span(awaiting, self.first_byte),
            "body_msec": _span(self.first_byte, _until(self.first_byte, self.body_done, end)),
            "total_msec": _span(self.start, end),
            "reused": self.dns_start is None and self.sent is not None,
        }


def _until(start: float | None, finish: float | None, end: float) -> float | None:
    """A phase's end: its mark, or the request's end if it began and never finished."""
    if finish is None and start is not None:
        return end
    return finish


def _span(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, end - start) * 1000, 3)
