"""
The private parts of Twisted that Octoplex builds on, each named with what
it replaces or extends: if a Twisted release moves one, this fails before
anything subtler does.  setup.py pins Twisted below 27 for the same reason;
tox's ``test`` and ``lowest`` environments run this on the newest and the
oldest Twisted allowed.
"""

from __future__ import annotations

import inspect

from twisted.web import _newclient, client, http


def _parameters(f: object) -> list[str]:
    return list(inspect.signature(f).parameters)  # type: ignore[arg-type]


def test_the_pool_internals_octoplex_pool_overrides() -> None:
    """
    octoplex.pool.OctoplexPool keeps Twisted's client factory (one for the
    whole pool: its quiescent callback hands a connection back) and replaces
    the pool's methods, under their names and signatures.
    """
    pool = client.HTTPConnectionPool(None)
    assert pool._reactor is None and pool._connections == {}
    assert pool._factory is client._HTTP11ClientFactory
    assert _parameters(pool._newConnection) == ["key", "endpoint"]
    assert _parameters(pool._putConnection) == ["key", "connection"]
    assert _parameters(client._HTTP11ClientFactory) == ["quiescentCallback", "metadata"]
    assert "self._quiescentCallback" in inspect.getsource(client._HTTP11ClientFactory.__init__)
    assert callable(pool._log.error)


def test_the_parts_octoplex_http11_builds_on() -> None:
    """
    octoplex.http11.UpstreamProtocol stands in for HTTP11ClientProtocol and
    HTTPClientParser (with a response class of its own): it gives a body's
    reader Twisted's transport proxy, and fails as the parser failed.
    """
    proxy = _newclient.TransportProxyProducer(None)
    assert callable(proxy.stopProxying) and callable(proxy.pauseProducing)
    assert issubclass(http._DataLoss, Exception)
    assert _newclient._ensureValidMethod(b"GET") == b"GET"
    assert _newclient._ensureValidURI(b"/x?y") == b"/x?y"
    assert "_quiescentCallback" in inspect.getsource(client._HTTP11ClientFactory.buildProtocol)


def test_the_request_octoplex_agent_builds() -> None:
    """
    octoplex.agent.UpstreamAgent builds the Request that
    Agent._requestWithEndpoint did, and adds an attribute of its own.
    """
    assert _parameters(_newclient.Request)[:5] == [
        "method", "uri", "headers", "bodyProducer", "persistent",
    ]  # fmt: skip
    request = _newclient.Request(b"GET", b"/x", None, None, persistent=True)
    assert request.persistent and request.uri == b"/x"
    # It carries a request's timings to octoplex.http11 (no __slots__).
    request.timings = object()  # type: ignore[attr-defined]


def test_the_errors_and_channel_octoplex_names() -> None:
    """octoplex.errors maps these failures; octoplex.web wraps its channel in this class."""
    for name in (
        "ParseError",
        "RequestGenerationFailed",
        "RequestTransmissionFailed",
        "ResponseFailed",
        "ResponseNeverReceived",
        "RequestNotSent",
    ):
        assert issubclass(getattr(_newclient, name), Exception), name
    assert issubclass(http._MalformedChunkedDataError, Exception)
    assert _parameters(http._GenericHTTPChannelProtocol)[:1] == ["original"]


def test_the_channel_state_octoplex_inbound_reads() -> None:
    """octoplex.inbound.OctoplexChannel counts head lines and bytes and knows when it is busy."""
    channel = http.HTTPChannel()
    assert channel._receivedHeaderSize == 0 and channel._receivedHeaderCount == 0
    assert channel._handlingRequest is False
    assert isinstance(channel.totalHeadersSize, int) and isinstance(channel.maxHeaders, int)
    assert "_receivedHeaderCount" in inspect.getsource(http.HTTPChannel.headerReceived)
    # octoplex.inbound refuses a folded header line once the request line
    # is in, which this private flag says.
    assert http.HTTPChannel()._HTTPChannel__first_line == 1  # type: ignore[attr-defined]
    assert "self.__first_line = 0" in inspect.getsource(http.HTTPChannel.lineReceived)


def test_the_answer_encoder_interfaces_octoplex_web_implements() -> None:
    """octoplex.web.LazyGzipEncoderFactory stands in for GzipEncoderFactory."""
    from twisted.web import iweb, resource

    assert "encoderForRequest" in iweb._IRequestEncoderFactory.names()
    assert set(iweb._IRequestEncoder.names()) == {"encode", "finish"}
    assert "encoderForRequest" in inspect.getsource(resource.EncodingResourceWrapper)


def test_the_http2_stream_octoplex_web_reads_the_connection_of() -> None:
    """
    octoplex.web._connection_transport: an HTTP/2 stream has no transport of
    its own; its connection (``H2Stream._conn``) has the caller's.
    """
    from twisted.web._http2 import H2Connection, H2Stream

    assert H2Stream.transport is None
    assert "self._conn = connection" in inspect.getsource(H2Stream.__init__)
    assert "transport" in inspect.getsource(H2Connection.connectionMade)


def test_the_http2_connection_octoplex_web_sends_goaway_on() -> None:
    """
    octoplex.web._Channel.go_away: the protocol switch holds the HTTP/2
    channel as ``_channel``, whose ``conn`` is the h2 state machine.
    """
    from twisted.web._http2 import H2Connection
    from twisted.web.http import _GenericHTTPChannelProtocol

    assert "self.conn = h2.connection.H2Connection" in inspect.getsource(H2Connection.__init__)
    assert "self._channel = " in inspect.getsource(_GenericHTTPChannelProtocol.dataReceived)
