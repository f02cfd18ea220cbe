"""
``twistd octoplex`` in process: the plugin, the command line and the service
tree that :func:`octoplex.tap.makeService` wires, started and stopped on real
ports of 127.0.0.1.
"""

from __future__ import annotations

import gc
import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, IServiceMaker, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.plugin import getPlugins
from twisted.python import usage

from octoplex.buffers import MemoryReturner
from octoplex.client import UpstreamClient
from octoplex.tap import Options, makeService
from octoplex.web import OctoplexSite

from .servers import Caller


def free_port() -> int:
    """
    A port of 127.0.0.1 that nothing listens on at the moment.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def held_port() -> Iterator[int]:
    """
    A port of 127.0.0.1 that a listening socket holds for the whole test.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def assert_free(port: int) -> None:
    """
    Assert that nothing listens on ``port`` of 127.0.0.1 any more.  (Closed
    connections may leave it in TIME_WAIT, which SO_REUSEADDR allows, as
    Twisted's own listeners do.)
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def parse(*argv: str) -> Options:
    """
    Parse ``argv`` as ``twistd octoplex`` would.
    """
    options = Options()
    # One process: these tests build the daemon itself, not a master.
    options.parseOptions(["--workers", "1", *argv])
    return options


def test_plugin_is_discoverable() -> None:
    """getPlugins finds exactly one IServiceMaker named octoplex, whose options are tap.Options."""
    makers = [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "octoplex"]
    assert len(makers) == 1
    (maker,) = makers
    assert maker.options is Options
    assert maker.makeService is makeService
    assert maker.description


def test_default_listen() -> None:
    """With no --listen the daemon listens on tcp:8080 alone, with a listen backlog of 1024."""
    assert parse()["listen"] == ["tcp:8080:backlog=1024"]


def test_listen_is_repeatable_and_keeps_order() -> None:
    """Every --listen is kept, in the order given, and the default is dropped."""
    listen = ["tcp:9001:interface=127.0.0.1", "tcp:0", "unix:/tmp/octoplex.sock"]
    argv = [arg for description in listen for arg in ("--listen", description)]
    assert parse(*argv)["listen"] == listen


def test_options_are_fresh_per_instance() -> None:
    """Two Options instances do not share their --listen list."""
    parse("--listen", "tcp:9001")
    assert parse()["listen"] == ["tcp:8080:backlog=1024"]


def test_numeric_defaults() -> None:
    """The numeric defaults are already ints and floats."""
    options = parse()
    assert options["max-batch-size"] == 50
    for name in ("max-batch-size", "max-timeout-msec", "max-request-bytes"):
        assert type(options[name]) is int, name
    for name in ("max-response-bytes", "pool-max-idle-per-host"):
        assert type(options[name]) is int, name
    for name in ("pool-idle-timeout", "connect-timeout"):
        assert type(options[name]) is float, name


@pytest.mark.parametrize(
    ("option", "text", "value"),
    [
        ("max-batch-size", "10", 10),
        ("max-timeout-msec", "1500", 1500),
        ("max-request-bytes", "1024", 1024),
        ("max-response-bytes", "2048", 2048),
        ("pool-max-idle-per-host", "4", 4),
        ("pool-idle-timeout", "2.5", 2.5),
        ("pool-idle-timeout", "3", 3.0),
        ("connect-timeout", "0.25", 0.25),
    ],
)
def test_numeric_options_are_coerced(option: str, text: str, value: float) -> None:
    """A numeric option given on the command line becomes an int or a float."""
    parsed = parse(f"--{option}", text)[option]
    assert parsed == value
    assert type(parsed) is type(value)


@pytest.mark.parametrize(
    ("option", "text"),
    [
        ("max-batch-size", "0"),
        ("max-batch-size", "-3"),
        ("max-batch-size", "many"),
        ("max-batch-size", "1.5"),
        ("max-timeout-msec", "0"),
        ("max-request-bytes", "-1"),
        ("max-response-bytes", "lots"),
        ("pool-max-idle-per-host", "0"),
        ("pool-idle-timeout", "0"),
        ("pool-idle-timeout", "-2.5"),
        ("pool-idle-timeout", "soon"),
        ("pool-idle-timeout", "nan"),
        ("pool-idle-timeout", "inf"),
        ("connect-timeout", "1e309"),
        ("connect-timeout", "0.0"),
    ],
)
def test_bad_numbers_are_usage_errors(option: str, text: str) -> None:
    """A zero, negative, infinite or non-numeric value is a UsageError naming the value."""
    with pytest.raises(usage.UsageError) as caught:
        parse(f"--{option}", text)
    assert repr(text) in str(caught.value)


@pytest.mark.parametrize("description", ["bogus:1234", "tcp:notaport", "tcp:"])
def test_unusable_endpoint_is_usage_error(description: str) -> None:
    """An endpoint string that serverFromString refuses is a UsageError naming it."""
    with pytest.raises(usage.UsageError) as caught:
        parse("--listen", "tcp:0", "--listen", description)
    assert repr(description) in str(caught.value)
    assert "--listen" in str(caught.value)


def test_version_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the version and exits with status 0."""
    with pytest.raises(SystemExit) as caught:
        parse("--version")
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("octoplex ")


def test_make_service_wiring() -> None:
    """makeService builds a MultiService of the upstream client and one listener per --listen."""
    ports = [free_port(), free_port()]
    options = parse(
        *(arg for port in ports for arg in ("--listen", f"tcp:{port}:interface=127.0.0.1")),
        "--max-batch-size",
        "7",
        "--max-response-bytes",
        "4096",
    )
    root = makeService(options)
    assert IService.providedBy(root)
    assert isinstance(root, MultiService)
    children = list(root)
    assert len(children) == 4
    assert isinstance(children[0], UpstreamClient)
    # Gives freed memory back after bursts (octoplex.buffers).
    assert isinstance(children[1], MemoryReturner)
    listeners = children[2:]
    assert all(isinstance(child, StreamServerEndpointService) for child in listeners)
    assert [child.endpoint._port for child in listeners] == ports  # type: ignore[attr-defined]
    (site,) = {id(child.factory): child.factory for child in listeners}.values()
    assert isinstance(site, OctoplexSite)
    assert site.limits.max_batch_size == 7
    assert site.limits.max_response_bytes == 4096
    assert not root.running


@pytest_twisted.ensureDeferred
async def test_service_serves_and_stops(log_events: list[dict[str, Any]], caller: Caller) -> None:
    """The started service answers /healthz on every listener and releases them when stopped."""
    ports = [free_port(), free_port()]
    listen = [f"tcp:{port}:interface=127.0.0.1" for port in ports]
    root = makeService(parse(*(arg for d in listen for arg in ("--listen", d))))
    root.startService()
    try:
        assert root.running
        # Once running, the start-up heap is out of the collector's reach.
        assert gc.get_freeze_count() > 10_000
        for port in ports:
            status, _, body = await caller.get(f"http://127.0.0.1:{port}/healthz")
            assert (status, json.loads(body)) == (200, {"healthy": True})
    finally:
        stopped = root.stopService()
        assert isinstance(stopped, Deferred)
        await stopped
    assert not root.running
    assert gc.get_freeze_count() == 0
    messages = [event.get("log_format", "") for event in log_events]
    assert "octoplex {version} listening on {listen}; {settings}" in messages
    assert any(m.startswith("octoplex {version} stopping: draining") for m in messages)
    assert any(m.startswith("octoplex {version} stopped:") for m in messages)
    assert "heap frozen: {frozen} objects left out of garbage collection" in messages
    announce = next(e for e in log_events if "listening on {listen}" in e.get("log_format", ""))
    assert announce["listen"] == listen
    assert announce["settings"] == "settings given: --workers 1; the rest at their defaults"
    for port in ports:
        assert_free(port)


@pytest_twisted.ensureDeferred
async def test_held_port_stops_start_up(held_port: int) -> None:
    """A listener whose port is taken makes startService raise CannotListenError."""
    first = free_port()
    root = makeService(
        parse(
            "--listen",
            f"tcp:{first}:interface=127.0.0.1",
            "--listen",
            f"tcp:{held_port}:interface=127.0.0.1",
        )
    )
    try:
        with pytest.raises(CannotListenError) as caught:
            root.startService()
        assert caught.value.port == held_port
        assert "Address already in use" in str(caught.value)
    finally:
        await root.stopService()
    # The listener that did start is stopped with the rest.
    assert_free(first)


@pytest_twisted.ensureDeferred
async def test_held_port_stops_privileged_start_up(held_port: int) -> None:
    """privilegedStartService, which twistd calls first, exits with a one-line reason."""
    root = makeService(parse("--listen", f"tcp:{held_port}:interface=127.0.0.1"))
    try:
        with pytest.raises(SystemExit) as caught:
            root.privilegedStartService()
        assert str(caught.value) == (
            f"octoplex: cannot listen on 127.0.0.1:{held_port}: [Errno 98] Address already in use"
        )
        assert not root.running
    finally:
        await root.stopService()


def test_dns_servers_replace_resolv_conf() -> None:
    """--dns-server names the servers the daemon's resolver asks, instead of resolv.conf's."""
    options = parse("--dns-server", "127.0.0.1:5353", "--dns-server", "[::1]")
    assert options["dns-server"] == [("127.0.0.1", 5353), ("::1", 53)]
    root = makeService(options)
    assert root._resolver._resolver.servers == [("127.0.0.1", 5353), ("::1", 53)]  # type: ignore[attr-defined]
    with pytest.raises(usage.UsageError, match=r"'ns\.example' is not an IP address"):
        parse("--dns-server", "ns.example")


def test_help_has_no_runs_of_spaces_inside_a_description() -> None:
    """
    ``twistd octoplex --help`` wraps each description as one paragraph: a
    method option's docstring indentation does not leak into it as a run of
    spaces (``whatever         its``).
    """
    usage_text = Options().getUsage(width=80)
    option = re.compile(r"^\s+(?:-\w, )?--[\w-]+=?\s+")
    descriptions = []
    for line in usage_text.splitlines():
        start = option.match(line)
        if start is not None:
            descriptions.append(line[start.end() :].rstrip())
        elif line.startswith(" " * 10):
            descriptions.append(line.strip())
    assert len(descriptions) > 50
    assert [text for text in descriptions if "  " in text] == []
