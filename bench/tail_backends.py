#!/usr/bin/env python3
"""
The upstreams of bench/tail.py, in a process of their own: three HTTP/1.1
keep-alive backends on one port of three loopback addresses, a dead address
whose connects hang, and a twisted.names DNS server that names them.

- ``A`` on 127.0.0.1:PORT answers every request after ``--fast-ms`` (5 ms).
- ``B`` on 127.0.0.2:PORT answers ``--slow-share`` (5 %) of its requests
  after ``--slow-ms`` (200 ms), chosen at random, the rest after
  ``--fast-ms``.
- ``C`` on 127.0.0.3:PORT answers like A while it is up, and goes down in a
  cycle: up ``--c-up`` s, down ``--c-down`` s.  Going down, it closes its
  listener, so that a connect to 127.0.0.3:PORT is refused by the kernel
  (RST), closes its idle keep-alive connections and closes the busy ones
  after their answer (``Connection: close``): a restart, which makes the
  daemon open new connections and some of them meet the refusal.
- ``dead`` on 127.0.0.4:PORT is a listening socket that never accepts, its
  accept queue filled by connections this process opens to it: the kernel
  then drops every further SYN, so a connect to it hangs (a dead machine, a
  firewall) until the caller gives up.
- DNS on 127.0.0.1 (UDP): ``bidder.test`` has A 127.0.0.1, 127.0.0.2 and
  127.0.0.3, ``dead.test`` A 127.0.0.4, TTL 300 s, no AAAA.

Each answer's body is the backend's letter and a newline, so the load
generator sees which backend answered each item.  ``GET /stats`` on the
stats port (127.0.0.1) answers the counters as JSON: per backend the
requests received, those answered, those whose connection went away before
their answer (a hedge's loser, cancelled by the daemon), the slow ones and
the connections accepted; C's down periods; DNS queries.

The ports and whether the dead address drops SYNs are written as JSON to
``--ready-file`` once everything listens.  Needs Twisted (run it with the
project's virtualenv).  SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import DomainError

ADDRESSES = {"A": "127.0.0.1", "B": "127.0.0.2", "C": "127.0.0.3"}
DEAD_ADDRESS = "127.0.0.4"
ZONE = {
    b"bidder.test": list(ADDRESSES.values()),
    b"dead.test": [DEAD_ADDRESS],
}
TTL = 300


class Backend(Factory):
    """One backend: its delays and its counters."""

    def __init__(self, name: str, rng: random.Random, args: argparse.Namespace) -> None:
        self.name = name
        self.rng = rng
        self.fast = args.fast_ms / 1000
        self.slow = args.slow_ms / 1000
        self.slow_share = args.slow_share if name == "B" else 0.0
        self.body = f"{name}\n".encode()
        self.head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(
            self.body
        )
        self.live: set[Answering] = set()
        self.closing = False
        self.counts = {
            "requests": 0,
            "answered": 0,
            "cancelled": 0,
            "slow": 0,
            "connections": 0,
        }

    def buildProtocol(self, addr: Any) -> Answering:
        self.counts["connections"] += 1
        return Answering(self)

    def delay(self) -> float:
        if self.slow_share and self.rng.random() < self.slow_share:
            self.counts["slow"] += 1
            return self.slow
        return self.fast

    def close_connections(self) -> None:
        """Close the idle connections now, the busy ones after their answer."""
        for protocol in list(self.live):
            if protocol.pending is None:
                protocol.transport.loseConnection()
            else:
                protocol.close_after = True


class Answering(Protocol):
    """
    HTTP/1.1 without pipelining (the daemon sends one request at a time on
    a connection): each request head is answered after the backend's delay.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.buffer = b""
        self.pending: Any = None
        self.close_after = False

    def connectionMade(self) -> None:
        self.backend.live.add(self)
        self.transport.setTcpNoDelay(True)
        if self.backend.closing:
            self.close_after = True

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and self.pending is None:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            # The daemon's GETs carry no body; a request that says it closes
            # the connection is answered so.
            if b"\r\nconnection: close" in head.lower():
                self.close_after = True
            self.backend.counts["requests"] += 1
            self.pending = reactor.callLater(self.backend.delay(), self.answer)

    def answer(self) -> None:
        self.pending = None
        backend = self.backend
        backend.counts["answered"] += 1
        if self.close_after or backend.closing:
            self.transport.write(backend.head + b"Connection: close\r\n\r\n" + backend.body)
            self.transport.loseConnection()
            return
        self.transport.write(backend.head + b"\r\n" + backend.body)
        if b"\r\n\r\n" in self.buffer:
            self.dataReceived(b"")

    def connectionLost(self, reason: Any = None) -> None:
        self.backend.live.discard(self)
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
            self.backend.counts["cancelled"] += 1


class Flapping:
    """C's cycle: its listener up for ``up`` s, then closed for ``down`` s."""

    def __init__(self, backend: Backend, port: int, up: float, down: float) -> None:
        self.backend = backend
        self.port_number = port
        self.up, self.down = up, down
        self.listener: Any = None
        self.down_periods = 0
        self.failed_listens = 0

    def start(self) -> None:
        self.backend.closing = False
        try:
            self.listener = reactor.listenTCP(
                self.port_number, self.backend, backlog=128, interface=ADDRESSES["C"]
            )
        except CannotListenError:
            # Rare: the port is briefly not bindable; try again in a moment.
            self.failed_listens += 1
            reactor.callLater(0.05, self.start)
            return
        if self.down > 0:
            reactor.callLater(self.up, self.stop)

    def stop(self) -> None:
        self.down_periods += 1
        self.backend.closing = True
        listener, self.listener = self.listener, None
        listener.stopListening()
        self.backend.close_connections()
        reactor.callLater(self.down, self.start)


class Zone(ResolverBase):
    """The benchmark's names; every query counted."""

    def __init__(self) -> None:
        super().__init__()
        self.queries = 0

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Any:
        self.queries += 1
        addresses = ZONE.get(name.lower().rstrip(b"."))
        if addresses is None:
            return fail(DomainError(name))
        answers = []
        if type in (dns.A, dns.ALL_RECORDS):
            answers = [
                dns.RRHeader(name, dns.A, dns.IN, TTL, dns.Record_A(a, TTL), auth=True)
                for a in addresses
            ]
        return succeed((answers, [], []))


class Stats(Protocol):
    """``GET /stats``: the counters as JSON, then close."""

    def __init__(self, report: Any) -> None:
        self.report = report
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            body = json.dumps(self.report()).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
            )
            self.transport.loseConnection()


def dead_listener(port: int) -> tuple[list[socket.socket], bool]:
    """
    A socket listening on DEAD_ADDRESS:``port`` that never accepts, and
    connections to it until one hangs: from then on the kernel drops every
    SYN to it.  The sockets (to keep open) and whether a connect now hangs.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((DEAD_ADDRESS, port))
    listener.listen(0)
    held = [listener]
    for _ in range(16):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.settimeout(0.2)
        try:
            filler.connect((DEAD_ADDRESS, port))
        except TimeoutError:
            filler.close()
            return held, True
        held.append(filler)
    return held, False


def listen_all(args: argparse.Namespace, backends: dict[str, Backend]) -> tuple[int, list[Any]]:
    """Bind A, B and the dead address on one free port (C starts later)."""
    for _ in range(20):
        first = reactor.listenTCP(args.port, backends["A"], backlog=128, interface=ADDRESSES["A"])
        port = first.getHost().port
        try:
            second = reactor.listenTCP(port, backends["B"], backlog=128, interface=ADDRESSES["B"])
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind((ADDRESSES["C"], port))
            probe.close()
        except (CannotListenError, OSError):
            first.stopListening()
            if args.port:
                raise
            continue
        return port, [first, second]
    raise SystemExit("no port free on 127.0.0.1, .2 and .3 alike")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0: a free one")
    parser.add_argument("--fast-ms", type=float, default=5.0)
    parser.add_argument("--slow-ms", type=float, default=200.0)
    parser.add_argument("--slow-share", type=float, default=0.05)
    parser.add_argument("--c-up", type=float, default=2.0)
    parser.add_argument("--c-down", type=float, default=2.0, help="0: C never goes down")
    parser.add_argument("--seed", type=int, default=19)
    parser.add_argument("--ready-file", required=True)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    backends = {name: Backend(name, rng, args) for name in ADDRESSES}
    port, _listeners = listen_all(args, backends)
    held, drops = dead_listener(port)
    flapping = Flapping(backends["C"], port, args.c_up, args.c_down)
    flapping.start()
    zone = Zone()
    dns_port = reactor.listenUDP(
        0, dns.DNSDatagramProtocol(server.DNSServerFactory(clients=[zone])), interface="127.0.0.1"
    )

    def report() -> dict[str, Any]:
        counts: dict[str, Any] = {name: dict(b.counts) for name, b in backends.items()}
        counts["C"]["down_periods"] = flapping.down_periods
        counts["C"]["up"] = flapping.listener is not None
        counts["dns_queries"] = zone.queries
        return counts

    stats_factory = Factory.forProtocol(lambda: Stats(report))
    stats_port = reactor.listenTCP(0, stats_factory, interface="127.0.0.1")
    ready = {
        "port": port,
        "dns_port": dns_port.getHost().port,
        "stats_port": stats_port.getHost().port,
        "dead_drops_syn": drops,
        "dead_sockets": len(held),
        "pid": os.getpid(),
    }
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ready, f)
    os.replace(tmp, args.ready_file)
    reactor.run()


if __name__ == "__main__":
    main()
