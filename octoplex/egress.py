"""
Where upstream connections may go: the egress policy.

A multiplexer calls URLs its callers choose from inside the operator's
network, so by default it must not reach what only that network can reach:
loopback, private and link-local ranges (cloud metadata services among
them), and addresses no upstream has.  :class:`EgressPolicy` decides, for
one connection, whether its host name, port and the *IP address actually
dialled* are allowed.  The dialler (:mod:`octoplex.endpoints`) asks it after
DNS resolution and before any packet is sent, for every address it is about
to dial, so a name that resolves (or rebinds) to an internal address is
refused like the address itself.

The rules, first match deciding:

1. a port outside the allowed ports is refused;
2. a host name matching a ``deny_hosts`` pattern is refused;
3. an address in a ``deny`` CIDR is refused (a deny always wins);
4. an address in an ``allow`` CIDR is allowed;
5. a host name matching an ``allow_hosts`` pattern is allowed, whatever its
   address: the operator vouches for that name;
6. an address in a default-blocked range (:data:`DEFAULT_BLOCKED`) is
   refused;
7. an address of this host's own interfaces is refused (unless the
   operator allowed them all: then the policy holds none);
8. anything else (a public address) is allowed.

An IPv6 address that carries IPv4 addresses (IPv4-mapped, SIIT, NAT64,
6to4, Teredo) is judged by them as well as by itself.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import attr

__all__ = ["DEFAULT_BLOCKED", "EgressPolicy", "EgressRefused", "parse_ports"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: What is refused unless allowed, and why, most specific first so that the
#: reason names the narrowest range.  It follows the IANA IPv4 and IPv6
#: Special-Purpose Address Registries (RFC 6890), entry by entry;
#: docs/security.md ("Egress policy") lists each entry, and those left
#: allowed, with the reason.
DEFAULT_BLOCKED: tuple[tuple[str, str], ...] = (
    ("169.254.169.254/32", "a cloud metadata address"),
    ("100.100.100.200/32", "a cloud metadata address"),
    ("192.0.0.192/32", "a cloud metadata address"),
    ("fd00:ec2::254/128", "a cloud metadata address"),
    ("0.0.0.0/8", "the 'this network' range"),
    ("10.0.0.0/8", "a private range"),
    ("100.64.0.0/10", "the shared (carrier-grade NAT) range"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "a private range"),
    ("192.0.0.0/24", "the IETF protocol assignments range"),
    ("192.0.2.0/24", "a documentation range (TEST-NET-1)"),
    ("192.88.99.0/24", "the deprecated 6to4 relay anycast range"),
    ("192.168.0.0/16", "a private range"),
    ("198.18.0.0/15", "the benchmarking range"),
    ("198.51.100.0/24", "a documentation range (TEST-NET-2)"),
    ("203.0.113.0/24", "a documentation range (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "the reserved range (broadcast included)"),
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
    ("::ffff:0:0:0/96", "the IPv4-translated (SIIT) range"),
    ("::/96", "the IPv4-compatible range"),
    ("64:ff9b:1::/48", "the local-use NAT64 range"),
    ("100::/64", "the discard-only range"),
    ("100:0:0:1::/64", "the dummy IPv6 prefix"),
    ("2001::/32", "the Teredo range"),
    ("2001:db8::/32", "a documentation range"),
    ("2001::/23", "the IETF protocol assignments range"),
    ("3fff::/20", "a documentation range"),
    ("5f00::/16", "the SRv6 SID range"),
    ("fc00::/7", "a private range (unique local)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "the deprecated site-local range"),
    ("ff00::/8", "multicast"),
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HINT = "which is blocked by default (--allow-egress CIDR allows a range)"
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")

# A host pattern: a name, or "*." and a name for its subdomains.
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_HOST_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*\Z")


class EgressRefused(Exception):
    """
    The egress policy refused a connection; the message names the rule and
    the address (or name, or port) it refused.
    """

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(host, port, reason)
        self.host = host
        self.port = port
        self.reason = reason

    def __str__(self) -> str:
        return f"egress policy refused {self.host} port {self.port}: {self.reason}"


def _network(text: str, what: str) -> _Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{what} {text!r} is not a CIDR (such as 10.0.0.0/8 or fd00::/8)"
        ) from None


def _host_pattern(text: str, what: str) -> str:
    pattern = text.strip().lower().rstrip(".")
    if not _HOST_PATTERN.match(pattern):
        raise ValueError(
            f"{what} {text!r} is not a host name or a *.domain pattern (such as *.example.com)"
        )
    return pattern


def parse_ports(text: str) -> frozenset[int] | None:
    """
    Parse a port list such as ``80,443,8000-8999``; ``any`` (or nothing)
    allows every port.

    :raises ValueError: naming the bad entry.
    """
    text = text.strip()
    if text in ("", "any"):
        return None
    ports: set[int] = set()
    for entry in text.split(","):
        low, _, high = entry.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(
                f"--egress-ports entry {entry!r} is not a port or a range like 8000-8999"
            ) from None
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"--egress-ports entry {entry!r} must lie within 1-65535, low to high")
        ports.update(range(first, last + 1))
    return frozenset(ports)


def _carried(address: _Address) -> tuple[ipaddress.IPv4Address, ...]:
    """
    The IPv4 addresses an IPv6 address carries, which are judged as well as
    the address itself: the one inside an IPv4-mapped (``::ffff:0:0/96``),
    IPv4-translated (SIIT, ``::ffff:0:0:0/96``), NAT64 (``64:ff9b::/96``)
    or 6to4 (``2002::/16``) address, and a Teredo (``2001::/32``) address's
    server and client (the client's stored inverted, RFC 4380).
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return ()
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address in _NAT64 or address in _SIIT:
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo
    return ()


def _matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class EgressPolicy:
    """
    Which upstream addresses, names and ports may be dialled.

    :ivar allow: CIDRs allowed even where a default-blocked range covers
        them (``--allow-egress``).
    :ivar deny: CIDRs always refused (``--deny-egress``).
    :ivar allow_hosts: host names or ``*.domain`` patterns allowed whatever
        their addresses (``--allow-egress-host``).
    :ivar deny_hosts: host names or patterns always refused
        (``--deny-egress-host``).
    :ivar ports: the ports that may be dialled, or ``None`` for any
        (``--egress-ports``).
    :ivar own_addresses: this host's own interface addresses, each with its
        interface's name (or ``""``), refused unless allowed like a
        default-blocked range; empty with ``--egress-own-addresses allow``.
    """

    allow: tuple[_Network, ...] = ()
    deny: tuple[_Network, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    deny_hosts: tuple[str, ...] = ()
    ports: frozenset[int] | None = None
    own_addresses: tuple[tuple[_Address, str], ...] = ()
    _blocked: tuple[tuple[_Network, str], ...] = attr.ib(
        init=False,
        factory=lambda: tuple((ipaddress.ip_network(c), why) for c, why in DEFAULT_BLOCKED),
    )

    @classmethod
    def from_strings(
        cls,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        allow_hosts: Iterable[str] = (),
        deny_hosts: Iterable[str] = (),
        ports: str = "any",
        own_addresses: Iterable[tuple[str, str]] = (),
    ) -> EgressPolicy:
        """
        Build a policy from its textual settings.

        :raises ValueError: naming the first bad value.
        """
        return cls(
            allow=tuple(_network(c, "--allow-egress") for c in allow),
            deny=tuple(_network(c, "--deny-egress") for c in deny),
            allow_hosts=tuple(_host_pattern(h, "--allow-egress-host") for h in allow_hosts),
            deny_hosts=tuple(_host_pattern(h, "--deny-egress-host") for h in deny_hosts),
            ports=parse_ports(ports),
            own_addresses=tuple(
                sorted({(ipaddress.ip_address(a), i) for a, i in own_addresses}, key=str)
            ),
        )

    def check_name(self, host: str, port: int) -> None:
        """
        Check what can be checked before resolving ``host``: its port and the
        denied names.  (Rules 1 and 2.)

        :raises EgressRefused: if either refuses it.
        """
        if self.ports is not None and port not in self.ports:
            raise EgressRefused(host, port, f"port {port} is not among the allowed egress ports")
        name = host.lower().rstrip(".")
        for pattern in self.deny_hosts:
            if _matches(name, pattern):
                raise EgressRefused(host, port, f"host {name} matches denied host {pattern}")

    def check_address(self, host: str, address: str, port: int) -> None:
        """
        Check one address ``host`` resolved to, about to be dialled on
        ``port``.  (Rules 3 to 7; call :meth:`check_name` first.)

        An IPv6 address that carries IPv4 addresses (see :func:`_carried`)
        is refused if it or any of them is denied, allowed by an ``allow``
        CIDR that holds it or every one of them, and else refused if it or
        any of them that no ``allow`` CIDR holds is blocked.

        :raises EgressRefused: naming the rule and the address.
        """
        if "%" in address:
            # A zone names an interface of this host: never an upstream.
            raise EgressRefused(host, port, f"address {address} has a zone (an interface name)")
        dialled = ipaddress.ip_address(address)
        carried = _carried(dialled)
        judged = (*carried, dialled)

        def shown(one: _Address) -> str:
            return str(dialled) if one == dialled else f"{dialled} (IPv4 {one})"

        for network in self.deny:
            for one in judged:
                if one in network:
                    raise EgressRefused(
                        host, port, f"address {shown(one)} is in denied range {network}"
                    )
        if any(dialled in network for network in self.allow):
            return
        # What an allow CIDR holds is cleared; if that is every address
        # carried, the address is allowed.
        uncleared = [one for one in carried if not any(one in n for n in self.allow)]
        if carried and not uncleared:
            return
        name = host.lower().rstrip(".")
        for pattern in self.allow_hosts:
            if _matches(name, pattern):
                return
        judged = (*uncleared, dialled)
        for network, why in self._blocked:
            for one in judged:
                if one in network:
                    raise EgressRefused(
                        host, port, f"address {shown(one)} is in {network}, {why}, {_HINT}"
                    )
        for own, interface in self.own_addresses:
            for one in judged:
                if one == own:
                    where = f"interface {interface}" if interface else "interfaces"
                    raise EgressRefused(
                        host,
                        port,
                        f"address {shown(one)} is an address of this host's own {where}, "
                        "which is refused by default (--egress-own-addresses allow, or an "
                        "--allow-egress CIDR, allows it)",
                    )
