"""
Outlier ejection across a host's addresses (:mod:`octoplex.outliers`): the
state machine against a fake clock; then, over real sockets, Octoplex
dialling a name that a ``twisted.names`` DNS server on 127.0.0.1 answers
with three loopback addresses, one of which misbehaves: in this process
behind the JSON frontend, and once as the ``twistd --reactor=asyncio``
daemon behind its gRPC frontend.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attr
import grpc
import pytest
import pytest_twisted
from OpenSSL import SSL
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.names import client as names_client
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DomainError
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.web._newclient import Request as ClientRequest
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from octoplex.client import PoolSettings
from octoplex.dns import CachingResolver, DNSSettings
from octoplex.metrics import Metrics, render_text
from octoplex.outliers import (
    ACTIVE,
    EJECTED,
    PROBING,
    Outliers,
    OutlierSettings,
    TrackedUpstreamProtocol,
    usable,
)
from octoplex.tap import Options, makeService, outliers_of
from octoplex.v1 import multiplexer_pb2 as pb
from octoplex.v1 import multiplexer_pb2_grpc as pb_grpc

from .servers import Caller, Octoplex, _CountingSite, serve_dns, start_octoplex, wait_until
from .test_grpc import Daemon, call, wait_serving

KEY = (b"http", b"multi.test", 8080)
OTHER = (b"http", b"other.test", 8080)
THREE = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]

#: Small numbers to reason about; latency judged on 3 answers.
SMALL = OutlierSettings(
    enabled=True,
    consecutive_failures=3,
    consecutive_5xx=0,
    latency_factor=3.0,
    latency_min_samples=3,
    latency_floor=0.05,
    latency_window=10.0,
    ejection_time=10.0,
    max_ejection_time=25.0,
    max_ejected_percent=50,
)


def make(settings: OutlierSettings = SMALL) -> tuple[Outliers, Clock, Metrics]:
    clock = Clock()
    metrics = Metrics()
    outliers = Outliers(clock, settings, metrics)
    # As the upstream client does.
    metrics.ejected_source = outliers.ejected
    return outliers, clock, metrics


def refused() -> Failure:
    return Failure(ConnectionRefusedError())


def connection(outliers: Outliers, address: str, key: Any = KEY) -> TrackedUpstreamProtocol:
    """A new connection to ``address``, attached as the pool attaches it."""
    protocol = TrackedUpstreamProtocol()
    protocol.transport = StringTransport(peerAddress=IPv4Address("TCP", address, 8080))
    outliers.attach(protocol, key)
    assert protocol.outlier is not None
    return protocol


def answer(
    outliers: Outliers, protocol: TrackedUpstreamProtocol, status: int = 200, latency: float = 0.001
) -> None:
    outliers.answered(protocol.outlier, protocol.outlier_epoch, status, latency)  # type: ignore[arg-type]


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return parse_samples(render_text(metrics).decode())


def parse_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Each sample of the Prometheus ``text``, by its name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


# ---------------------------------------------------------------------------
# The state machine, on a fake clock.
# ---------------------------------------------------------------------------


def test_consecutive_connect_failures_eject_and_a_success_resets_the_count() -> None:
    """K refusals in a row eject an address; a connection that opens in between resets them."""
    outliers, _, _ = make()
    assert outliers.choose(KEY, THREE) == (THREE, None)
    for _ in range(2):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    connection(outliers, "127.0.0.3")
    for _ in range(2):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    assert outliers.state(KEY, "127.0.0.3") == ACTIVE
    outliers.connect_failed(KEY, "127.0.0.3", refused())
    assert outliers.state(KEY, "127.0.0.3") == EJECTED
    assert outliers.choose(KEY, THREE) == (["127.0.0.1", "127.0.0.2"], None)


def test_back_off_then_one_probe_whose_success_restores() -> None:
    """After the back-off the address is dialled first, by one connection; an answer restores it."""
    outliers, clock, _ = make()
    outliers.choose(KEY, THREE)
    for _ in range(3):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    clock.advance(9.9)
    assert outliers.choose(KEY, THREE) == (["127.0.0.1", "127.0.0.2"], None)
    clock.advance(0.1)
    assert outliers.choose(KEY, THREE) == (["127.0.0.3", "127.0.0.1", "127.0.0.2"], "127.0.0.3")
    assert outliers.state(KEY, "127.0.0.3") == PROBING
    # While the probe is out, no other connection dials it.
    assert outliers.choose(KEY, THREE) == (["127.0.0.1", "127.0.0.2"], None)
    probe = connection(outliers, "127.0.0.3")
    assert usable(probe)
    answer(outliers, probe)
    assert outliers.state(KEY, "127.0.0.3") == ACTIVE
    assert usable(probe)
    assert outliers.choose(KEY, THREE) == (THREE, None)


def test_a_failed_probe_re_ejects_for_longer_up_to_the_most() -> None:
    """Each failed probe ejects again for base x times ejected, capped at the longest."""
    outliers, clock, _ = make()
    outliers.choose(KEY, THREE)
    for _ in range(3):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    for back_off in (10.0, 20.0, 25.0, 25.0):
        clock.advance(back_off - 0.1)
        assert outliers.choose(KEY, THREE)[1] is None, back_off
        clock.advance(0.1)
        assert outliers.choose(KEY, THREE)[1] == "127.0.0.3"
        outliers.connect_failed(KEY, "127.0.0.3", refused())
        assert outliers.state(KEY, "127.0.0.3") == EJECTED


def test_a_probe_cancelled_or_silent_gives_its_turn_to_the_next_connection() -> None:
    """A probe connect cancelled frees the probe at once; a silent probe after the base back-off."""
    outliers, clock, _ = make()
    outliers.choose(KEY, THREE)
    for _ in range(3):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    clock.advance(10)
    assert outliers.choose(KEY, THREE)[1] == "127.0.0.3"
    outliers.probe_dropped(KEY, "127.0.0.3")
    assert outliers.choose(KEY, THREE)[1] == "127.0.0.3"
    silent = connection(outliers, "127.0.0.3")
    clock.advance(10)
    assert outliers.choose(KEY, THREE)[1] == "127.0.0.3"
    # The silent one's answer, late, no longer counts, and it is not reused.
    answer(outliers, silent)
    assert outliers.state(KEY, "127.0.0.3") == PROBING
    assert not usable(silent)


def test_pooled_connections_to_an_ejected_address_are_not_reused() -> None:
    """A connection opened before its address was ejected is never reused, even once restored."""
    outliers, clock, _ = make()
    outliers.choose(KEY, THREE)
    old = connection(outliers, "127.0.0.3")
    sibling = connection(outliers, "127.0.0.1")
    for _ in range(3):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    assert not usable(old)
    assert usable(sibling)
    # Its late answer does not count either.
    answer(outliers, old)
    clock.advance(10)
    outliers.choose(KEY, THREE)
    answer(outliers, connection(outliers, "127.0.0.3"))
    assert outliers.state(KEY, "127.0.0.3") == ACTIVE
    assert not usable(old)


@implementer(ISSLTransport)
class _TLSTransport(StringTransport):
    """A transport that says it is TLS."""


def test_tls_handshake_failures_count_as_connect_failures() -> None:
    """A TLS connection lost before its handshake is a connect failure; a handshake resets them."""
    outliers, clock, _ = make()
    outliers.choose(KEY, THREE)

    def tls_connection() -> TrackedUpstreamProtocol:
        protocol = TrackedUpstreamProtocol()
        protocol.clock = clock
        protocol.transport = _TLSTransport(peerAddress=IPv4Address("TCP", "127.0.0.3", 443))
        outliers.attach(protocol, KEY)
        assert protocol.tls_pending
        return protocol

    for _ in range(2):
        tls_connection().connectionLost(Failure(SSL.Error("handshake failure")))
    tls_connection().handshakeCompleted()
    for _ in range(2):
        tls_connection().connectionLost(Failure(SSL.Error("handshake failure")))
    assert outliers.state(KEY, "127.0.0.3") == ACTIVE
    tls_connection().connectionLost(Failure(SSL.Error("handshake failure")))
    assert outliers.state(KEY, "127.0.0.3") == EJECTED


def test_5xx_ejects_only_when_counted() -> None:
    """With consecutive_5xx 0 no 5xx ejects; with 3, three in a row do, and a 2xx resets them."""
    outliers, _, _ = make()
    outliers.choose(KEY, THREE)
    bad = connection(outliers, "127.0.0.3")
    for _ in range(10):
        answer(outliers, bad, 503)
    assert outliers.state(KEY, "127.0.0.3") == ACTIVE

    outliers, _, _ = make(OutlierSettings(**{**_fields(SMALL), "consecutive_5xx": 3}))
    outliers.choose(KEY, THREE)
    bad = connection(outliers, "127.0.0.3")
    answer(outliers, bad, 500)
    answer(outliers, bad, 502)
    answer(outliers, bad, 200)
    answer(outliers, bad, 503)
    answer(outliers, bad, 503)
    assert outliers.state(KEY, "127.0.0.3") == ACTIVE
    answer(outliers, bad, 503)
    assert outliers.state(KEY, "127.0.0.3") == EJECTED


def _fields(settings: OutlierSettings) -> dict[str, Any]:
    return attr.asdict(settings)


def _traffic(outliers: Outliers, latencies: dict[str, float], rounds: int) -> None:
    connections = {a: connection(outliers, a) for a in latencies}
    for _ in range(rounds):
        for address, latency in latencies.items():
            answer(outliers, connections[address], 200, latency)


def test_a_latency_outlier_is_ejected() -> None:
    """An address answering in 300 ms while its siblings take 2 ms is ejected for latency."""
    outliers, _, metrics = make()
    outliers.choose(KEY, THREE)
    _traffic(outliers, {"127.0.0.1": 0.002, "127.0.0.2": 0.002, "127.0.0.3": 0.3}, 3)
    assert outliers.state(KEY, "127.0.0.3") == EJECTED
    assert (
        samples(metrics)[
            "octoplex_upstream_ejections_total",
            (("host", "http://multi.test:8080"), ("reason", "latency")),
        ]
        == 1
    )


@pytest.mark.parametrize(
    ("latencies", "rounds"),
    [
        # 1 ms against 3 ms: three times as slow, but under the floor.
        ({"127.0.0.1": 0.001, "127.0.0.2": 0.001, "127.0.0.3": 0.004}, 5),
        # Too few answers to judge.
        ({"127.0.0.1": 0.001, "127.0.0.2": 0.001, "127.0.0.3": 0.5}, 2),
        # Slower, but not three times the median.
        ({"127.0.0.1": 0.2, "127.0.0.2": 0.2, "127.0.0.3": 0.5}, 5),
    ],
)
def test_latency_below_the_floor_factor_or_samples_ejects_nothing(
    latencies: dict[str, float], rounds: int
) -> None:
    """The floor, the factor and the sample count each keep an address in."""
    outliers, _, _ = make()
    outliers.choose(KEY, THREE)
    _traffic(outliers, latencies, rounds)
    assert [outliers.state(KEY, a) for a in THREE] == [ACTIVE] * 3


def test_latency_factor_zero_never_ejects() -> None:
    """With latency_factor 0, latency ejects nothing."""
    outliers, _, _ = make(OutlierSettings(**{**_fields(SMALL), "latency_factor": 0.0}))
    outliers.choose(KEY, THREE)
    _traffic(outliers, {"127.0.0.1": 0.002, "127.0.0.2": 0.002, "127.0.0.3": 0.9}, 5)
    assert outliers.state(KEY, "127.0.0.3") == ACTIVE


def test_requests_cancelled_unanswered_count_their_wait_as_a_latency() -> None:
    """
    An address whose requests are all cancelled unanswered after 300 ms
    (a deadline, a hedge that won) while its siblings answer in 2 ms is
    ejected for latency: the wait is a lower bound of its latency.  The
    cancellation goes through the connection, as the pool's does: a
    request still being written, or answered, counts no wait.
    """
    outliers, clock, _ = make()
    outliers.choose(KEY, THREE)
    quick = {a: connection(outliers, a) for a in ("127.0.0.1", "127.0.0.2")}
    hanging = connection(outliers, "127.0.0.3")
    hanging.clock = clock
    for _ in range(3):
        for protocol in quick.values():
            answer(outliers, protocol, 200, 0.002)
        headers = Headers({b"host": [b"multi.test"]})
        sent = hanging.request(ClientRequest(b"GET", b"/", headers, None, persistent=True))
        clock.advance(0.3)
        assert outliers.state(KEY, "127.0.0.3") == ACTIVE
        sent.addErrback(lambda f: f.trap(ResponseNeverReceived))
        sent.cancel()
        # A new connection, as the pool opens after cancelling one.
        hanging = connection(outliers, "127.0.0.3")
        hanging.clock = clock
    assert outliers.state(KEY, "127.0.0.3") == EJECTED


def test_a_wait_resets_no_failure_count_and_a_probe_ignores_it() -> None:
    """
    A cancelled request's wait is only a latency: a run of failures goes
    on through it, and a probe is not judged by it.
    """
    outliers, clock, _ = make()
    outliers.choose(KEY, THREE)
    protocol = connection(outliers, "127.0.0.3")
    address = protocol.outlier
    outliers.connect_failed(KEY, "127.0.0.3", refused())
    outliers.connect_failed(KEY, "127.0.0.3", refused())
    outliers.waited(address, protocol.outlier_epoch, 0.001)  # type: ignore[arg-type]
    outliers.connect_failed(KEY, "127.0.0.3", refused())
    assert outliers.state(KEY, "127.0.0.3") == EJECTED

    clock.advance(SMALL.ejection_time)
    assert outliers.choose(KEY, THREE)[1] == "127.0.0.3"
    probe = connection(outliers, "127.0.0.3")
    assert outliers.state(KEY, "127.0.0.3") == PROBING
    outliers.waited(probe.outlier, probe.outlier_epoch, 5.0)  # type: ignore[arg-type]
    assert outliers.state(KEY, "127.0.0.3") == PROBING
    answer(outliers, probe)
    assert outliers.state(KEY, "127.0.0.3") == ACTIVE


def test_one_address_is_never_ejected_and_at_most_the_share_is() -> None:
    """A host with one address is never ejected; of three, at 50 %, one at most; of four, two."""
    outliers, _, _ = make()
    outliers.choose(OTHER, ["127.0.0.1"])
    for _ in range(20):
        outliers.connect_failed(OTHER, "127.0.0.1", refused())
    assert outliers.state(OTHER, "127.0.0.1") == ACTIVE

    outliers.choose(KEY, THREE)
    for _ in range(3):
        outliers.connect_failed(KEY, "127.0.0.2", refused())
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    assert [outliers.state(KEY, a) for a in THREE] == [ACTIVE, EJECTED, ACTIVE]

    four = [*THREE, "127.0.0.4"]
    outliers.choose(KEY, four)
    for _ in range(3):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
        outliers.connect_failed(KEY, "127.0.0.4", refused())
    assert [outliers.state(KEY, a) for a in four] == [ACTIVE, EJECTED, EJECTED, ACTIVE]


def test_every_address_out_dials_them_all() -> None:
    """With 100 % allowed and every address ejected, a connection dials all of them."""
    outliers, _, _ = make(OutlierSettings(**{**_fields(SMALL), "max_ejected_percent": 100}))
    outliers.choose(KEY, THREE[:2])
    for _ in range(3):
        for address in THREE[:2]:
            outliers.connect_failed(KEY, address, refused())
    assert [outliers.state(KEY, a) for a in THREE[:2]] == [EJECTED, EJECTED]
    assert outliers.choose(KEY, THREE[:2]) == (THREE[:2], None)


def test_the_back_off_is_forgiven_after_a_long_good_spell() -> None:
    """Once active for the longest back-off, an address's next ejection is the first again."""
    outliers, clock, _ = make()
    outliers.choose(KEY, THREE)
    for _ in range(3):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    clock.advance(10)
    outliers.choose(KEY, THREE)
    answer(outliers, connection(outliers, "127.0.0.3"))
    clock.advance(25)
    for _ in range(3):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    clock.advance(10)
    assert outliers.choose(KEY, THREE)[1] == "127.0.0.3"


def test_hosts_are_bounded_and_idle_ones_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_HOSTS the least recently used host goes; prune forgets quiet hosts."""
    from octoplex import outliers as module

    monkeypatch.setattr(module, "MAX_HOSTS", 3)
    outliers, clock, _ = make()
    for n in range(5):
        outliers.choose((b"http", b"h%d.test" % n, 80), THREE)
    assert len(outliers) == 3
    outliers.choose(KEY, THREE)
    for _ in range(3):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    clock.advance(10)
    # Quiet for a window: every host but the one with an address out.
    assert outliers.prune() == 2
    clock.advance(25)
    assert outliers.prune() == 1
    assert len(outliers) == 0


def test_metrics_and_log_events(log_events: list[dict[str, Any]]) -> None:
    """Ejected, probing, re-ejected and restored are events; the gauge and counter follow."""
    outliers, clock, metrics = make()
    outliers.choose(KEY, THREE)
    for _ in range(3):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    gauge = (
        "octoplex_upstream_address_ejected",
        (("address", "127.0.0.3"), ("host", "http://multi.test:8080")),
    )
    assert samples(metrics)[gauge] == 1
    clock.advance(10)
    outliers.choose(KEY, THREE)
    outliers.connect_failed(KEY, "127.0.0.3", refused())
    clock.advance(20)
    outliers.choose(KEY, THREE)
    assert samples(metrics)[gauge] == 1
    answer(outliers, connection(outliers, "127.0.0.3"))
    assert gauge not in samples(metrics)
    found = samples(metrics)
    for reason, count in (("connect", 1), ("probe", 1)):
        labels = (("host", "http://multi.test:8080"), ("reason", reason))
        assert found["octoplex_upstream_ejections_total", labels] == count

    events = [e for e in log_events if "outlier" in e]
    assert [(e["outlier"], e["log_level"].name) for e in events] == [
        ("ejected", "warn"),
        ("probing", "info"),
        ("re_ejected", "warn"),
        ("probing", "info"),
        ("restored", "info"),
    ]
    assert all(e["host"] == "multi.test:8080" and e["address"] == "127.0.0.3" for e in events)
    ejected = events[0]
    assert ejected["seconds"] == 10
    assert ejected["reason"] == "3 consecutive connect failures (connection refused by upstream)"
    assert events[2]["seconds"] == 20
    assert formatEvent(ejected) == (
        "address 127.0.0.3 of multi.test:8080 ejected for 10 s: 3 consecutive connect "
        "failures (connection refused by upstream)"
    )


def test_reconfigure_keeps_states() -> None:
    """New settings keep the addresses' states and apply from the next outcome."""
    outliers, _, _ = make()
    outliers.choose(KEY, THREE)
    for _ in range(3):
        outliers.connect_failed(KEY, "127.0.0.3", refused())
    outliers.connect_failed(KEY, "127.0.0.2", refused())
    outliers.reconfigure(OutlierSettings(**{**_fields(SMALL), "consecutive_failures": 2}))
    assert outliers.state(KEY, "127.0.0.3") == EJECTED
    outliers.connect_failed(KEY, "127.0.0.1", refused())
    outliers.connect_failed(KEY, "127.0.0.1", refused())
    # At most one of three is out.
    assert outliers.state(KEY, "127.0.0.1") == ACTIVE


def test_options_make_the_settings() -> None:
    """The --outlier-* options make the settings; off by default; a bad pair is refused."""
    options = Options(list)
    options.parseOptions([])
    assert outliers_of(options) == OutlierSettings()
    assert not OutlierSettings().enabled
    options = Options(list)
    options.parseOptions(
        [
            "--outlier-ejection",
            "on",
            "--outlier-consecutive-5xx",
            "4",
            "--outlier-ejection-time",
            "5",
        ]
    )
    settings = outliers_of(options)
    assert (settings.enabled, settings.consecutive_5xx, settings.ejection_time) == (True, 4, 5.0)
    with pytest.raises(UsageError, match=r"--outlier-ejection-time 400\.0 is above"):
        Options(list).parseOptions(["--outlier-ejection-time", "400"])
    with pytest.raises(UsageError):
        Options(list).parseOptions(["--outlier-max-ejected-percent", "101"])


def test_a_reload_turns_it_on_and_off(tmp_path: Path) -> None:
    """SIGHUP's reload applies the [outlier] keys to the running client, its states kept."""
    config = tmp_path / "octoplex.toml"
    config.write_text("[outlier]\nejection = 'on'\nconsecutive_failures = 3\n")
    options = Options(list)
    options.parseOptions(["--workers", "1", "--listen", "tcp:0", "--config", str(config)])
    root: Any = makeService(options)
    outliers = root.client.outliers
    assert outliers is not None
    assert outliers.settings.consecutive_failures == 3
    config.write_text("[outlier]\nejection = 'on'\nconsecutive_5xx = 2\n")
    root.reload()
    assert root.client.outliers is outliers
    assert (outliers.settings.consecutive_failures, outliers.settings.consecutive_5xx) == (5, 2)
    config.write_text("")
    root.reload()
    assert root.client.outliers is None


# ---------------------------------------------------------------------------
# Over real sockets: a DNS server, and a name with three loopback addresses.
# ---------------------------------------------------------------------------


class Zone(ResolverBase):
    """``multi.test``: 127.0.0.1-3; ``one.test``: 127.0.0.1; nothing else."""

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        host = name.decode("ascii").lower()
        addresses = {"multi.test": THREE, "one.test": ["127.0.0.1"]}.get(host)
        if addresses is None:
            return fail(DomainError(name))
        if type != dns.A:
            return succeed(([], [], []))
        records = [dns.RRHeader(host, dns.A, dns.IN, 60, dns.Record_A(a, 60)) for a in addresses]
        return succeed((records, [], []))


class Answer(Resource):
    """Answer every request with ``status`` after ``delay`` seconds; count them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.delay = 0.0
        self.requests = 0

    def render(self, request: Request) -> Any:
        self.requests += 1
        request.setResponseCode(self.status)
        if not self.delay:
            return b"ok"
        call = reactor.callLater(self.delay, lambda: (request.write(b"ok"), request.finish()))
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return NOT_DONE_YET


class World:
    """The DNS server, a server on each of 127.0.0.1-3 (one port), and Octoplex."""

    def __init__(self) -> None:
        self.answers = {a: Answer() for a in THREE}
        self.sites = {a: _CountingSite(self.answers[a]) for a in THREE}
        self.ports: dict[str, Any] = {}
        self.octoplex: Octoplex | None = None
        self.metrics = Metrics()
        self._dns = serve_dns(Zone())
        for _ in range(20):
            try:
                port = 0
                for address in THREE:
                    listening = reactor.listenTCP(port, self.sites[address], interface=address)
                    port = listening.getHost().port
                    self.ports[address] = listening
                self.port = port
                break
            except CannotListenError:
                for listening in self.ports.values():
                    listening.stopListening()
                self.ports = {}
        else:
            raise AssertionError("no port free on all of 127.0.0.1-3")
        names = names_client.Resolver(
            servers=[("127.0.0.1", self._dns.getHost().port)], reactor=reactor
        )
        self.resolver = CachingResolver(reactor, names, DNSSettings(min_ttl=60), hosts=None)

    def start(self, outliers: OutlierSettings | None, keep_alive: bool = False) -> Octoplex:
        # Without keep_alive, one request per connection: every request dials.
        self.octoplex = start_octoplex(
            pool=PoolSettings() if keep_alive else PoolSettings(max_requests=1),
            metrics=self.metrics,
            resolver=self.resolver,
            outliers=outliers,
        )
        return self.octoplex

    @property
    def dns_server(self) -> str:
        """The DNS server's address, as ``--dns-server`` takes it."""
        return f"127.0.0.1:{self._dns.getHost().port}"

    def url(self, name: str = "multi.test", path: str = "/x") -> str:
        return f"http://{name}:{self.port}{path}"

    def state(self, address: str, name: str = "multi.test") -> str:
        assert self.octoplex is not None
        outliers = self.octoplex.client.outliers
        assert outliers is not None
        return outliers.state((b"http", name.encode(), self.port), address)

    def accepted(self, address: str) -> int:
        return len(self.sites[address].connections)

    def close(self, address: str) -> None:
        self.ports.pop(address).stopListening()

    def reopen(self, address: str) -> None:
        self.sites[address] = _CountingSite(self.answers[address])
        self.ports[address] = reactor.listenTCP(self.port, self.sites[address], interface=address)

    async def stop(self) -> None:
        if self.octoplex is not None:
            await self.octoplex.stop()
        for address in list(self.ports):
            await self.ports.pop(address).stopListening()
        await self._dns.stopListening()


def closed_port() -> int:
    """A port of 127.0.0.1 with nothing listening (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def in_world(test: Callable[[World], Any]) -> None:
    world = World()
    try:
        await test(world)
    finally:
        await world.stop()


async def batch(caller: Caller, world: World, uris: list[str]) -> list[dict[str, Any]]:
    assert world.octoplex is not None
    document = {"timeout_msec": 5000, "requests": [{"uri": uri} for uri in uris]}
    status, _, body = await caller.post(world.octoplex.url + "/multiplex", document)
    assert status == 200, body
    return [o.get("Success") or o["Failure"] for o in body["responses"]]


def statuses(items: list[dict[str, Any]]) -> list[Any]:
    return [item.get("status", item.get("kind")) for item in items]


#: Quick to eject, latency left out unless a test asks for it.
LIVE = OutlierSettings(
    enabled=True,
    consecutive_failures=3,
    latency_factor=0.0,
    ejection_time=4.0,
    max_ejection_time=20.0,
)


@pytest_twisted.ensureDeferred
async def test_a_refusing_address_is_ejected_then_probed_then_restored(
    caller: Caller, log_events: list[dict[str, Any]]
) -> None:
    """
    An address that refuses is ejected after 3 refusals and gets no
    connection attempt during its back-off, the batch's items all answered
    by its siblings; then exactly one probe connects to it, and once that
    succeeds it gets traffic again.
    """

    async def test(world: World) -> None:
        world.close("127.0.0.3")
        world.start(LIVE)
        items = await batch(caller, world, [world.url()] * 12)
        # Every refusal failed over to a sibling at once.
        assert statuses(items) == [200] * 12
        assert world.state("127.0.0.3") == EJECTED
        ejected_at = reactor.seconds()

        # A listener there now counts every connection attempt.
        world.reopen("127.0.0.3")
        items = await batch(caller, world, [world.url()] * 12)
        assert statuses(items) == [200] * 12
        assert reactor.seconds() < ejected_at + LIVE.ejection_time, "too slow to tell"
        assert world.accepted("127.0.0.3") == 0
        assert world.state("127.0.0.3") == EJECTED

        await wait_until(
            lambda: reactor.seconds() >= ejected_at + LIVE.ejection_time, "the back-off"
        )
        items = await batch(caller, world, [world.url()] * 12)
        assert statuses(items) == [200] * 12
        assert world.accepted("127.0.0.3") == 1
        assert world.answers["127.0.0.3"].requests == 1
        assert world.state("127.0.0.3") == ACTIVE

        items = await batch(caller, world, [world.url()] * 12)
        assert statuses(items) == [200] * 12
        assert world.accepted("127.0.0.3") > 1
        events = [e["outlier"] for e in log_events if "outlier" in e]
        assert events == ["ejected", "probing", "restored"]

    await in_world(test)


def _ejecting_daemon(world: World, tmp_path: Path, ejection_time: float) -> Daemon:
    """
    The gRPC daemon, asking ``world``'s DNS server, ejecting an address after
    3 refused connects for ``ejection_time`` s (latency never ejects), and
    dialling for every request (one request per connection).
    """
    options = ["--outlier-ejection", "on", "--outlier-consecutive-failures", "3"]
    options += ["--outlier-latency-factor", "0", "--outlier-ejection-time", str(ejection_time)]
    options += ["--pool-max-requests", "1", "--dns-server", world.dns_server]
    return Daemon(tmp_path, options, plain=True, tls=False)


@pytest_twisted.ensureDeferred
async def test_a_refusing_address_is_ejected_behind_the_grpc_frontend(
    caller: Caller, tmp_path: Path
) -> None:
    """
    The gRPC daemon with --outlier-ejection on ejects an address that
    refuses, the batch's items all answered by its siblings, and dials it no
    more during its back-off; its metrics and log say so.
    """
    ejection_time = 5.0

    async def test(world: World) -> None:
        world.close("127.0.0.3")
        daemon = _ejecting_daemon(world, tmp_path, ejection_time)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
                await deferToThread(wait_serving, daemon, channel)
                stub = pb_grpc.MultiplexerStub(channel)
                twelve = pb.Batch(timeout_msec=5000, requests=[pb.Request(uri=world.url())] * 12)
                # The back-off starts after this, when the daemon ejects.
                sent = reactor.seconds()
                answered = await call(stub.Multiplex, twelve, metadata=())
                assert [o.success.status for o in answered.outcomes] == [200] * 12
                status, _, text = await caller.get(f"http://127.0.0.1:{daemon.http_port}/metrics")
                assert status == 200
                host = f"http://multi.test:{world.port}"
                found = parse_samples(text.decode())
                ejected = ("address", "127.0.0.3"), ("host", host)
                assert found.get(("octoplex_upstream_address_ejected", ejected)) == 1
                connect = ("host", host), ("reason", "connect")
                assert found["octoplex_upstream_ejections_total", connect] == 1

                # A listener there now counts every connection attempt.
                world.reopen("127.0.0.3")
                answered = await call(stub.Multiplex, twelve, metadata=())
                assert [o.success.status for o in answered.outcomes] == [200] * 12
                assert reactor.seconds() < sent + ejection_time, "too slow to tell"
                assert world.accepted("127.0.0.3") == 0
                siblings = world.answers["127.0.0.1"], world.answers["127.0.0.2"]
                assert sum(answer.requests for answer in siblings) == 24
        finally:
            daemon.stop()
        assert daemon.errors() == []
        events = [e for e in daemon.events() if "outlier" in e]
        assert [(e["outlier"], e["address"]) for e in events] == [("ejected", "127.0.0.3")]
        assert events[0]["host"] == f"multi.test:{world.port}"

    await in_world(test)


@pytest_twisted.ensureDeferred
async def test_an_address_answering_5xx_is_ejected_when_counted(caller: Caller) -> None:
    """
    With consecutive 5xx counted, an address answering 503 is ejected: its
    pooled keep-alive connections are not reused, nor is it dialled; the
    metrics say so.
    """
    settings = OutlierSettings(**{**_fields(LIVE), "consecutive_5xx": 3})

    async def test(world: World) -> None:
        world.answers["127.0.0.3"].status = 503
        world.start(settings, keep_alive=True)
        items = await batch(caller, world, [world.url()] * 9)
        # Its answers are the callers' answers: ejection does not retry.
        assert sorted(statuses(items)) == [200] * 6 + [503] * 3
        assert world.state("127.0.0.3") == EJECTED
        before = world.answers["127.0.0.3"].requests
        # Twice as many as the pool holds: idle connections and new ones.
        items = await batch(caller, world, [world.url()] * 18)
        assert statuses(items) == [200] * 18
        assert world.answers["127.0.0.3"].requests == before
        assert world.accepted("127.0.0.3") == 3
        host = f"http://multi.test:{world.port}"
        found = samples(world.metrics)
        assert (
            found["octoplex_upstream_address_ejected", (("address", "127.0.0.3"), ("host", host))]
            == 1
        )
        assert found["octoplex_upstream_ejections_total", (("host", host), ("reason", "5xx"))] == 1

    await in_world(test)


@pytest_twisted.ensureDeferred
async def test_a_far_slower_address_is_ejected(caller: Caller) -> None:
    """An address answering in 300 ms while its siblings answer at once is ejected for latency."""
    settings = OutlierSettings(**{**_fields(LIVE), "latency_factor": 3.0, "latency_min_samples": 3})

    async def test(world: World) -> None:
        world.answers["127.0.0.3"].delay = 0.3
        world.start(settings)

        async def traffic() -> bool:
            await batch(caller, world, [world.url()] * 6)
            return world.state("127.0.0.3") == EJECTED

        for _ in range(15):
            if await traffic():
                break
        assert world.state("127.0.0.3") == EJECTED
        assert world.state("127.0.0.1") == world.state("127.0.0.2") == ACTIVE
        before = world.answers["127.0.0.3"].requests
        await batch(caller, world, [world.url()] * 6)
        assert world.answers["127.0.0.3"].requests == before

    await in_world(test)


@pytest_twisted.ensureDeferred
async def test_one_address_hosts_and_the_share_and_other_hosts(caller: Caller) -> None:
    """
    A name with one refusing address is never ejected; of three addresses
    two refusing, one only is ejected; the other items of the batch are
    answered as usual.
    """

    async def test(world: World) -> None:
        world.close("127.0.0.2")
        world.close("127.0.0.3")
        world.start(LIVE)
        dead_alone = f"http://one.test:{closed_port()}/x"
        for _ in range(2):
            items = await batch(caller, world, [world.url()] * 9 + [dead_alone] * 4)
            assert statuses(items) == [200] * 9 + ["connect"] * 4
        assert [world.state(a) for a in THREE].count(EJECTED) == 1
        assert world.state("127.0.0.1") == ACTIVE
        assert world.state("127.0.0.1", "one.test") == ACTIVE

    await in_world(test)


@pytest_twisted.ensureDeferred
async def test_off_by_default_nothing_is_ejected(caller: Caller) -> None:
    """Without --outlier-ejection, a 503-answering address keeps its traffic."""

    async def test(world: World) -> None:
        world.answers["127.0.0.3"].status = 503
        world.start(None)
        assert world.octoplex is not None and world.octoplex.client.outliers is None
        for _ in range(3):
            items = await batch(caller, world, [world.url()] * 9)
            assert sorted(statuses(items)) == [200] * 6 + [503] * 3
        assert world.answers["127.0.0.3"].requests == 9
        assert not any(
            name == "octoplex_upstream_address_ejected" for name, _ in samples(world.metrics)
        )

    await in_world(test)


@pytest_twisted.ensureDeferred
async def test_an_ejected_address_is_probed_and_restored_behind_the_grpc_frontend(
    caller: Caller, tmp_path: Path
) -> None:
    """
    Behind the gRPC daemon, an address ejected for refusing is probed once
    its back-off is over: one request, one connection to it, which answers;
    the address is then restored (its ``octoplex_upstream_address_ejected``
    series is gone), the log says ejected, probing, restored, and it takes
    its share of the next batch.
    """
    ejection_time = 3.0

    async def test(world: World) -> None:
        world.close("127.0.0.3")
        daemon = _ejecting_daemon(world, tmp_path, ejection_time)
        host = f"http://multi.test:{world.port}"
        ejected = ("octoplex_upstream_address_ejected", (("address", "127.0.0.3"), ("host", host)))

        async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            status, _, text = await caller.get(f"http://127.0.0.1:{daemon.http_port}/metrics")
            assert status == 200
            return parse_samples(text.decode())

        try:
            with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
                await deferToThread(wait_serving, daemon, channel)
                stub = pb_grpc.MultiplexerStub(channel)
                twelve = pb.Batch(timeout_msec=5000, requests=[pb.Request(uri=world.url())] * 12)
                answered = await call(stub.Multiplex, twelve, metadata=())
                # The daemon ejected the address before it answered: its
                # back-off is over by this time plus ejection_time.
                ejected_by = reactor.seconds()
                assert [o.success.status for o in answered.outcomes] == [200] * 12
                assert (await scrape()).get(ejected) == 1

                # A listener there now counts every connection attempt.
                world.reopen("127.0.0.3")
                await wait_until(
                    lambda: reactor.seconds() >= ejected_by + ejection_time, "the back-off"
                )
                # One request: its new connection dials the address first, as the probe.
                one = pb.Batch(timeout_msec=5000, requests=[pb.Request(uri=world.url())])
                (probe,) = (await call(stub.Multiplex, one, metadata=())).outcomes
                assert probe.success.status == 200
                assert world.accepted("127.0.0.3") == 1
                assert world.answers["127.0.0.3"].requests == 1
                # Restored: only addresses out of rotation have a series.
                found = await scrape()
                assert ejected not in found
                connect = ("host", host), ("reason", "connect")
                assert found["octoplex_upstream_ejections_total", connect] == 1

                # In rotation again: it answers some of the next batch.
                answered = await call(stub.Multiplex, twelve, metadata=())
                assert [o.success.status for o in answered.outcomes] == [200] * 12
                assert world.answers["127.0.0.3"].requests > 1
        finally:
            daemon.stop()
        assert daemon.errors() == []
        events = [e for e in daemon.events() if "outlier" in e]
        assert [(e["outlier"], e["address"]) for e in events] == [
            ("ejected", "127.0.0.3"),
            ("probing", "127.0.0.3"),
            ("restored", "127.0.0.3"),
        ]
        assert {e["host"] for e in events} == {f"multi.test:{world.port}"}

    await in_world(test)


@pytest_twisted.ensureDeferred
async def test_an_address_that_never_answers_is_ejected_for_the_deadlines_it_misses(
    caller: Caller,
) -> None:
    """
    127.0.0.3 accepts requests and answers none: each is cut by its batch's
    400 ms deadline, and the time it waited counts as its latency, so it
    is ejected for latency and then gets no requests, the batch answered
    by its siblings.
    """
    settings = OutlierSettings(**{**_fields(LIVE), "latency_factor": 3.0, "latency_min_samples": 3})

    async def test(world: World) -> None:
        world.answers["127.0.0.3"].delay = 30.0
        octoplex = world.start(settings)

        async def traffic() -> list[Any]:
            document = {"timeout_msec": 400, "requests": [{"uri": world.url()}] * 6}
            status, _, body = await caller.post(octoplex.url + "/multiplex", document)
            assert status == 200, body
            return statuses([o.get("Success") or o["Failure"] for o in body["responses"]])

        for _ in range(15):
            found = await traffic()
            assert set(found) <= {200, "timeout"}, found
            if world.state("127.0.0.3") == EJECTED:
                break
        assert world.state("127.0.0.3") == EJECTED
        assert world.state("127.0.0.1") == world.state("127.0.0.2") == ACTIVE
        before = world.answers["127.0.0.3"].requests
        assert await traffic() == [200] * 6
        assert world.answers["127.0.0.3"].requests == before
        found = samples(world.metrics)
        host = f"http://multi.test:{world.port}"
        assert (
            found["octoplex_upstream_ejections_total", (("host", host), ("reason", "latency"))] == 1
        )

    await in_world(test)
