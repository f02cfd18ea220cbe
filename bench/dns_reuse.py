#!/usr/bin/env python3
"""
How often Octoplex asks DNS, and opens connections, under steady load.

Everything runs on 127.0.0.1 in this one process: a twisted.names DNS
server that answers ``bench.test`` with 127.0.0.1 and a TTL of 5 s, an HTTP
upstream, and Octoplex's multiplexer and upstream client wired as the daemon
wires them, with its caching resolver installed on the reactor.  Eight
concurrent callers send batches of 10 GETs to ``http://bench.test:PORT/``
for the given time.  It prints DNS queries and new upstream connections per
1,000 sub-requests.

Run it with the project installed (it imports octoplex and Twisted):

    .venv/bin/python bench/dns_reuse.py --duration 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred, fail, succeed
from twisted.names import client as names_client
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import DomainError
from twisted.web.resource import Resource
from twisted.web.server import Site

from octoplex.client import PoolSettings, UpstreamClient
from octoplex.dns import CachingResolver, DNSSettings
from octoplex.egress import EgressPolicy
from octoplex.limits import Limits
from octoplex.multiplexer import Multiplexer
from octoplex.wire import parse_batch

NAME = b"bench.test"
TTL = 5


class Zone(ResolverBase):
    """
    ``bench.test``: A 127.0.0.1 with a 5 s TTL, no AAAA; queries counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.queries = 0

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Any:
        self.queries += 1
        if name.lower() != NAME:
            return fail(DomainError(name))
        answers = []
        if type == dns.A:
            answers = [
                dns.RRHeader(name, dns.A, dns.IN, TTL, dns.Record_A("127.0.0.1", TTL), auth=True)
            ]
        return succeed((answers, [], []))


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello world\n"


class CountingSite(Site):
    noisy = False
    connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return super().buildProtocol(addr)

    def log(self, request: Any) -> None:
        pass


async def drive(multiplexer: Multiplexer, body: bytes, until: float, counts: list[int]) -> None:
    while reactor.seconds() < until:
        result = await multiplexer.run(parse_batch(body, Limits()), "bench")
        counts[0] += len(result.outcomes)
        counts[1] += result.succeeded


async def main(duration: float, callers: int, size: int) -> dict[str, Any]:
    zone = Zone()
    dns_port = reactor.listenUDP(
        0,
        dns.DNSDatagramProtocol(server.DNSServerFactory(clients=[zone])),
        interface="127.0.0.1",
    )
    site = CountingSite(Hello())
    http_port = reactor.listenTCP(0, site, interface="127.0.0.1")
    names = names_client.Resolver(servers=[("127.0.0.1", dns_port.getHost().port)], reactor=reactor)
    resolver = CachingResolver(reactor, names, DNSSettings(), hosts=None)
    previous = reactor.installNameResolver(resolver)
    # The upstream is local, which the default egress policy refuses.
    local = EgressPolicy.from_strings(allow=["127.0.0.0/8"])
    client = UpstreamClient(
        reactor, PoolSettings(), Limits().max_response_bytes, None, resolver, local
    )
    client.startService()
    multiplexer = Multiplexer(reactor, client)
    uri = f"http://bench.test:{http_port.getHost().port}/"
    body = json.dumps({"timeout_msec": 5000, "requests": [{"uri": uri}] * size}).encode()
    counts = [0, 0]
    until = reactor.seconds() + duration
    try:
        await DeferredList(
            [ensureDeferred(drive(multiplexer, body, until, counts)) for _ in range(callers)]
        )
    finally:
        reactor.installNameResolver(previous)
        await client.stopService()
        await http_port.stopListening()
        await dns_port.stopListening()
    subs = counts[0]
    return {
        "duration_s": duration,
        "sub_requests": subs,
        "succeeded": counts[1],
        "dns_queries": zone.queries,
        "dns_queries_per_1k": round(zone.queries * 1000 / subs, 3) if subs else None,
        "upstream_connections": site.connections,
        "upstream_connections_per_1k": round(site.connections * 1000 / subs, 3) if subs else None,
    }


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--duration", type=float, default=20.0, help="seconds (default 20)")
    parser.add_argument("-c", "--callers", type=int, default=8, help="concurrent callers")
    parser.add_argument("-b", "--batch-size", type=int, default=10, help="requests per batch")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []

    def done(result: dict[str, Any]) -> None:
        results.append(result)
        reactor.stop()

    def failed(failure: Any) -> None:
        failure.printTraceback()
        reactor.stop()

    reactor.callWhenRunning(
        lambda: ensureDeferred(main(args.duration, args.callers, args.batch_size)).addCallbacks(
            done, failed
        )
    )
    reactor.run()
    if not results:
        raise SystemExit(1)
    result = results[0]
    print(json.dumps(result, indent=2))
    print(
        f"\n{result['sub_requests']} sub-requests in {args.duration:.0f} s to one name with a "
        f"{TTL} s TTL: {result['dns_queries_per_1k']} DNS queries and "
        f"{result['upstream_connections_per_1k']} new upstream connections per 1,000."
    )
    if result["succeeded"] != result["sub_requests"]:
        raise SystemExit("some sub-requests failed")


if __name__ == "__main__":
    run()
