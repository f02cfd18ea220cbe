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
    """octoplex.pool.OctoplexPool: idle-connection order, retirement, warm connects, retries."""
    pool = client.HTTPConnectionPool(None)
    assert pool._connections == {} and pool._timeouts == {}
    assert pool._factory is client._HTTP11ClientFactory
    assert _parameters(pool._newConnection) == ["key", "endpoint"]
    assert _parameters(pool._putConnection) == ["key", "connection"]
    assert _parameters(client._HTTP11ClientFactory) == ["quiescentCallback", "metadata"]
    retrying = client._RetryingHTTP11ClientProtocol
    assert _parameters(retrying) == ["clientProtocol", "newConnection"]
    assert _parameters(retrying._shouldRetry) == ["self", "method", "exception", "bodyProducer"]
    assert "_clientProtocol" in inspect.getsource(retrying.__init__)


def test_the_client_protocol_and_parser_the_head_limits_hook() -> None:
    """octoplex.pool._HeadLimit stands in for the parser's lineReceived during the head."""
    protocol = _newclient.HTTP11ClientProtocol(lambda c: None)
    assert protocol._parser is None and protocol._quiescentCallback is not None
    assert protocol.state == "QUIESCENT"
    parser = _newclient.HTTPClientParser(None, None)
    assert callable(parser.lineReceived) and callable(parser.lineLengthExceeded)
    assert _newclient.STATUS != _newclient.HEADER
    assert "self._parser = HTTPClientParser(" in inspect.getsource(
        _newclient.HTTP11ClientProtocol.request
    )


def test_the_request_octoplex_agent_builds() -> None:
    """octoplex.agent.UpstreamAgent builds the Request that Agent._requestWithEndpoint did."""
    assert _parameters(_newclient.Request)[:5] == [
        "method", "uri", "headers", "bodyProducer", "persistent",
    ]  # fmt: skip
    request = _newclient.Request(b"GET", b"/x", None, None, persistent=True)
    assert request.persistent and request.uri == b"/x"


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
