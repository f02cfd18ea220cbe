"""
The process-wide budget of buffered bytes, unit by unit: the budget, each
batch's share of it, the default, the memory returner, and the inbound
channel's count of unsent bytes and its send timeout.  (The whole, against
the real daemon over real sockets, is tests/test_memory.py.)
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from octoplex.body import BatchResponsesTooLarge, ResponseBudget, read_body
from octoplex.buffers import (
    BATCH_FLOOR,
    BufferBudget,
    BuffersExhausted,
    MemoryReturner,
    default_max_buffered_bytes,
)
from octoplex.errors import cause, describe, kind_of
from octoplex.limits import Limits
from octoplex.metrics import Metrics
from octoplex.multiplexer import Multiplexer
from octoplex.web import OctoplexApp, OctoplexSite

from .test_body import _Response

MIB = 1024 * 1024


def test_budget_takes_up_to_its_limit_and_counts_refusals() -> None:
    budget = BufferBudget(100)
    assert budget.take(60)
    assert not budget.take(41)
    assert budget.refused == 1
    assert budget.used == 60
    budget.force(50)
    assert (budget.used, budget.peak) == (110, 110)
    assert not budget.take(1)
    budget.give_back(110)
    assert budget.used == 0
    assert budget.take(100)


def test_default_is_an_eighth_of_memory_within_bounds() -> None:
    assert default_max_buffered_bytes(8 * 1024 * MIB) == 1024 * MIB
    assert default_max_buffered_bytes(64 * 1024 * MIB) == 1024 * MIB
    assert default_max_buffered_bytes(2 * 1024 * MIB) == 256 * MIB
    assert default_max_buffered_bytes(128 * MIB) == 64 * MIB
    assert 64 * MIB <= default_max_buffered_bytes() <= 1024 * MIB


def test_a_batch_has_its_floor_then_the_process_budget() -> None:
    buffers = BufferBudget(BATCH_FLOOR)
    first, second = ResponseBudget(10 * MIB, buffers), ResponseBudget(10 * MIB, buffers)
    # Each batch reads its floor whatever the process holds.
    assert first.take(BATCH_FLOOR) is None
    assert second.take(BATCH_FLOOR) is None
    assert buffers.used == 2 * BATCH_FLOOR
    # Past it, only while the process's budget has room: it has none.
    refusal = first.take(1)
    assert isinstance(refusal, BuffersExhausted)
    assert f"its budget is {BATCH_FLOOR} (--max-buffered-bytes)" in str(refusal)
    buffers.limit = 2 * BATCH_FLOOR + 10
    assert first.take(10) is None
    assert buffers.used == 2 * BATCH_FLOOR + 10
    # The batch's own limit still comes first.
    assert isinstance(first.take(10 * MIB), BatchResponsesTooLarge)
    first.give_back(10)
    assert buffers.used == 2 * BATCH_FLOOR
    # Answered: what the batch holds goes back, once.
    first.close()
    first.close()
    first.give_back(BATCH_FLOOR)
    assert buffers.used == BATCH_FLOOR
    second.close()
    assert buffers.used == 0


def test_a_body_past_the_process_budget_fails_too_large_naming_it() -> None:
    buffers = BufferBudget(0)
    response = _Response()
    results: list[Any] = []
    read_body(response, MIB, budget=ResponseBudget(MIB, buffers)).addBoth(  # type: ignore[arg-type]
        results.append
    )
    assert response.protocol is not None
    response.protocol.dataReceived(b"x" * BATCH_FLOOR)
    assert results == []
    response.protocol.dataReceived(b"x")
    [failure] = results
    assert isinstance(failure, Failure)
    assert failure.check(BuffersExhausted)
    assert (cause(failure), kind_of(cause(failure))) == ("too_large", "too_large")
    assert "--max-buffered-bytes" in describe(failure)
    # The reader closed the connection and returned its bytes.
    assert response.transport.disconnecting
    assert buffers.used == 0


def test_the_returner_acts_once_a_burst_is_over() -> None:
    clock = Clock()
    buffers = BufferBudget(1024 * MIB)
    returner = MemoryReturner(clock, buffers, interval=5.0)
    # Nothing large held yet.
    assert not returner.check()
    buffers.force(32 * MIB)
    # Still held: not over.
    assert not returner.check()
    buffers.give_back(30 * MIB)
    assert returner.check()
    # Once per burst.
    assert not returner.check()
    assert buffers.high == buffers.used == 2 * MIB


def _site(buffers: BufferBudget, clock: Clock, send_timeout: float = 3.0) -> OctoplexSite:
    limits = Limits(send_timeout=send_timeout)
    app = OctoplexApp(Multiplexer(clock, None), limits, clock)  # type: ignore[arg-type]
    return OctoplexSite(app, clock, buffers)


def test_unsent_answer_bytes_count_until_the_send_buffer_drains() -> None:
    clock, buffers = Clock(), BufferBudget(MIB)
    site = _site(buffers, clock)
    channel = site.buildProtocol(None)._http11
    transport = StringTransport()
    channel.callLater = clock.callLater
    channel.makeConnection(transport)
    # Written while the send buffer has room: the transport holds it.
    channel.write(b"x" * 100)
    assert buffers.used == 0
    # The buffer fills (the transport pauses its producer): what follows counts.
    channel.pauseProducing()
    channel.write(b"y" * 1000)
    channel.writeSequence([b"z" * 10, b"z" * 20])
    assert buffers.used == 1030
    # It drains: every byte left the process, and the send timer stops.
    channel.resumeProducing()
    assert buffers.used == 0
    clock.advance(10)
    assert not transport.disconnecting
    channel.connectionLost(Failure(ConnectionError()))


def test_an_answer_left_unread_past_the_send_timeout_aborts_the_connection() -> None:
    clock, buffers = Clock(), BufferBudget(MIB)
    site = _site(buffers, clock, send_timeout=3.0)
    channel = site.buildProtocol(None)._http11
    channel.callLater = clock.callLater
    transport = StringTransport()
    aborted: list[bool] = []
    transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    channel.makeConnection(transport)
    channel.pauseProducing()
    channel.write(b"x" * 5000)
    clock.advance(2.9)
    assert aborted == []
    clock.advance(0.2)
    assert aborted == [True]
    assert site.metrics.send_timeouts._value.get() == 1
    # Its bytes go back as the connection goes.
    channel.connectionLost(Failure(ConnectionError()))
    assert buffers.used == 0


def test_metrics_show_the_budget() -> None:
    metrics, buffers = Metrics(), BufferBudget(1234)
    metrics.watch_buffers(lambda: buffers.used, lambda: buffers.limit)
    buffers.force(99)
    assert metrics.registry.get_sample_value("octoplex_buffered_bytes") == 99
    assert metrics.registry.get_sample_value("octoplex_buffered_bytes_limit") == 1234
