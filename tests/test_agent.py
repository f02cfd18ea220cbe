"""
The agent under treq (:mod:`octoplex.agent`): a request URI is parsed once
per distinct URI, and each request still carries its own path and Host.
Over real sockets, through the whole daemon, with a test upstream.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from octoplex.agent import TARGET_CACHE_SIZE, UpstreamAgent
from octoplex.pool import OctoplexPool

from .servers import Caller, Octoplex, Upstream


def _batch(uris: list[str], headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "timeout_msec": 5000,
        "requests": [{"uri": uri, "headers": headers or {}} for uri in uris],
    }


class _Endpoints:
    def endpointForURI(self, uri: Any) -> Any:
        return object()


def test_targets_are_parsed_once_per_uri_and_bounded() -> None:
    """The same URI bytes give the same target; different ones their own; the cache is capped."""
    pool = OctoplexPool(Clock(), max_requests=100, max_age=100.0, connect_grace=1.0)
    agent = UpstreamAgent(pool, _Endpoints())  # type: ignore[arg-type]
    one = agent._target(b"http://a.test/x?q=1")
    assert agent._target(b"http://a.test/x?q=1") is one
    assert (one.key, one.path, one.host) == ((b"http", b"a.test", 80), b"/x?q=1", b"a.test")
    other = agent._target(b"http://a.test:8080/X")
    assert (other.key, other.path, other.host) == (
        (b"http", b"a.test", 8080), b"/X", b"a.test:8080",
    )  # fmt: skip
    tls = agent._target(b"https://a.test/")
    assert (tls.key, tls.host) == ((b"https", b"a.test", 443), b"a.test")
    for n in range(TARGET_CACHE_SIZE + 10):
        agent._target(b"http://a.test/%d" % n)
    assert len(agent._targets) == TARGET_CACHE_SIZE


@pytest_twisted.ensureDeferred
async def test_each_request_carries_its_own_path_and_host(
    octoplex: Octoplex, upstream: Upstream, caller: Caller
) -> None:
    """
    Requests to one upstream by two spellings of its address, and a caller's
    own Host header, each reach the upstream as sent, in one batch and again
    (from the cache).
    """
    port = upstream.url.rsplit(":", 1)[1]
    uris = [
        f"http://127.0.0.1:{port}/uri/one?x=1",
        f"http://127.0.0.1:{port}/uri/two",
        f"http://localhost:{port}/uri/one?x=1",
    ]
    for _ in range(2):
        status, _, body = await caller.post(octoplex.url + "/multiplex", _batch(uris))
        assert status == 200
        assert [o["Success"]["content"] for o in body["responses"]] == [
            "/uri/one?x=1", "/uri/two", "/uri/one?x=1",
        ]  # fmt: skip
        echo = _batch([upstream.url + "/echo", f"http://localhost:{port}/echo"])
        status, _, body = await caller.post(octoplex.url + "/multiplex", echo)
        hosts = [
            [v for k, v in json.loads(o["Success"]["content"])["headers"] if k.lower() == "host"]
            for o in body["responses"]
        ]
        assert hosts == [[f"127.0.0.1:{port}"], [f"localhost:{port}"]]
        mine = _batch([upstream.url + "/echo"], {"Host": "bidder.example"})
        status, _, body = await caller.post(octoplex.url + "/multiplex", mine)
        headers = json.loads(body["responses"][0]["Success"]["content"])["headers"]
        assert [v for k, v in headers if k.lower() == "host"] == ["bidder.example"]


class _CountingEndpoints:
    """Makes in-memory connections, and counts the endpoints asked for."""

    def __init__(self) -> None:
        self.made = 0
        self.transports: list[StringTransport] = []
        self.protocols: list[Any] = []

    def endpointForURI(self, uri: Any) -> Any:
        self.made += 1
        return self

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return succeed(protocol)


def test_an_endpoint_is_made_only_for_a_new_connection() -> None:
    """
    Requests that go out on a pooled connection make no endpoint (DNS,
    egress, TLS set-up): only the one that opens the connection does.
    """
    endpoints = _CountingEndpoints()
    pool = OctoplexPool(Clock(), max_requests=100, max_age=100.0, connect_grace=1.0)
    agent = UpstreamAgent(pool, endpoints)  # type: ignore[arg-type]
    for n in range(3):
        answers: list[Any] = []
        agent.request(b"GET", b"http://a.test/%d" % n).addBoth(answers.append)
        assert b"GET /%d HTTP/1.1\r\n" % n in endpoints.transports[0].value()
        endpoints.protocols[0].dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert answers[0].code == 204
        endpoints.transports[0].clear()
    assert endpoints.made == 1 and len(endpoints.protocols) == 1


def test_a_new_connection_carries_its_request_on_one_deferred_and_one_factory() -> None:
    """
    A request that opens a connection is answered on the Deferred the pool
    handed out (no second Deferred chained behind the connect), and every
    connection is built by the pool's one factory, going back to the pool
    under the key it carries.
    """
    endpoints = _CountingEndpoints()
    pool = OctoplexPool(Clock(), max_requests=100, max_age=100.0, connect_grace=1.0)
    agent = UpstreamAgent(pool, endpoints)  # type: ignore[arg-type]
    answers: list[Any] = []
    first = agent.request(b"GET", b"http://a.test/1")
    second = agent.request(b"GET", b"http://b.test/2")
    for d in (first, second):
        d.addBoth(answers.append)
    one, two = endpoints.protocols
    assert one._finished is first and two._finished is second
    assert one._quiescentCallback == two._quiescentCallback
    for protocol in (one, two):
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert [a.code for a in answers] == [204, 204]
    assert {key: len(idle) for key, idle in pool._connections.items()} == {
        (b"http", b"a.test", 80): 1,
        (b"http", b"b.test", 80): 1,
    }
