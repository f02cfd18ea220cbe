"""
The Twisted transport of :mod:`octoplex.caller`: a batch POSTed with treq,
and its answer read as it arrives.

:func:`octoplex.caller.send` and :func:`octoplex.caller.send_streamed`
import this module when they are called, so that a script that only
sends batches the blocking way never imports Twisted or treq.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss

from octoplex.caller import (
    JSON_CONTENT_TYPE,
    NDJSON_CONTENT_TYPE,
    Batch,
    Outcome,
    Streamed,
    StreamReader,
    answer_outcomes,
    default_timeout,
    is_ndjson,
    refusal,
    request_headers,
    whole_answer_streamed,
)

__all__ = ["send", "send_streamed"]

T = TypeVar("T")


class _Body(Protocol):
    """
    Hands each chunk of a response body to ``on_data`` as it arrives;
    ``finished`` fires when the body is whole.  Cancelling ``finished``, or
    an exception from ``on_data``, stops the reading and closes the
    connection.
    """

    def __init__(self, on_data: Callable[[bytes], object]) -> None:
        self._on_data = on_data
        self._stopped = False
        self.finished: Deferred[None] = Deferred(self._cancel)

    def _stop(self) -> None:
        self._stopped = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _cancel(self, _: Deferred[None]) -> None:
        # The Deferred fails with CancelledError once this returns; the
        # connectionLost that stopping may cause is not the cause.
        self._stop()

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        try:
            self._on_data(data)
        except BaseException:
            failure = Failure()
            self._stop()
            self.finished.errback(failure)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._stopped:
            return
        self._stopped = True
        # PotentialDataLoss: a body without a length, ended by the close.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)


def _deliver(response: Any, on_data: Callable[[bytes], object]) -> Deferred[None]:
    body = _Body(on_data)
    response.deliverBody(body)
    return body.finished


async def _read(response: Any) -> bytes:
    chunks: list[bytes] = []
    await _deliver(response, chunks.append)
    return b"".join(chunks)


def _header(response: Any, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return None if not values else values[-1].decode("latin-1")


async def _post(
    batch: Batch,
    url: str,
    accept: str,
    http: Any,
    token: str | None,
    headers: Mapping[str, str] | None,
) -> Any:
    """
    POST ``batch``; the response, once it is a ``200``.

    :raises BatchRefused: for any other status.
    """
    response = await http.request(
        "POST",
        url,
        data=batch.to_bytes(),
        headers=request_headers(token, headers, accept),
        # A redirect would turn the POST into a GET of somewhere else.
        allow_redirects=False,
        # Read as it arrives: treq would otherwise collect the body first.
        unbuffered=True,
    )
    if response.code != 200:
        raise refusal(
            response.code,
            await _read(response),
            _header(response, b"retry-after"),
            _header(response, b"www-authenticate"),
            response.phrase.decode("latin-1"),
        )
    return response


async def _whole(
    batch: Batch, url: str, http: Any, token: str | None, headers: Mapping[str, str] | None
) -> list[Outcome]:
    response = await _post(batch, url, JSON_CONTENT_TYPE, http, token, headers)
    return answer_outcomes(await _read(response), len(batch.requests))


async def _streamed(
    batch: Batch,
    url: str,
    on_outcome: Callable[[Outcome], object] | None,
    http: Any,
    token: str | None,
    headers: Mapping[str, str] | None,
) -> Streamed:
    response = await _post(batch, url, NDJSON_CONTENT_TYPE, http, token, headers)
    size = len(batch.requests)
    if not is_ndjson(_header(response, b"content-type")):
        return whole_answer_streamed(await _read(response), size, on_outcome)
    reader = StreamReader(size, on_outcome)
    await _deliver(response, reader.feed)
    return reader.finish()


async def _bounded(
    exchange: Callable[[Any], Coroutine[Any, Any, T]],
    url: str,
    http: Any,
    seconds: float,
    reactor: IReactorTime | None,
) -> T:
    """
    Run ``exchange(http)``, on a client of its own if ``http`` is None,
    cancelled after ``seconds``.

    :raises TimeoutError: if it has not finished by then.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    assert reactor is not None
    pool = None
    if http is None:
        # Persistent connections would outlive the call, which owns nothing after it.
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(Agent(reactor, pool=pool))
    running = Deferred.fromCoroutine(exchange(http))
    expired = []

    def expire() -> None:
        expired.append(True)
        running.cancel()

    call = reactor.callLater(seconds, expire)
    try:
        return await running
    except Exception as e:
        if expired:
            raise TimeoutError(f"no whole answer from {url} within {seconds:g} s") from e
        raise
    finally:
        if call.active():
            call.cancel()
        if pool is not None:
            await pool.closeCachedConnections()


async def send(
    batch: Batch,
    url: str,
    http: Any,
    token: str | None,
    headers: Mapping[str, str] | None,
    timeout: float | None,
    reactor: IReactorTime | None,
) -> list[Outcome]:
    """:func:`octoplex.caller.send`, which documents the parameters."""
    seconds = default_timeout(batch) if timeout is None else timeout
    return await _bounded(
        lambda client: _whole(batch, url, client, token, headers), url, http, seconds, reactor
    )


async def send_streamed(
    batch: Batch,
    url: str,
    on_outcome: Callable[[Outcome], object] | None,
    http: Any,
    token: str | None,
    headers: Mapping[str, str] | None,
    timeout: float | None,
    reactor: IReactorTime | None,
) -> Streamed:
    """:func:`octoplex.caller.send_streamed`, which documents the parameters."""
    seconds = default_timeout(batch) if timeout is None else timeout
    return await _bounded(
        lambda client: _streamed(batch, url, on_outcome, client, token, headers),
        url,
        http,
        seconds,
        reactor,
    )
