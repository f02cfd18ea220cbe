#!/usr/bin/env python3
"""
A tiny keep-alive HTTP/1.1 server that answers every request with
``200 hello world\\n``: the benchmark's upstream when nginx is not installed.

Stdlib only (asyncio).  It parses just enough HTTP for a benchmark: a request
line, headers, and a Content-Length body; chunked request bodies get 501.

    python3 bench/upstream.py --port 8081 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import signal

BODY = b"hello world\n"
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(BODY)
KEEP_ALIVE = _HEAD + b"\r\n" + BODY
CLOSE = _HEAD + b"Connection: close\r\n\r\n" + BODY
NOT_IMPLEMENTED = b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
MAX_HEAD = 64 * 1024


class Hello(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.buffer:
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
            self.buffer = self.buffer[end + 4 + length :]
            if keep_alive:
                self.transport.write(KEEP_ALIVE)
            else:
                self.transport.write(CLOSE)
                self.transport.close()
                return


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    server = await loop.create_server(Hello, host, port, backlog=1024)
    print(f"upstream listening on {host}:{port}", flush=True)
    async with server:
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
