"""
Load shedding over real sockets: past the in-flight caps a batch gets 503
with Retry-After at once, the batches in flight are untouched, and the
daemon serves again once they are answered.
"""

from __future__ import annotations

import time
from typing import Any

import pytest_twisted
from twisted.internet.defer import ensureDeferred

from octoplex.limits import Limits

from .servers import Caller, Upstream, start_octoplex, wait_until


def _batch(uris: list[str]) -> dict[str, Any]:
    return {"timeout_msec": 10000, "requests": [{"uri": uri} for uri in uris]}


@pytest_twisted.ensureDeferred
async def test_batches_past_the_caps_are_shed_at_once(
    upstream: Upstream, caller: Caller, log_events: list[dict[str, Any]]
) -> None:
    """A batch past the batch cap, or one that would pass the request cap, gets 503 at once."""
    server = start_octoplex(
        Limits(max_batch_size=5, max_batches_in_flight=3, max_requests_in_flight=5)
    )
    url = server.url + "/multiplex"
    # Slow enough to stay in flight through the checks on a loaded machine.
    slow = upstream.url + "/delay/3000"
    try:
        first = ensureDeferred(caller.post(url, _batch([slow, slow])))
        second = ensureDeferred(caller.post(url, _batch([slow])))
        # Both admitted: their requests are at the upstream.
        await wait_until(lambda: upstream.resource.active == 3, "3 requests at the upstream")
        # 3 requests in flight: 3 more would pass the cap of 5.
        started = time.monotonic()
        status, headers, body = await caller.post(url, _batch([slow] * 3))
        # At once, not after the batches in flight.
        assert time.monotonic() - started < 1.0
        assert status == 503
        assert headers.getRawHeaders(b"retry-after") == [b"1"]
        assert body["error"] == (
            "overloaded: 2 batches with 3 requests in flight "
            "(at most 3 batches and 5 requests); retry shortly"
        )
        # 2 more fit; then a fourth batch passes the cap of 3 batches.
        third = ensureDeferred(caller.post(url, _batch([slow] * 2)))
        await wait_until(lambda: upstream.resource.active == 5, "5 requests at the upstream")
        status, _, body = await caller.post(url, _batch([upstream.url + "/hello"]))
        assert status == 503
        assert body["error"].startswith("overloaded: 3 batches with 5 requests in flight")
        # The batches in flight are answered in full.
        for answer, count in ((await first, 2), (await second, 1), (await third, 2)):
            assert answer[0] == 200
            assert [o["Success"]["content"] for o in answer[2]["responses"]] == [
                "delayed 3000"
            ] * count
        # With room again, batches run.
        status, _, body = await caller.post(url, _batch([upstream.url + "/hello"] * 5))
        assert status == 200 and len(body["responses"]) == 5
    finally:
        await server.stop()
    shed = [e for e in log_events if "shed" in e.get("log_format", "")]
    assert [(e["shed_total"], e["size"]) for e in shed] == [(1, 3), (2, 1)]
