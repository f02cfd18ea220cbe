"""
The hard limits an operator sets on what one caller may ask of Octoplex.

Every limit has a name that matches its command-line option, so an error
message can tell a caller which limit it broke and an operator which knob
moves it.
"""

from __future__ import annotations

import attr

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
    """

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_timeout_msec: int = DEFAULT_MAX_TIMEOUT_MSEC
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_batches_in_flight: int = DEFAULT_MAX_BATCHES_IN_FLIGHT
    max_requests_in_flight: int = DEFAULT_MAX_REQUESTS_IN_FLIGHT

    def __attrs_post_init__(self) -> None:
        for field in attr.fields(Limits):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(
                    f"{field.name} is {value!r}; it must be a whole number of at least 1"
                )
