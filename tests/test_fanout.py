"""
The fan-out over real sockets: order, parallelism, the deadline, upstream
faults, keep-alive reuse, cookie isolation, and what a departing caller
leaves behind.
"""

from __future__ import annotations

import json
import random
import socket
import time
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from octoplex.limits import Limits

from .servers import (
    Caller,
    Octoplex,
    Upstream,
    start_misbehaving,
    start_octoplex,
    wait_until,
)


def _batch(timeout_msec: int, uris: list[str]) -> dict[str, Any]:
    return {"timeout_msec": timeout_msec, "requests": [{"uri": uri} for uri in uris]}


async def _sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_order_is_kept_when_answers_arrive_out_of_order(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """40 requests answered in scrambled order come back in request order."""
    delays = list(range(10, 410, 10))
    random.Random(7).shuffle(delays)
    uris = [f"{upstream.url}/delay/{delay}" for delay in delays]
    status, _, body = await caller.post(octoplex.url + "/multiplex", _batch(5000, uris))
    assert status == 200
    contents = [outcome["Success"]["content"] for outcome in body["responses"]]
    assert contents == [f"delayed {delay}" for delay in delays]


@pytest_twisted.ensureDeferred
async def test_requests_run_in_parallel(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """20 requests of 300 ms each complete in well under 2 x 300 ms."""
    uris = [f"{upstream.url}/delay/300?n={n}" for n in range(20)]
    started = time.monotonic()
    status, _, body = await caller.post(octoplex.url + "/multiplex", _batch(5000, uris))
    elapsed = time.monotonic() - started
    assert status == 200
    assert all(o["Success"]["content"] == "delayed 300" for o in body["responses"])
    assert 0.3 <= elapsed < 0.5, elapsed


@pytest_twisted.ensureDeferred
async def test_deadline_cuts_off_the_slow_request(
    octoplex: Octoplex, upstream: Upstream, caller: Caller, log_events: list[dict[str, Any]]
) -> None:
    """With a 100 ms deadline, a 1 s request times out, the fast ones succeed, in time."""
    slow = f"{upstream.url}/delay/1000"
    uris = [upstream.url + "/hello", slow, upstream.url + "/delay/10"]
    started = time.monotonic()
    status, _, body = await caller.post(octoplex.url + "/multiplex", _batch(100, uris))
    elapsed = time.monotonic() - started
    assert status == 200
    # Honest slack for a shared 2-core machine (CI has seen the reactor stall
    # for 190 ms): the answer is due at 100 ms, long before the 1 s request.
    assert 0.1 <= elapsed < 0.5, elapsed
    fast, late, fast2 = body["responses"]
    assert fast["Success"]["content"] == "Hello world!"
    assert fast2["Success"]["content"] == "delayed 10"
    assert late["Failure"]["error"] == "timeout elapsed"
    assert 100 <= late["Failure"]["duration_msec"] < 500
    # The slow request was cancelled: its connection was closed, not left to finish.
    await wait_until(
        lambda: upstream.resource.finished_early, "the upstream to see the slow request end"
    )
    assert upstream.resource.finished_early == ["/delay/1000"]
    [expiry] = [e for e in log_events if "deadline" in e.get("log_format", "")]
    assert expiry["pending_uris"] == [slow]
    assert expiry["timeout_msec"] == 100


@pytest_twisted.ensureDeferred
async def test_deadline_cancels_a_half_read_body(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """A body still arriving at the deadline is abandoned and its connection closed."""
    batch = _batch(150, [upstream.url + "/stall", upstream.url + "/hello"])
    status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    assert status == 200
    assert body["responses"][0]["Failure"]["error"] == "timeout elapsed"
    assert body["responses"][1]["Success"]["status"] == 200
    await wait_until(
        lambda: upstream.resource.finished_early, "the upstream to see the stalled body end"
    )
    assert upstream.resource.finished_early == ["/stall"]


@pytest_twisted.ensureDeferred
async def test_zero_timeout_times_everything_out(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """timeout_msec 0 is legal and answers at once, every request a timeout."""
    status, _, body = await caller.post(
        octoplex.url + "/multiplex", _batch(0, [upstream.url + "/delay/200"] * 3)
    )
    assert status == 200
    assert [o["Failure"]["error"] for o in body["responses"]] == ["timeout elapsed"] * 3


@pytest_twisted.ensureDeferred
async def test_upstream_faults_are_failures(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """Refused, reset, closed-early and garbage upstreams each give a Failure that says so."""
    # A port nothing listens on: bind one, note it, close it.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    probe.close()
    servers = {mode: start_misbehaving(mode) for mode in ("reset", "close", "garbage")}
    try:
        uris = [refused] + [url + "/" for url, _ in servers.values()]
        uris.append(upstream.url + "/status/503")
        status, _, body = await caller.post(octoplex.url + "/multiplex", _batch(2000, uris))
    finally:
        for _, port in servers.values():
            await port.stopListening()
    assert status == 200
    refused_o, reset_o, close_o, garbage_o, unavailable = body["responses"]
    assert refused_o["Failure"]["error"] == "connection refused by upstream"
    assert "lost or reset" in reset_o["Failure"]["error"]
    assert "closed the connection before sending a response" in close_o["Failure"]["error"]
    assert "invalid HTTP response" in garbage_o["Failure"]["error"]
    assert "this is not HTTP" in garbage_o["Failure"]["error"]
    assert unavailable["Success"]["status"] == 503
    for outcome in (refused_o, reset_o, close_o, garbage_o):
        assert outcome["Failure"]["duration_msec"] < 1000


@pytest_twisted.ensureDeferred
async def test_oversized_response_fails_alone(upstream: Upstream, caller: Caller) -> None:
    """A response body over max-response-bytes fails that request and names the limit."""
    server = start_octoplex(Limits(max_response_bytes=1000))
    try:
        uris = [upstream.url + "/bytes/1000", upstream.url + "/bytes/1001"]
        status, _, body = await caller.post(server.url + "/multiplex", _batch(2000, uris))
    finally:
        await server.stop()
    assert status == 200
    assert body["responses"][0]["Success"]["content"] == "x" * 1000
    assert body["responses"][1]["Failure"]["error"] == (
        "upstream response body exceeded 1000 bytes (--max-response-bytes)"
    )


@pytest_twisted.ensureDeferred
async def test_keep_alive_connections_are_reused(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """100 sequential single-request batches to one upstream use only a few connections."""
    for n in range(100):
        _, _, body = await caller.post(
            octoplex.url + "/multiplex", _batch(2000, [f"{upstream.url}/hello?n={n}"])
        )
        assert body["responses"][0]["Success"]["status"] == 200
    assert 1 <= len(upstream.site.connections) <= 3


@pytest_twisted.ensureDeferred
async def test_no_cookie_crosses_between_batches(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """A cookie one batch's upstream sets is never sent on a later batch's request."""
    url = octoplex.url + "/multiplex"
    _, _, first = await caller.post(url, _batch(2000, [upstream.url + "/set-cookie"]))
    assert "secret-of-caller-one" in first["responses"][0]["Success"]["headers"]["set-cookie"]
    _, _, second = await caller.post(url, _batch(2000, [upstream.url + "/show-cookie"]))
    assert second["responses"][0]["Success"]["content"] == "cookie: <none>"
    # A caller's own Cookie header is still sent as given.
    own = {
        "timeout_msec": 2000,
        "requests": [{"uri": upstream.url + "/show-cookie", "headers": {"Cookie": "mine=1"}}],
    }
    _, _, third = await caller.post(url, own)
    assert third["responses"][0]["Success"]["content"] == "cookie: mine=1"


@pytest_twisted.ensureDeferred
async def test_caller_disconnect_cancels_its_requests(
    octoplex: Octoplex, upstream: Upstream, log_events: list[dict[str, Any]]
) -> None:
    """When the caller hangs up, its batch's upstream requests are cancelled at once."""
    batch = json.dumps(_batch(5000, [upstream.url + "/delay/3000"] * 3)).encode()
    port = octoplex.port.getHost().port
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /multiplex HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(batch) + batch
    )
    await wait_until(lambda: len(upstream.site.connections) == 3, "3 upstream connections")
    sock.close()
    await wait_until(
        lambda: len(upstream.resource.finished_early) == 3, "the 3 requests to be cancelled"
    )
    assert upstream.resource.finished_early == ["/delay/3000"] * 3
    assert any("caller disconnected" in e.get("log_format", "") for e in log_events)


@pytest_twisted.ensureDeferred
async def test_batches_log_structured_events(
    octoplex: Octoplex, upstream: Upstream, caller: Caller, log_events: list[dict[str, Any]]
) -> None:
    """One event per batch has its id, size, outcome counts and elapsed time; no factory noise."""
    uris = [upstream.url + "/hello", upstream.url + "/delay/500", "ftp://x/"]
    await caller.post(octoplex.url + "/multiplex", _batch(100, uris))
    [event] = [e for e in log_events if e.get("log_format", "").startswith("batch {batch_id} from")]
    assert len(event["batch_id"]) == 16
    assert (event["size"], event["succeeded"], event["failed"], event["timed_out"]) == (3, 1, 1, 1)
    assert 100 <= event["elapsed_ms"] < 300
    assert event["client"].startswith("127.0.0.1:")
    noisy = [e for e in log_events if "factory" in str(e.get("log_format", ""))]
    assert not noisy, noisy


@pytest_twisted.ensureDeferred
async def test_uris_differing_in_case_or_escaping_reach_the_upstream_apart(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    The per-URI cache of checked URIs keys on the exact text: URIs that
    differ only in case or escaping each reach the upstream as sent, twice
    over (the second batch is served from the cache).
    """
    paths = ["/uri/A", "/uri/a", "/uri/%41", "/uri/%61", "/uri/a?q=A", "/uri/a?q=%41", "/uri/a?q=a"]
    for _ in range(2):
        batch = _batch(5000, [upstream.url + p for p in paths])
        status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
        assert status == 200
        assert [o["Success"]["content"] for o in body["responses"]] == paths
