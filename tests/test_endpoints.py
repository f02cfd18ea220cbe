"""
How a host name is dialled, on a memory reactor: one attempt per address,
0.3 s apart or at once after a failure, the first to connect winning.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS

from octoplex.endpoints import ATTEMPT_DELAY, UpstreamEndpointFactory
from octoplex.hedging import Route
from octoplex.metrics import Metrics
from octoplex.outliers import EJECTED, Outliers, OutlierSettings

from .servers import LOOPBACK


class Addresses:
    """
    The resolver as the endpoint sees it: fixed addresses, refusals noted.
    """

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.refusing: list[str] = []

    def lookup(self, name: str) -> Deferred[list[str]]:
        return succeed(self.addresses)

    def usable(self, addresses: list[str]) -> list[str]:
        return [a for a in addresses if a not in self.refusing] or addresses

    def refused(self, address: str) -> None:
        self.refusing.append(address)


def _dial(reactor: MemoryReactorClock, resolver: Addresses) -> list[Any]:
    endpoints = UpstreamEndpointFactory(
        reactor,
        BrowserLikePolicyForHTTPS(),
        5.0,
        resolver,  # type: ignore[arg-type]
        LOOPBACK,
    )
    endpoint = endpoints.endpointForURI(URI.fromBytes(b"http://multi.test:8080/"))
    results: list[Any] = []
    endpoint.connect(Factory.forProtocol(Protocol)).addBoth(results.append)
    return results


def _connect(reactor: MemoryReactorClock, index: int) -> None:
    host, port, factory, _, _ = reactor.tcpClients[index]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(StringTransport())


def _refuse(reactor: MemoryReactorClock, index: int) -> None:
    connector = reactor.connectors[index]
    reactor.tcpClients[index][2].clientConnectionFailed(
        connector, Failure(ConnectionRefusedError())
    )


def test_addresses_are_tried_one_attempt_delay_apart() -> None:
    """A second address is tried 0.3 s after the first, and the first to connect wins."""
    reactor = MemoryReactorClock()
    results = _dial(reactor, Addresses("127.0.0.2", "127.0.0.3"))
    assert [c[0] for c in reactor.tcpClients] == ["127.0.0.2"]
    reactor.advance(ATTEMPT_DELAY)
    assert [c[0] for c in reactor.tcpClients] == ["127.0.0.2", "127.0.0.3"]
    _connect(reactor, 1)
    [protocol] = results
    assert isinstance(protocol, Protocol)
    # The slower attempt is given up.
    assert reactor.connectors[0].stoppedConnecting
    assert reactor.getDelayedCalls() == []


def test_a_refusal_moves_on_at_once_and_is_reported() -> None:
    """A refused address hands over to the next without waiting, and the resolver hears of it."""
    reactor = MemoryReactorClock()
    resolver = Addresses("127.0.0.2", "127.0.0.3")
    results = _dial(reactor, resolver)
    _refuse(reactor, 0)
    assert [c[0] for c in reactor.tcpClients] == ["127.0.0.2", "127.0.0.3"]
    assert resolver.refusing == ["127.0.0.2"]
    _connect(reactor, 1)
    assert isinstance(results[0], Protocol)


def test_all_refusing_fails_with_the_last_reason() -> None:
    """When every address refuses, the dial fails with a refusal."""
    reactor = MemoryReactorClock()
    results = _dial(reactor, Addresses("127.0.0.2", "127.0.0.3"))
    _refuse(reactor, 0)
    _refuse(reactor, 1)
    [failure] = results
    assert failure.check(ConnectionRefusedError)


def test_cancelling_gives_up_every_attempt() -> None:
    """Cancelling the dial stops the attempts under way and the ones to come."""
    reactor = MemoryReactorClock()
    endpoints = UpstreamEndpointFactory(
        reactor,
        BrowserLikePolicyForHTTPS(),
        5.0,
        Addresses("127.0.0.2", "127.0.0.3"),  # type: ignore[arg-type]
        LOOPBACK,
    )
    endpoint = endpoints.endpointForURI(URI.fromBytes(b"http://multi.test:8080/"))
    d = endpoint.connect(Factory.forProtocol(Protocol))
    results: list[Any] = []
    d.addBoth(results.append)
    d.cancel()
    reactor.advance(ATTEMPT_DELAY * 2)
    assert len(reactor.tcpClients) == 1
    assert reactor.connectors[0].stoppedConnecting
    assert results and isinstance(results[0], Failure)


class Known:
    """The resolver as a hedge asks it: what its cache holds, what refused lately."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.down: list[str] = []

    def known(self, name: str) -> list[str]:
        return list(self.addresses)

    def refusing(self, address: str) -> bool:
        return address in self.down


def test_a_hedge_dials_its_first_attempts_address_last_and_notes_where_it_went() -> None:
    """
    A hedge's route avoids 127.0.0.2: it is dialled after 127.0.0.3, and
    the route notes the address dialled, then the one that connected.
    """
    reactor = MemoryReactorClock()
    endpoints = UpstreamEndpointFactory(
        reactor,
        BrowserLikePolicyForHTTPS(),
        5.0,
        Addresses("127.0.0.2", "127.0.0.3"),  # type: ignore[arg-type]
        LOOPBACK,
    )
    route = Route(avoid="127.0.0.2")
    uri = URI.fromBytes(b"http://multi.test:8080/")
    results: list[Any] = []
    endpoints.endpointForURI(uri, None, route).connect(Factory.forProtocol(Protocol)).addBoth(
        results.append
    )
    assert [c[0] for c in reactor.tcpClients] == ["127.0.0.3"]
    assert route.address == "127.0.0.3"
    reactor.advance(ATTEMPT_DELAY)
    assert [c[0] for c in reactor.tcpClients] == ["127.0.0.3", "127.0.0.2"]
    assert route.address == "127.0.0.2"
    _connect(reactor, 0)
    assert isinstance(results[0], Protocol)
    assert route.address == "127.0.0.3"

    # An address alone is dialled even when avoided.
    alone = UpstreamEndpointFactory(
        reactor,
        BrowserLikePolicyForHTTPS(),
        5.0,
        Addresses("127.0.0.2"),  # type: ignore[arg-type]
        LOOPBACK,
    )
    alone.endpointForURI(uri, None, Route(avoid="127.0.0.2")).connect(Factory.forProtocol(Protocol))
    assert reactor.tcpClients[-1][0] == "127.0.0.2"


def test_elsewhere_knows_another_usable_allowed_address_from_the_cache_only() -> None:
    """
    Whether a hedge has another address to dial: one the cache holds that
    is not avoided, refusing, ejected, or refused by the egress policy.
    """
    resolver = Known("127.0.0.2", "127.0.0.3")
    clock = MemoryReactorClock()
    endpoints = UpstreamEndpointFactory(
        clock,
        BrowserLikePolicyForHTTPS(),
        5.0,
        resolver,  # type: ignore[arg-type]
        LOOPBACK,
    )
    uri = URI.fromBytes(b"http://multi.test:8080/")
    assert endpoints.elsewhere(uri, "127.0.0.2")
    assert endpoints.elsewhere(uri, "127.0.0.3")
    resolver.down.append("127.0.0.3")
    assert not endpoints.elsewhere(uri, "127.0.0.2")
    resolver.down.clear()

    outliers = Outliers(clock, OutlierSettings(enabled=True, consecutive_failures=1), Metrics())
    endpoints.outliers = outliers
    key = (b"http", b"multi.test", 8080)
    outliers.choose(key, ["127.0.0.2", "127.0.0.3"])
    outliers.connect_failed(key, "127.0.0.3", Failure(ConnectionRefusedError()))
    assert outliers.state(key, "127.0.0.3") == EJECTED
    assert not endpoints.elsewhere(uri, "127.0.0.2")
    endpoints.outliers = None

    # A documentation address (RFC 5737), resolved here but never dialled:
    # the egress policy (loopback only) refuses it.
    resolver.addresses = ["127.0.0.2", "192.0.2.1"]
    assert not endpoints.elsewhere(uri, "127.0.0.2")
    resolver.addresses = []
    assert not endpoints.elsewhere(uri, "127.0.0.2")
