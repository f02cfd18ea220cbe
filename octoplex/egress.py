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
6. an address in a default-blocked range is refused;
7. anything else (a public address) is allowed.

IPv4-mapped (``::ffff:a.b.c.d``), NAT64 (``64:ff9b::a.b.c.d``) and 6to4
addresses are judged by the IPv4 address they carry.
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
#: reason names the narrowest range.
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
    ("192.168.0.0/16", "a private range"),
    ("198.18.0.0/15", "the benchmarking range"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "the reserved range (broadcast included)"),
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
    ("::/96", "the IPv4-compatible range"),
    ("fc00::/7", "a private range (unique local)"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")

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


def _judged(address: _Address) -> _Address:
    """
    The address whose ranges decide: the IPv4 address inside an IPv4-mapped,
    NAT64 or 6to4 IPv6 address, else the address itself.
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour is not None:
            return address.sixtofour
    return address


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
    """

    allow: tuple[_Network, ...] = ()
    deny: tuple[_Network, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    deny_hosts: tuple[str, ...] = ()
    ports: frozenset[int] | None = None
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

        :raises EgressRefused: naming the rule and the address.
        """
        dialled = ipaddress.ip_address(address.split("%", 1)[0])
        judged = _judged(dialled)
        shown = str(dialled) if judged == dialled else f"{dialled} (IPv4 {judged})"
        for network in self.deny:
            if judged in network or dialled in network:
                raise EgressRefused(host, port, f"address {shown} is in denied range {network}")
        for network in self.allow:
            if judged in network or dialled in network:
                return
        name = host.lower().rstrip(".")
        for pattern in self.allow_hosts:
            if _matches(name, pattern):
                return
        for network, why in self._blocked:
            if judged in network:
                raise EgressRefused(
                    host,
                    port,
                    f"address {shown} is in {network}, {why}, which is blocked by default "
                    "(--allow-egress CIDR allows a range)",
                )
