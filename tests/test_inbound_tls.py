"""
HTTPS into Octoplex, on real ports of 127.0.0.1 with certificates from
trustme: ``--listen-tls`` beside a plain ``--listen``, an intermediate from
``--tls-chain``, the TLS versions and ALPN it accepts, client certificates
with ``--tls-client-ca``, the ``ssl:`` endpoint string, and the start-up
errors twistd reports for bad TLS files.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attr
import pytest
import pytest_twisted
import treq
import trustme
from treq.client import HTTPClient
from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, ResponseNeverReceived
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from octoplex.tap import Options, makeService
from octoplex.tls import peer_identity

from .schema import check_answer
from .servers import Caller, Upstream, _QuietPool
from .test_twistd import free_port, run_twistd

# How long a raw stdlib client waits on its socket before giving up.
SOCKET_TIMEOUT = 5.0

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


@attr.s(auto_attribs=True, frozen=True)
class Pair:
    """
    A certificate file and its key file, as written for the daemon.
    """

    cert: Path
    key: Path


def write_leaf(directory: Path, name: str, leaf: trustme.LeafCert) -> Pair:
    """
    Write ``leaf``'s certificate alone (no intermediates) and its key as PEM files.
    """
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    pair.cert.write_bytes(leaf.cert_chain_pems[0].bytes())
    pair.key.write_bytes(leaf.private_key_pem.bytes())
    return pair


@attr.s(auto_attribs=True, frozen=True)
class ServerPKI:
    """
    A CA, its PEM, and a server certificate for 127.0.0.1 it signed.
    """

    ca: trustme.CA
    server: Pair

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()


@pytest.fixture
def pki(tmp_path: Path) -> ServerPKI:
    """
    A fresh CA and a server certificate for 127.0.0.1 and localhost, on disk.
    """
    ca = trustme.CA()
    return ServerPKI(ca, write_leaf(tmp_path, "server", ca.issue_cert("127.0.0.1", "localhost")))


def parse(*argv: str) -> Options:
    """
    Parse ``argv`` as ``twistd octoplex`` would, with the test upstreams'
    loopback range allowed.
    """
    options = Options()
    options.parseOptions(["--workers", "1", "--allow-egress", "127.0.0.0/8", *argv])
    return options


@asynccontextmanager
async def running(*argv: str) -> AsyncIterator[IService]:
    """
    Build the daemon from ``argv`` as twistd would, start it, and stop it afterwards.
    """
    root = makeService(parse(*argv))
    root.startService()
    try:
        yield root
    finally:
        await root.stopService()


def tls_argv(port: int, pki: ServerPKI, *more: str) -> list[str]:
    """
    The options of one --listen-tls listener on ``port`` of 127.0.0.1 with ``pki``'s certificate.
    """
    return [
        "--listen-tls",
        f"tcp:{port}:interface=127.0.0.1",
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        *more,
    ]


@implementer(IPolicyForHTTPS)
class _TrustingPolicy:
    """
    Verify servers against one CA and present ``client`` when asked.
    """

    def __init__(self, ca_pem: bytes, client: PrivateCertificate | None) -> None:
        self._root = Certificate.loadPEM(ca_pem)
        self._client = client

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self._root, clientCertificate=self._client
        )


class HTTPSCaller(Caller):
    """
    The test's HTTPS client: it trusts only ``ca_pem`` and presents ``client`` if given.
    """

    def __init__(self, ca_pem: bytes, client: trustme.LeafCert | None = None) -> None:
        certificate = None
        if client is not None:
            certificate = PrivateCertificate.loadPEM(client.private_key_and_cert_chain_pem.bytes())
        pool = _QuietPool(reactor, persistent=False)
        agent = Agent(reactor, contextFactory=_TrustingPolicy(ca_pem, certificate), pool=pool)
        self._http = HTTPClient(agent)


async def assert_batch_succeeds(caller: Caller, url: str, upstream: Upstream) -> None:
    """
    POST a one-request batch to ``url`` and assert it answers 200 with the upstream's Success.
    """
    batch = {"timeout_msec": 5000, "requests": [{"uri": upstream.url + "/hello"}]}
    status, _, body = await caller.post(url + "/multiplex", batch)
    assert status == 200, body
    (outcome,) = body["responses"]
    assert outcome["Success"]["status"] == 200
    assert outcome["Success"]["content"] == "Hello world!"


def batch_events(log_events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    The per-batch log events of the test, in order.
    """
    return [e for e in log_events if e.get("log_format", "").startswith("batch {batch_id}")]


@attr.s(auto_attribs=True, frozen=True)
class Attempt:
    """
    What a raw TLS client saw: the negotiated version and ALPN protocol, the
    bytes of the response, and the error that ended the exchange, if any.
    """

    version: str | None
    alpn: str | None
    response: bytes
    error: OSError | None


def attempt(
    port: int, context: ssl.SSLContext, host: str = "127.0.0.1", server_name: str = "127.0.0.1"
) -> Attempt:
    """
    Connect with stdlib ``ssl`` (blocking: run it in a thread), GET /healthz
    and read until the server closes.
    """
    version = alpn = None
    received = b""
    try:
        with socket.create_connection((host, port), timeout=SOCKET_TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                version, alpn = tls.version(), tls.selected_alpn_protocol()
                tls.sendall(HEALTHZ)
                while chunk := tls.recv(65536):
                    received += chunk
    except OSError as e:
        return Attempt(version, alpn, received, e)
    return Attempt(version, alpn, received, None)


async def attempt_in_thread(port: int, context: ssl.SSLContext) -> Attempt:
    """
    :func:`attempt`, in the reactor's thread pool so that the daemon keeps running.
    """
    result: Attempt = await deferToThread(attempt, port, context)
    return result


def client_context(
    ca_pem: bytes,
    version: ssl.TLSVersion | None = None,
    certificate: trustme.LeafCert | None = None,
) -> ssl.SSLContext:
    """
    A stdlib client context that trusts ``ca_pem``, pinned to ``version`` if
    given, presenting ``certificate`` if given.
    """
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    if version is not None:
        context.minimum_version = context.maximum_version = version
    if certificate is not None:
        certificate.configure_cert(context)
    return context


def assert_healthy(result: Attempt) -> None:
    """
    Assert that the raw exchange completed with ``200 {"healthy":true}``.
    """
    assert result.error is None, result.error
    head, _, body = result.response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), result.response
    assert json.loads(body) == {"healthy": True}


def assert_refused(result: Attempt, reasons: set[str]) -> None:
    """
    Assert that the server ended the handshake with an alert in ``reasons``
    and that no HTTP response ever came back.
    """
    assert isinstance(result.error, ssl.SSLError), result
    assert result.error.reason in reasons, result.error
    assert result.response == b""


@pytest_twisted.ensureDeferred
async def test_https_listener_beside_plain_listener(
    pki: ServerPKI, upstream: Upstream, log_events: list[dict[str, Any]]
) -> None:
    """A batch over --listen-tls succeeds for a client trusting the CA; --listen serves too."""
    tls_port, plain_port = free_port(), free_port()
    argv = tls_argv(tls_port, pki, "--listen", f"tcp:{plain_port}:interface=127.0.0.1")
    async with running(*argv):
        await assert_batch_succeeds(
            HTTPSCaller(pki.ca_pem), f"https://127.0.0.1:{tls_port}", upstream
        )
        await assert_batch_succeeds(Caller(), f"http://127.0.0.1:{plain_port}", upstream)
        # Plain HTTP to the TLS port gets no HTTP answer.
        with pytest.raises(ResponseNeverReceived):
            await Caller().get(f"http://127.0.0.1:{tls_port}/healthz")
    events = batch_events(log_events)
    assert len(events) == 2
    assert [e["tls_identity"] for e in events] == [None, None]
    assert all(e["client"].startswith("127.0.0.1:") for e in events)


@pytest_twisted.ensureDeferred
async def test_intermediate_from_tls_chain(tmp_path: Path, upstream: Upstream) -> None:
    """With the intermediate in --tls-chain, a client that trusts only the root succeeds."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("127.0.0.1")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(intermediate.cert_pem.bytes())
    pki = ServerPKI(root, write_leaf(tmp_path, "leaf", leaf))
    with_chain, without_chain = free_port(), free_port()
    async with running(*tls_argv(with_chain, pki, "--tls-chain", str(chain))):
        await assert_batch_succeeds(
            HTTPSCaller(root.cert_pem.bytes()), f"https://127.0.0.1:{with_chain}", upstream
        )
        assert_healthy(await attempt_in_thread(with_chain, client_context(pki.ca_pem)))
    # Without the chain the same leaf cannot be verified against the root.
    async with running(*tls_argv(without_chain, pki)):
        result = await attempt_in_thread(without_chain, client_context(pki.ca_pem))
    assert isinstance(result.error, ssl.SSLCertVerificationError), result
    assert result.error.verify_message == "unable to get local issuer certificate"


# The TLS 1.1 client needs the deprecated versions, to prove the server refuses them.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls_versions_and_alpn(pki: ServerPKI) -> None:
    """
    TLS 1.1 is refused by the server, TLS 1.2 and 1.3 are served, and ALPN
    selects http/1.1 for a client that offers only that (h2: below).
    """
    port = free_port()
    async with running(*tls_argv(port, pki)):
        old = client_context(pki.ca_pem)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        # OpenSSL 3 will not even offer TLS 1.1 at its default security level.
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        refused = await attempt_in_thread(port, old)
        for version, name in [
            (ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
            (ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
        ]:
            result = await attempt_in_thread(port, client_context(pki.ca_pem, version))
            assert_healthy(result)
            assert result.version == name
            assert result.alpn is None
        offering = client_context(pki.ca_pem)
        offering.set_alpn_protocols(["http/1.1"])
        negotiated = await attempt_in_thread(port, offering)
    # The server's protocol_version alert, not a client-side refusal to offer TLS 1.1.
    assert_refused(refused, {"TLSV1_ALERT_PROTOCOL_VERSION"})
    assert refused.version is None
    assert_healthy(negotiated)
    assert negotiated.alpn == "http/1.1"


@pytest.fixture
def client_ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    """
    The CA that signs client certificates, and its PEM file.
    """
    ca = trustme.CA()
    path = tmp_path / "client-ca.pem"
    path.write_bytes(ca.cert_pem.bytes())
    return ca, path


# With TLS 1.2 the server refuses in the handshake; with TLS 1.3 the client's
# handshake is done before the server judges its certificate, so the alert
# arrives on the first read.
NO_CERTIFICATE = {
    ssl.TLSVersion.TLSv1_2: {"SSLV3_ALERT_HANDSHAKE_FAILURE"},
    ssl.TLSVersion.TLSv1_3: {"TLSV13_ALERT_CERTIFICATE_REQUIRED"},
}


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"]
)
@pytest_twisted.ensureDeferred
async def test_client_ca_refuses_missing_and_foreign_certificates(
    pki: ServerPKI,
    client_ca: tuple[trustme.CA, Path],
    version: ssl.TLSVersion,
    log_events: list[dict[str, Any]],
) -> None:
    """
    With --tls-client-ca, no client certificate or one from another CA gets
    no HTTP answer; each failed handshake is logged with OpenSSL's reason.
    """
    port = free_port()
    foreign = trustme.CA().issue_cert("bidder-7")
    async with running(*tls_argv(port, pki, "--tls-client-ca", str(client_ca[1]))):
        bare = await attempt_in_thread(port, client_context(pki.ca_pem, version))
        stranger = await attempt_in_thread(port, client_context(pki.ca_pem, version, foreign))
        known = await attempt_in_thread(
            port, client_context(pki.ca_pem, version, client_ca[0].issue_cert("bidder-7"))
        )
    assert_refused(bare, NO_CERTIFICATE[version])
    assert_refused(stranger, {"TLSV1_ALERT_UNKNOWN_CA"})
    assert_healthy(known)
    failures = [e["error"] for e in log_events if e.get("tls_failure")]
    assert failures == ["peer did not return a certificate", "certificate verify failed"]


@pytest.mark.parametrize(
    ("identities", "common_name", "identity"),
    [
        # No subject CN (trustme sets none by default): the first SAN.
        (["bidder-7", "bidder-7.example.com"], None, "bidder-7"),
        (["127.0.0.2"], None, "127.0.0.2"),
        # A subject CN wins over the SANs.
        (["bidder-7.example.com"], "Bidder Seven", "Bidder Seven"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_client_certificate_identity_is_logged(
    pki: ServerPKI,
    client_ca: tuple[trustme.CA, Path],
    upstream: Upstream,
    log_events: list[dict[str, Any]],
    identities: list[str],
    common_name: str | None,
    identity: str,
) -> None:
    """A client certificate from --tls-client-ca gets its batch served and logged by identity."""
    port = free_port()
    certificate = client_ca[0].issue_cert(*identities, common_name=common_name)
    async with running(*tls_argv(port, pki, "--tls-client-ca", str(client_ca[1]))):
        caller = HTTPSCaller(pki.ca_pem, certificate)
        await assert_batch_succeeds(caller, f"https://127.0.0.1:{port}", upstream)
    (event,) = batch_events(log_events)
    assert event["tls_identity"] == identity
    assert event["client"].startswith("127.0.0.1:")
    assert event["client"].endswith(f" ({identity})")
    assert event["succeeded"] == 1


@pytest_twisted.ensureDeferred
async def test_client_certificate_and_token_together(
    pki: ServerPKI,
    client_ca: tuple[trustme.CA, Path],
    upstream: Upstream,
    log_events: list[dict[str, Any]],
) -> None:
    """
    With both --tls-client-ca and a token, a caller needs both: a verified
    certificate without the token gets 401; with it, the batch runs and its
    event names the identity and the token's name.
    """
    port = free_port()
    token = "s3cret-token-of-bidder-7"
    argv = tls_argv(port, pki, "--tls-client-ca", str(client_ca[1]), "--api-token", f"b7={token}")
    batch = json.dumps({"timeout_msec": 5000, "requests": [{"uri": upstream.url + "/hello"}]})
    caller = HTTPSCaller(pki.ca_pem, client_ca[0].issue_cert("bidder-7"))
    url = f"https://127.0.0.1:{port}/multiplex"
    async with running(*argv):
        without = await caller._http.post(url, data=batch.encode())
        await treq.content(without)
        bearer = {"authorization": f"Bearer {token}"}
        with_token = await caller._http.post(url, data=batch.encode(), headers=bearer)
        answer = json.loads(await treq.content(with_token))
        check_answer(with_token.code, answer)
    assert without.code == 401
    assert with_token.code == 200
    assert answer["responses"][0]["Success"]["content"] == "Hello world!"
    (event,) = batch_events(log_events)
    assert event["tls_identity"] == "bidder-7"
    assert event["client"].endswith(" (bidder-7) [token b7]")


@pytest_twisted.ensureDeferred
async def test_ssl_endpoint_string(pki: ServerPKI, upstream: Upstream) -> None:
    """--listen ssl:...:privateKey=...:certKey=... serves a batch over HTTPS."""
    port = free_port()
    listen = f"ssl:{port}:interface=127.0.0.1:privateKey={pki.server.key}:certKey={pki.server.cert}"
    async with running("--listen", listen):
        await assert_batch_succeeds(HTTPSCaller(pki.ca_pem), f"https://127.0.0.1:{port}", upstream)


@pytest_twisted.ensureDeferred
async def test_ssl_endpoint_string_with_extra_chain(tmp_path: Path, upstream: Upstream) -> None:
    """--listen ssl:...:extraCertChain=... sends the intermediate; a root-only client succeeds."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = write_leaf(tmp_path, "leaf", intermediate.issue_cert("127.0.0.1"))
    chain = tmp_path / "chain.pem"
    chain.write_bytes(intermediate.cert_pem.bytes())
    port = free_port()
    listen = (
        f"ssl:{port}:interface=127.0.0.1:privateKey={leaf.key}:certKey={leaf.cert}"
        f":extraCertChain={chain}"
    )
    async with running("--listen", listen):
        await assert_batch_succeeds(
            HTTPSCaller(root.cert_pem.bytes()), f"https://127.0.0.1:{port}", upstream
        )


def start_up_errors(tmp_path: Path) -> list[tuple[list[str], str]]:
    """
    Bad TLS command lines, each with the one-line error twistd must end with.
    """
    ca = trustme.CA()
    good = write_leaf(tmp_path, "good", ca.issue_cert("127.0.0.1"))
    other = write_leaf(tmp_path, "other", ca.issue_cert("127.0.0.1"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    missing = tmp_path / "missing.key"
    listen = ["--listen-tls", f"tcp:{free_port()}:interface=127.0.0.1"]
    return [
        (
            [*listen, "--tls-cert", str(good.cert), "--tls-key", str(missing)],
            f"cannot read the TLS key file {missing}: No such file or directory",
        ),
        (
            # Running as root, permissions cannot make a file unreadable; a directory is.
            [*listen, "--tls-cert", str(tmp_path), "--tls-key", str(good.key)],
            f"cannot read the TLS certificate file {tmp_path}: Is a directory",
        ),
        (
            [*listen, "--tls-cert", str(garbage), "--tls-key", str(good.key)],
            f"the TLS certificate file {garbage} holds no PEM certificate",
        ),
        (
            [*listen, "--tls-cert", str(good.cert), "--tls-key", str(other.key)],
            f"the TLS key file {other.key} does not match the certificate in {good.cert}",
        ),
        (
            [
                *listen,
                "--tls-cert",
                str(good.cert),
                "--tls-key",
                str(good.key),
                "--tls-chain",
                str(garbage),
            ],
            f"the TLS chain file {garbage} holds no PEM certificate",
        ),
        (
            [*listen, "--tls-key", str(good.key)],
            "--listen-tls needs --tls-cert and --tls-key",
        ),
        (
            [
                "--listen",
                f"tcp:{free_port()}:interface=127.0.0.1",
                "--tls-client-ca",
                str(good.cert),
            ],
            "--tls-client-ca applies to --listen-tls and --grpc-listen-tls, "
            "neither of which is given",
        ),
    ]


def test_bad_tls_files_stop_twistd(tmp_path: Path) -> None:
    """Each bad TLS file or option makes twistd exit 1 at once with a line that names it."""
    cases = start_up_errors(tmp_path)

    def run(argv: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        result = run_twistd(["-n", "--pidfile=", "octoplex", *argv], timeout=60.0)
        return result, time.monotonic() - started

    # Each twistd spends most of a second importing; run them side by side,
    # with one that only prints the version: it imports as much and takes
    # as long on a machine as busy, a yardstick for "at once".
    with ThreadPoolExecutor(len(cases) + 1) as pool:
        results = list(pool.map(run, [["--version"]] + [argv for argv, _ in cases]))
    (version, yardstick), results = results[0], results[1:]
    assert version.returncode == 0, (version.stdout, version.stderr)
    for (argv, message), (result, elapsed) in zip(cases, results, strict=True):
        assert result.returncode == 1, (argv, result.stdout, result.stderr)
        # twistd prints the usage, then "<argv0> -n: <error>", on stdout.
        last = result.stdout.rstrip().splitlines()[-1]
        assert last.endswith(f": {message}"), (argv, last)
        assert "Traceback" not in result.stdout + result.stderr
        assert "listening on" not in result.stdout
        # Not waiting for anything: about as long as importing takes.
        assert elapsed < 2 * yardstick + 2.0, (argv, elapsed, yardstick)


@pytest_twisted.ensureDeferred
async def test_tls_endpoint_string(tmp_path: Path, pki: ServerPKI) -> None:
    """--listen tls:DIR:... serves HTTPS with the PEM in DIR that the client's SNI names."""
    pems = tmp_path / "pems"
    pems.mkdir()
    (pems / "localhost.pem").write_bytes(pki.server.key.read_bytes() + pki.server.cert.read_bytes())
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    async with running("--listen", f"tls:{pems}:port={port}:interface=\\:\\:1"):
        # Here localhost is 127.0.0.1 alone, so dial ::1 and name localhost.
        result = await deferToThread(attempt, port, client_context(pki.ca_pem), "::1", "localhost")
    assert_healthy(result)


class _Transport:
    """
    A TLS transport as far as peer_identity looks at one.
    """

    def __init__(self, pem: bytes) -> None:
        from OpenSSL.crypto import FILETYPE_PEM, load_certificate

        self._certificate = load_certificate(FILETYPE_PEM, pem)

    def getPeerCertificate(self) -> Any:
        return self._certificate


@pytest.mark.parametrize(
    ("names", "common_name", "identity"),
    [
        (["bidder-7", "bidder-7.example.com"], None, "bidder-7"),
        (["127.0.0.2", "bidder-7"], None, "127.0.0.2"),
        (["client-one@example.com"], None, "client-one@example.com"),
        (["bidder-7"], "Bidder Seven", "Bidder Seven"),
    ],
)
def test_peer_identity_is_the_cn_or_the_first_alternative_name(
    names: list[str], common_name: str | None, identity: str
) -> None:
    """The logged identity is the subject CN, else the first SAN of any common kind."""
    leaf = trustme.CA().issue_cert(*names, common_name=common_name)
    assert peer_identity(_Transport(leaf.cert_chain_pems[0].bytes())) == identity


def test_peer_identity_of_a_plain_connection_is_none() -> None:
    """A transport without TLS has no identity."""
    assert peer_identity(object()) is None


def h2_batches(
    port: int, ca_pem: bytes, bodies: list[bytes], certificate: trustme.LeafCert | None = None
) -> tuple[str | None, list[tuple[int, bytes]], float]:
    """
    Over one TLS connection that offers h2 (run it in a thread): send every
    body as a POST /multiplex on its own stream before reading any answer,
    then read them all.  The negotiated protocol, each stream's status and
    body in order, and the seconds it all took.
    """
    import h2.config
    import h2.connection
    import h2.events

    context = client_context(ca_pem, certificate=certificate)
    context.set_alpn_protocols(["h2", "http/1.1"])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            alpn = tls.selected_alpn_protocol()
            if alpn != "h2":
                return alpn, [], 0.0
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            streams = []
            for body in bodies:
                stream = conn.get_next_available_stream_id()
                streams.append(stream)
                conn.send_headers(
                    stream,
                    [
                        (":method", "POST"),
                        (":path", "/multiplex"),
                        (":scheme", "https"),
                        (":authority", f"127.0.0.1:{port}"),
                        ("content-type", "application/json"),
                        ("content-length", str(len(body))),
                    ],
                )
                conn.send_data(stream, body, end_stream=True)
            tls.sendall(conn.data_to_send())
            statuses: dict[int, int] = {}
            received: dict[int, bytes] = {stream: b"" for stream in streams}
            ended: set[int] = set()
            while len(ended) < len(streams):
                data = tls.recv(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        statuses[event.stream_id] = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        received[event.stream_id] += event.data
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        ended.add(event.stream_id)
                tls.sendall(conn.data_to_send())
    elapsed = time.monotonic() - started
    return alpn, [(statuses.get(s, 0), received[s]) for s in streams], elapsed


@pytest_twisted.ensureDeferred
async def test_http2_batches_in_parallel_on_one_connection(
    pki: ServerPKI, upstream: Upstream
) -> None:
    """
    A client that offers h2 gets HTTP/2 on the HTTPS listener, and four
    batches sent at once on one connection run at once: each waits 400 ms
    upstream, and all are answered in well under four times that.
    """
    port = free_port()
    bodies = [
        json.dumps(
            {"timeout_msec": 3000, "requests": [{"id": str(n), "uri": upstream.url + "/delay/400"}]}
        ).encode()
        for n in range(4)
    ]
    # One connection at a time: the second must find the first's slot free
    # (HTTP/2 takes the connection over from the HTTP/1.1 channel, which
    # kept the count).
    async with running(*tls_argv(port, pki, "--max-connections", "1")):
        alpn, answers, elapsed = await deferToThread(h2_batches, port, pki.ca_pem, bodies)
        await deferLater(reactor, 0.3, lambda: None)
        again, more, _ = await deferToThread(h2_batches, port, pki.ca_pem, bodies[:1])
    assert (again, [status for status, _ in more]) == ("h2", [200])
    assert alpn == "h2"
    assert [status for status, _ in answers] == [200] * 4
    for n, (_, body) in enumerate(answers):
        document = json.loads(body)
        check_answer(200, document)
        [outcome] = document["responses"]
        assert outcome["Success"]["content"] == "delayed 400"
        assert outcome["Success"]["id"] == str(n)
    assert 0.4 <= elapsed < 1.2, elapsed


@pytest_twisted.ensureDeferred
async def test_http2_body_over_the_limit_is_refused_on_its_stream_alone(
    pki: ServerPKI, upstream: Upstream
) -> None:
    """
    Over HTTP/2, a batch over --max-request-bytes gets 413 naming the limit
    on its own stream; the batch beside it on the same connection is served.
    """
    port = free_port()
    small = json.dumps(
        {"timeout_msec": 3000, "requests": [{"uri": upstream.url + "/hello"}]}
    ).encode()
    big = json.dumps(
        {"timeout_msec": 3000, "requests": [{"uri": upstream.url + "/hello", "body": "x" * 5000}]}
    ).encode()
    async with running(*tls_argv(port, pki, "--max-request-bytes", "2000")):
        alpn, answers, _ = await deferToThread(h2_batches, port, pki.ca_pem, [big, small])
    assert alpn == "h2"
    (big_status, big_body), (small_status, small_body) = answers
    assert big_status == 413
    assert json.loads(big_body) == {
        "error": f"request body is {len(big)} bytes; at most 2000 are allowed"
    }
    assert small_status == 200
    assert json.loads(small_body)["responses"][0]["Success"]["content"] == "Hello world!"


@pytest_twisted.ensureDeferred
async def test_http2_batches_log_the_client_certificate_identity(
    pki: ServerPKI,
    client_ca: tuple[trustme.CA, Path],
    upstream: Upstream,
    log_events: list[dict[str, Any]],
) -> None:
    """Over HTTP/2 too, a batch's event names the caller's certificate identity."""
    port = free_port()
    certificate = client_ca[0].issue_cert("bidder-9")
    body = json.dumps({"timeout_msec": 3000, "requests": [{"uri": upstream.url + "/hello"}]})
    async with running(*tls_argv(port, pki, "--tls-client-ca", str(client_ca[1]))):
        alpn, answers, _ = await deferToThread(
            h2_batches, port, pki.ca_pem, [body.encode()], certificate
        )
    assert alpn == "h2" and [status for status, _ in answers] == [200]
    (event,) = batch_events(log_events)
    assert event["tls_identity"] == "bidder-9"
    assert event["client"].endswith(" (bidder-9)")


def h2_answered_then_closed(
    port: int, ca_pem: bytes, body: bytes, answered: threading.Event
) -> tuple[int, list[Any], bool]:
    """
    Over one h2 connection (run it in a thread): POST ``body`` to
    /multiplex, read the answer, set ``answered``, then read until the
    server closes.  The answer's status, the events after it, and whether
    the connection was closed rather than timed out.
    """
    import h2.config
    import h2.connection
    import h2.events

    context = client_context(ca_pem)
    context.set_alpn_protocols(["h2"])
    status, after = 0, []
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(
                1,
                [
                    (":method", "POST"),
                    (":path", "/multiplex"),
                    (":scheme", "https"),
                    (":authority", f"127.0.0.1:{port}"),
                    ("content-length", str(len(body))),
                ],
            )
            conn.send_data(1, body, end_stream=True)
            tls.sendall(conn.data_to_send())
            while True:
                try:
                    data = tls.recv(65536)
                except TimeoutError:
                    return status, after, False
                if not data:
                    return status, after, True
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.StreamEnded):
                        answered.set()
                    elif answered.is_set():
                        after.append(event)
                tls.sendall(conn.data_to_send())


@pytest_twisted.ensureDeferred
async def test_http2_connections_get_a_goaway_before_the_shutdown_closes_them(
    pki: ServerPKI, upstream: Upstream
) -> None:
    """
    On shutdown an idle HTTP/2 connection gets GOAWAY (NO_ERROR, its last
    stream answered) before the close, so the client knows the close is clean.
    """
    port = free_port()
    body = json.dumps({"timeout_msec": 3000, "requests": [{"uri": upstream.url + "/hello"}]})
    root = makeService(parse(*tls_argv(port, pki)))
    root.startService()
    answered = threading.Event()
    try:
        client = deferToThread(h2_answered_then_closed, port, pki.ca_pem, body.encode(), answered)
        assert await deferToThread(answered.wait, 10)
    finally:
        await root.stopService()
    status, after, closed = await client
    assert status == 200 and closed
    (goaway,) = [e for e in after if type(e).__name__ == "ConnectionTerminated"]
    assert (goaway.error_code, goaway.last_stream_id) == (0, 1)
