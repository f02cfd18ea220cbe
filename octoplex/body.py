"""
Reading an upstream response body with a size cap, cancellably.

treq's ``content()`` has no canceller and Twisted's ``readBody`` logs an
``AlreadyCalledError`` when cancelled (twisted#12499), so neither can sit
under a deadline.  :func:`read_body` can: cancelling its Deferred closes the
upstream connection at once, so a half-read response never goes back to the
pool.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from octoplex.buffers import BATCH_FLOOR, BufferBudget, BuffersExhausted
from octoplex.http11 import RESPONSE_DONE

__all__ = [
    "BadGzip",
    "BatchResponsesTooLarge",
    "BodyReader",
    "BodyTooLarge",
    "ResponseBudget",
    "read_body",
    "reading",
]


class BodyTooLarge(Exception):
    """
    The upstream body is larger than the limit.

    :ivar limit: the limit, in bytes.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return f"upstream response body exceeded {self.limit} bytes (--max-response-bytes)"


class BatchResponsesTooLarge(BodyTooLarge):
    """
    The bodies of one batch's responses, together, are larger than the
    batch's limit; the response that passed it fails.
    """

    def __str__(self) -> str:
        return (
            f"upstream response bodies of this batch exceeded {self.limit} bytes in total "
            "(--max-batch-response-bytes)"
        )


class ResponseBudget:
    """
    The body bytes one batch's responses may still take, shared by their
    readers.  A reader that fails gives its bytes back, since they will not
    be in the answer.

    The bytes count against the process's budget too, when there is one:
    the first :data:`~octoplex.buffers.BATCH_FLOOR` bytes the batch holds
    whatever the process holds, the rest only while the process's budget
    has room.  :meth:`close` returns what the batch still holds once its
    answer is written.

    :ivar limit: the batch's limit, in bytes.
    """

    def __init__(self, limit: int, buffers: BufferBudget | None = None) -> None:
        self.limit = limit
        self._remaining = limit
        self._buffers = buffers
        #: Bytes held of the process's budget (none once closed).
        self._held = 0

    def take(self, count: int) -> BodyTooLarge | BuffersExhausted | None:
        """
        Take ``count`` bytes; if either budget has too few, take nothing
        and return the error that says which.
        """
        if count > self._remaining:
            return BatchResponsesTooLarge(self.limit)
        buffers = self._buffers
        if buffers is not None:
            held = self._held + count
            if held <= BATCH_FLOOR:
                buffers.force(count)
            elif not buffers.take(count):
                return BuffersExhausted(buffers.used, buffers.limit)
            self._held = held
        self._remaining -= count
        return None

    def give_back(self, count: int) -> None:
        """
        Return ``count`` bytes taken earlier.
        """
        self._remaining += count
        if self._buffers is not None and self._held:
            count = min(count, self._held)
            self._held -= count
            self._buffers.give_back(count)

    def close(self) -> None:
        """
        The batch is answered: return to the process what it still holds.
        What its readers give back later is theirs no more.
        """
        if self._buffers is not None:
            self._buffers.give_back(self._held)
            self._held = 0
            self._buffers = None


_T = TypeVar("_T")


class BadGzip(Exception):
    """
    A body declared gzip-encoded does not decode.
    """

    def __str__(self) -> str:
        return f"upstream sent a gzip-encoded body that does not decode: {self.args[0]}"


class BodyReader(Protocol):
    """
    Collect a body until it ends, or until it passes ``limit`` bytes, in
    which case the connection is closed.  A gzip body is decoded as it
    arrives, and the limit counts decoded bytes: no chunk is ever inflated
    past it, so a small bomb cannot exhaust memory.

    :param done: called once, with the body (``bytes``) or with a
        ``Failure`` saying why it could not be read; never after
        :meth:`abort`.
    """

    def __init__(
        self,
        done: Callable[[bytes | Failure], None],
        limit: int,
        gzip: bool,
        budget: ResponseBudget | None,
    ) -> None:
        self._done = done
        #: Set once ``done`` was called, or the read given up.
        self.over = False
        self._budget = budget
        self._taken = 0
        self._limit = limit
        self._remaining = limit
        self._chunks: list[bytes] = []
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None

    def dataReceived(self, data: bytes) -> None:
        if self.over:
            return
        if self._inflate is not None:
            if self._inflate.eof:
                return
            try:
                data = self._inflate.decompress(data, self._remaining + 1)
            except zlib.error as e:
                self._fail(BadGzip(str(e)))
                return
            if self._inflate.unconsumed_tail:
                self._fail(BodyTooLarge(self._limit))
                return
        self._remaining -= len(data)
        if self._remaining < 0:
            self._fail(BodyTooLarge(self._limit))
            return
        if self._budget is not None:
            refusal = self._budget.take(len(data))
            if refusal is not None:
                self._fail(refusal)
                return
            self._taken += len(data)
        self._chunks.append(data)

    def _fail(self, error: Exception) -> None:
        self._chunks.clear()
        self._give_back()
        self.over = True
        self._done(Failure(error))
        self._close()

    def _give_back(self) -> None:
        if self._budget is not None:
            self._budget.give_back(self._taken)
            self._taken = 0

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self.over:
            return
        self.over = True
        # PotentialDataLoss: an HTTP/1.0-style body that ends when the
        # connection closes, which is how such a body is meant to end.
        # RESPONSE_DONE first: how octoplex.http11 ends nearly every body,
        # spared check()'s walk of the class hierarchy.
        if reason is RESPONSE_DONE or reason.check(ResponseDone, PotentialDataLoss):
            if self._inflate is not None and not self._inflate.eof:
                self._give_back()
                self._done(Failure(BadGzip("it ends early")))
            else:
                self._done(b"".join(self._chunks))
        else:
            self._give_back()
            self._done(reason)
        self._chunks = []

    def abort(self) -> None:
        """
        Give the read up: close the upstream connection and return what the
        batch's budget lent; ``done`` is not called.
        """
        self.over = True
        self._chunks = []
        self._give_back()
        self._close()

    def _close(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.loseConnection()


def read_body(
    response: IResponse, limit: int, gzip: bool = False, budget: ResponseBudget | None = None
) -> Deferred[bytes]:
    """
    Read ``response``'s whole body.

    :param response: the response whose body to read.
    :param limit: the most bytes to accept (decoded bytes, for gzip); past
        it, the Deferred fails with :class:`BodyTooLarge` and the connection
        is closed.
    :param gzip: decode the body as gzip; one that does not decode fails
        with :class:`BadGzip`.
    :param budget: the bytes left to the batch, if it has a limit; a body
        that passes it fails with :class:`BatchResponsesTooLarge`.
    :return: a Deferred that fires with the body.  Cancelling it closes the
        connection.
    """

    def start(done: Callable[[bytes | Failure], None]) -> BodyReader:
        reader = BodyReader(done, limit, gzip, budget)
        response.deliverBody(reader)
        return reader

    return reading(start)


def reading(start: Callable[[Callable[[_T | Failure], None]], BodyReader]) -> Deferred[_T]:
    """
    What a body reader finds, as a Deferred: ``start(done)`` starts the
    reader, which calls ``done`` once; cancelling the Deferred aborts it
    (the connection is closed).
    """
    reader: BodyReader | None = None

    def cancel(_: Deferred[_T]) -> None:
        if reader is not None:
            reader.abort()

    finished: Deferred[_T] = Deferred(cancel)

    def done(result: _T | Failure) -> None:
        if isinstance(result, Failure):
            finished.errback(result)
        else:
            finished.callback(result)

    reader = start(done)
    return finished
