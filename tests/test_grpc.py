"""
The gRPC frontend over real loopback sockets: ``twistd --reactor=asyncio
octoplex --grpc-listen`` run as a subprocess (the product as operators start
it), Twisted upstreams in this process, and grpcio's own client.

The client's calls block, so each runs in a thread (``deferToThread``) while
this process's reactor serves the upstreams.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_twisted
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread

from octoplex.v1 import multiplexer_pb2 as pb
from octoplex.v1 import multiplexer_pb2_grpc as pb_grpc

from .servers import Upstream, start_upstream
from .test_twistd import ROOT, environment, free_port, run_twistd, twistd, wait_for_exit

TOKEN = "grpc-s3cret-of-bidder-9"
BEARER = (("authorization", f"Bearer {TOKEN}"),)
#: Seconds a test waits for a call (the daemon answers within its deadline).
CALL_TIMEOUT = 20.0


class Daemon:
    """
    A ``twistd --reactor=asyncio octoplex`` with gRPC listeners, and its log.
    """

    def __init__(
        self, tmp: Path, options: list[str], plain: bool, tls: bool, workers: int = 1
    ) -> None:
        self.tmp = tmp
        self.http_port = free_port()
        self.grpc_port = free_port() if plain else None
        self.tls_port = free_port() if tls else None
        self.log = tmp / "octoplex.log"
        self.output = tmp / "output.txt"
        listeners = []
        if self.grpc_port is not None:
            listeners += ["--grpc-listen", f"127.0.0.1:{self.grpc_port}"]
        if self.tls_port is not None:
            listeners += ["--grpc-listen-tls", f"127.0.0.1:{self.tls_port}"]
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    *twistd(),
                    "-n",
                    "--pidfile=",
                    "--reactor=asyncio",
                    "octoplex",
                    "--log-file",
                    str(self.log),
                    "--listen",
                    f"tcp:{self.http_port}:interface=127.0.0.1",
                    "--allow-egress",
                    "127.0.0.0/8",
                    "--workers",
                    str(workers),
                    *listeners,
                    *options,
                ],
                cwd=ROOT,
                env=environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def events(self) -> list[dict[str, Any]]:
        """The daemon's log events so far."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def errors(self) -> list[dict[str, Any]]:
        """The error events the daemon logged: a test fails on any."""
        return [e for e in self.events() if e.get("level") in ("error", "critical")]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def wait_serving(daemon: Daemon, channel: grpc.Channel, metadata: Any = ()) -> None:
    """
    Block until the daemon's health service says SERVING (at most 30 s);
    fail at once if the daemon exits.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 30
    while True:
        if daemon.process.poll() is not None:
            pytest.fail(
                f"twistd exited with {daemon.process.returncode}: {daemon.output.read_text()}"
            )
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            pass
        else:
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
        assert time.monotonic() < deadline, f"no SERVING within 30 s: {daemon.output.read_text()}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA, the daemon's certificate for 127.0.0.1 and a client's."""
    tmp = tmp_path_factory.mktemp("grpc-tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("bidder-9.example")
    files = {
        "ca": tmp / "ca.pem",
        "cert": tmp / "cert.pem",
        "key": tmp / "key.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(files["cert"]), append=True)
    return {
        "files": files,
        "ca_pem": ca.cert_pem.bytes(),
        "client_key": client.private_key_pem.bytes(),
        "client_chain": b"".join(blob.bytes() for blob in client.cert_chain_pems),
    }


def _serving(daemon: Daemon, channel: grpc.Channel) -> Iterator[Daemon]:
    """Yield ``daemon`` once it serves; stop it after, failing on any error it logged."""
    try:
        with channel:
            wait_serving(daemon, channel)
        yield daemon
    finally:
        daemon.stop()
    assert daemon.errors() == []


def _tls_files(certificates: dict[str, Any]) -> list[str]:
    files = certificates["files"]
    return ["--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])]


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, certificates: dict[str, Any]
) -> Iterator[Daemon]:
    """
    The daemon with a plain gRPC listener and a TLS one (no client
    certificates), which needs a bearer token, and batches of at most 20.
    """
    options = ["--api-token", f"bidder-9={TOKEN}", "--max-batch-size", "20"]
    options += ["--max-timeout-msec", "5000", *_tls_files(certificates)]
    running = Daemon(tmp_path_factory.mktemp("grpc-daemon"), options, plain=True, tls=True)
    yield from _serving(running, grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}"))


@pytest.fixture(scope="module")
def tight(
    tmp_path_factory: pytest.TempPathFactory, certificates: dict[str, Any]
) -> Iterator[Daemon]:
    """
    A daemon whose only gRPC listener requires client certificates (mTLS),
    taking one batch at a time and messages of at most 4,000 bytes.
    """
    options = ["--max-batches-in-flight", "1", "--max-request-bytes", "4000"]
    options += [*_tls_files(certificates), "--tls-client-ca", str(certificates["files"]["ca"])]
    running = Daemon(tmp_path_factory.mktemp("grpc-tight"), options, plain=False, tls=True)
    yield from _serving(running, _mtls_channel(running, certificates))


def _mtls_channel(daemon: Daemon, certificates: dict[str, Any]) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certificates["ca_pem"],
        private_key=certificates["client_key"],
        certificate_chain=certificates["client_chain"],
    )
    return grpc.secure_channel(f"127.0.0.1:{daemon.tls_port}", credentials)


@pytest.fixture
def stub(daemon: Daemon) -> Iterator[pb_grpc.MultiplexerStub]:
    """A client of the daemon's plain gRPC listener."""
    with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
        yield pb_grpc.MultiplexerStub(channel)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = start_upstream()
    yield server
    pytest_twisted.blockon(server.stop())


async def call(method: Callable[..., Any], batch: Any, **kwargs: Any) -> Any:
    """``method(batch)`` in a thread, with the token and a timeout unless given."""
    kwargs.setdefault("metadata", BEARER)
    kwargs.setdefault("timeout", CALL_TIMEOUT)
    return await deferToThread(method, batch, **kwargs)


async def refused(method: Callable[..., Any], batch: Any, **kwargs: Any) -> grpc.RpcError:
    """The error a call that must fail ends with."""
    with pytest.raises(grpc.RpcError) as caught:
        await call(method, batch, **kwargs)
    return caught.value


def headers(outcome: pb.Outcome) -> list[tuple[str, str]]:
    return [(h.name.lower(), h.value) for h in outcome.success.headers]


@pytest_twisted.ensureDeferred
async def test_binary_bodies_with_every_byte_value_go_and_come_back_unchanged(
    stub: pb_grpc.MultiplexerStub, upstream: Upstream
) -> None:
    """A body of all 256 byte values is sent as given and its echo comes back as bytes."""
    body = bytes(range(256)) * 8
    batch = pb.Batch(
        timeout_msec=3000,
        requests=[
            pb.Request(id="bin", method="POST", uri=upstream.url + "/mirror", body=body),
            pb.Request(uri=upstream.url + "/binary"),
        ],
    )
    result = await call(stub.Multiplex, batch)
    first, second = result.outcomes
    assert (first.index, first.id, first.success.status) == (0, "bin", 200)
    assert first.success.content == body
    assert second.index == 1
    assert second.success.content == b"ok \xff\xfe end"


@pytest_twisted.ensureDeferred
async def test_repeated_headers_are_sent_and_received_line_by_line(
    stub: pb_grpc.MultiplexerStub, upstream: Upstream
) -> None:
    """Repeated request headers go out in order; repeated response headers all come back."""
    batch = pb.Batch(
        timeout_msec=3000,
        requests=[
            pb.Request(
                uri=upstream.url + "/echo",
                headers=[
                    pb.Header(name="X-Bid", value="first"),
                    pb.Header(name="X-Bid", value="second"),
                    pb.Header(name="X-Text", value="caf\u00e9"),
                ],
            ),
            pb.Request(uri=upstream.url + "/repeat-header"),
        ],
    )
    echo, repeated = (await call(stub.Multiplex, batch)).outcomes
    sent = json.loads(echo.success.content)["headers"]
    assert [value for name, value in sent if name == "X-Bid"] == ["first", "second"]
    # Request values go out as UTF-8 (as the JSON API's do).
    assert ["X-Text", "caf\u00e9"] in sent
    lines = headers(repeated)
    assert [v for n, v in lines if n == "set-cookie"] == ["a=1", "b=2"]
    assert [v for n, v in lines if n == "x-multi"] == ["first", "last"]


@pytest_twisted.ensureDeferred
async def test_defaults_text_bodies_timeouts_retries_and_timings(
    stub: pb_grpc.MultiplexerStub, upstream: Upstream
) -> None:
    """The JSON API's features mean the same over gRPC; a bad item fails alone."""
    key = f"grpc-{time.monotonic_ns()}"
    batch = pb.Batch(
        timeout_msec=3000,
        timings=True,
        defaults=pb.Defaults(
            base_uri=upstream.url + "/",
            method="POST",
            headers=[pb.Header(name="Content-Encoding", value="gzip")],
            text="default text",
        ),
        requests=[
            # Octoplex gzips a text body whose headers ask for gzip.
            pb.Request(id="inflate", uri="inflate"),
            pb.Request(id="slow", uri="delay/2000", method="GET", timeout_msec=200),
            pb.Request(
                id="flaky",
                uri=f"flaky/{key}/1",
                method="GET",
                # Its own header replaces the default's (names without case),
                # and its own body the default text (an empty one is a body).
                headers=[pb.Header(name="content-encoding", value="identity")],
                body=b"",
                retry=pb.Retry(times=2, statuses=[503]),
            ),
            pb.Request(id="bad", uri="nope://example"),
        ],
    )
    inflate, slow, flaky, bad = (await call(stub.Multiplex, batch)).outcomes
    assert inflate.success.content == b"gzip: default text"
    assert inflate.timings.HasField("total_msec")
    assert inflate.timings.total_msec >= inflate.timings.ttfb_msec
    assert slow.failure.kind == pb.KIND_TIMEOUT
    assert "own timeout_msec of 200" in slow.failure.error
    assert 150 <= slow.failure.duration_msec < 1500
    assert (flaky.success.status, flaky.attempts) == (200, 2), flaky
    assert flaky.success.content == b"ok after 1"
    assert bad.failure.kind == pb.KIND_INVALID
    assert bad.failure.duration_msec == 0
    assert "scheme" in bad.failure.error
    assert not bad.HasField("timings")


@pytest_twisted.ensureDeferred
async def test_gzip_answers_are_decoded_and_say_so(
    stub: pb_grpc.MultiplexerStub, upstream: Upstream
) -> None:
    """A gzipped upstream answer comes back decoded, with content_encoding set."""
    batch = pb.Batch(
        timeout_msec=3000,
        requests=[
            pb.Request(
                uri=upstream.url + "/gzip/3000",
                headers=[pb.Header(name="Accept-Encoding", value="gzip")],
            ),
            pb.Request(uri=upstream.url + "/hello"),
        ],
    )
    zipped, plain = (await call(stub.Multiplex, batch)).outcomes
    assert zipped.success.content == b"x" * 3000
    assert zipped.success.content_encoding == "gzip"
    assert plain.success.content_encoding == ""


@pytest_twisted.ensureDeferred
async def test_stream_sends_the_first_outcome_before_the_slowest_finishes(
    stub: pb_grpc.MultiplexerStub, upstream: Upstream
) -> None:
    """MultiplexStream sends each outcome as it settles, then the counts as trailers."""
    batch = pb.Batch(
        timeout_msec=4000,
        requests=[
            pb.Request(id="slow", uri=upstream.url + "/delay/1500"),
            pb.Request(id="fast", uri=upstream.url + "/hello"),
            pb.Request(id="late", uri=upstream.url + "/delay/3000", timeout_msec=800),
        ],
    )

    def receive() -> tuple[list[tuple[float, pb.Outcome]], Any]:
        started = time.monotonic()
        stream = stub.MultiplexStream(batch, metadata=BEARER, timeout=CALL_TIMEOUT)
        arrivals = [(time.monotonic() - started, outcome) for outcome in stream]
        return arrivals, stream.trailing_metadata()

    arrivals, trailers = await deferToThread(receive)
    assert [outcome.id for _, outcome in arrivals] == ["fast", "late", "slow"]
    assert [outcome.index for _, outcome in arrivals] == [1, 2, 0]
    (first_at, first), (_, late), (slow_at, slow) = arrivals
    assert first.success.content == b"Hello world!"
    assert first_at < 1.0 < 1.4 < slow_at
    assert late.failure.kind == pb.KIND_TIMEOUT
    assert slow.success.content == b"delayed 1500"
    counts = dict(trailers)
    assert (counts["octoplex-succeeded"], counts["octoplex-timed-out"]) == ("2", "1")
    assert counts["octoplex-failed"] == "0"
    assert len(counts["octoplex-batch-id"]) == 16


@pytest_twisted.ensureDeferred
async def test_batch_errors_are_invalid_argument_naming_the_value_and_limit(
    daemon: Daemon, stub: pb_grpc.MultiplexerStub, upstream: Upstream
) -> None:
    """Each malformed batch gets INVALID_ARGUMENT with the JSON API's message."""
    hello = pb.Request(uri=upstream.url + "/hello")
    cases = [
        (pb.Batch(requests=[hello]), "missing field timeout_msec"),
        (pb.Batch(timeout_msec=9000, requests=[hello]), "timeout_msec is 9000; at most 5000"),
        (pb.Batch(timeout_msec=100), "batch has 0 requests; between 1 and 20"),
        (pb.Batch(timeout_msec=100, requests=[hello] * 21), "batch has 21 requests; at most 20"),
        (
            pb.Batch(timeout_msec=100, requests=[pb.Request(id="a", uri="/x")] * 2),
            'requests[1].id "a" is already the id of requests[0]',
        ),
        (
            pb.Batch(timeout_msec=100, requests=[pb.Request(uri="/x", retry=pb.Retry(times=9))]),
            "requests[0].retry.times must be a whole number from 1 to 5, got 9",
        ),
        (pb.Batch(timeout_msec=100, requests=[pb.Request()]), "missing field uri in requests[0]"),
        (pb.Batch(timeout_msec=100, requests=[hello], max_parallel=0), "max_parallel must"),
    ]
    for batch, message in cases:
        error = await refused(stub.Multiplex, batch)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in error.details()
    # The daemon serves on, and says why in its log.
    result = await call(stub.Multiplex, pb.Batch(timeout_msec=2000, requests=[hello]))
    assert result.outcomes[0].success.status == 200
    rejected = [e for e in daemon.events() if "rejected" in e.get("message", "")]
    assert any(e["status"] == 400 and e["grpc_code"] == "INVALID_ARGUMENT" for e in rejected)


@pytest_twisted.ensureDeferred
async def test_bytes_that_are_no_batch_message_are_invalid_argument(
    daemon: Daemon, upstream: Upstream
) -> None:
    """Corrupt protobuf, or a string field with bad UTF-8, is INVALID_ARGUMENT, and logged."""
    with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
        raw = channel.unary_unary("/octoplex.v1.Multiplexer/Multiplex")
        for data, reason in [
            (b"\xff\xff\xff", "corrupt"),
            # requests[0].uri = three bytes that are not UTF-8.
            (b"\x12\x05\x1a\x03\xff\xfe\xfd", "UTF-8"),
        ]:
            error = await refused(raw, data)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details().startswith("the request is not an octoplex.v1.Batch message")
            assert reason in error.details()
        good = pb.Batch(timeout_msec=2000, requests=[pb.Request(uri=upstream.url + "/hello")])
        answer = pb.BatchResult.FromString(await call(raw, good.SerializeToString()))
    assert answer.outcomes[0].success.content == b"Hello world!"
    logged = [e for e in daemon.events() if "not an octoplex.v1.Batch" in e.get("error", "")]
    assert len(logged) == 2 and {e["status"] for e in logged} == {400}


@pytest_twisted.ensureDeferred
async def test_calls_without_an_accepted_token_are_unauthenticated(
    stub: pb_grpc.MultiplexerStub, upstream: Upstream
) -> None:
    """No token, or a wrong one, is UNAUTHENTICATED, and nothing is sent upstream."""
    batch = pb.Batch(timeout_msec=1000, requests=[pb.Request(uri=upstream.url + "/hello")])
    missing = await refused(stub.Multiplex, batch, metadata=())
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "needs authorization metadata" in missing.details()

    def stream(batch: pb.Batch, **kwargs: Any) -> list[pb.Outcome]:
        return list(stub.MultiplexStream(batch, **kwargs))

    wrong = await refused(stream, batch, metadata=(("authorization", "Bearer nope"),))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not one this server accepts" in wrong.details()
    assert upstream.resource.arrivals == []


@pytest_twisted.ensureDeferred
async def test_deadline_exceeded_is_for_the_whole_call_only(
    stub: pb_grpc.MultiplexerStub, upstream: Upstream
) -> None:
    """
    Items past the batch's deadline are timeouts in an OK answer; only a
    call whose own gRPC deadline passes first is DEADLINE_EXCEEDED, and its
    upstream requests are cancelled.
    """
    batch = pb.Batch(
        timeout_msec=300,
        requests=[pb.Request(uri=upstream.url + "/delay/2000")],
    )
    result = await call(stub.Multiplex, batch, timeout=5)
    assert result.outcomes[0].failure.kind == pb.KIND_TIMEOUT

    long_batch = pb.Batch(
        timeout_msec=4000, requests=[pb.Request(uri=upstream.url + "/delay/3000")]
    )
    started = time.monotonic()
    error = await refused(stub.Multiplex, long_batch, timeout=0.5)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.5
    # The daemon cancels the upstream request rather than letting it run.
    for _ in range(40):
        if upstream.resource.finished_early.count("/delay/3000"):
            break
        await deferToThread(time.sleep, 0.05)
    assert upstream.resource.finished_early.count("/delay/3000") == 1


@pytest_twisted.ensureDeferred
async def test_a_stream_the_caller_cancels_cancels_its_batch(
    daemon: Daemon, stub: pb_grpc.MultiplexerStub, upstream: Upstream
) -> None:
    """A caller that cancels a stream after its first outcome: the slow requests are cancelled."""
    batch = pb.Batch(
        timeout_msec=4000,
        requests=[
            pb.Request(uri=upstream.url + "/hello"),
            pb.Request(uri=upstream.url + "/delay/3000"),
        ],
    )

    def first_then_cancel() -> pb.Outcome:
        stream = stub.MultiplexStream(batch, metadata=BEARER, timeout=CALL_TIMEOUT)
        first = next(stream)
        stream.cancel()
        return first

    first = await deferToThread(first_then_cancel)
    assert first.success.content == b"Hello world!"
    for _ in range(40):
        if "/delay/3000" in upstream.resource.finished_early:
            break
        await deferToThread(time.sleep, 0.05)
    assert "/delay/3000" in upstream.resource.finished_early
    ended = [e for e in daemon.events() if "ended early" in e.get("message", "")]
    assert ended[-1]["grpc_code"] == "CANCELLED" and ended[-1]["status"] == 499


@pytest_twisted.ensureDeferred
async def test_tls_listener_serves_with_the_https_certificate(
    daemon: Daemon, certificates: dict[str, Any], upstream: Upstream
) -> None:
    """--grpc-listen-tls serves over TLS with --tls-cert and --tls-key; plain text is refused."""
    credentials = grpc.ssl_channel_credentials(root_certificates=certificates["ca_pem"])
    batch = pb.Batch(timeout_msec=2000, requests=[pb.Request(uri=upstream.url + "/hello")])
    with grpc.secure_channel(f"127.0.0.1:{daemon.tls_port}", credentials) as channel:
        result = await call(pb_grpc.MultiplexerStub(channel).Multiplex, batch)
    assert result.outcomes[0].success.content == b"Hello world!"
    with grpc.insecure_channel(f"127.0.0.1:{daemon.tls_port}") as channel:
        error = await refused(pb_grpc.MultiplexerStub(channel).Multiplex, batch, timeout=3)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


@pytest_twisted.ensureDeferred
async def test_mtls_listener_requires_a_client_certificate_and_logs_its_identity(
    tight: Daemon, certificates: dict[str, Any], upstream: Upstream
) -> None:
    """With --tls-client-ca a client certificate is required; its identity is logged."""
    batch = pb.Batch(timeout_msec=2000, requests=[pb.Request(uri=upstream.url + "/hello")])
    with _mtls_channel(tight, certificates) as channel:
        result = await call(pb_grpc.MultiplexerStub(channel).Multiplex, batch, metadata=())
    assert result.outcomes[0].success.status == 200
    answered = [e for e in tight.events() if e.get("status") == 200 and e.get("rpc")]
    assert answered[-1]["tls_identity"] == "bidder-9.example"
    assert answered[-1]["frontend"] == "grpc"

    anonymous = grpc.ssl_channel_credentials(root_certificates=certificates["ca_pem"])
    with grpc.secure_channel(f"127.0.0.1:{tight.tls_port}", anonymous) as channel:
        error = await refused(pb_grpc.MultiplexerStub(channel).Multiplex, batch, timeout=3)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


@pytest_twisted.ensureDeferred
async def test_shed_and_oversized_batches_are_resource_exhausted(
    tight: Daemon, certificates: dict[str, Any], upstream: Upstream
) -> None:
    """Past the in-flight caps, or over --max-request-bytes: RESOURCE_EXHAUSTED."""
    slow = pb.Batch(timeout_msec=3000, requests=[pb.Request(uri=upstream.url + "/delay/1000")])
    quick = pb.Batch(timeout_msec=1000, requests=[pb.Request(uri=upstream.url + "/hello")])
    with _mtls_channel(tight, certificates) as channel:
        stub = pb_grpc.MultiplexerStub(channel)
        first = call(stub.Multiplex, slow, metadata=())

        running = ensureDeferred(first)
        # Until the slow batch is in flight upstream.
        for _ in range(100):
            if upstream.resource.active:
                break
            await deferToThread(time.sleep, 0.02)
        shed = await refused(stub.Multiplex, quick, metadata=())
        assert shed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 1 batches" in shed.details()
        assert (await running).outcomes[0].success.content == b"delayed 1000"

        big = pb.Batch(
            timeout_msec=1000,
            requests=[pb.Request(uri=upstream.url + "/mirror", body=b"\x00" * 5000)],
        )
        oversized = await refused(stub.Multiplex, big, metadata=())
        assert oversized.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4000" in oversized.details()
        # Both were refused, and the daemon serves on.
        result = await call(stub.Multiplex, quick, metadata=())
        assert result.outcomes[0].success.status == 200
    sheds = [e for e in tight.events() if e.get("grpc_code") == "RESOURCE_EXHAUSTED"]
    assert sheds and sheds[0]["status"] == 503


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """
    A daemon with two tokens, each its own client, and a share of one batch
    in flight per client.
    """
    options = ["--api-token", f"greedy={TOKEN}", "--api-token", f"polite={TOKEN}-2"]
    options += ["--max-client-batches-in-flight", "1"]
    running = Daemon(tmp_path_factory.mktemp("grpc-shared"), options, plain=True, tls=False)
    yield from _serving(running, grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}"))


@pytest_twisted.ensureDeferred
async def test_a_client_over_its_share_is_resource_exhausted_and_others_are_served(
    shared: Daemon, upstream: Upstream
) -> None:
    """
    A token's second batch in flight, past its share of one, ends with
    RESOURCE_EXHAUSTED naming the client and its counts, while another
    token's batch is answered; both counted as 429.
    """
    slow = pb.Batch(timeout_msec=5000, requests=[pb.Request(uri=upstream.url + "/delay/2000")])
    quick = pb.Batch(timeout_msec=2000, requests=[pb.Request(uri=upstream.url + "/hello")])
    polite = (("authorization", f"Bearer {TOKEN}-2"),)
    with grpc.insecure_channel(f"127.0.0.1:{shared.grpc_port}") as channel:
        stub = pb_grpc.MultiplexerStub(channel)
        running = ensureDeferred(call(stub.Multiplex, slow))
        # Until the slow batch is in flight upstream.
        for _ in range(250):
            if upstream.resource.active:
                break
            await deferToThread(time.sleep, 0.02)
        throttled = await refused(stub.Multiplex, quick)
        assert throttled.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert throttled.details() == (
            "client token greedy is over its share: 1 batches with 1 requests in flight, "
            "and this one has 1 (at most 1 batches and 1000 requests per client); retry "
            "once its batches are answered"
        )
        result = await call(stub.Multiplex, quick, metadata=polite)
        assert result.outcomes[0].success.content == b"Hello world!"
        # Served while the greedy batch was still in flight.
        assert not running.called
        assert (await running).outcomes[0].success.content == b"delayed 2000"
    refusals = [e for e in shared.events() if e.get("grpc_code") == "RESOURCE_EXHAUSTED"]
    assert [(e["status"], e["token_name"], e["throttled_total"]) for e in refusals] == [
        (429, "greedy", 1)
    ]


@pytest_twisted.ensureDeferred
async def test_health_and_reflection_answer(daemon: Daemon) -> None:
    """grpc.health.v1 says SERVING for the daemon and its service; reflection lists it."""
    with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "octoplex.v1.Multiplexer"):
            answer = await deferToThread(
                health.Check, health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        unknown = await refused(
            health.Check, health_pb2.HealthCheckRequest(service="nope"), metadata=(), timeout=5
        )
        assert unknown.code() == grpc.StatusCode.NOT_FOUND

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        def services() -> list[str]:
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (answer,) = reflection.ServerReflectionInfo(iter([request]), timeout=5)
            return [s.name for s in answer.list_services_response.service]

        listed = await deferToThread(services)
    assert "octoplex.v1.Multiplexer" in listed
    assert "grpc.health.v1.Health" in listed


def test_grpc_listener_on_the_default_reactor_names_the_reactor_option() -> None:
    """Without --reactor=asyncio, start-up stops and says which option to use."""
    result = run_twistd(["-n", "--pidfile=", "octoplex", "--grpc-listen", "127.0.0.1:1"])
    assert result.returncode != 0
    assert "twistd --reactor=asyncio octoplex" in result.stdout + result.stderr


def test_bad_grpc_address_is_a_usage_error() -> None:
    """An address that is not HOST:PORT is refused by name."""
    result = run_twistd(
        ["-n", "--pidfile=", "--reactor=asyncio", "octoplex", "--grpc-listen", "localhost"]
    )
    assert result.returncode != 0
    assert "--grpc-listen 'localhost' is not HOST:PORT" in result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_a_grpc_call_in_flight(tmp_path: Path, upstream: Upstream) -> None:
    """
    SIGTERM turns the health service NOT_SERVING at once, lets a call in
    flight finish with its outcomes, then the daemon exits 0.
    """
    running = Daemon(tmp_path, ["--drain-delay", "0.5"], plain=True, tls=False)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            await deferToThread(wait_serving, running, channel)
            stub = pb_grpc.MultiplexerStub(channel)
            batch = pb.Batch(
                timeout_msec=3000, requests=[pb.Request(uri=upstream.url + "/delay/800")]
            )

            answer = ensureDeferred(call(stub.Multiplex, batch, metadata=()))
            for _ in range(100):
                if upstream.resource.active:
                    break
                await deferToThread(time.sleep, 0.02)
            running.process.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="octoplex.v1.Multiplexer")
            for _ in range(50):
                status = (await deferToThread(health.Check, check, timeout=2)).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    break
                await deferToThread(time.sleep, 0.01)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            result = await answer
        assert result.outcomes[0].success.content == b"delayed 800"
        assert await wait_for_exit(running.process, 15) == 0
    finally:
        running.stop()


@pytest_twisted.ensureDeferred
async def test_workers_share_the_grpc_address(tmp_path: Path, upstream: Upstream) -> None:
    """With --workers 2 each worker binds the gRPC address (SO_REUSEPORT) and serves on it."""
    running = Daemon(tmp_path, [], plain=True, tls=False, workers=2)
    try:
        batch = pb.Batch(timeout_msec=2000, requests=[pb.Request(uri=upstream.url + "/hello")])
        served: set[str] = set()
        for _ in range(40):
            # A new connection each time: the kernel spreads them over the workers.
            with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
                if not served:
                    await deferToThread(wait_serving, running, channel)
                stub = pb_grpc.MultiplexerStub(channel)
                result = await call(stub.Multiplex, batch, metadata=())
            assert result.outcomes[0].success.content == b"Hello world!"
            served = {
                path.name
                for path in tmp_path.glob("octoplex.log.worker-*")
                if '"frontend":"grpc"' in path.read_text()
            }
            if len(served) == 2:
                break
        assert served == {"octoplex.log.worker-0", "octoplex.log.worker-1"}
        running.process.send_signal(signal.SIGTERM)
        assert await wait_for_exit(running.process, 20) == 0
    finally:
        running.stop()
