"""
Octoplex's HTTPS client against real TLS upstreams on 127.0.0.1, with
certificates made by trustme (and one built by hand): a trusted chain
succeeds; a self-signed, foreign, misnamed or expired certificate fails with
a sentence saying why; a client certificate is presented when configured;
SNI is sent for names and not for addresses; one TLS context is built per
host; and WireMock's HTTPS port is checked like any other upstream.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attr
import pytest
import pytest_twisted
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    load_pem_private_key,
    pkcs12,
)
from cryptography.x509.oid import NameOID
from OpenSSL.SSL import Connection
from twisted.internet import reactor
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, CertificateOptions
from zope.interface import implementer

from octoplex.tls import UpstreamTLSPolicy, load_client_certificate, load_trust_root

from .servers import Caller, Octoplex, Upstream, _CountingSite, _Upstream, start_octoplex
from .test_wiremock import WireMock, running_wiremocks

#: Each upstream certificate below names both, unless a test says otherwise.
IDENTITIES = ("localhost", "127.0.0.1")

#: What Octoplex says when an upstream demands a client certificate it does
#: not have.  In TLS 1.3 the client's side of the handshake is done before
#: the server judges its (empty) certificate, so the refusal is the server's
#: alert in answer to the request; should the server's close overtake the
#: alert (an RST, for the request it did not read), the connection is reset.
REFUSED_WITHOUT_CLIENT_CERTIFICATE = {
    "TLS error before sending a response: tlsv13 alert certificate required",
    "connection to upstream was lost or reset before sending a response",
}

#: The password of the PKCS12 keystore made for WireMock.
KEYSTORE_PASSWORD = "octoplex-test"


def _batch(*uris: str, timeout_msec: int = 5000) -> dict[str, Any]:
    return {"timeout_msec": timeout_msec, "requests": [{"uri": uri} for uri in uris]}


async def _multiplex(octoplex: Octoplex, caller: Caller, *uris: str) -> list[dict[str, Any]]:
    status, _, body = await caller.post(octoplex.url + "/multiplex", _batch(*uris))
    assert status == 200, body
    responses: list[dict[str, Any]] = body["responses"]
    assert len(responses) == len(uris)
    return responses


def _assert_hello(outcome: dict[str, Any]) -> None:
    assert list(outcome) == ["Success"], outcome
    assert outcome["Success"]["status"] == 200
    assert outcome["Success"]["content"] == "Hello world!"


def _error(outcome: dict[str, Any]) -> str:
    assert list(outcome) == ["Failure"], outcome
    assert 0 <= outcome["Failure"]["duration_msec"] < 5000
    error: str = outcome["Failure"]["error"]
    return error


def _trusting(tmp_path: Path, ca: trustme.CA) -> Any:
    """
    The trust root of Octoplex's ``--upstream-ca``: ``ca``, written to a PEM file.
    """
    path = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return load_trust_root(str(path))


def _options(
    key: Any, certificate: x509.Certificate, chain: Sequence[x509.Certificate] = (), **kwargs: Any
) -> CertificateOptions:
    """
    An HTTPS server's settings (given as cryptography objects: pyOpenSSL's
    are deprecated).
    """
    return CertificateOptions(
        privateKey=key, certificate=certificate, extraCertChain=list(chain), **kwargs
    )


def _leaf_options(leaf: trustme.LeafCert, **kwargs: Any) -> CertificateOptions:
    key = load_pem_private_key(leaf.private_key_pem.bytes(), None)
    [certificate, *chain] = [
        x509.load_pem_x509_certificate(p.bytes()) for p in leaf.cert_chain_pems
    ]
    return _options(key, certificate, chain, **kwargs)


def _serve(options: CertificateOptions) -> Upstream:
    """
    The scriptable upstream of :mod:`tests.servers`, over TLS on 127.0.0.1.
    """
    resource = _Upstream()
    site = _CountingSite(resource)
    port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
    return Upstream(f"https://127.0.0.1:{port.getHost().port}", site, resource, port)


def _self_signed_options() -> CertificateOptions:
    """
    An HTTPS server's settings with a certificate for :data:`IDENTITIES`,
    valid now, that is its own issuer.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed upstream")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(names, critical=False)
        .sign(key, hashes.SHA256())
    )
    return _options(key, certificate)


@pytest_twisted.ensureDeferred
async def test_trusted_ca_succeeds_by_address_and_by_name(tmp_path: Path, caller: Caller) -> None:
    """An upstream whose certificate chains to the configured CA answers by IP and by name."""
    ca = trustme.CA()
    upstream = _serve(_leaf_options(ca.issue_cert(*IDENTITIES)))
    octoplex = start_octoplex(tls_policy=UpstreamTLSPolicy(_trusting(tmp_path, ca)))
    port = upstream.port.getHost().port
    try:
        by_address, by_name = await _multiplex(
            octoplex,
            caller,
            f"https://127.0.0.1:{port}/hello",
            f"https://localhost:{port}/hello",
        )
        _assert_hello(by_address)
        _assert_hello(by_name)
    finally:
        await octoplex.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_self_signed_and_foreign_certificates_are_rejected(
    tmp_path: Path, caller: Caller
) -> None:
    """A self-signed leaf and a leaf of another CA each fail with the reason named."""
    ca = trustme.CA()
    self_signed = _serve(_self_signed_options())
    foreign = _serve(_leaf_options(trustme.CA().issue_cert(*IDENTITIES)))
    octoplex = start_octoplex(tls_policy=UpstreamTLSPolicy(_trusting(tmp_path, ca)))
    try:
        by_self, by_foreign = await _multiplex(
            octoplex, caller, self_signed.url + "/hello", foreign.url + "/hello"
        )
        assert _error(by_self) == (
            "TLS handshake failed: certificate of 127.0.0.1 rejected: "
            "the certificate is self-signed "
            "(subject CN=self-signed upstream, chain depth 0)"
        )
        foreign_error = _error(by_foreign)
        assert foreign_error.startswith(
            "TLS handshake failed: certificate of 127.0.0.1 rejected: "
            "its issuer is not trusted (unable to get local issuer certificate) (subject "
        ), foreign_error
        assert foreign_error.endswith(", chain depth 0)"), foreign_error
        # Each was reached, and refused at the handshake.
        assert len(self_signed.site.connections) == len(foreign.site.connections) == 1
    finally:
        await octoplex.stop()
        await self_signed.stop()
        await foreign.stop()


@pytest_twisted.ensureDeferred
async def test_wrong_host_name_is_rejected(tmp_path: Path, caller: Caller) -> None:
    """A trusted certificate for another name fails, naming what it is for and what was asked."""
    ca = trustme.CA()
    upstream = _serve(_leaf_options(ca.issue_cert("other.example")))
    octoplex = start_octoplex(tls_policy=UpstreamTLSPolicy(_trusting(tmp_path, ca)))
    port = upstream.port.getHost().port
    try:
        by_address, by_name = await _multiplex(
            octoplex,
            caller,
            f"https://127.0.0.1:{port}/hello",
            f"https://localhost:{port}/hello",
        )
        address_error = _error(by_address)
        assert address_error.startswith(
            "TLS handshake failed: certificate of 127.0.0.1 rejected: "
            "it is for other.example, not 127.0.0.1 (subject "
        ), address_error
        assert address_error.endswith(", chain depth 0)"), address_error
        name_error = _error(by_name)
        assert name_error.startswith(
            "TLS handshake failed: certificate of localhost rejected: "
            "it is for other.example, not localhost (subject "
        ), name_error
    finally:
        await octoplex.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_expired_certificate_is_rejected(tmp_path: Path, caller: Caller) -> None:
    """A trusted certificate that expired yesterday fails as expired."""
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = ca.issue_cert(
        *IDENTITIES,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    upstream = _serve(_leaf_options(leaf))
    octoplex = start_octoplex(tls_policy=UpstreamTLSPolicy(_trusting(tmp_path, ca)))
    try:
        [outcome] = await _multiplex(octoplex, caller, upstream.url + "/hello")
        error = _error(outcome)
        assert error.startswith(
            "TLS handshake failed: certificate of 127.0.0.1 rejected: "
            "the certificate has expired (subject "
        ), error
        assert error.endswith(", chain depth 0)"), error
    finally:
        await octoplex.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_client_certificate_is_presented_when_configured(
    tmp_path: Path, caller: Caller
) -> None:
    """An upstream that requires a client certificate refuses Octoplex without one, not with one."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    upstream = _serve(
        _leaf_options(
            server_ca.issue_cert(*IDENTITIES),
            verify=True,
            requireCertificate=True,
            caCerts=[Certificate.loadPEM(client_ca.cert_pem.bytes()).original],
        )
    )
    client = client_ca.issue_cert("octoplex.example")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    trust_root = _trusting(tmp_path, server_ca)
    anonymous = start_octoplex(tls_policy=UpstreamTLSPolicy(trust_root))
    identified = start_octoplex(
        tls_policy=UpstreamTLSPolicy(
            trust_root, load_client_certificate(str(cert_file), str(key_file))
        )
    )
    try:
        [refused] = await _multiplex(anonymous, caller, upstream.url + "/hello")
        assert _error(refused) in REFUSED_WITHOUT_CLIENT_CERTIFICATE
        assert len(upstream.site.connections) == 1
        [accepted] = await _multiplex(identified, caller, upstream.url + "/hello")
        _assert_hello(accepted)
        assert len(upstream.site.connections) == 2
    finally:
        await anonymous.stop()
        await identified.stop()
        await upstream.stop()


@pytest_twisted.ensureDeferred
async def test_sni_is_sent_for_names_only(tmp_path: Path, caller: Caller) -> None:
    """The upstream sees SNI "localhost" for a request by name and no SNI for one by address."""
    ca = trustme.CA()
    server_names: list[bytes | None] = []

    def record(server_name: bytes | None) -> None:
        server_names.append(server_name)
        # None: the listener's own context serves every name.

    upstream = _serve(_leaf_options(ca.issue_cert(*IDENTITIES), contextForServerName=record))
    octoplex = start_octoplex(tls_policy=UpstreamTLSPolicy(_trusting(tmp_path, ca)))
    port = upstream.port.getHost().port
    try:
        [by_name] = await _multiplex(octoplex, caller, f"https://localhost:{port}/hello")
        _assert_hello(by_name)
        assert server_names == [b"localhost"]
        [by_address] = await _multiplex(octoplex, caller, f"https://127.0.0.1:{port}/hello")
        _assert_hello(by_address)
        assert server_names == [b"localhost", None]
    finally:
        await octoplex.stop()
        await upstream.stop()


@implementer(IOpenSSLClientConnectionCreator)
class _RecordingCreator:
    """
    Pass connections through, noting the TLS context each one uses.
    """

    def __init__(self, inner: Any, contexts: list[Any]) -> None:
        self._inner = inner
        self._contexts = contexts

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Connection:
        connection: Connection = self._inner.clientConnectionForTLS(tlsProtocol)
        self._contexts.append(connection.get_context())
        return connection


class _CountingPolicy(UpstreamTLSPolicy):
    """
    Octoplex's policy, counting the creators (each with its own context)
    it makes and the contexts each host's connections use.
    """

    def __init__(self, trust_root: Any) -> None:
        super().__init__(trust_root)
        self.netlocs: list[tuple[bytes, int]] = []
        self.contexts: dict[bytes, list[Any]] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        self.netlocs.append((hostname, port))
        contexts = self.contexts.setdefault(hostname, [])
        return _RecordingCreator(super().creatorForNetloc(hostname, port), contexts)


@pytest_twisted.ensureDeferred
async def test_one_tls_context_per_host(tmp_path: Path, caller: Caller) -> None:
    """Concurrent connections to one host, over two batches, share one TLS context per host."""
    ca = trustme.CA()
    upstream = _serve(_leaf_options(ca.issue_cert(*IDENTITIES)))
    policy = _CountingPolicy(_trusting(tmp_path, ca))
    octoplex = start_octoplex(tls_policy=policy)
    port = upstream.port.getHost().port
    by_address = f"https://127.0.0.1:{port}/delay/50"
    by_name = f"https://localhost:{port}/delay/50"
    try:
        first = await _multiplex(octoplex, caller, *[by_address] * 10)
        # No idle connection to reuse: one connection per request.
        assert len(upstream.site.connections) == 10
        # Those ten, back in the pool, serve ten of these; the rest dial anew.
        second = await _multiplex(octoplex, caller, *[by_address] * 20, *[by_name] * 10)
        for outcome in first + second:
            assert outcome.get("Success", {}).get("content") == "delayed 50", outcome
        assert len(upstream.site.connections) >= 30
        # One creator, and so one context, per host ...
        assert policy.netlocs == [(b"127.0.0.1", port), (b"localhost", port)]
        # ... used by every connection to that host.
        assert len(policy.contexts[b"127.0.0.1"]) >= 20
        assert len(policy.contexts[b"localhost"]) == 10
        assert sum(map(len, policy.contexts.values())) == len(upstream.site.connections)
        for contexts in policy.contexts.values():
            assert all(context is contexts[0] for context in contexts)
        assert policy.contexts[b"127.0.0.1"][0] is not policy.contexts[b"localhost"][0]
    finally:
        await octoplex.stop()
        await upstream.stop()


@attr.s(auto_attribs=True)
class _HTTPSWireMocks:
    """
    Two WireMocks with HTTPS ports: one with WireMock's own self-signed
    certificate, one with a trustme certificate of :attr:`ca`.
    """

    builtin: WireMock
    trustme: WireMock
    ca: trustme.CA


@pytest.fixture(scope="module")
def https_wiremocks(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[_HTTPSWireMocks]:
    """
    Both HTTPS WireMocks, started together once for the module.
    """
    ca = trustme.CA()
    leaf = ca.issue_cert(*IDENTITIES)
    key = leaf.private_key_pem.bytes()
    keystore = tmp_path_factory.mktemp("wiremock-tls") / "keystore.p12"
    keystore.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"octoplex",
            load_pem_private_key(key, None),
            x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()),
            [x509.load_pem_x509_certificate(ca.cert_pem.bytes())],
            BestAvailableEncryption(KEYSTORE_PASSWORD.encode()),
        )
    )
    with running_wiremocks(
        ["--https-port", "0"],
        [
            "--https-port",
            "0",
            "--https-keystore",
            str(keystore),
            "--keystore-type",
            "PKCS12",
            "--keystore-password",
            KEYSTORE_PASSWORD,
            "--key-manager-password",
            KEYSTORE_PASSWORD,
        ],
    ) as [builtin, trusted]:
        yield _HTTPSWireMocks(builtin, trusted, ca)


# WireMock's certificate has the country "Unknown"; cryptography warns that
# a country name must be two letters when Octoplex names the subject.
@pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")
@pytest_twisted.ensureDeferred
async def test_wiremock_builtin_certificate_is_rejected(
    https_wiremocks: _HTTPSWireMocks, caller: Caller
) -> None:
    """WireMock's own self-signed certificate fails against the platform's trust store."""
    octoplex = start_octoplex()
    try:
        [outcome] = await _multiplex(octoplex, caller, https_wiremocks.builtin.https_url + "/hello")
        error = _error(outcome)
        assert error.startswith(
            "TLS handshake failed: certificate of 127.0.0.1 rejected: "
            "the certificate is self-signed (subject CN=Tom Akehurst,"
        ), error
        assert error.endswith(", chain depth 0)"), error
    finally:
        await octoplex.stop()


@pytest_twisted.ensureDeferred
async def test_wiremock_with_trustme_certificate_succeeds(
    https_wiremocks: _HTTPSWireMocks, tmp_path: Path, caller: Caller
) -> None:
    """WireMock serving a trustme certificate answers over HTTPS, by address and by name."""
    server = https_wiremocks.trustme
    policy = UpstreamTLSPolicy(_trusting(tmp_path, https_wiremocks.ca))
    octoplex = start_octoplex(tls_policy=policy)
    port = server.https_url.rsplit(":", 1)[1]
    try:
        by_address, by_name = await _multiplex(
            octoplex,
            caller,
            server.https_url + "/hello",
            f"https://localhost:{port}/hello",
        )
        _assert_hello(by_address)
        _assert_hello(by_name)
        assert "matched-stub-id" in by_address["Success"]["headers"]
    finally:
        await octoplex.stop()
