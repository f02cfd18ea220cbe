"""
The hard limits an operator sets on what one caller may ask of Octoplex.

Every limit has a name that matches its command-line option, so an error
message can tell a caller which limit it broke and an operator which knob
moves it.
"""

from __future__ import annotations

import attr

from octoplex.buffers import default_max_buffered_bytes

#: The original Octoplex accepted at most 50 requests in a batch.
DEFAULT_MAX_BATCH_SIZE = 50

#: The original Octoplex rejected deadlines over one hour.
DEFAULT_MAX_TIMEOUT_MSEC = 3_600_000

#: Bytes of JSON a caller may POST to ``/multiplex``.
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024

#: Bytes of (decoded) body Octoplex reads from one upstream response.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024

#: Batches being answered at once; past it a batch is shed with 503.
DEFAULT_MAX_BATCHES_IN_FLIGHT = 1000

#: Upstream requests of those batches, running or queued; past it, likewise.
DEFAULT_MAX_REQUESTS_IN_FLIGHT = 10_000

#: Batches of one client (its token, else its address) answered at once:
#: a tenth of the global cap, so that at least ten clients fill it.
DEFAULT_MAX_CLIENT_BATCHES_IN_FLIGHT = 100

#: Upstream requests of one client's batches in flight: likewise a tenth.
DEFAULT_MAX_CLIENT_REQUESTS_IN_FLIGHT = 1000

#: Bytes of (decoded) body read from all the upstream responses of a batch.
DEFAULT_MAX_BATCH_RESPONSE_BYTES = 64 * 1024 * 1024

#: Header lines of any HTTP message Octoplex reads or sends: a request to
#: it, an item's request, an upstream's response.
DEFAULT_MAX_HEADER_COUNT = 100

#: Bytes of the head of any such message (start line and headers).
DEFAULT_MAX_HEADER_BYTES = 64 * 1024

#: Inbound connections open at once; one more is answered 503 and closed.
DEFAULT_MAX_CONNECTIONS = 10_000

#: Seconds a caller has to send a request's headers, from its first byte.
DEFAULT_HEADER_TIMEOUT = 10.0

#: Seconds a caller has to send a request's body, once its headers are in.
DEFAULT_BODY_TIMEOUT = 30.0

#: Seconds an inbound keep-alive connection may sit idle between requests.
DEFAULT_IDLE_TIMEOUT = 60.0

#: Bytes of upstream bodies and unsent answers the whole process may hold
#: (:mod:`octoplex.buffers`): an eighth of its memory, 64 MiB to 1 GiB.
DEFAULT_MAX_BUFFERED_BYTES = default_max_buffered_bytes()

#: Seconds an answer may wait in a full send buffer for the caller to read
#: it; then the connection is aborted.
DEFAULT_SEND_TIMEOUT = 30.0

_SECONDS = ("header_timeout", "body_timeout", "idle_timeout", "send_timeout")


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Limits:
    """
    The limits that guard a daemon against one caller.

    :ivar max_batch_size: the most requests one batch may hold.
    :ivar max_timeout_msec: the longest deadline a batch may ask for.
    :ivar max_request_bytes: the largest ``/multiplex`` body accepted.
    :ivar max_response_bytes: the largest upstream body read for one item;
        a larger one fails that item.
    :ivar max_batches_in_flight: batches being answered at once; one more
        is shed at once with ``503`` and ``Retry-After``.
    :ivar max_requests_in_flight: upstream requests of the batches in
        flight; a batch that would pass it is shed likewise.
    :ivar max_client_batches_in_flight: batches of one client (its token's
        name when tokens are on, else its address) being answered at once;
        one more of that client's gets ``429`` with ``Retry-After``.
    :ivar max_client_requests_in_flight: upstream requests of one client's
        batches in flight; a batch of that client that would pass it gets
        ``429`` likewise.
    :ivar max_batch_response_bytes: body bytes read from all the upstream
        responses of one batch; the item whose response passes it fails,
        and the rest of the batch is untouched.
    :ivar max_header_count: header lines in a request to Octoplex, in an
        item's request, and in an upstream's response.
    :ivar max_header_bytes: bytes in the head (start line and headers) of
        each of those.
    :ivar max_connections: inbound connections open at once.
    :ivar header_timeout: seconds a caller has to send a request's headers.
    :ivar body_timeout: seconds a caller has to send a request's body.
    :ivar idle_timeout: seconds an idle inbound connection is kept open.
    :ivar max_buffered_bytes: upstream body bytes being read and answer
        bytes not yet sent that the whole process may hold; a body read that
        would pass it fails its item.
    :ivar send_timeout: seconds an answer may wait, unread, in a full send
        buffer before the connection is aborted.
    """

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_timeout_msec: int = DEFAULT_MAX_TIMEOUT_MSEC
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_batches_in_flight: int = DEFAULT_MAX_BATCHES_IN_FLIGHT
    max_requests_in_flight: int = DEFAULT_MAX_REQUESTS_IN_FLIGHT
    max_client_batches_in_flight: int = DEFAULT_MAX_CLIENT_BATCHES_IN_FLIGHT
    max_client_requests_in_flight: int = DEFAULT_MAX_CLIENT_REQUESTS_IN_FLIGHT
    max_batch_response_bytes: int = DEFAULT_MAX_BATCH_RESPONSE_BYTES
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES
    send_timeout: float = DEFAULT_SEND_TIMEOUT

    def __attrs_post_init__(self) -> None:
        for field in attr.fields(Limits):
            value = getattr(self, field.name)
            if field.name in _SECONDS:
                if type(value) not in (int, float) or not 0 < value < float("inf"):
                    raise ValueError(
                        f"{field.name} is {value!r}; it must be a number of seconds above 0"
                    )
            elif type(value) is not int or value < 1:
                raise ValueError(
                    f"{field.name} is {value!r}; it must be a whole number of at least 1"
                )
