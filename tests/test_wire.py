"""
The wire format's rules that need no socket: how headers are checked and
folded, how URIs are normalised, and how outcomes are serialised.
"""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

import pytest
from hyperlink import EncodedURL
from twisted.web.http_headers import Headers

from octoplex.limits import Limits
from octoplex.wire import (
    BatchError,
    InvalidRequest,
    UpstreamRequest,
    encode,
    failure_outcome,
    parse_batch,
    success_outcome,
)


def _one(item: dict[str, Any]) -> UpstreamRequest | InvalidRequest:
    document = {"timeout_msec": 100, "requests": [item]}
    return parse_batch(json.dumps(document).encode(), Limits()).requests[0]


def _ok(item: dict[str, Any]) -> UpstreamRequest:
    request = _one(item)
    assert isinstance(request, UpstreamRequest), request
    return request


def _invalid(item: dict[str, Any]) -> str:
    request = _one(item)
    assert isinstance(request, InvalidRequest), request
    return request.error


def test_defaults() -> None:
    """method defaults to GET, headers to none and body to none; null headers are none."""
    request = _ok({"uri": "http://a.example/x?y=1", "headers": None})
    assert request.method == b"GET"
    assert list(request.headers.getAllRawHeaders()) == []
    assert request.body is None
    assert request.url.to_text() == "http://a.example/x?y=1"


def test_body_is_utf8() -> None:
    """A body string is sent as its UTF-8 bytes."""
    assert _ok({"uri": "http://a.test/", "body": "café ☕"}).body == "café ☕".encode()


def test_hop_by_hop_headers_are_dropped() -> None:
    """Connection-level headers are the pool's business and are not forwarded."""
    headers = {
        "Connection": "close, X-Named-By-Connection",
        "Keep-Alive": "timeout=5",
        "Transfer-Encoding": "chunked",
        "Upgrade": "h2c",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Proxy-Connection": "keep-alive",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "x-named-by-connection": "gone",
        "X-Kept": "yes",
    }
    request = _ok({"uri": "http://a.test/", "headers": headers})
    assert list(request.headers.getAllRawHeaders()) == [(b"X-Kept", [b"yes"])]


def test_content_length_must_match_the_body() -> None:
    """A Content-Length that matches the body is accepted; one that lies fails the request."""
    request = _ok({"uri": "http://a.test/", "body": "abc", "headers": {"Content-Length": "3"}})
    assert not request.headers.hasHeader(b"content-length")
    error = _invalid({"uri": "http://a.test/", "body": "abc", "headers": {"Content-Length": "30"}})
    assert error == (
        'header Content-Length is "30" but the body is 3 bytes; leave it out and Octoplex sets it'
    )


def test_header_values_may_be_utf8_and_tabs() -> None:
    """Non-ASCII header text is sent as UTF-8; HTAB is legal; DEL is not."""
    request = _ok({"uri": "http://a.test/", "headers": {"X-Name": "Zoë\tB"}})
    assert request.headers.getRawHeaders(b"x-name") == ["Zoë\tB".encode()]
    assert "control character" in _invalid({"uri": "http://a.test/", "headers": {"X": "a\x7f"}})


@pytest.mark.parametrize(
    ("uri", "sent"),
    [
        ("HTTP://Example.COM/Path", "http://example.com/Path"),
        ("HTTPS://Example.COM:8443/", "https://example.com:8443/"),
        ("HtTp://127.0.0.1:8080/x", "http://127.0.0.1:8080/x"),
        ("https://bücher.example/ä?q=ü", "https://xn--bcher-kva.example/%C3%A4?q=%C3%BC"),
        ("http://127.0.0.1:8080/a%20b", "http://127.0.0.1:8080/a%20b"),
        # Other spellings of an IPv4 address, read as the URL standard does.
        ("http://2130706433:8080/", "http://127.0.0.1:8080/"),
        ("http://0177.0.0.1/", "http://127.0.0.1/"),
        ("http://0x7f.1/", "http://127.0.0.1/"),
        ("http://127.1/", "http://127.0.0.1/"),
        ("http://0xA9.0xFE.0xA9.0xFE/", "http://169.254.169.254/"),
        ("http://0251.0376.0251.0376/", "http://169.254.169.254/"),
        ("http://1.2.3.4./", "http://1.2.3.4/"),
        # IPv6 literals, in their canonical text (one pool key per address).
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
        ("HTTPS://[2001:DB8:0:0::1]/ä?q=ü", "https://[2001:db8::1]/%C3%A4?q=%C3%BC"),
        ("http://[::ffff:127.0.0.1]:80/", "http://[::ffff:7f00:1]/"),
    ],
)
def test_uris_are_normalised_to_ascii(uri: str, sent: str) -> None:
    """
    Schemes are case-insensitive, IRIs become URIs and a numeric host is
    the dotted quad it means, before they are sent.
    """
    assert _ok({"uri": uri}).url.to_text() == sent


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://user:pw@a.test/", "carries credentials"),
        ("http://a.test:0/", "port 0"),
        ("http://[fe80::1%25eth0]:80/", 'has an IPv6 zone ID ("fe80::1%25eth0")'),
        ("http://[fe80::1%eth0]/", "a zone names one of this host's interfaces"),
        ("http://[127.0.0.1]/", 'has "127.0.0.1" in brackets, which is no IPv6 address'),
        ("http://[v1.x]/", 'has "v1.x" in brackets'),
        ("http://[::1/", "does not parse"),
        ("http://xn--.test/", "invalid host"),
        ("http://a.test:/", "does not parse"),
        ("http://1.2.3.4.5/", 'host "1.2.3.4.5" ends in a number, so it must be an IPv4 address'),
        ("http://a.test.09/", "ends in a number"),
        ("http://256.0.0.1/", 'host "256.0.0.1" is an IPv4 address out of range'),
        ("http://1.16777216/", "out of range"),
    ],
)
def test_unsendable_uris_fail_alone(uri: str, message: str) -> None:
    """URIs Octoplex cannot send fail their request with a reason."""
    assert message in _invalid({"uri": uri})


def test_long_bad_values_are_cut_short_in_errors() -> None:
    """An error quotes at most 80 characters of a hostile value."""
    error = _invalid({"uri": "ftp://" + "a" * 10_000})
    assert len(error) < 200
    assert "…" in error


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"timeout_msec": 100, "requests": [{"uri": "http://a.test/\\ud800"}]}',
            "request body has a string with a lone UTF-16 surrogate escape",
        ),
        (b'{"\\udfff": 1}', "request body has a string with a lone UTF-16 surrogate escape"),
        (
            b'{"timeout_msec": ' + b"9" * 5000 + b', "requests": []}',
            "request body holds an integer of more than 4300 digits",
        ),
    ],
)
def test_json_that_python_reads_but_cannot_use_is_400(body: bytes, message: str) -> None:
    """A lone surrogate escape, or an integer too long to convert, is a batch error."""
    with pytest.raises(BatchError) as raised:
        parse_batch(body, Limits())
    assert str(raised.value).startswith(message)


def test_surrogate_pairs_are_text() -> None:
    """A well-formed pair of escapes is one character, sent UTF-8 and percent-encoded."""
    body = b'{"timeout_msec": 100, "requests": [{"uri": "http://a.test/\\ud83d\\ude00"}]}'
    (request,) = parse_batch(body, Limits()).requests
    assert isinstance(request, UpstreamRequest)
    assert request.url.to_text() == "http://a.test/%F0%9F%98%80"


def test_json_must_be_an_object_and_strict() -> None:
    """Infinity and a top-level array are rejected as batch errors."""
    with pytest.raises(BatchError, match="Infinity is not valid JSON"):
        parse_batch(b'{"timeout_msec": Infinity, "requests": []}', Limits())
    with pytest.raises(BatchError, match="must be a JSON object"):
        parse_batch(b"null", Limits())


def test_success_outcome_folds_headers_the_original_way() -> None:
    """
    Names are lowercased and a repeated header keeps its last value, as in
    the original; a UTF-8 body is content, any other content_base64.
    """
    headers = Headers({b"Content-Type": [b"text/plain"], b"Set-Cookie": [b"a=1", b"b=2"]})
    outcome = success_outcome(201, headers, "ok é".encode(), 12)
    assert outcome == {
        "Success": {
            "headers": {"content-type": "text/plain", "set-cookie": "b=2"},
            "status": 201,
            "content": "ok é",
            "duration_msec": 12,
        }
    }
    binary = success_outcome(200, Headers(), b"ok \xff", 3)["Success"]
    assert binary["content_base64"] == "b2sg/w==" and "content" not in binary


def test_encode_is_compact_utf8() -> None:
    """Responses are compact JSON with non-ASCII text as UTF-8, as serde_json wrote them."""
    assert encode({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()


def test_checked_uris_are_remembered_by_their_exact_text() -> None:
    """
    A URI's check is done once per distinct text: the same text gives the
    same URL object, texts that differ in case or escaping give their own,
    a bad one fails each time, and the URL's to_uri() is itself.
    """
    texts = ["http://a.test/A", "http://a.test/a", "http://a.test/%41", "http://A.test/a"]
    first = [_ok({"uri": t}).url for t in texts]
    again = [_ok({"uri": t}).url for t in texts]
    assert all(one is two for one, two in zip(first, again, strict=True))
    # The host's case is the host's (DNS names are case-blind): lower-cased.
    assert [u.to_text() for u in first] == [
        "http://a.test/A", "http://a.test/a", "http://a.test/%41", "http://a.test/a"
    ]  # fmt: skip
    assert first[0].to_uri() is first[0]
    assert first[0] == EncodedURL.from_text("http://a.test/A")
    for _ in range(2):
        assert _invalid({"uri": "ftp://a.test/"}).startswith('URI "ftp://a.test/" has scheme "ftp"')


def test_new_item_fields_are_parsed() -> None:
    """id, timeout_msec, body_base64, header lists and the batch's options."""
    batch = parse_batch(
        json.dumps(
            {
                "timeout_msec": 100,
                "header_list": True,
                "content_base64": True,
                "requests": [
                    {
                        "id": "a",
                        "uri": "http://a.test/",
                        "timeout_msec": 50,
                        "body_base64": base64.b64encode(b"\x00\xff").decode(),
                        "headers": {"X-Two": ["1", "2"], "X-One": "x"},
                    }
                ],
            }
        ).encode(),
        Limits(),
    )
    [request] = batch.requests
    assert isinstance(request, UpstreamRequest)
    assert (request.id, request.timeout_msec, request.body) == ("a", 50, b"\x00\xff")
    assert request.headers.getRawHeaders(b"x-two") == [b"1", b"2"]
    assert (batch.options.header_list, batch.options.content_base64) == (True, True)
    assert batch.options.content_encoding is False


def test_a_gzip_body_base64_is_sent_as_given() -> None:
    """Content-Encoding: gzip compresses a text body, never a body_base64 (already bytes)."""
    raw = gzip.compress(b"already")
    batch = parse_batch(
        json.dumps(
            {
                "timeout_msec": 100,
                "requests": [
                    {
                        "uri": "http://a.test/",
                        "headers": {"Content-Encoding": "gzip"},
                        "body_base64": base64.b64encode(raw).decode(),
                    },
                    {"uri": "http://a.test/", "headers": {"Content-Encoding": "gzip"}, "body": "t"},
                ],
            }
        ).encode(),
        Limits(),
    )
    given, text = batch.requests
    assert isinstance(given, UpstreamRequest) and isinstance(text, UpstreamRequest)
    assert given.body == raw
    assert text.body is not None and gzip.decompress(text.body) == b"t"


def test_failure_outcomes_carry_kind_and_id() -> None:
    """kind always, id only when the request had one."""
    assert failure_outcome("x", 3, "dns") == {
        "Failure": {"error": "x", "kind": "dns", "duration_msec": 3}
    }
    assert failure_outcome("x", 3, "dns", id="i")["Failure"]["id"] == "i"


def test_defaults_fill_what_an_item_leaves_out() -> None:
    """Method, headers (item wins by name, any case), body and a base URI for relative ones."""
    batch = parse_batch(
        json.dumps(
            {
                "timeout_msec": 100,
                "max_parallel": 3,
                "defaults": {
                    "method": "POST",
                    "headers": {"X-A": "d", "X-B": "d"},
                    "body_base64": base64.b64encode(b"\x01\x02").decode(),
                    "base_uri": "https://b.test/api/",
                },
                "requests": [
                    {"uri": "bid?x=1"},
                    {"uri": "http://other.test/", "method": "GET", "headers": {"x-b": "own"}},
                    {"uri": "/root", "body": "text"},
                ],
            }
        ).encode(),
        Limits(),
    )
    first, second, third = batch.requests
    assert isinstance(first, UpstreamRequest)
    assert isinstance(second, UpstreamRequest)
    assert isinstance(third, UpstreamRequest)
    assert batch.max_parallel == 3
    assert (first.method, first.url.to_text(), first.body) == (
        b"POST",
        "https://b.test/api/bid?x=1",
        b"\x01\x02",
    )
    assert first.headers.getRawHeaders(b"x-b") == [b"d"]
    assert (second.method, second.url.to_text()) == (b"GET", "http://other.test/")
    assert second.headers.getRawHeaders(b"x-b") == [b"own"]
    assert second.headers.getRawHeaders(b"x-a") == [b"d"]
    assert (third.url.to_text(), third.body) == ("https://b.test/root", b"text")
