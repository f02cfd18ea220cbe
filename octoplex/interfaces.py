"""
This host's own addresses, which the egress policy refuses by default.

A service listening on ``0.0.0.0`` or ``::`` answers on every address of
the host, not only on loopback, so an upstream URL naming the host's public
or private interface address reaches it.  :func:`read_own_addresses` reads
them from Linux's ``/proc/net`` (no dependency, no packet): IPv6 addresses
with their interface from ``if_inet6``, IPv4 ones from the ``LOCAL`` host
routes of ``fib_trie`` (secondary addresses included), named by interface
where ``SIOCGIFADDR`` says whose primary address it is.  Elsewhere (no
``/proc/net``) it finds none.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

__all__ = ["parse_fib_trie", "parse_if_inet6", "read_own_addresses"]

#: <linux/sockios.h>: the primary IPv4 address of an interface.
_SIOCGIFADDR = 0x8915


def parse_if_inet6(text: str) -> list[tuple[str, str]]:
    """
    The ``(address, interface)`` pairs of a ``/proc/net/if_inet6`` text:
    one line per address, 32 hex digits first and the interface last.
    """
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or len(fields[0]) != 32:
            continue
        try:
            address = ipaddress.IPv6Address(int(fields[0], 16))
        except ValueError:
            continue
        found.append((str(address), fields[-1]))
    return found


def parse_fib_trie(text: str) -> list[str]:
    """
    The local IPv4 addresses in a ``/proc/net/fib_trie`` text: each leaf
    (``|-- a.b.c.d``) with a ``/32 host LOCAL`` route, once each, in order.
    """
    found: list[str] = []
    leaf = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|-- "):
            leaf = stripped[4:]
        elif leaf is not None and stripped.split() == ["/32", "host", "LOCAL"]:
            if leaf not in found:
                found.append(leaf)
        elif stripped.startswith("+--") or not stripped.startswith("/"):
            leaf = None
    return found


def _primary_ipv4(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            answer = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()))
        except OSError:
            return None
    return socket.inet_ntoa(answer[20:24])


def read_own_addresses(proc: str = "/proc/net") -> list[tuple[str, str]]:
    """
    This host's interface addresses, each with its interface's name (``""``
    where it is not known): what :func:`parse_if_inet6` and
    :func:`parse_fib_trie` find in ``proc``, none where it cannot be read.
    """
    found: list[tuple[str, str]] = []
    try:
        with open(f"{proc}/if_inet6") as f:
            found.extend(parse_if_inet6(f.read()))
    except OSError:
        pass
    try:
        with open(f"{proc}/fib_trie") as f:
            local = parse_fib_trie(f.read())
    except OSError:
        local = []
    names: dict[str, str] = {}
    if local:
        for _, name in socket.if_nameindex():
            primary = _primary_ipv4(name)
            if primary is not None:
                names.setdefault(primary, name)
    found.extend((address, names.get(address, "")) for address in local)
    return found
