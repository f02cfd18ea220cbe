#!/usr/bin/env python3
"""
A plain aiohttp multiplexer: Octoplex's peer in bench/peers.py.

It speaks the same JSON wire format (../shared/WIRE-FORMAT.md) on
``POST /multiplex``: a batch ``{"timeout_msec": N, "requests": [{"method",
"uri", "headers", "body"}, ...]}`` in, and ``{"responses": [{"Success":
{"headers", "status", "content", "duration_msec"}} | {"Failure": {"error",
"duration_msec"}}, ...]}`` out, in request order, as compact JSON.  ``GET /``
and ``GET /healthz`` answer ``{"healthy": true}``.

It is written the way a competent aiohttp user would write it, neither
held back nor tuned: an ``aiohttp.web`` application, one shared
``ClientSession`` (a ``TCPConnector`` without a connection limit, keep-alive
as aiohttp does it, a cookie jar that keeps nothing since the callers are
strangers to each other), every item of a batch run with
``asyncio.gather``, each under an ``aiohttp.ClientTimeout`` of what is left
of the batch's deadline, redirects not followed, and stdlib ``json``.  The
default asyncio event loop (no uvloop), no access log, no limits, no
metrics.

    python bench/peer_aiohttp.py --port 8090 [--host 127.0.0.1]

It needs aiohttp (in the project's virtualenv).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector, web

SESSION = web.AppKey("session", ClientSession)
HEALTHY = b'{"healthy":true}'


def _encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _json_response(document: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=_encode(document), status=status, content_type="application/json", charset="utf-8"
    )


async def _one(
    session: ClientSession, item: Any, deadline: float, loop: asyncio.AbstractEventLoop
) -> dict[str, Any]:
    """
    One item of a batch: its outcome, Success or Failure.
    """
    start = loop.time()
    try:
        method = item.get("method", "GET")
        uri = item["uri"]
        headers = item.get("headers") or {}
        body = item.get("body")
        data = body.encode("utf-8") if body is not None else None
        # aiohttp reads a total of 0 as no timeout at all.
        timeout = ClientTimeout(total=max(deadline - start, 0.001))
        async with session.request(
            method, uri, headers=headers, data=data, allow_redirects=False, timeout=timeout
        ) as response:
            content = await response.read()
            return {
                "Success": {
                    "headers": {name.lower(): value for name, value in response.headers.items()},
                    "status": response.status,
                    "content": content.decode("utf-8", "replace"),
                    "duration_msec": int((loop.time() - start) * 1000),
                }
            }
    except asyncio.TimeoutError:
        error = "timeout elapsed"
    except Exception as e:
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return {"Failure": {"error": error, "duration_msec": int((loop.time() - start) * 1000)}}


async def multiplex(request: web.Request) -> web.Response:
    loop = asyncio.get_running_loop()
    arrived = loop.time()
    try:
        document = json.loads(await request.read())
        timeout_msec = document["timeout_msec"]
        items = document["requests"]
        if not isinstance(timeout_msec, int) or timeout_msec < 0:
            raise ValueError("timeout_msec must be a non-negative integer")
        if not isinstance(items, list) or not items:
            raise ValueError("requests must be a non-empty array")
    except (ValueError, KeyError, TypeError) as e:
        return _json_response({"error": f"bad batch: {e}"}, status=400)
    session = request.app[SESSION]
    deadline = arrived + timeout_msec / 1000
    outcomes = await asyncio.gather(*(_one(session, item, deadline, loop) for item in items))
    return _json_response({"responses": outcomes})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=HEALTHY, content_type="application/json", charset="utf-8")


async def _session(app: web.Application) -> AsyncIterator[None]:
    # No connection limit (aiohttp's default is 100); keep-alive as aiohttp does it.
    session = ClientSession(connector=TCPConnector(limit=0), cookie_jar=DummyCookieJar())
    app[SESSION] = session
    yield
    await session.close()


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/multiplex", multiplex)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", healthz)
    app.cleanup_ctx.append(_session)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
