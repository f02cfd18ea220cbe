"""
The egress policy: which upstream addresses Octoplex may dial.

The policy's rules are unit-tested on addresses; every rule that decides a
real connection is then proven over real sockets, with a reactor that
records every TCP connection the daemon's client dials (and refuses any
off loopback), so "no packet was sent" is checked rather than assumed.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError, ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.names import client as names_client
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DomainError
from twisted.python import usage
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from zope.interface import directlyProvides, providedBy

from octoplex.client import PoolSettings, UpstreamClient
from octoplex.dns import CachingResolver, DNSSettings
from octoplex.egress import DEFAULT_BLOCKED, EgressPolicy, EgressRefused
from octoplex.endpoints import UpstreamEndpointFactory
from octoplex.interfaces import parse_fib_trie, parse_if_inet6, read_own_addresses
from octoplex.limits import Limits
from octoplex.multiplexer import Multiplexer
from octoplex.tap import Options, makeService
from octoplex.tls import UpstreamTLSPolicy
from octoplex.web import OctoplexApp, OctoplexSite

from .servers import (
    Caller,
    Octoplex,
    Upstream,
    _CountingSite,
    _Upstream,
    local_resolver,
    serve_dns,
)

DEFAULT = EgressPolicy()
METADATA = "a cloud metadata address"
HINT = "which is blocked by default (--allow-egress CIDR allows a range)"

# ---------------------------------------------------------------------------
# The rules, on addresses.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "judged", "network", "why"),
    [
        ("127.0.0.1", None, "127.0.0.0/8", "loopback"),
        ("127.255.255.254", None, "127.0.0.0/8", "loopback"),
        ("10.1.2.3", None, "10.0.0.0/8", "a private range"),
        ("172.16.0.1", None, "172.16.0.0/12", "a private range"),
        ("172.31.255.255", None, "172.16.0.0/12", "a private range"),
        ("192.168.1.1", None, "192.168.0.0/16", "a private range"),
        ("169.254.169.254", None, "169.254.169.254/32", "a cloud metadata address"),
        ("169.254.1.1", None, "169.254.0.0/16", "link-local"),
        ("100.100.100.200", None, "100.100.100.200/32", "a cloud metadata address"),
        ("192.0.0.192", None, "192.0.0.192/32", "a cloud metadata address"),
        ("100.64.0.1", None, "100.64.0.0/10", "the shared (carrier-grade NAT) range"),
        ("0.0.0.0", None, "0.0.0.0/8", "the 'this network' range"),
        ("0.1.2.3", None, "0.0.0.0/8", "the 'this network' range"),
        ("224.0.0.1", None, "224.0.0.0/4", "multicast"),
        ("239.255.255.250", None, "224.0.0.0/4", "multicast"),
        ("255.255.255.255", None, "240.0.0.0/4", "the reserved range (broadcast included)"),
        ("198.18.0.1", None, "198.18.0.0/15", "the benchmarking range"),
        ("::1", None, "::1/128", "loopback"),
        ("::", None, "::/128", "the unspecified address"),
        ("::7f00:1", None, "::/96", "the IPv4-compatible range"),
        ("fc00::1", None, "fc00::/7", "a private range (unique local)"),
        ("fd12:3456::1", None, "fc00::/7", "a private range (unique local)"),
        ("fd00:ec2::254", None, "fd00:ec2::254/128", "a cloud metadata address"),
        ("fe80::1", None, "fe80::/10", "link-local"),
        ("ff02::1", None, "ff00::/8", "multicast"),
        # IPv6 forms that carry an IPv4 address are judged by it.
        ("::ffff:127.0.0.1", "127.0.0.1", "127.0.0.0/8", "loopback"),
        ("::ffff:7f00:1", "127.0.0.1", "127.0.0.0/8", "loopback"),
        (
            "::ffff:169.254.169.254",
            "169.254.169.254",
            "169.254.169.254/32",
            "a cloud metadata address",
        ),
        ("::ffff:a9fe:a9fe", "169.254.169.254", "169.254.169.254/32", "a cloud metadata address"),
        ("::ffff:10.0.0.1", "10.0.0.1", "10.0.0.0/8", "a private range"),
        ("::ffff:0.0.0.0", "0.0.0.0", "0.0.0.0/8", "the 'this network' range"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254", "169.254.169.254/32", METADATA),
        ("2002:7f00:1::1", "127.0.0.1", "127.0.0.0/8", "loopback"),
        ("2002:a9fe:a9fe::1", "169.254.169.254", "169.254.169.254/32", METADATA),
        # SIIT (::ffff:0:a.b.c.d) carries one too, and is blocked as a range.
        ("::ffff:0:a9fe:a9fe", "169.254.169.254", "169.254.169.254/32", METADATA),
        ("::ffff:0:808:808", None, "::ffff:0:0:0/96", "the IPv4-translated (SIIT) range"),
        # Teredo: server 65.54.227.120, client 192.0.2.45 (stored inverted),
        # then a client of 169.254.169.254, then public server and client.
        (
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "192.0.2.45",
            "192.0.2.0/24",
            "a documentation range (TEST-NET-1)",
        ),
        ("2001:0:4136:e378:8000:63bf:5601:5601", "169.254.169.254", "169.254.169.254/32", METADATA),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None, "2001::/32", "the Teredo range"),
        ("64:ff9b:1::a9fe:a9fe", None, "64:ff9b:1::/48", "the local-use NAT64 range"),
        ("fec0::1", None, "fec0::/10", "the deprecated site-local range"),
        ("192.0.2.1", None, "192.0.2.0/24", "a documentation range (TEST-NET-1)"),
        ("198.51.100.7", None, "198.51.100.0/24", "a documentation range (TEST-NET-2)"),
        ("203.0.113.9", None, "203.0.113.0/24", "a documentation range (TEST-NET-3)"),
        ("192.88.99.1", None, "192.88.99.0/24", "the deprecated 6to4 relay anycast range"),
        ("192.0.0.9", None, "192.0.0.0/24", "the IETF protocol assignments range"),
        ("2001:db8::1", None, "2001:db8::/32", "a documentation range"),
        ("3fff::1", None, "3fff::/20", "a documentation range"),
        ("100::1", None, "100::/64", "the discard-only range"),
        ("100:0:0:1::1", None, "100:0:0:1::/64", "the dummy IPv6 prefix"),
        ("2001:2::1", None, "2001::/23", "the IETF protocol assignments range"),
        ("2001:20::1", None, "2001::/23", "the IETF protocol assignments range"),
        ("5f00::1", None, "5f00::/16", "the SRv6 SID range"),
    ],
)
def test_default_policy_refuses_internal_addresses(
    address: str, judged: str | None, network: str, why: str
) -> None:
    """Every default-blocked range, and IPv6 forms of IPv4 ones, is refused, naming the range."""
    with pytest.raises(EgressRefused) as raised:
        DEFAULT.check_address(address, address, 80)
    # Python 3.13 writes an IPv4-mapped address with a dotted quad, 3.11 not.
    canonical = str(ipaddress.ip_address(address))
    shown = canonical if judged is None else f"{canonical} (IPv4 {judged})"
    assert str(raised.value) == (
        f"egress policy refused {address} port 80: address {shown} is in {network}, {why}, {HINT}"
    )


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "2606:4700:4700::1111",
        # IPv6 forms of a public IPv4 address.
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
        # Globally reachable anycast services, left allowed (docs/security.md).
        "192.31.196.1",
        "192.52.193.1",
        "192.175.48.1",
        "2620:4f:8000::1",
    ],
)
def test_default_policy_allows_other_addresses(address: str) -> None:
    """An address outside every blocked range is allowed (the policy is asked, nothing dialled)."""
    DEFAULT.check_name("upstream.test", 443)
    DEFAULT.check_address("upstream.test", address, 443)


def test_allow_then_deny() -> None:
    """An allowed CIDR opens a blocked range; a denied CIDR inside it closes it again."""
    policy = EgressPolicy.from_strings(allow=["10.0.0.0/8"], deny=["10.9.0.0/16"])
    policy.check_address("a.test", "10.1.1.1", 80)
    with pytest.raises(
        EgressRefused, match=r"address 10\.9\.0\.1 is in denied range 10\.9\.0\.0/16"
    ):
        policy.check_address("a.test", "10.9.0.1", 80)
    # A deny beats an allowed host name too, and covers IPv4-mapped forms.
    policy = EgressPolicy.from_strings(allow_hosts=["*.corp.test"], deny=["10.0.0.0/8"])
    policy.check_address("db.corp.test", "172.16.0.1", 80)
    with pytest.raises(EgressRefused, match=r"is in denied range 10\.0\.0\.0/8"):
        policy.check_address("db.corp.test", "::ffff:10.0.0.1", 80)


def test_carried_addresses_under_allow_and_deny() -> None:
    """
    An address that carries IPv4 is allowed by a CIDR holding it or every
    address it carries, and denied by a CIDR holding any.
    """
    policy = EgressPolicy.from_strings(allow=["169.254.0.0/16"], deny=["169.254.169.254/32"])
    policy.check_address("a.test", "::ffff:0:a9fe:101", 80)
    with pytest.raises(EgressRefused, match=r"\(IPv4 169\.254\.169\.254\) is in denied range"):
        policy.check_address("a.test", "::ffff:0:a9fe:a9fe", 80)
    # A Teredo address is allowed by its IPv4 only if both server and client are.
    teredo = "2001:0:a9fe:a9fe:8000:63bf:3fff:fdd2"  # server 169.254.169.254, client 192.0.2.45
    with pytest.raises(EgressRefused, match=r"\(IPv4 192\.0\.2\.45\) is in 192\.0\.2\.0/24"):
        EgressPolicy.from_strings(allow=["169.254.0.0/16"]).check_address("t.test", teredo, 80)
    EgressPolicy.from_strings(allow=["169.254.0.0/16", "192.0.2.0/24"]).check_address(
        "t.test", teredo, 80
    )
    EgressPolicy.from_strings(allow=["2001::/32"]).check_address("t.test", teredo, 80)


def test_every_default_entry_is_documented() -> None:
    """docs/security.md's egress table names every default-blocked range."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    section = page.split("\n## Egress policy\n", 1)[1].split("\n## ", 1)[0]
    for cidr, _ in DEFAULT_BLOCKED:
        network = ipaddress.ip_network(cidr)
        shown = str(network.network_address) if network.prefixlen == network.max_prefixlen else cidr
        assert f"`{shown}`" in section, cidr


OWN = [("198.51.100.20", "eth0"), ("2a01:4f8::20", ""), ("127.0.0.1", "lo")]
OWN_HINT = (
    "which is refused by default (--egress-own-addresses allow, or an --allow-egress CIDR, "
    "allows it)"
)


def test_own_addresses_are_refused() -> None:
    """
    This host's own addresses are refused, naming the interface, in every
    spelling; a range rule that already refuses one keeps its reason; an
    allowed CIDR or host name lets one through.
    """
    policy = EgressPolicy.from_strings(own_addresses=[("8.8.4.4", "eth0"), *OWN])
    for address, shown in [
        ("8.8.4.4", "8.8.4.4"),
        ("::ffff:8.8.4.4", "::ffff:808:404 (IPv4 8.8.4.4)"),
        ("2002:808:404::1", "2002:808:404::1 (IPv4 8.8.4.4)"),
    ]:
        with pytest.raises(EgressRefused) as raised:
            policy.check_address("me.test", address, 80)
        assert str(raised.value) == (
            f"egress policy refused me.test port 80: address {shown} is an address of this "
            f"host's own interface eth0, {OWN_HINT}"
        )
    with pytest.raises(EgressRefused) as raised:
        policy.check_address("me.test", "2a01:4f8::20", 80)
    assert "address 2a01:4f8::20 is an address of this host's own interfaces, " in str(raised.value)
    with pytest.raises(EgressRefused, match=r"is in 127\.0\.0\.0/8, loopback"):
        policy.check_address("me.test", "127.0.0.1", 80)
    with pytest.raises(EgressRefused, match=r"is in 198\.51\.100\.0/24, a documentation"):
        policy.check_address("me.test", "198.51.100.20", 80)
    policy.check_address("me.test", "8.8.8.8", 80)
    allowed = EgressPolicy.from_strings(allow=["8.8.4.0/24"], own_addresses=[("8.8.4.4", "eth0")])
    allowed.check_address("me.test", "8.8.4.4", 80)
    by_name = EgressPolicy.from_strings(allow_hosts=["me.test"], own_addresses=[("8.8.4.4", "")])
    by_name.check_address("me.test", "8.8.4.4", 80)


def test_own_addresses_are_read_by_the_options() -> None:
    """
    The options read the own addresses through the reader they are given,
    unless --egress-own-addresses (or its config key) allows them.
    """
    calls: list[None] = []

    def reader() -> list[tuple[str, str]]:
        calls.append(None)
        return OWN

    options = Options(reader)
    options.parseOptions(["--allow-egress", "127.0.0.0/8"])
    assert options["egress"] == EgressPolicy.from_strings(allow=["127.0.0.0/8"], own_addresses=OWN)
    assert len(calls) == 1
    # An --allow-egress CIDR beats an own address (here 127.0.0.1 on lo).
    options["egress"].check_address("localhost", "127.0.0.1", 80)
    allowing = Options(reader)
    allowing.parseOptions(["--egress-own-addresses", "allow"])
    assert allowing["egress"] == EgressPolicy()
    assert len(calls) == 1
    with pytest.raises(usage.UsageError, match="'maybe' is neither deny nor allow"):
        Options(reader).parseOptions(["--egress-own-addresses", "maybe"])


def test_own_addresses_are_read_again_on_reload(tmp_path: Path) -> None:
    """SIGHUP's reload reads the interfaces again, and the client dials under the new list."""
    config = tmp_path / "octoplex.toml"
    config.write_text("[server]\nlisten = ['tcp:0:interface=127.0.0.1']\n")
    addresses = [("8.8.4.4", "eth0")]
    options = Options(lambda: list(addresses))
    options.parseOptions(["--workers", "1", "--config", str(config)])
    root: Any = makeService(options)
    client = next(child for child in root if isinstance(child, UpstreamClient))
    assert client._endpoints.egress.own_addresses == ((ipaddress.ip_address("8.8.4.4"), "eth0"),)
    addresses[:] = [("8.8.8.8", "eth1")]
    root.reload()
    assert client._endpoints.egress.own_addresses == ((ipaddress.ip_address("8.8.8.8"), "eth1"),)
    config.write_text("[egress]\nown_addresses = 'allow'\n[server]\nlisten = ['tcp:0']\n")
    root.reload()
    assert client._endpoints.egress.own_addresses == ()


IF_INET6 = """\
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
2a0104f8000000000000000000000020 05 40 00 00 enp3s0.10
"""

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 10.1.0.0/16 2 0 2
        |-- 10.1.0.0
           /16 link UNICAST
        |-- 10.1.2.3
           /32 host LOCAL
        |-- 10.1.9.9
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.1.2.3
        /32 host LOCAL
     |-- 203.0.113.7
        /32 link UNICAST
"""


def test_interface_files_are_parsed() -> None:
    """/proc/net/if_inet6 gives each address and interface; fib_trie its LOCAL /32 hosts once."""
    assert parse_if_inet6(IF_INET6) == [
        ("fe80::fc:ff:fe00:1", "eth0"),
        ("::1", "lo"),
        ("2a01:4f8::20", "enp3s0.10"),
    ]
    assert parse_fib_trie(FIB_TRIE) == ["127.0.0.1", "10.1.2.3", "10.1.9.9"]
    assert parse_if_inet6("") == parse_fib_trie("") == []


def test_reading_the_interfaces(tmp_path: Path) -> None:
    """The reader finds this host's loopback, and none where /proc/net is missing."""
    found = read_own_addresses()
    assert ("127.0.0.1", "lo") in found
    assert read_own_addresses(str(tmp_path)) == []


def test_host_patterns() -> None:
    """A denied pattern matches the name and its subdomains, case and a final dot aside."""
    policy = EgressPolicy.from_strings(deny_hosts=["*.internal.test", "admin.test"])
    for name in ("x.internal.test", "A.B.Internal.Test.", "admin.test", "ADMIN.test."):
        with pytest.raises(EgressRefused, match="matches denied host"):
            policy.check_name(name, 443)
    for name in ("internal.test", "xinternal.test", "admin.test.example", "sub.admin.test"):
        policy.check_name(name, 443)


def test_ports() -> None:
    """Only the listed ports may be dialled; any is the default."""
    policy = EgressPolicy.from_strings(ports="80,443,8000-8002")
    for port in (80, 443, 8000, 8002):
        policy.check_name("a.test", port)
    with pytest.raises(EgressRefused) as raised:
        policy.check_name("a.test", 8003)
    assert str(raised.value) == (
        "egress policy refused a.test port 8003: port 8003 is not among the allowed egress ports"
    )
    DEFAULT.check_name("a.test", 1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--allow-egress", "localhost"], "--allow-egress 'localhost' is not a CIDR"),
        (["--deny-egress", "10.0.0.0/33"], "--deny-egress '10.0.0.0/33' is not a CIDR"),
        (["--allow-egress-host", "bad host"], "--allow-egress-host 'bad host' is not a host name"),
        (["--deny-egress-host", "a.*.test"], "--deny-egress-host 'a.*.test' is not a host name"),
        (["--egress-ports", "80,http"], "--egress-ports entry 'http' is not a port"),
        (["--egress-ports", "0-80"], "--egress-ports entry '0-80' must lie within 1-65535"),
        (["--egress-ports", "90-80"], "--egress-ports entry '90-80' must lie within 1-65535"),
    ],
)
def test_bad_settings_stop_start_up(argv: list[str], message: str) -> None:
    """A bad egress option is a usage error that names the option and the value."""
    with pytest.raises(usage.UsageError) as raised:
        Options().parseOptions(argv)
    assert str(raised.value).startswith(message)


def test_command_line_builds_the_policy() -> None:
    """The options become the policy; with none, the default one."""
    options = Options(list)
    options.parseOptions(
        [
            "--allow-egress",
            "127.0.0.0/8",
            "--allow-egress",
            "::1",
            "--deny-egress",
            "127.0.0.2/32",
            "--allow-egress-host",
            "*.corp.test",
            "--deny-egress-host",
            "db.corp.test",
            "--egress-ports",
            "80,443",
        ]
    )
    assert options["egress"] == EgressPolicy.from_strings(
        allow=["127.0.0.0/8", "::1/128"],
        deny=["127.0.0.2/32"],
        allow_hosts=["*.corp.test"],
        deny_hosts=["db.corp.test"],
        ports="80,443",
    )
    plain = Options(list)
    plain.parseOptions([])
    assert plain["egress"] == EgressPolicy()


def test_refused_address_is_never_dialled() -> None:
    """The dialler fails a refused address without asking the reactor for a connection."""
    memory = MemoryReactorClock()
    endpoints = UpstreamEndpointFactory(
        memory, BrowserLikePolicyForHTTPS(), 5.0, local_resolver(memory), DEFAULT
    )
    for uri in (b"http://169.254.169.254/latest/meta-data/", b"https://10.0.0.1:8443/"):
        results: list[Any] = []
        endpoint = endpoints.endpointForURI(URI.fromBytes(uri))
        endpoint.connect(Factory.forProtocol(Protocol)).addBoth(results.append)
        (failure,) = results
        assert failure.check(EgressRefused)
    assert memory.tcpClients == []


# ---------------------------------------------------------------------------
# Over real sockets.
# ---------------------------------------------------------------------------


class RecordingReactor:
    """
    The global reactor, recording every TCP connection asked of it, and
    refusing (recorded, never sent) any to an address not on loopback, so
    a policy that failed to refuse one cannot reach another host.
    """

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped
        self.dialled: list[tuple[str, int]] = []
        directlyProvides(self, providedBy(wrapped))

    def connectTCP(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        self.dialled.append((host, port))
        if not ipaddress.ip_address(host).is_loopback:
            raise ConnectError(string=f"the test reactor never dials {host}")
        return self._wrapped.connectTCP(host, port, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


@asynccontextmanager
async def policed(
    egress: EgressPolicy,
    resolver: CachingResolver | None = None,
    tls_policy: Any = None,
    **pool: Any,
) -> AsyncIterator[tuple[Octoplex, RecordingReactor]]:
    """
    Run Octoplex with ``egress``, its client on a recording reactor.
    """
    recording = RecordingReactor(reactor)
    limits = Limits()
    client = UpstreamClient(
        recording,
        PoolSettings(**pool),
        limits.max_response_bytes,
        tls_policy,
        resolver or local_resolver(),
        egress,
    )
    client.startService()
    site = OctoplexSite(OctoplexApp(Multiplexer(reactor, client), limits, reactor), reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    octoplex = Octoplex(f"http://127.0.0.1:{port.getHost().port}", client, site, port)
    try:
        yield octoplex, recording
    finally:
        await octoplex.stop()


def upstream_on(address: str, port: int = 0) -> Upstream:
    """
    Start the scriptable upstream on ``address`` (127.0.0.2, ``::1`` and so on).
    """
    resource = _Upstream()
    site = _CountingSite(resource)
    listening = reactor.listenTCP(port, site, interface=address)
    host = f"[{address}]" if ":" in address else address
    return Upstream(f"http://{host}:{listening.getHost().port}", site, resource, listening)


async def outcomes(octoplex: Octoplex, caller: Caller, *uris: str, **item: Any) -> list[Any]:
    batch = {"timeout_msec": 3000, "requests": [{"uri": uri, **item} for uri in uris]}
    status, _, body = await caller.post(octoplex.url + "/multiplex", batch)
    assert status == 200, body
    return list(body["responses"])


def refusal(outcome: dict[str, Any]) -> str:
    assert set(outcome) == {"Failure"}, outcome
    assert outcome["Failure"]["kind"] == "forbidden", outcome
    return str(outcome["Failure"]["error"])


@pytest_twisted.ensureDeferred
async def test_internal_addresses_are_refused_without_a_packet(
    upstream: Upstream, caller: Caller, log_events: list[dict[str, Any]]
) -> None:
    """
    With the default policy, loopback in every spelling (a live upstream
    listens there) and the internal ranges are refused, and nothing is dialled.
    """
    port = upstream.port.getHost().port
    spellings = ["127.0.0.1", "2130706433", "0177.0.0.1", "0x7f.0.0.1", "0x7f000001", "127.1"]
    metadata = ["169.254.169.254", "2852039166", "0251.0376.0251.0376", "0xa9.0xfe.0xa9.0xfe"]
    others = ["10.0.0.1", "172.16.0.1", "192.168.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255"]
    async with policed(DEFAULT) as (octoplex, recording):
        results = await outcomes(
            octoplex,
            caller,
            *[f"http://{host}:{port}/hello" for host in spellings],
            *[f"http://{host}/latest/meta-data/" for host in metadata],
            *[f"https://{host}/" for host in others],
        )
    errors = [refusal(outcome) for outcome in results]
    loopback = (
        f"egress policy refused 127.0.0.1 port {port}: "
        f"address 127.0.0.1 is in 127.0.0.0/8, loopback, {HINT}"
    )
    assert errors[: len(spellings)] == [loopback] * len(spellings)
    meta = (
        "egress policy refused 169.254.169.254 port 80: address 169.254.169.254 is in "
        f"169.254.169.254/32, a cloud metadata address, {HINT}"
    )
    assert errors[len(spellings) : -len(others)] == [meta] * len(metadata)
    assert [e.split(":")[0] for e in errors[-len(others) :]] == [
        f"egress policy refused {host} port 443" for host in others
    ]
    assert all(outcome["Failure"]["duration_msec"] < 1000 for outcome in results)
    assert recording.dialled == []
    assert upstream.site.connections == []
    logged = [e for e in log_events if e.get("egress_refused")]
    assert len(logged) == len(results)
    assert {e["reason"] for e in logged} == set(errors)


class Zone(ResolverBase):
    """
    The test DNS server's records, which a test may change: name -> A or
    AAAA addresses.  Every other name does not exist.

    :ivar asked: names queried.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, list[str]] = {}
        self.asked: list[str] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        key = name.decode("ascii").lower()
        self.asked.append(key)
        if key not in self.records:
            return fail(DomainError(name))
        answers = []
        for address in self.records[key]:
            if type == dns.A and ":" not in address:
                answers.append(dns.RRHeader(key, dns.A, dns.IN, 1, dns.Record_A(address, 1)))
            elif type == dns.AAAA and ":" in address:
                answers.append(dns.RRHeader(key, dns.AAAA, dns.IN, 1, dns.Record_AAAA(address, 1)))
        return succeed((answers, [], []))


@asynccontextmanager
async def dns_server() -> AsyncIterator[tuple[Zone, CachingResolver]]:
    """
    A DNS server on 127.0.0.1, and a caching resolver (TTLs of 1 s, nothing
    served stale) that asks it.
    """
    zone = Zone()
    port = serve_dns(zone)
    names = names_client.Resolver(servers=[("127.0.0.1", port.getHost().port)], reactor=reactor)
    resolver = CachingResolver(
        reactor, names, DNSSettings(min_ttl=1, stale_grace=0, timeouts=(1.0,)), hosts=None
    )
    try:
        yield zone, resolver
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_names_resolving_to_internal_addresses_are_refused(
    upstream: Upstream, caller: Caller
) -> None:
    """
    A name whose A or AAAA records point inside (loopback, an IPv4-mapped
    loopback, the metadata address) is refused after resolution, undialled.
    """
    port = upstream.port.getHost().port
    async with (
        dns_server() as (zone, resolver),
        policed(DEFAULT, resolver) as (octoplex, recording),
    ):
        zone.records = {
            "loop.test": ["127.0.0.1"],
            "mapped.test": ["::ffff:127.0.0.1"],
            "meta.test": ["169.254.169.254"],
        }
        results = await outcomes(
            octoplex,
            caller,
            f"http://loop.test:{port}/hello",
            f"http://mapped.test:{port}/hello",
            f"http://meta.test:{port}/hello",
        )
    assert [refusal(outcome) for outcome in results] == [
        f"egress policy refused loop.test port {port}: address 127.0.0.1 is in "
        f"127.0.0.0/8, loopback, {HINT}",
        f"egress policy refused mapped.test port {port}: address ::ffff:7f00:1 (IPv4 127.0.0.1) "
        f"is in 127.0.0.0/8, loopback, {HINT}",
        f"egress policy refused meta.test port {port}: address 169.254.169.254 is in "
        f"169.254.169.254/32, a cloud metadata address, {HINT}",
    ]
    assert recording.dialled == []
    assert upstream.site.connections == []


@pytest_twisted.ensureDeferred
async def test_names_resolving_to_addresses_carrying_internal_ones_are_refused(
    upstream: Upstream, caller: Caller
) -> None:
    """
    AAAA records of the forms that carry an internal IPv4 address, of the
    ranges added from the IANA registries, and of this host's own address
    are refused after resolution, before any packet.
    """
    port = upstream.port.getHost().port
    # This host's "own" address here is a public one, never dialled: the
    # recording reactor would refuse it anyway.
    policy = EgressPolicy.from_strings(own_addresses=[("8.8.4.4", "eth9")])
    names = {
        "nat64local.test": "64:ff9b:1::a9fe:a9fe",
        "siit.test": "::ffff:0:a9fe:a9fe",
        "sitelocal.test": "fec0::1",
        "teredo.test": "2001:0:4136:e378:8000:63bf:5601:5601",
        "sixtofour.test": "2002:7f00:1::1",
        "docs.test": "2001:db8::1",
        "own.test": "8.8.4.4",
        "ownmapped.test": "::ffff:8.8.4.4",
    }
    async with (
        dns_server() as (zone, resolver),
        policed(policy, resolver) as (octoplex, recording),
    ):
        zone.records = {name: [address] for name, address in names.items()}
        results = await outcomes(octoplex, caller, *[f"http://{n}:{port}/hello" for n in names])
    reasons = [refusal(outcome).split(": ", 1)[1] for outcome in results]
    assert reasons == [
        f"address 64:ff9b:1::a9fe:a9fe is in 64:ff9b:1::/48, the local-use NAT64 range, {HINT}",
        "address ::ffff:0:a9fe:a9fe (IPv4 169.254.169.254) is in 169.254.169.254/32, "
        f"{METADATA}, {HINT}",
        f"address fec0::1 is in fec0::/10, the deprecated site-local range, {HINT}",
        "address 2001:0:4136:e378:8000:63bf:5601:5601 (IPv4 169.254.169.254) is in "
        f"169.254.169.254/32, {METADATA}, {HINT}",
        f"address 2002:7f00:1::1 (IPv4 127.0.0.1) is in 127.0.0.0/8, loopback, {HINT}",
        f"address 2001:db8::1 is in 2001:db8::/32, a documentation range, {HINT}",
        f"address 8.8.4.4 is an address of this host's own interface eth9, {OWN_HINT}",
        "address ::ffff:808:404 (IPv4 8.8.4.4) is an address of this host's own interface "
        f"eth9, {OWN_HINT}",
    ]
    assert set(zone.asked) == set(names)
    assert recording.dialled == []
    assert upstream.site.connections == []


def loopback6_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not loopback6_usable(), reason="::1 cannot be bound here")


@needs_ipv6
@pytest_twisted.ensureDeferred
async def test_ipv6_literal_upstream(caller: Caller) -> None:
    """
    An IPv6 literal URI is refused by the default policy with nothing sent,
    and with --allow-egress ::1/128 reaches the upstream on ::1 with
    Host: [::1]:port, one pooled connection for two spellings of it.
    """
    upstream = upstream_on("::1")
    port = upstream.port.getHost().port
    try:
        async with policed(DEFAULT) as (octoplex, recording):
            (refused,) = await outcomes(octoplex, caller, f"http://[::1]:{port}/hello")
        assert refusal(refused) == (
            f"egress policy refused ::1 port {port}: address ::1 is in ::1/128, loopback, {HINT}"
        )
        assert recording.dialled == []
        assert upstream.site.connections == []
        allowed = EgressPolicy.from_strings(allow=["::1/128"])
        async with policed(allowed) as (octoplex, recording):
            echoed, hello = await outcomes(
                octoplex,
                caller,
                f"http://[::1]:{port}/echo",
                f"http://[0:0::0:1]:{port}/hello",
            )
            (again,) = await outcomes(octoplex, caller, f"http://[::1]:{port}/hello")
    finally:
        await upstream.stop()
    seen = json.loads(echoed["Success"]["content"])
    assert ["Host", f"[::1]:{port}"] in seen["headers"]
    assert hello["Success"]["content"] == again["Success"]["content"] == "Hello world!"
    assert {address for address, _ in recording.dialled} == {"::1"}
    assert len(upstream.site.connections) == len(recording.dialled) <= 2


@needs_ipv6
@pytest_twisted.ensureDeferred
async def test_https_ipv6_literal_is_verified_against_its_ip_san(caller: Caller) -> None:
    """
    Over https to [::1], no SNI is sent and the certificate must name the
    IP address: one for ::1 answers, one only for localhost is rejected.
    """
    ca = trustme.CA()
    trusted = UpstreamTLSPolicy(Certificate.loadPEM(ca.cert_pem.bytes()))
    results = []
    sni: list[bytes | None] = []
    for names in (("::1",), ("localhost",)):
        cert = ca.issue_cert(*names)
        options = PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes()).options()
        # OpenSSL calls this on every ClientHello, with None for no SNI.
        options.getContext().set_tlsext_servername_callback(
            lambda connection: sni.append(connection.get_servername())
        )
        site = _CountingSite(_Upstream())
        port = reactor.listenSSL(0, site, options, interface="::1")
        policy = EgressPolicy.from_strings(allow=["::1/128"])
        try:
            async with policed(policy, tls_policy=trusted) as (octoplex, _):
                (outcome,) = await outcomes(
                    octoplex, caller, f"https://[::1]:{port.getHost().port}/hello"
                )
        finally:
            await port.stopListening()
        results.append(outcome)
    served, rejected = results
    assert served["Success"]["content"] == "Hello world!"
    assert sni == [None, None]
    error = rejected["Failure"]["error"]
    assert error.startswith("TLS handshake failed: certificate of ::1 rejected"), error


def two_upstreams() -> tuple[Upstream, Upstream]:
    """
    Upstreams on 127.0.0.1 and 127.0.0.2, on one port.
    """
    for _ in range(20):
        first = upstream_on("127.0.0.1")
        try:
            second = upstream_on("127.0.0.2", first.port.getHost().port)
        except CannotListenError:
            first.port.stopListening()
            continue
        return first, second
    raise AssertionError("found no port free on both 127.0.0.1 and 127.0.0.2")


@pytest_twisted.ensureDeferred
async def test_only_allowed_addresses_of_a_name_are_dialled(caller: Caller) -> None:
    """
    Of a name's addresses, only those the policy allows are dialled; a name
    with none allowed is refused.
    """
    first, second = two_upstreams()
    port = first.port.getHost().port
    policy = EgressPolicy.from_strings(allow=["127.0.0.1/32"])
    try:
        async with dns_server() as (zone, resolver), policed(policy, resolver) as (o, recording):
            zone.records = {"both.test": ["127.0.0.2", "127.0.0.1"], "two.test": ["127.0.0.2"]}
            both = await outcomes(o, caller, *[f"http://both.test:{port}/hello"] * 4)
            (two,) = await outcomes(o, caller, f"http://two.test:{port}/hello")
    finally:
        await first.stop()
        await second.stop()
    assert [outcome["Success"]["content"] for outcome in both] == ["Hello world!"] * 4
    assert refusal(two).startswith(f"egress policy refused two.test port {port}: address 127.0.0.2")
    assert {address for address, _ in recording.dialled} == {"127.0.0.1"}
    assert second.site.connections == []


@pytest_twisted.ensureDeferred
async def test_a_name_rebound_inside_is_refused(caller: Caller) -> None:
    """
    DNS rebinding: a name that resolved to an allowed address and then
    resolves to a blocked one is refused on its next connection.
    """
    first, second = two_upstreams()
    port = first.port.getHost().port
    policy = EgressPolicy.from_strings(allow=["127.0.0.1/32"])
    try:
        async with (
            dns_server() as (zone, resolver),
            # One request per connection: each request dials anew.
            policed(policy, resolver, max_requests=1) as (octoplex, recording),
        ):
            zone.records = {"rebind.test": ["127.0.0.1"]}
            (before,) = await outcomes(octoplex, caller, f"http://rebind.test:{port}/hello")
            zone.records = {"rebind.test": ["127.0.0.2"]}
            await deferLater(reactor, 1.2, lambda: None)  # the TTL of 1 s runs out
            (after,) = await outcomes(octoplex, caller, f"http://rebind.test:{port}/hello")
    finally:
        await first.stop()
        await second.stop()
    assert before["Success"]["status"] == 200
    assert refusal(after) == (
        f"egress policy refused rebind.test port {port}: address 127.0.0.2 is in "
        f"127.0.0.0/8, loopback, {HINT}"
    )
    assert zone.asked.count("rebind.test") >= 4  # A and AAAA, twice
    assert recording.dialled == [("127.0.0.1", port)]
    assert second.site.connections == []


@pytest_twisted.ensureDeferred
async def test_allowed_cidr_then_denied_cidr(caller: Caller) -> None:
    """--allow-egress 127.0.0.0/8 lets both through; --deny-egress 127.0.0.2/32 wins over it."""
    first, second = two_upstreams()
    port = first.port.getHost().port
    uris = [f"http://127.0.0.1:{port}/hello", f"http://127.0.0.2:{port}/hello"]
    allow = EgressPolicy.from_strings(allow=["127.0.0.0/8"])
    deny = EgressPolicy.from_strings(allow=["127.0.0.0/8"], deny=["127.0.0.2/32"])
    try:
        async with policed(allow) as (octoplex, _):
            allowed = await outcomes(octoplex, caller, *uris)
        connected = len(second.site.connections)
        async with policed(deny) as (octoplex, recording):
            denied = await outcomes(octoplex, caller, *uris)
    finally:
        await first.stop()
        await second.stop()
    assert [o["Success"]["content"] for o in allowed] == ["Hello world!"] * 2
    assert connected == 1
    assert denied[0]["Success"]["content"] == "Hello world!"
    assert refusal(denied[1]) == (
        f"egress policy refused 127.0.0.2 port {port}: "
        "address 127.0.0.2 is in denied range 127.0.0.2/32"
    )
    assert recording.dialled == [("127.0.0.1", port)]
    assert len(second.site.connections) == 1


@pytest_twisted.ensureDeferred
async def test_host_rules_and_ports(upstream: Upstream, caller: Caller) -> None:
    """
    An allowed host name reaches loopback while the bare address is still
    refused; a denied pattern is refused before any DNS query; a port off
    the list is refused.
    """
    port = upstream.port.getHost().port
    policy = EgressPolicy.from_strings(allow_hosts=["localhost"], deny_hosts=["*.test"])
    async with dns_server() as (zone, _), policed(policy) as (octoplex, recording):
        by_name, by_address, denied = await outcomes(
            octoplex,
            caller,
            f"http://localhost:{port}/hello",
            f"http://127.0.0.1:{port}/hello",
            f"http://inside.test:{port}/hello",
        )
    assert by_name["Success"]["content"] == "Hello world!"
    assert refusal(by_address).startswith(f"egress policy refused 127.0.0.1 port {port}: address")
    assert refusal(denied) == (
        f"egress policy refused inside.test port {port}: "
        "host inside.test matches denied host *.test"
    )
    assert zone.asked == []
    assert [address for address, _ in recording.dialled] == ["127.0.0.1"]

    ports = EgressPolicy.from_strings(allow=["127.0.0.0/8"], ports="80,443")
    async with policed(ports) as (octoplex, recording):
        (off_list,) = await outcomes(octoplex, caller, f"http://127.0.0.1:{port}/hello")
    assert refusal(off_list) == (
        f"egress policy refused 127.0.0.1 port {port}: port {port} is not among the allowed "
        "egress ports"
    )
    assert recording.dialled == []


@pytest_twisted.ensureDeferred
async def test_host_header_cannot_steer_the_connection(upstream: Upstream, caller: Caller) -> None:
    """An item's Host header is sent as given, but the connection goes to the URI's host."""
    policy = EgressPolicy.from_strings(allow=["127.0.0.0/8"])
    async with policed(policy) as (octoplex, recording):
        (echoed,) = await outcomes(
            octoplex, caller, upstream.url + "/echo", headers={"Host": "169.254.169.254"}
        )
    seen = json.loads(echoed["Success"]["content"])
    assert ["Host", "169.254.169.254"] in seen["headers"]
    port = upstream.port.getHost().port
    assert recording.dialled == [("127.0.0.1", port)]
    assert len(upstream.site.connections) == 1
