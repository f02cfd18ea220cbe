"""
The fields that end a batch's log event, the same for every frontend, so
that the access log and the statistics read alike whichever listener a
batch came in by.
"""

from __future__ import annotations

from typing import Any

from octoplex.metrics import Metrics
from octoplex.multiplexer import BatchResult

__all__ = ["answered", "batch_answered"]


def answered(
    metrics: Metrics,
    elapsed: float,
    status: int,
    sent: int,
    size: int = 0,
    succeeded: int = 0,
    failed: int = 0,
    timed_out: int = 0,
) -> dict[str, Any]:
    """
    Count a batch answered with ``status`` (an HTTP status, or the one a
    gRPC status counts as) after ``elapsed`` seconds, ``sent`` bytes of
    answer, in the statistics; the fields of its event.
    """
    metrics.batch(status, elapsed, sent)
    return {
        "status": status,
        "size": size,
        "succeeded": succeeded,
        "failed": failed,
        "timed_out": timed_out,
        "bytes_out": sent,
        "elapsed_ms": int(elapsed * 1000),
    }


def batch_answered(
    metrics: Metrics, elapsed: float, sent: int, result: BatchResult
) -> dict[str, Any]:
    """
    :func:`answered` for a batch that ran: ``200`` and its counts, and
    ``hedged``, the requests that sent a hedge, when there were any.
    """
    fields = answered(
        metrics,
        elapsed,
        200,
        sent,
        size=len(result.outcomes),
        succeeded=result.succeeded,
        failed=result.failed,
        timed_out=result.timed_out,
    )
    if result.hedged:
        fields["hedged"] = result.hedged
    return fields
