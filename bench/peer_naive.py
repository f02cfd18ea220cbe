#!/usr/bin/env python3
"""
A naive treq + Klein multiplexer: an optional peer in bench/peers.py
(``--contenders ...,naive``).

The same Klein app, batch and JSON as the floor probe (bench/peer_floor.py),
but each item's request made the way treq's documentation would have it,
with every setting left at its default: ``HTTPClient(Agent(reactor,
pool=HTTPConnectionPool(reactor)))`` (Twisted's HTTP/1.1 client protocol;
the pool keeps at most 2 idle connections per host), treq's own cookie
jar, the URL given as a string, the body buffered by treq, and no
redirects followed (a multiplexer answers a 3xx as it came).  Next to the
floor probe, it shows what the lean agent saves.

    python bench/peer_naive.py --port 8092 [--host 127.0.0.1]

It runs on Twisted's epoll reactor and needs treq and klein (in the
project's virtualenv).
"""

from __future__ import annotations

from typing import Any

from peer_floor import Issue, serve
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool


def naive_issue(reactor: Any) -> Issue:
    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor)))

    def issue(method: str, uri: str, headers: Any, data: Any) -> Deferred[Any]:
        return client.request(method, uri, headers=headers, data=data, allow_redirects=False)

    return issue


def main() -> None:
    serve(__doc__.split("\n\n")[0], naive_issue)


if __name__ == "__main__":
    main()
