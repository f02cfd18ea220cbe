#!/usr/bin/env python3
"""
A tiny keep-alive HTTP/1.1 server that answers every request with
``200 hello world\\n``: the benchmark's upstream when nginx is not installed,
and the one that can take its time.

Stdlib only (asyncio), and bench/common.py.  It parses just enough HTTP for a benchmark: a request
line, headers, and a Content-Length body; chunked request bodies get 501.

- ``--delay-ms MS`` answers every request MS ms after it arrived, and a path
  ``/delay/MS`` (e.g. ``/delay/50``) that one request; a connection's later
  requests wait their turn, as HTTP/1.1 has it.
- ``GET /stats`` answers at once, as JSON: connections accepted and open,
  requests answered, and requests waiting out a delay (``pending``).
- ``/echo`` answers at once with the request's body, as
  ``application/octet-stream``.
- ``--tls-cert PEM --tls-key PEM`` serves HTTPS instead.

It raises its own RLIMIT_NOFILE to the hard limit, to hold many connections.

    python3 bench/upstream.py --port 8081 [--port 8082 ...] [--host 127.0.0.1] [--delay-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl

from common import raise_nofile

BODY = b"hello world\n"
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(BODY)
KEEP_ALIVE = _HEAD + b"\r\n" + BODY
CLOSE = _HEAD + b"Connection: close\r\n\r\n" + BODY
NOT_IMPLEMENTED = b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD = 64 * 1024


class Counters:
    accepted = 0
    open = 0
    answered = 0
    pending = 0


class Hello(asyncio.Protocol):
    transport: asyncio.Transport
    #: Every request's delay in seconds (--delay-ms), unless its path says.
    delay = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""
        self.waiting: asyncio.TimerHandle | None = None
        Counters.accepted += 1
        Counters.open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        Counters.open -= 1
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None
            Counters.pending -= 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve()

    def _serve(self) -> None:
        while self.buffer and self.waiting is None and not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.transport.close()
                return
            lines = self.buffer[:end].split(b"\r\n")
            keep_alive = not lines[0].endswith(b"HTTP/1.0")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                value = value.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    self.transport.write(NOT_IMPLEMENTED)
                    self.transport.close()
                    return
                elif name == b"connection":
                    keep_alive = value == b"keep-alive" or (keep_alive and value != b"close")
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            parts = lines[0].split(b" ")
            path = parts[1] if len(parts) > 1 else b"/"
            if path == b"/stats":
                self._answer(keep_alive, stats=True)
                continue
            if path == b"/echo":
                self._echo(keep_alive, body)
                continue
            delay = self.delay
            if path.startswith(b"/delay/"):
                delay = int(path[len(b"/delay/") :].split(b"?")[0]) / 1000
            if delay > 0:
                Counters.pending += 1
                self.waiting = asyncio.get_running_loop().call_later(delay, self._late, keep_alive)
                return
            self._answer(keep_alive)

    def _late(self, keep_alive: bool) -> None:
        self.waiting = None
        Counters.pending -= 1
        self._answer(keep_alive)
        self._serve()

    def _echo(self, keep_alive: bool, body: bytes) -> None:
        if self.transport.is_closing():
            return
        Counters.answered += 1
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n%s\r\n%s"
            % (len(body), b"" if keep_alive else b"Connection: close\r\n", body)
        )
        if not keep_alive:
            self.transport.close()

    def _answer(self, keep_alive: bool, stats: bool = False) -> None:
        if self.transport.is_closing():
            return
        if stats:
            body = json.dumps(
                {
                    "accepted": Counters.accepted,
                    "open": Counters.open,
                    "answered": Counters.answered,
                    "pending": Counters.pending,
                }
            ).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            return
        Counters.answered += 1
        if keep_alive:
            self.transport.write(KEEP_ALIVE)
        else:
            self.transport.write(CLOSE)
            self.transport.close()


async def serve(host: str, ports: list[int], context: ssl.SSLContext | None, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    servers = [
        await loop.create_server(Hello, host, port, backlog=backlog, ssl=context) for port in ports
    ]
    scheme = "https" if context else "http"
    for port in ports:
        print(f"upstream listening on {scheme}://{host}:{port}", flush=True)
    await stop
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, action="append", required=True, help="a port; repeatable"
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="answer every request this many ms after it arrived (default: at once); "
        "a path /delay/MS overrides it",
    )
    parser.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--backlog", type=int, default=4096, help="listen backlog")
    args = parser.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    Hello.delay = args.delay_ms / 1000
    raise_nofile()
    asyncio.run(serve(args.host, args.port, context, args.backlog))


if __name__ == "__main__":
    main()
