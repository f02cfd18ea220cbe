#!/usr/bin/env python3
"""
Example traffic for Octoplex, to fill the dashboard: a steady stream of
batches with a mix of outcomes, and now and then a burst that runs into the
in-flight caps.  Standard library only, so that it runs in Octoplex's image
(docker-compose.yml's ``traffic`` service) as well as anywhere else.

The upstream is WireMock with the stubs of ``tests/wiremock`` (compose), or
the local upstream of ``deploy/grafana/plot.py``, which answers the same
paths.  Each batch holds 3 to 8 requests drawn from:

- ``/hello`` (most of them): ``200`` at once;
- ``/slow``: ``200`` after 1 s, so a batch with an 800 ms deadline is cut;
- ``/unavailable``: the upstream's ``503``, a success for Octoplex;
- ``/fault/reset``, ``/fault/empty``, ``/fault/garbage``: broken answers;
- port 1 of the upstream's host: connection refused;
- ``--refused-url`` (a private address by default): refused by Octoplex's
  egress policy before any connection.

The burst (``--burst-threads`` callers, each sending batches of
``--burst-size`` ``/slow`` requests back to back for ``--burst-for`` seconds
every ``--burst-every`` seconds) is what gets answers 429 (a client over its
share) or 503 (shed).  A refused batch is retried after 0.2 s.

It is bounded: it stops after ``--duration`` seconds or ``--max-batches``
batches, whichever comes first, printing its counts by HTTP status every 10
seconds and at the end.

    python3 deploy/traffic.py --octoplex http://127.0.0.1:8080 \\
        --upstream http://wiremock:8080 --duration 600
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

#: Paths of the upstream, with their weights in a steady batch.
PATHS = (
    ("/hello", 70),
    ("/slow", 8),
    ("/unavailable", 6),
    ("/fault/reset", 3),
    ("/fault/empty", 2),
    ("/fault/garbage", 2),
    ("refused-connection", 4),
    ("refused-egress", 5),
)


class Load:
    """
    The state the callers share: what to send, when to stop, what came back.
    """

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.deadline = time.monotonic() + options.duration
        self.started = time.monotonic()
        self.sent = 0
        self.statuses: Counter[str] = Counter()
        self.lock = threading.Lock()
        upstream = urlsplit(options.upstream)
        self.upstream = options.upstream.rstrip("/")
        self.refused_connection = f"{upstream.scheme}://{upstream.hostname}:1/"
        self.refused_egress = str(options.refused_url)
        target = urlsplit(options.octoplex)
        self.host, self.port = target.hostname or "127.0.0.1", target.port or 80

    def take(self) -> bool:
        """Count one more batch, unless the time or the count is up."""
        with self.lock:
            if time.monotonic() >= self.deadline or self.sent >= self.options.max_batches:
                return False
            self.sent += 1
            return True

    def record(self, status: str) -> None:
        with self.lock:
            self.statuses[status] += 1

    def report(self) -> str:
        with self.lock:
            counts = " ".join(f"{key}={value}" for key, value in sorted(self.statuses.items()))
            return f"{time.monotonic() - self.started:5.0f} s: {self.sent} batches: {counts}"

    def url(self, path: str) -> str:
        if path == "refused-connection":
            return self.refused_connection
        if path == "refused-egress":
            return self.refused_egress
        return self.upstream + path


class Caller:
    """
    One client connection (kept alive), from ``source`` if given.
    """

    def __init__(self, load: Load, source: str | None) -> None:
        self.load = load
        self.source = source
        self.connection: http.client.HTTPConnection | None = None

    def post(self, batch: dict[str, object]) -> str:
        """Send ``batch``; return its answer's status, or the error's name."""
        body = json.dumps(batch).encode()
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(
                    self.load.host,
                    self.load.port,
                    timeout=30,
                    source_address=None if self.source is None else (self.source, 0),
                )
            try:
                self.connection.request(
                    "POST", "/multiplex", body, {"content-type": "application/json"}
                )
                response = self.connection.getresponse()
                response.read()
                if response.getheader("connection", "").lower() == "close":
                    self.close()
                return str(response.status)
            except (OSError, http.client.HTTPException) as e:
                self.close()
                if attempt:
                    return type(e).__name__
        return "unreachable"

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def steady(load: Load, index: int, source: str | None) -> None:
    """Send batches at this caller's share of --rate, until the load ends."""
    rng = random.Random(index)
    caller = Caller(load, source)
    period = load.options.concurrency / load.options.rate
    due = time.monotonic() + rng.random() * period
    paths, weights = zip(*PATHS, strict=True)
    while True:
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        due += period
        if not load.take():
            break
        size = rng.randint(3, 8)
        requests = [{"uri": load.url(path)} for path in rng.choices(paths, weights, k=size)]
        timeout = rng.choice((800, 2000, 2000, 2000))
        load.record(caller.post({"timeout_msec": timeout, "requests": requests}))
    caller.close()


def burst(load: Load, index: int, source: str | None) -> None:
    """Every --burst-every seconds, for --burst-for seconds, send slow batches back to back."""
    options = load.options
    caller = Caller(load, source)
    batch = {
        "timeout_msec": 2000,
        "requests": [{"uri": load.url("/slow")}] * options.burst_size,
    }
    start = load.started + options.burst_every
    while start < load.deadline:
        if time.monotonic() < start:
            time.sleep(min(start - time.monotonic(), max(load.deadline - time.monotonic(), 0)))
            continue
        end = start + options.burst_for
        while time.monotonic() < end and load.take():
            status = caller.post(batch)
            load.record(status)
            if status != "200":
                time.sleep(0.2)
        start += options.burst_every
    caller.close()


def arguments() -> argparse.ArgumentParser:
    """The command line (tests/test_deploy.py parses docker-compose.yml's with it)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--octoplex", default="http://127.0.0.1:8080", help="Octoplex's URL")
    parser.add_argument("--upstream", required=True, help="the upstream's base URL")
    parser.add_argument(
        "--refused-url",
        default="http://10.255.255.1/",
        help="a URL the egress policy refuses (default: a private address)",
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds, at most")
    parser.add_argument("--max-batches", type=int, default=1_000_000, help="batches, at most")
    parser.add_argument("--rate", type=float, default=10.0, help="steady batches per second")
    parser.add_argument("--concurrency", type=int, default=4, help="steady callers")
    parser.add_argument("--burst-every", type=float, default=60.0, help="seconds between bursts")
    parser.add_argument("--burst-for", type=float, default=10.0, help="seconds each burst lasts")
    parser.add_argument("--burst-threads", type=int, default=24, help="callers in a burst")
    parser.add_argument("--burst-size", type=int, default=45, help="requests per burst batch")
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        help="local address the burst callers bind to, in turn (each address is a client "
        "of its own to Octoplex's per-client share); may be repeated",
    )
    return parser


def main() -> None:
    options = arguments().parse_args()
    load = Load(options)
    threads = [
        threading.Thread(target=steady, args=(load, i, None), daemon=True)
        for i in range(options.concurrency)
    ]
    sources = options.source or [None]
    threads += [
        threading.Thread(target=burst, args=(load, i, sources[i % len(sources)]), daemon=True)
        for i in range(options.burst_threads)
    ]
    for thread in threads:
        thread.start()
    last = time.monotonic()
    while any(thread.is_alive() for thread in threads):
        # Every caller stops by the deadline; a request may take its 30 s timeout more.
        if time.monotonic() > load.deadline + 60:
            break
        time.sleep(0.5)
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            print(load.report(), flush=True)
    print(load.report(), flush=True)


if __name__ == "__main__":
    main()
