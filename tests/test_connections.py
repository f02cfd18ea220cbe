"""
The connections themselves, over real sockets: TCP_NODELAY on both sides,
pooled connections closed on shutdown, and an HTTPS upstream verified
against a CA the test makes.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import deferLater
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.server import Site

from octoplex.client import PoolSettings, UpstreamClient
from octoplex.endpoints import UpstreamEndpointFactory
from octoplex.limits import Limits
from octoplex.multiplexer import Multiplexer
from octoplex.web import OctoplexApp, OctoplexSite

from .servers import (
    LOOPBACK,
    Caller,
    Octoplex,
    Upstream,
    _Upstream,
    local_resolver,
    start_octoplex,
)


def _nodelay(transport: Any) -> int:
    return transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest_twisted.ensureDeferred
async def test_outbound_connections_have_tcp_nodelay(upstream: Upstream) -> None:
    """Every connection the pool dials has Nagle's algorithm off, quietly."""
    endpoints = UpstreamEndpointFactory(
        reactor, BrowserLikePolicyForHTTPS(), 5.0, local_resolver(), LOOPBACK
    )
    factory = Factory.forProtocol(Protocol)
    endpoint = endpoints.endpointForURI(URI.fromBytes(upstream.url.encode() + b"/"))
    protocol = await endpoint.connect(factory)
    try:
        assert _nodelay(protocol.transport) != 0
        assert factory.noisy is False
    finally:
        protocol.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_inbound_connections_have_tcp_nodelay(caller: Caller) -> None:
    """A caller's connection to Octoplex has Nagle's algorithm off."""
    channels: list[Any] = []

    class Recording(OctoplexSite):
        def buildProtocol(self, addr: Any) -> Any:
            channel = super().buildProtocol(addr)
            channels.append(channel)
            return channel

    limits = Limits()
    client = UpstreamClient(
        reactor, PoolSettings(), limits.max_response_bytes, None, local_resolver(), LOOPBACK
    )
    site = Recording(OctoplexApp(Multiplexer(reactor, client), limits, reactor), reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        # The caller's request ends once the raw socket's has been read.
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = await caller.get(f"http://127.0.0.1:{port.getHost().port}/healthz")
        assert status == 200
        # The raw socket's connection is still open: look at its server side.
        assert _nodelay(channels[0]._channel.transport) != 0
        sock.close()
    finally:
        await port.stopListening()
        await client.stopService()


@pytest_twisted.ensureDeferred
async def test_pooled_connections_close_on_shutdown(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """Stopping the client service closes every idle pooled connection."""
    batch = {"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/hello"}] * 5}
    status, _, _ = await caller.post(octoplex.url + "/multiplex", batch)
    assert status == 200
    assert len(upstream.site.connections) == 5
    assert upstream.site.lost == []
    await octoplex.client.stopService()
    for _ in range(50):
        if len(upstream.site.lost) == 5:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert len(upstream.site.lost) == 5


@pytest_twisted.ensureDeferred
async def test_https_upstream_is_verified(caller: Caller) -> None:
    """An HTTPS upstream chained to a trusted CA answers; with the platform roots it fails."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_options = PrivateCertificate.loadPEM(
        cert.private_key_and_cert_chain_pem.bytes()
    ).options()
    tls_site = Site(_Upstream())
    tls_port = reactor.listenSSL(0, tls_site, server_options, interface="127.0.0.1")
    url = f"https://127.0.0.1:{tls_port.getHost().port}/hello"
    batch = {"timeout_msec": 5000, "requests": [{"uri": url}]}
    root = Certificate.loadPEM(ca.cert_pem.bytes())
    trusting = start_octoplex(tls_policy=BrowserLikePolicyForHTTPS(trustRoot=root))
    default = start_octoplex()
    try:
        _, _, body = await caller.post(trusting.url + "/multiplex", batch)
        assert body["responses"][0]["Success"]["content"] == "Hello world!"
        _, _, body = await caller.post(default.url + "/multiplex", batch)
        error = body["responses"][0]["Failure"]["error"]
        assert error.startswith("TLS handshake failed: certificate of 127.0.0.1 rejected: ")
        assert "issuer is not trusted" in error
    finally:
        await trusting.stop()
        await default.stop()
        await tls_port.stopListening()
