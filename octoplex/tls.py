"""
TLS on both ends: the settings of the HTTPS listener, and how upstream
certificates are verified.

Inbound, :func:`server_options` builds the ``CertificateOptions`` of an HTTPS
listener from PEM files: TLS 1.2 and 1.3 only, modern ciphers, ALPN
``http/1.1``, and client certificates required when a client CA is given.
Every file problem is a :class:`TLSConfigError` that names the file, so
start-up stops with a sentence an operator can act on.

Outbound, :class:`UpstreamTLSPolicy` verifies each upstream's certificate
chain and host name (through service-identity), sends SNI, can present a
client certificate, and says *why* it rejected a certificate: expired,
self-signed, untrusted issuer or wrong host.  Wrapped in Twisted's
``HostnameCachingHTTPSPolicy`` it builds one TLS context per host, not one
per connection.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attr
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import NameOID
from OpenSSL.SSL import (
    VERIFY_FAIL_IF_NO_PEER_CERT,
    VERIFY_PEER,
    Connection,
)
from OpenSSL.SSL import Error as SSLError
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import H2_ENABLED
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

__all__ = [
    "CertificateRejected",
    "ServerPEM",
    "TLSConfigError",
    "UpstreamTLSPolicy",
    "certificate_identity",
    "load_client_certificate",
    "load_trust_root",
    "peer_identity",
    "server_options",
    "server_pem",
]

#: TLS 1.2 suites with forward secrecy and AEAD only; TLS 1.3's suites are
#: all modern and OpenSSL's defaults.
MODERN_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"

#: What the HTTPS listener offers by ALPN: HTTP/2 first when Twisted can
#: serve it (the ``h2`` package, ``pip install octoplex[http2]``), which
#: twisted.web's channel then switches to; else HTTP/1.1 alone.
SERVER_ALPN = [b"h2", b"http/1.1"] if H2_ENABLED else [b"http/1.1"]

#: What the client offers upstream: its protocol speaks HTTP/1.1 only.
_ALPN = [b"http/1.1"]

_log = Logger()

# X509_V_ERR_* codes (openssl/x509_vfy.h) a caller can act on.
_VERIFY_ERRORS = {
    2: "its issuer certificate is unknown",
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed",
    19: "the chain has a self-signed certificate that is not trusted",
    20: "its issuer is not trusted (unable to get local issuer certificate)",
    21: "the first certificate could not be verified",
    23: "the certificate is revoked",
    26: "the certificate is not for TLS servers",
}


class TLSConfigError(ValueError):
    """
    A TLS file is missing, unreadable, malformed or does not fit with
    another; the message names the file.
    """


class CertificateRejected(SSLError):
    """
    An upstream's certificate failed verification; the message says why.
    """


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read the {what} {path}: {e.strerror}") from None


def _certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSConfigError(f"the {what} {path} holds no PEM certificate")
    return certificates


def _private_key(path: str, what: str) -> Any:
    data = _read(path, what)
    try:
        return load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(
            f"the {what} {path} is not an unencrypted PEM private key: {e}"
        ) from None


def _public(key: Any) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _pair(cert_path: str, key_path: str, what: str) -> tuple[list[x509.Certificate], Any]:
    certificates = _certificates(cert_path, f"{what} certificate file")
    key = _private_key(key_path, f"{what} key file")
    if _public(certificates[0].public_key()) != _public(key.public_key()):
        raise TLSConfigError(
            f"the {what} key file {key_path} does not match the certificate in {cert_path}"
        )
    return certificates, key


def _to_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(Encoding.PEM)


def _private_certificate(certificate: x509.Certificate, key: Any) -> PrivateCertificate:
    key_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    return PrivateCertificate.loadPEM(_to_pem(certificate) + key_pem)


def _server_files(
    cert_path: str, key_path: str, chain_path: str | None, client_ca_path: str | None
) -> tuple[list[x509.Certificate], Any, list[x509.Certificate]]:
    """A listener's certificate and intermediates, its key, and its client CAs."""
    certificates, key = _pair(cert_path, key_path, "TLS")
    if chain_path is not None:
        certificates += _certificates(chain_path, "TLS chain file")
    authorities = []
    if client_ca_path is not None:
        authorities = _certificates(client_ca_path, "TLS client CA file")
    return certificates, key, authorities


def server_options(
    cert_path: str,
    key_path: str,
    chain_path: str | None = None,
    client_ca_path: str | None = None,
) -> CertificateOptions:
    """
    The TLS settings of an HTTPS listener.

    :param cert_path: the server certificate, PEM; intermediates may follow it
        in the same file.
    :param key_path: its private key, PEM, unencrypted.
    :param chain_path: more intermediate certificates, PEM.
    :param client_ca_path: if given, clients must present a certificate
        signed by a CA in this PEM file, or the handshake fails.
    :raises TLSConfigError: naming the file that is missing, unreadable,
        malformed or does not match.
    """
    certificates, key, authorities = _server_files(cert_path, key_path, chain_path, client_ca_path)
    verify: dict[str, Any] = {}
    if authorities:
        verify = {
            "verify": True,
            "requireCertificate": True,
            # The CA store takes pyOpenSSL certificates only.
            "caCerts": [Certificate.loadPEM(_to_pem(c)).original for c in authorities],
        }
    # cryptography objects: pyOpenSSL 26 deprecates its own X509 and PKey,
    # and hands these straight to OpenSSL (Twisted's annotations lag).
    return CertificateOptions(
        privateKey=key,
        certificate=certificates[0],  # type: ignore[arg-type]
        extraCertChain=certificates[1:],  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(MODERN_CIPHERS),
        acceptableProtocols=SERVER_ALPN,
        **verify,
    )


@attr.s(frozen=True, auto_attribs=True)
class ServerPEM:
    """
    The TLS files of a listener, read and checked as for the HTTPS
    listener, as PEM: for a TLS stack other than OpenSSL's through
    pyOpenSSL (the gRPC listener's).

    :ivar key: the private key, PKCS#8.
    :ivar chain: the certificate, then its intermediates.
    :ivar client_ca: the CAs that must have signed a client's certificate,
        or ``None`` to ask for none.
    """

    key: bytes
    chain: bytes
    client_ca: bytes | None


def server_pem(
    cert_path: str,
    key_path: str,
    chain_path: str | None = None,
    client_ca_path: str | None = None,
) -> ServerPEM:
    """
    The same files as :func:`server_options`, checked the same way.

    :raises TLSConfigError: naming the file that is missing, unreadable,
        malformed or does not match.
    """
    certificates, key, authorities = _server_files(cert_path, key_path, chain_path, client_ca_path)
    return ServerPEM(
        key=key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        chain=b"".join(_to_pem(c) for c in certificates),
        client_ca=b"".join(_to_pem(c) for c in authorities) if authorities else None,
    )


def load_trust_root(ca_path: str | None) -> Any:
    """
    The trust root for upstream certificates: the CAs in ``ca_path``
    *instead of* the platform's, or the platform's trust store.

    :raises TLSConfigError: naming the file.
    """
    if ca_path is None:
        return platformTrust()
    authorities = _certificates(ca_path, "upstream CA file")
    return trustRootFromCertificates([Certificate.loadPEM(_to_pem(c)) for c in authorities])


def load_client_certificate(cert_path: str, key_path: str) -> PrivateCertificate:
    """
    The certificate Octoplex presents to upstreams that ask for one.

    :raises TLSConfigError: naming the file.
    """
    certificates, key = _pair(cert_path, key_path, "upstream client")
    return _private_certificate(certificates[0], key)


def _alternative_names(cert: x509.Certificate) -> list[str]:
    """
    The certificate's subject alternative names, in order: DNS names, IP
    addresses, e-mail addresses and URIs (a SPIFFE ID, say).
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    kinds = (x509.DNSName, x509.IPAddress, x509.RFC822Name, x509.UniformResourceIdentifier)
    return [str(name.value) for name in san if isinstance(name, kinds)]


def _subject(cert: x509.Certificate) -> str:
    # cryptography warns about malformed attributes (a country that is not
    # two letters, as in WireMock's built-in certificate); the subject is
    # still worth showing.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cert.subject.rfc4514_string()


def _names(cert: x509.Certificate) -> str:
    names = _alternative_names(cert) or [
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    return ", ".join(names) or "no names"


def _verifier(
    hostname: str,
) -> Callable[[Any], Callable[[Connection, Any, int, int, int], bool]]:
    """
    Make verify callbacks that explain each rejection.  A callback checks
    what Twisted's own does (the chain by OpenSSL, the leaf against the host
    by service-identity), and fails the connection with a
    :class:`CertificateRejected` that says why.
    """
    if isIPAddress(hostname) or isIPv6Address(hostname):
        identity: Any = IPAddress_ID(hostname)
    else:
        identity = DNS_ID(hostname)

    def for_connection(tls_protocol: Any) -> Callable[[Connection, Any, int, int, int], bool]:
        # Dropped once the leaf is judged, as Twisted does, so that the
        # connection and its protocol do not keep each other alive.
        protocol = [tls_protocol]

        def reject(reason: str, certificate: x509.Certificate, depth: int) -> bool:
            error = CertificateRejected(
                f"certificate of {hostname} rejected: {reason} "
                f"(subject {_subject(certificate)}, chain depth {depth})"
            )
            if protocol:
                protocol.pop().failVerification(Failure(error))
            return False

        def verify(connection: Connection, cert: Any, error: int, depth: int, ok: int) -> bool:
            # An exception raised here would be lost: pyOpenSSL re-raises
            # only a context's callback errors, not a connection's.
            try:
                certificate = cert.to_cryptography()
                if not ok:
                    reason = _VERIFY_ERRORS.get(error, f"OpenSSL verify error {error}")
                    return reject(reason, certificate, depth)
                if depth == 0:
                    try:
                        verify_service_identity(extract_patterns(cert), [identity], [])
                    except VerificationError:
                        names = _names(certificate)
                        return reject(f"it is for {names}, not {hostname}", certificate, depth)
                    protocol.clear()
                return True
            except Exception:
                _log.failure("verifying the certificate of {hostname} failed", hostname=hostname)
                return False

        return verify

    return for_connection


@implementer(IOpenSSLClientConnectionCreator)
class _ExplainingCreator:
    """
    Twisted's client TLS settings for one host, with a verify callback that
    says why a certificate was rejected.
    """

    def __init__(self, inner: IOpenSSLClientConnectionCreator, hostname: str) -> None:
        self._inner = inner
        self._verifier = _verifier(hostname)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Connection:
        connection: Connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(
            VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT, self._verifier(tlsProtocol)
        )
        return connection


@implementer(IPolicyForHTTPS)
class UpstreamTLSPolicy:
    """
    How Octoplex checks upstream certificates.

    :param trust_root: the CAs to trust; see :func:`load_trust_root`.
    :param client_certificate: presented to upstreams that ask for one.
    """

    def __init__(
        self, trust_root: Any = None, client_certificate: PrivateCertificate | None = None
    ) -> None:
        self._trust_root = platformTrust() if trust_root is None else trust_root
        self._client_certificate = client_certificate

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii")
        inner = optionsForClientTLS(
            host,
            trustRoot=self._trust_root,
            clientCertificate=self._client_certificate,
            acceptableProtocols=_ALPN,
        )
        return _ExplainingCreator(inner, host)


def peer_identity(transport: Any) -> str | None:
    """
    The verified client certificate's identity on an inbound connection:
    its subject CN, else its first subject alternative name.  ``None`` on a
    plain connection or when the client sent no certificate.
    """
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    if get_peer_certificate is None:
        return None
    peer = get_peer_certificate()
    if peer is None:
        return None
    return certificate_identity(peer.to_cryptography())


def certificate_identity(certificate: x509.Certificate) -> str | None:
    """
    A client certificate's identity: its subject CN, else its first subject
    alternative name.
    """
    common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common:
        return str(common[0].value)
    names = _alternative_names(certificate)
    return names[0] if names else None
