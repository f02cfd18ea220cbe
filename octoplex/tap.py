"""
``twistd octoplex``: the command line and the wiring of the daemon's
services.

:func:`makeService` only wires things together: the upstream client (which
owns the connection pool), the multiplexer, the Klein app and one listener
per ``--listen``.  Only this module imports the global reactor.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import signal
import stat
import sys
import threading
from collections.abc import Callable
from typing import Any

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.internet.tcp import makeBinding
from twisted.logger import Logger
from twisted.names import client as names_client
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from octoplex import __version__
from octoplex.admission import Admission
from octoplex.auth import TokenError, load_tokens
from octoplex.buffers import BufferBudget, MemoryReturner, return_large_blocks
from octoplex.circuits import CircuitSettings
from octoplex.client import PoolSettings, UpstreamClient
from octoplex.config import RELOADABLE, ConfigError, read_config
from octoplex.dns import CachingResolver, DNSSettings, nameservers, parse_nameserver
from octoplex.egress import EgressPolicy
from octoplex.hedging import HedgeBudgets
from octoplex.interfaces import read_own_addresses
from octoplex.limits import Limits
from octoplex.logs import LogOptions, Logs
from octoplex.metrics import Metrics
from octoplex.multiplexer import Multiplexer
from octoplex.outliers import OutlierSettings
from octoplex.tls import (
    TLSConfigError,
    UpstreamTLSPolicy,
    load_client_certificate,
    load_trust_root,
    server_options,
    server_pem,
)
from octoplex.web import MetricsSite, OctoplexApp, OctoplexSite
from octoplex.workers import Master, ParentWatch, stop_reactor, tell_master_ready, usable_cpus

__all__ = ["Options", "makeService"]

#: Seconds the inbound connections get to send their last answers at
#: shutdown, once the batches in flight are answered.
CLOSE_GRACE = 2.0

# Twisted's listen backlog is 50: a burst of new callers past it has its SYNs
# dropped and waits a second to retry.
DEFAULT_LISTEN = "tcp:8080:backlog=1024"


def _positive(kind: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def coerce(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {what}") from None
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{text!r} must be a finite number greater than 0")
        return value

    coerce.coerceDoc = f"Must be {what} greater than 0."  # type: ignore[attr-defined]
    return coerce


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{text!r} must be a finite number of seconds, 0 or more")
    return value


_non_negative_seconds.coerceDoc = "Must be a number of seconds, 0 or more."  # type: ignore[attr-defined]

_count = _positive(int, "a whole number")


def _whole_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise ValueError(f"{text!r} must be 0 or more")
    return value


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _count(text)
    except ValueError as e:
        raise ValueError(f"{e}, nor auto") from None


_workers.coerceDoc = "Must be a whole number greater than 0, or auto."  # type: ignore[attr-defined]


def _deny_or_allow(text: str) -> str:
    if text not in ("deny", "allow"):
        raise ValueError(f"{text!r} is neither deny nor allow")
    return text


_deny_or_allow.coerceDoc = "deny or allow."  # type: ignore[attr-defined]


def _on_off(text: str) -> str:
    if text not in ("on", "off"):
        raise ValueError(f"{text!r} is neither on nor off")
    return text


_on_off.coerceDoc = "on or off."  # type: ignore[attr-defined]


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise ValueError(f"{text!r} must be above 0 and at most 1")
    return value


_ratio.coerceDoc = "Must be above 0 and at most 1."  # type: ignore[attr-defined]

_whole_id.coerceDoc = "Must be a whole number, 0 or more."  # type: ignore[attr-defined]


def _non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{text!r} must be a finite number, 0 or more")
    return value


_non_negative_number.coerceDoc = "Must be a number, 0 or more."  # type: ignore[attr-defined]


def _percent(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 100:
        raise ValueError(f"{text!r} must be from 0 to 100")
    return value


_percent.coerceDoc = "Must be a whole number from 0 to 100."  # type: ignore[attr-defined]
_LIMITS = Limits()
_CIRCUITS = CircuitSettings()
_OUTLIERS = OutlierSettings()
_seconds = _positive(float, "a number of seconds")


class Options(LogOptions):
    """
    The options of ``twistd octoplex``.
    """

    synopsis = "[--listen ENDPOINT ...] [options]"
    longdesc = (
        "Octoplex: POST a JSON batch of HTTP requests to /multiplex; they run in "
        "parallel over a shared keep-alive pool and every result comes back, in "
        "order, by the batch's deadline."
    )

    optParameters = [
        [
            "max-batch-size",
            None,
            _LIMITS.max_batch_size,
            "The most requests one batch may hold.",
            _count,
        ],
        [
            "max-timeout-msec",
            None,
            _LIMITS.max_timeout_msec,
            "The longest deadline (timeout_msec) a batch may ask for.",
            _count,
        ],
        [
            "max-request-bytes",
            None,
            _LIMITS.max_request_bytes,
            "The largest /multiplex body accepted; a larger one gets 413.",
            _count,
        ],
        [
            "max-response-bytes",
            None,
            _LIMITS.max_response_bytes,
            "The most body bytes read from one upstream response; a larger "
            "body fails that request.",
            _count,
        ],
        [
            "max-batches-in-flight",
            None,
            _LIMITS.max_batches_in_flight,
            "Batches answered at once; past it a batch gets 503 with Retry-After.",
            _count,
        ],
        [
            "max-requests-in-flight",
            None,
            _LIMITS.max_requests_in_flight,
            "Upstream requests of the batches in flight; past it, likewise 503.",
            _count,
        ],
        [
            "max-client-batches-in-flight",
            None,
            _LIMITS.max_client_batches_in_flight,
            "Batches of one client (its token, else its address) answered at once; "
            "past it that client gets 429 with Retry-After.",
            _count,
        ],
        [
            "max-client-requests-in-flight",
            None,
            _LIMITS.max_client_requests_in_flight,
            "Upstream requests of one client's batches in flight; past it, likewise 429.",
            _count,
        ],
        [
            "max-batch-response-bytes",
            None,
            _LIMITS.max_batch_response_bytes,
            "The most body bytes read from all the upstream responses of one batch; "
            "the item that passes it fails.",
            _count,
        ],
        [
            "max-header-count",
            None,
            _LIMITS.max_header_count,
            "Header lines allowed in a request to Octoplex, an item's request and "
            "an upstream's response.",
            _count,
        ],
        [
            "max-header-bytes",
            None,
            _LIMITS.max_header_bytes,
            "Bytes allowed in the request line (or status line) and headers of each of those.",
            _count,
        ],
        [
            "max-connections",
            None,
            _LIMITS.max_connections,
            "Inbound connections open at once; one more gets 503 and is closed.",
            _count,
        ],
        [
            "header-timeout",
            None,
            _LIMITS.header_timeout,
            "Seconds a caller has to send a request's headers; past it 408 and close.",
            _seconds,
        ],
        [
            "body-timeout",
            None,
            _LIMITS.body_timeout,
            "Seconds a caller has to send a request's body after its headers; likewise.",
            _seconds,
        ],
        [
            "idle-timeout",
            None,
            _LIMITS.idle_timeout,
            "Seconds an inbound keep-alive connection may be idle before it is closed.",
            _seconds,
        ],
        [
            "send-timeout",
            None,
            _LIMITS.send_timeout,
            "Seconds an answer may wait, unread, in a full send buffer; then the "
            "connection is aborted.",
            _seconds,
        ],
        [
            "max-buffered-bytes",
            None,
            _LIMITS.max_buffered_bytes,
            "Bytes of upstream bodies and unsent answers the process may hold; a body "
            "that would pass it fails its item (default: an eighth of memory, "
            "64 MiB to 1 GiB).",
            _count,
        ],
        [
            "drain-timeout",
            None,
            30.0,
            "On SIGTERM, seconds the batches in flight may take to finish before "
            "they are answered as they stand.",
            _non_negative_seconds,
        ],
        [
            "drain-delay",
            None,
            0.0,
            "On SIGTERM, seconds /readyz answers 503 while batches are still taken, "
            "before the listeners close (give load balancers time to notice).",
            _non_negative_seconds,
        ],
        [
            "pool-max-idle-per-host",
            None,
            PoolSettings().max_idle_per_host,
            "Idle keep-alive connections kept per upstream scheme, host and port.",
            _count,
        ],
        [
            "pool-idle-timeout",
            None,
            PoolSettings().idle_timeout,
            "Seconds an idle upstream connection is kept open.",
            _seconds,
        ],
        [
            "pool-max-per-host",
            None,
            PoolSettings().max_per_host,
            "Requests in flight (connections in use) per upstream; more wait in a queue.",
            _count,
        ],
        [
            "pool-max-total",
            None,
            PoolSettings().max_total,
            "Requests in flight (connections in use) over all upstreams; more wait.",
            _count,
        ],
        [
            "pool-max-requests",
            None,
            PoolSettings().max_requests,
            "Requests one upstream connection carries before it is closed.",
            _count,
        ],
        [
            "pool-max-age",
            None,
            PoolSettings().max_age,
            "Seconds after which an upstream connection is closed once idle.",
            _seconds,
        ],
        [
            "pool-connect-grace",
            None,
            PoolSettings().connect_grace,
            "Seconds a connection cut off by a deadline may still take to open, to be pooled.",
            _seconds,
        ],
        [
            "connect-timeout",
            None,
            PoolSettings().connect_timeout,
            "Seconds a connection to an upstream may take to open.",
            _seconds,
        ],
        [
            "circuit-breaking",
            None,
            "off",
            "on: a request to an upstream that failed most of its recent requests "
            "fails at once (circuit_open) for a cool-down, then a probe decides.",
            _on_off,
        ],
        [
            "circuit-failure-ratio",
            None,
            _CIRCUITS.failure_ratio,
            "The share of failed requests in --circuit-window that opens a circuit.",
            _ratio,
        ],
        [
            "circuit-min-requests",
            None,
            _CIRCUITS.min_requests,
            "Requests to an upstream in --circuit-window before its circuit can open.",
            _count,
        ],
        [
            "circuit-window",
            None,
            _CIRCUITS.window,
            "Seconds of an upstream's recent outcomes that its circuit judges.",
            _seconds,
        ],
        [
            "circuit-cooldown",
            None,
            _CIRCUITS.cooldown,
            "Seconds an opened circuit fails requests at once before a probe goes through.",
            _seconds,
        ],
        [
            "circuit-max-cooldown",
            None,
            _CIRCUITS.max_cooldown,
            "The longest cool-down, which doubles after each failed probe.",
            _seconds,
        ],
        [
            "circuit-probes",
            None,
            _CIRCUITS.probes,
            "Probe requests let through a half-open circuit; all must succeed to close it.",
            _count,
        ],
        [
            "circuit-count-5xx",
            None,
            "off",
            "on: a 5xx answer counts as a failure of its upstream too.",
            _on_off,
        ],
        [
            "outlier-ejection",
            None,
            "off",
            "on: an address of a host that fails to connect, answers 5xx or is far slower "
            "than its siblings is left out of rotation for a back-off, then probed.",
            _on_off,
        ],
        [
            "outlier-consecutive-failures",
            None,
            _OUTLIERS.consecutive_failures,
            "Connect failures in a row (refused, timed out, TLS) that eject an address.",
            _count,
        ],
        [
            "outlier-consecutive-5xx",
            None,
            _OUTLIERS.consecutive_5xx,
            "5xx answers in a row that eject an address; 0: 5xx answers never eject.",
            _whole_id,
        ],
        [
            "outlier-latency-factor",
            None,
            _OUTLIERS.latency_factor,
            "Eject an address whose mean latency is above this many times its siblings' "
            "median; 0: latency never ejects.",
            _non_negative_number,
        ],
        [
            "outlier-latency-min-samples",
            None,
            _OUTLIERS.latency_min_samples,
            "Latencies (answers, and requests cancelled unanswered) in "
            "--outlier-latency-window an address, and each sibling it is compared "
            "with, must have.",
            _count,
        ],
        [
            "outlier-latency-floor",
            None,
            _OUTLIERS.latency_floor,
            "Seconds an address's latency must also be above its siblings' median to eject it.",
            _non_negative_seconds,
        ],
        [
            "outlier-latency-window",
            None,
            _OUTLIERS.latency_window,
            "Seconds of an address's latencies judged.",
            _seconds,
        ],
        [
            "outlier-ejection-time",
            None,
            _OUTLIERS.ejection_time,
            "Seconds of an address's first ejection; the n-th lasts n times as long.",
            _seconds,
        ],
        [
            "outlier-max-ejection-time",
            None,
            _OUTLIERS.max_ejection_time,
            "The longest ejection, in seconds.",
            _seconds,
        ],
        [
            "outlier-max-ejected-percent",
            None,
            _OUTLIERS.max_ejected_percent,
            "The most of a host's addresses out of rotation at once, in percent, rounded "
            "down (a host with one address is never ejected).",
            _percent,
        ],
        [
            "hedge-budget-percent",
            None,
            10,
            "Hedges each client may send, at most, in percent of its hedge-armed tries of "
            "the last 10 s, above --hedge-budget-min-per-second (100: no limit).",
            _percent,
        ],
        [
            "hedge-budget-min-per-second",
            None,
            10.0,
            "Hedges a second each client may always send, whatever its share of tries.",
            _non_negative_number,
        ],
        [
            "dns-min-ttl",
            None,
            DNSSettings().min_ttl,
            "Seconds a DNS answer is cached at least, whatever its TTL.",
            _seconds,
        ],
        [
            "dns-max-ttl",
            None,
            DNSSettings().max_ttl,
            "Seconds a DNS answer is cached at most, whatever its TTL.",
            _seconds,
        ],
        [
            "dns-stale-grace",
            None,
            DNSSettings().stale_grace,
            "Seconds past its TTL a DNS answer may be served while it is refreshed.",
            _non_negative_seconds,
        ],
        [
            "dns-negative-ttl",
            None,
            DNSSettings().negative_ttl,
            "Seconds a failed DNS lookup is remembered.",
            _seconds,
        ],
        [
            "api-tokens-file",
            None,
            None,
            "File of NAME=TOKEN lines: /multiplex then needs Authorization: Bearer TOKEN.",
        ],
        [
            "config",
            None,
            None,
            "TOML file of settings (see etc/octoplex.toml); options given here win over it.",
        ],
        ["tls-cert", None, None, "PEM certificate (intermediates may follow) for --listen-tls."],
        ["tls-key", None, None, "PEM private key of --tls-cert."],
        ["tls-chain", None, None, "PEM intermediate certificates for --listen-tls."],
        [
            "tls-client-ca",
            None,
            None,
            "PEM CA certificates: --listen-tls then requires a client certificate they signed.",
        ],
        [
            "upstream-ca",
            None,
            None,
            "PEM CA certificates to trust for https upstreams, instead of the system's.",
        ],
        ["upstream-client-cert", None, None, "PEM client certificate for https upstreams."],
        ["upstream-client-key", None, None, "PEM private key of --upstream-client-cert."],
        [
            "egress-ports",
            None,
            "any",
            "Upstream ports that may be dialled, e.g. 80,443,8000-8999; any for all.",
        ],
        [
            "egress-own-addresses",
            None,
            "deny",
            "deny: refuse upstream connections to this host's own interface addresses "
            "(read at start-up and on reload); allow: let them through.",
            _deny_or_allow,
        ],
        [
            "metrics-listen",
            None,
            None,
            "Serve /metrics and /stats, with no token, only on this endpoint "
            "(e.g. tcp:9100:interface=127.0.0.1) and not on --listen.",
        ],
        [
            "workers",
            None,
            "auto",
            "Processes serving the listeners (SO_REUSEPORT); above 1, this one "
            "supervises them and serves nothing itself. auto: one per usable CPU "
            "(affinity and cgroup CPU quota), or 1 where a listener is not tcp:.",
            _workers,
        ],
        [
            "worker-id",
            None,
            None,
            "Internal: set by the master on each worker it spawns.",
            _whole_id,
        ],
    ]

    def __init__(
        self, read_addresses: Callable[[], list[tuple[str, str]]] = read_own_addresses
    ) -> None:
        super().__init__()
        # A method option's help is its docstring, whose line breaks and
        # indentation usage.Options keeps: one space between words instead.
        for name, doc in self.docs.items():
            if doc:
                self.docs[name] = " ".join(doc.split())
        #: Reads this host's interface addresses (address, interface name)
        #: for the egress policy; a reload reads them again.
        self.read_addresses = read_addresses
        self["listen"] = []
        self["listen-tls"] = []
        self["grpc-listen"] = []
        self["grpc-listen-tls"] = []
        self["api-token"] = []
        for option in ("allow-egress", "deny-egress", "allow-egress-host", "deny-egress-host"):
            self[option] = []
        self["dns-server"] = []
        #: The options given on the command line, which win over the file.
        self.given: set[str] = set()
        #: The command line, for a reload to parse again.
        self.argv: list[str] = []
        #: Set when the options are read again for a reload, which opens no
        #: log file.
        self.reloading = False
        #: The options set by the config file, and where.
        self.from_file: dict[str, str] = {}
        for name, handler in list(self._dispatch.items()):
            self._dispatch[name] = self._recording(handler)

    def _recording(self, handler: Any) -> Any:
        if isinstance(handler, usage.CoerceParameter):
            dispatch = handler.dispatch

            def record(name: str, value: Any) -> None:
                self.given.add(name)
                dispatch(name, value)

            handler.dispatch = record  # type: ignore[method-assign]
            return handler

        def call(name: str, value: Any = None) -> Any:
            self.given.add(name)
            return handler(name, value)

        return call

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def _read_config(self) -> None:
        """
        Apply the ``--config`` file's keys whose options the command line
        did not give.
        """
        path = self["config"]
        if path is None:
            return
        for key, value in read_config(path, lambda option: option in self._dispatch):
            if key.option in self.given:
                continue
            where = f"config file {path}: [{key.section}] {key.name}"
            self.from_file[key.option] = where
            handler = self._dispatch[key.option]
            try:
                if isinstance(handler, usage.CoerceParameter):
                    handler.dispatch(key.option, str(value))
                    self.given.discard(key.option)
                else:
                    self[key.option] = []
                    for item in value:
                        handler(key.option, item)
                    self.given.discard(key.option)
            except (usage.UsageError, ValueError) as e:
                message = str(e).removeprefix("Parameter type enforcement failed: ")
                raise ConfigError(f"{where} = {value!r}: {message}") from None

    def _located(self, message: str) -> str:
        """
        ``message``, about an option, with the option named as the config
        file's key where the file set it.
        """
        for option, where in self.from_file.items():
            prefix = f"--{option} "
            if message.startswith(prefix):
                return f"{where}: {message[len(prefix) :]}"
        return message

    def given_text(self, leave_out: tuple[str, ...] = ("listen",)) -> str:
        """
        The settings given on the command line or in the config file, as a
        text log line shows them: ``--name value`` each, tokens left out.
        """
        shown: list[str] = []
        for name, value in self.effective().items():
            if name in leave_out or (name not in self.given and name not in self.from_file):
                continue
            values = value if isinstance(value, list) else [value]
            shown.extend(f"--{name} {item}" for item in values)
        if not shown:
            return "every setting at its default"
        return "settings given: " + " ".join(shown) + "; the rest at their defaults"

    def effective(self) -> dict[str, Any]:
        """
        The settings in force, by option, with every token left out.
        """
        shown: dict[str, Any] = {}
        for name in sorted(self._dispatch):
            if name in ("help", "version") or name not in self:
                continue
            value = self[name]
            if name == "api-token":
                value = [entry.split("=", 1)[0] + "=<redacted>" for entry in value]
            shown[name] = value
        return shown

    def opt_listen(self, description: str) -> None:
        """
        Listen on this Twisted endpoint (tcp:8080:backlog=1024, ssl:8443:...); repeatable.
        [default: tcp:8080:backlog=1024]
        """
        self["listen"].append(description)

    def opt_listen_tls(self, description: str) -> None:
        """
        Listen with TLS (--tls-cert, --tls-key) on this endpoint, e.g. tcp:8443; repeatable.
        """
        self["listen-tls"].append(description)

    def opt_grpc_listen(self, address: str) -> None:
        """
        Serve the gRPC API (octoplex.v1.Multiplexer, health, reflection) on
        HOST:PORT, e.g. 127.0.0.1:50051; repeatable.  Needs twistd
        --reactor=asyncio.
        """
        self["grpc-listen"].append(address)

    def opt_grpc_listen_tls(self, address: str) -> None:
        """
        Serve the gRPC API with TLS (--tls-cert, --tls-key, and client
        certificates if --tls-client-ca) on HOST:PORT; repeatable.
        """
        self["grpc-listen-tls"].append(address)

    def opt_api_token(self, entry: str) -> None:
        """
        NAME=TOKEN: require this bearer token on /multiplex; repeatable (a file keeps it out of ps).
        """
        self["api-token"].append(entry)

    def opt_dns_server(self, server: str) -> None:
        """
        Ask this name server (IP, IP:PORT or [IPv6]:PORT) instead of those of
        /etc/resolv.conf; repeatable.
        """
        try:
            self["dns-server"].append(parse_nameserver(server))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def opt_allow_egress(self, cidr: str) -> None:
        """
        Let upstream connections reach this CIDR, though blocked by default
        (e.g. 127.0.0.0/8 for local upstreams); repeatable.
        """
        self["allow-egress"].append(cidr)

    def opt_deny_egress(self, cidr: str) -> None:
        """
        Never let upstream connections reach this CIDR; beats any allow; repeatable.
        """
        self["deny-egress"].append(cidr)

    def opt_allow_egress_host(self, pattern: str) -> None:
        """
        Let upstream connections reach this host name (or *.domain), whatever
        its address, unless denied; repeatable.
        """
        self["allow-egress-host"].append(pattern)

    def opt_deny_egress_host(self, pattern: str) -> None:
        """
        Never connect to this host name (or *.domain); repeatable.
        """
        self["deny-egress-host"].append(pattern)

    def opt_version(self) -> None:
        """
        Print Octoplex's version and exit.
        """
        print(f"octoplex {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self._read_config()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if not self["listen"] and not self["listen-tls"]:
            self["listen"] = [DEFAULT_LISTEN]
        from twisted.internet import reactor

        metrics_listen = [] if self["metrics-listen"] is None else [self["metrics-listen"]]
        for option, descriptions in (
            ("listen", self["listen"]),
            ("listen-tls", self["listen-tls"]),
            ("metrics-listen", metrics_listen),
        ):
            for description in descriptions:
                try:
                    serverFromString(reactor, description)
                except Exception as e:
                    raise usage.UsageError(
                        self._located(f"--{option} {description!r} is not usable: {e}")
                    ) from None
        self._check_grpc(reactor)
        self._check_workers()
        try:
            self._load_tls()
            self["tokens"] = load_tokens(self["api-token"], self["api-tokens-file"])
            self["egress"] = EgressPolicy.from_strings(
                allow=self["allow-egress"],
                deny=self["deny-egress"],
                allow_hosts=self["allow-egress-host"],
                deny_hosts=self["deny-egress-host"],
                ports=self["egress-ports"],
                own_addresses=(
                    self.read_addresses() if self["egress-own-addresses"] == "deny" else ()
                ),
            )
        except (TLSConfigError, TokenError, ValueError) as e:
            raise usage.UsageError(self._located(str(e))) from None
        if not self.reloading:
            self.open_logs()

    def _check_grpc(self, reactor: Any) -> None:
        """
        Check the gRPC listeners' addresses, and that the reactor can host
        them.
        """
        addresses = [
            (option, address)
            for option in ("grpc-listen", "grpc-listen-tls")
            for address in self[option]
        ]
        if not addresses:
            return
        try:
            # Only here: grpcio is an extra, which a daemon without a gRPC
            # listener does not need.
            from octoplex.grpc_server import check_reactor, split_address
        except ImportError as e:
            raise usage.UsageError(
                f"--{addresses[0][0]} needs the grpc extra (pip install 'octoplex[grpc]'): {e}"
            ) from None
        for option, address in addresses:
            try:
                split_address(address)
            except ValueError as e:
                raise usage.UsageError(self._located(f"--{option} {e}")) from None
        try:
            check_reactor(reactor)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    @property
    def is_master(self) -> bool:
        """
        Whether this process supervises workers rather than serving.
        """
        return self["workers"] > 1 and self["worker-id"] is None

    def _unshareable(self) -> list[tuple[str, str]]:
        """
        The listeners that several processes cannot share, by option.
        """
        from twisted.internet import reactor

        return [
            (option, description)
            for option in ("listen", "listen-tls")
            for description in self[option]
            if not isinstance(
                serverFromString(reactor, description), (TCP4ServerEndpoint, TCP6ServerEndpoint)
            )
        ]

    def _check_workers(self) -> None:
        """
        Settle ``--workers auto``, check that the listeners can be shared by
        several processes, and give a worker its own log files.
        """
        if self["workers"] == "auto":
            self["workers"] = 1 if self._unshareable() else usable_cpus()
        if self["workers"] == 1 and self["worker-id"] is None:
            return
        for option, description in self._unshareable():
            raise usage.UsageError(
                self._located(
                    f"--{option} {description!r} cannot be shared by --workers "
                    f"{self['workers']}: only plain tcp: listeners can (SO_REUSEPORT)"
                )
            )
        if self.is_master:
            # The master serves no batch: the workers write the access log.
            self["access-log"] = None
        else:
            for option in ("log-file", "access-log"):
                if self[option] is not None:
                    self[option] = f"{self[option]}.worker-{self['worker-id']}"

    def _load_tls(self) -> None:
        """
        Read every TLS file now, so that a bad one stops start-up with its
        name rather than failing the first handshake.
        """
        serving = self["listen-tls"]
        grpc_serving = self["grpc-listen-tls"]
        for option in ("tls-cert", "tls-key", "tls-chain", "tls-client-ca"):
            if self[option] is not None and not (serving or grpc_serving):
                raise usage.UsageError(
                    f"--{option} applies to --listen-tls and --grpc-listen-tls, "
                    "neither of which is given"
                )
        self["tls-options"] = self["grpc-tls"] = None
        for option, given in (("listen-tls", serving), ("grpc-listen-tls", grpc_serving)):
            if given and (self["tls-cert"] is None or self["tls-key"] is None):
                raise usage.UsageError(f"--{option} needs --tls-cert and --tls-key")
        files = (self["tls-cert"], self["tls-key"], self["tls-chain"], self["tls-client-ca"])
        if serving:
            self["tls-options"] = server_options(*files)
        if grpc_serving:
            self["grpc-tls"] = server_pem(*files)
        if self["max-batch-size"] > self["max-requests-in-flight"]:
            raise usage.UsageError(
                f"--max-batch-size {self['max-batch-size']} is above --max-requests-in-flight "
                f"{self['max-requests-in-flight']}: a full batch could never run"
            )
        if self["max-batch-size"] > self["max-client-requests-in-flight"]:
            raise usage.UsageError(
                f"--max-batch-size {self['max-batch-size']} is above "
                f"--max-client-requests-in-flight {self['max-client-requests-in-flight']}: "
                "a full batch could never run"
            )
        if self["circuit-cooldown"] > self["circuit-max-cooldown"]:
            raise usage.UsageError(
                f"--circuit-cooldown {self['circuit-cooldown']} is above "
                f"--circuit-max-cooldown {self['circuit-max-cooldown']}"
            )
        if self["outlier-ejection-time"] > self["outlier-max-ejection-time"]:
            raise usage.UsageError(
                f"--outlier-ejection-time {self['outlier-ejection-time']} is above "
                f"--outlier-max-ejection-time {self['outlier-max-ejection-time']}"
            )
        if self["dns-min-ttl"] > self["dns-max-ttl"]:
            raise usage.UsageError(
                f"--dns-min-ttl {self['dns-min-ttl']} is above --dns-max-ttl {self['dns-max-ttl']}"
            )
        cert, key = self["upstream-client-cert"], self["upstream-client-key"]
        if (cert is None) != (key is None):
            raise usage.UsageError("--upstream-client-cert and --upstream-client-key go together")
        self["upstream-tls"] = UpstreamTLSPolicy(
            load_trust_root(self["upstream-ca"]),
            None if cert is None else load_client_certificate(cert, key),
        )


class _Octoplex(MultiService):
    """
    The daemon's root service: it installs the caching resolver on the
    reactor, announces the daemon once it listens, and stops it gracefully.

    Stopping (SIGTERM, or SIGINT) drains: ``/readyz`` turns ``503``; after
    ``drain_delay`` seconds, in which batches are still taken while load
    balancers notice, new batches are refused and the listeners close; the
    batches in flight are answered by their own deadlines (and at the
    latest after ``drain_timeout`` seconds); only then are the pooled
    connections closed.  A SIGTERM then ends the process with status 0, where twistd
    would re-raise the signal.
    """

    #: Set by :func:`makeService`.
    options: Options
    app: OctoplexApp
    site: OctoplexSite
    admission: Admission
    client: UpstreamClient
    #: The gRPC listener (octoplex.grpc_server.GRPCListener), if any.
    grpc: Any = None
    #: The process's budget of buffered bytes (a reload sets its limit).
    buffers: BufferBudget | None = None
    drain_timeout: float = 30.0
    drain_delay: float = 0.0
    logs: Logs | None = None
    #: Whether this process is a worker of a master (--workers).
    worker = False

    log = Logger()

    def __init__(
        self,
        listen: list[str],
        limits: Limits,
        reactor: Any,
        resolver: CachingResolver,
        upstream_connections: int,
    ) -> None:
        super().__init__()
        self._listen = listen
        self._limits = limits
        self._upstream_connections = upstream_connections
        self._reactor = reactor
        self._resolver = resolver
        self._previous_resolver: Any = None
        self._previous_sigterm: Any = None
        self._previous_sighup: Any = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd hands the service to its Application here, before its log
        # starts: Octoplex's observer becomes twistd's (see octoplex.logs).
        if self.logs is not None:
            self.logs.attach(parent)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            # A daemon that cannot take its port must not run on without it;
            # say so in one line rather than a traceback.
            address = f"{e.interface or '*'}:{e.port}"
            raise SystemExit(f"octoplex: cannot listen on {address}: {e.socketError}") from None

    def startService(self) -> None:
        if self.logs is not None:
            self.logs.start(self._reactor)
        # After the reactor has installed its own handlers.
        self._reactor.callWhenRunning(self._take_sigterm)
        if self.worker and stat.S_ISFIFO(os.fstat(0).st_mode):
            # The master's pipe: when it closes, the master is gone.
            self._reactor.addReader(ParentWatch(self._reactor, self._orphaned))
        self._raise_file_limit()
        if self._previous_resolver is None:
            self._previous_resolver = self._reactor.installNameResolver(self._resolver)
        super().startService()
        self._reactor.callWhenRunning(self._freeze_heap)
        if self.worker:
            tell_master_ready()
        self.log.info(
            "octoplex {version} listening on {listen}; {settings}",
            version=__version__,
            listen=self._listen,
            settings=self.options.given_text(),
            limits=self._limits,
            config_file=self.options["config"],
            # Every setting in force, tokens left out.
            configuration=self.options.effective(),
        )

    def _freeze_heap(self) -> None:
        """
        Move every object alive once the daemon has started (its modules,
        classes and services, some 60,000) out of the cyclic garbage
        collector's reach.  A full collection otherwise walks them all, some
        30 ms during which no deadline fires; refcounting still frees what
        it can, and what is frozen lives as long as the daemon anyway.
        """
        if not self.running:
            return
        gc.collect()
        gc.freeze()
        self.log.info(
            "heap frozen: {frozen} objects left out of garbage collection",
            frozen=gc.get_freeze_count(),
        )

    def _raise_file_limit(self) -> None:
        """
        Raise the soft limit on open files to the hard one, as servers do:
        every inbound and upstream connection is a file, and the usual soft
        limit of 1024 is below the default connection caps.
        """
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (ValueError, OSError) as e:
                self.log.warn(
                    "could not raise the open-file limit above {soft}: {e}", soft=soft, e=e
                )
        needed = self._limits.max_connections + self._upstream_connections + 64
        if soft != resource.RLIM_INFINITY and soft < needed:
            self.log.warn(
                "the open-file limit is {soft}, below the {needed} that --max-connections and "
                "--pool-max-total may need; raise it (ulimit -n, LimitNOFILE=) or lower them",
                soft=soft,
                needed=needed,
            )

    def _take_sigterm(self) -> None:
        if not self.running or threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._sigterm)
        self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)

    def _sighup(self, number: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        Read the ``--config`` file (and the command line) again, and apply
        what can change safely: limits, tokens, the egress policy, circuit
        breaking, outlier ejection, the log level and the drain settings.
        Other changed settings are logged as needing a restart.  A file that
        does not check out changes nothing.
        """
        path = self.options["config"]
        if path is None:
            self.log.warn("SIGHUP: there is no --config file to reload")
            return
        fresh = Options(self.options.read_addresses)
        fresh.reloading = True
        try:
            fresh.parseOptions(self.options.argv)
        except (usage.UsageError, SystemExit) as e:
            self.log.error(
                "reload of {path} failed; the running configuration stays: {error}",
                path=path,
                error=str(e),
            )
            return
        running, wanted = self.options.effective(), fresh.effective()
        changed = sorted(k for k in wanted if wanted[k] != running.get(k))
        applied = [k for k in changed if k in RELOADABLE]
        restart = [k for k in changed if k not in RELOADABLE]
        for key in applied:
            self.options[key] = fresh[key]
        self.options["tokens"], self.options["egress"] = fresh["tokens"], fresh["egress"]
        self._apply(fresh)
        self.log.info(
            "configuration reloaded from {path}: applied {applied}; "
            "changed but needing a restart: {restart}",
            path=path,
            applied=applied,
            restart=restart,
        )

    def _apply(self, options: Options) -> None:
        limits = limits_of(options)
        self._limits = self.app.limits = self.site.limits = self.admission.limits = limits
        self.app.tokens = options["tokens"]
        if self.grpc is not None:
            self.grpc.servicer.tokens = options["tokens"]
        self.app.multiplexer.max_batch_response_bytes = limits.max_batch_response_bytes
        self.app.multiplexer.hedge_budgets.configure(
            options["hedge-budget-percent"], options["hedge-budget-min-per-second"]
        )
        if self.buffers is not None:
            self.buffers.limit = limits.max_buffered_bytes
        self.client.reconfigure(
            limits.max_response_bytes,
            limits.max_header_count,
            limits.max_header_bytes,
            options["egress"],
            circuits_of(options),
            outliers_of(options),
        )
        self.drain_timeout, self.drain_delay = options["drain-timeout"], options["drain-delay"]
        if self.logs is not None:
            self.logs.set_level(options["log-level"])

    def _orphaned(self) -> None:
        if self.running:
            self.log.warn("the master process is gone: stopping")
            stop_reactor(self._reactor)

    def _sigterm(self, number: int, frame: Any) -> None:
        # As the reactor's handler does, less the note that makes twistd
        # re-raise the signal: a drained stop is a clean exit.
        self._reactor.callFromThread(stop_reactor, self._reactor)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        in_flight = self.app.batches_in_flight
        self.log.info(
            "octoplex {version} stopping: draining {in_flight} batches in flight "
            "(at most {drain_timeout:g} s)",
            version=__version__,
            in_flight=in_flight,
            drain_timeout=self.drain_timeout,
        )
        self.admission.ready = False
        if self.grpc is not None:
            await self.grpc.serving(False)
        if self.drain_delay:
            await deferLater(self._reactor, self.drain_delay, lambda: None)
        self.admission.draining = True
        listeners = [service for service in self if service is not self.client]
        await DeferredList([maybeDeferred(s.stopService) for s in listeners])
        started = self._reactor.seconds()
        await self.app.multiplexer.drain(self.drain_timeout)
        await self.site.close_connections(CLOSE_GRACE)
        if self.grpc is not None and self.grpc.stopped is not None:
            await self.grpc.stopped
        await self.client.stopService()
        if self._previous_resolver is not None:
            self._reactor.installNameResolver(self._previous_resolver)
            self._previous_resolver = None
        if self._previous_sigterm is not None and not self.worker:
            # A worker keeps its handler to the end: a second SIGTERM (the
            # master's, after systemd's to the whole group) must not make
            # twistd re-raise it.
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sigterm = None
        # Give the heap back to the collector (a process that runs on, as a
        # test does, collects its garbage again).
        gc.unfreeze()
        self.log.info(
            "octoplex {version} stopped: {in_flight} batches drained in {drained_ms} ms",
            version=__version__,
            in_flight=in_flight,
            drained_ms=int((self._reactor.seconds() - started) * 1000),
        )
        if self.logs is not None:
            self.logs.stop()


def _listener(description: str, factory: Any, reactor: Any, share: bool) -> Service:
    """
    The service listening on ``description``; with ``share``, a TCP port
    bound with ``SO_REUSEPORT``, which the other workers bind too.
    """
    if not share:
        return strports.service(description, factory, reactor=reactor)
    endpoint: Any = serverFromString(reactor, description)
    endpoint._port = makeBinding(
        endpoint._interface, endpoint._port, reuseAddress=True, reusePort=True
    )
    service = StreamServerEndpointService(endpoint, factory)
    service._raiseSynchronously = True
    return service


def limits_of(options: Options) -> Limits:
    """
    The limits ``options`` set.
    """
    return Limits(
        max_batch_size=options["max-batch-size"],
        max_timeout_msec=options["max-timeout-msec"],
        max_request_bytes=options["max-request-bytes"],
        max_response_bytes=options["max-response-bytes"],
        max_batches_in_flight=options["max-batches-in-flight"],
        max_requests_in_flight=options["max-requests-in-flight"],
        max_client_batches_in_flight=options["max-client-batches-in-flight"],
        max_client_requests_in_flight=options["max-client-requests-in-flight"],
        max_batch_response_bytes=options["max-batch-response-bytes"],
        max_header_count=options["max-header-count"],
        max_header_bytes=options["max-header-bytes"],
        max_connections=options["max-connections"],
        header_timeout=options["header-timeout"],
        body_timeout=options["body-timeout"],
        idle_timeout=options["idle-timeout"],
        max_buffered_bytes=options["max-buffered-bytes"],
        send_timeout=options["send-timeout"],
    )


def circuits_of(options: Options) -> CircuitSettings:
    """
    The circuit breaking settings ``options`` set.
    """
    return CircuitSettings(
        enabled=options["circuit-breaking"] == "on",
        failure_ratio=options["circuit-failure-ratio"],
        min_requests=options["circuit-min-requests"],
        window=options["circuit-window"],
        cooldown=options["circuit-cooldown"],
        max_cooldown=options["circuit-max-cooldown"],
        probes=options["circuit-probes"],
        count_5xx=options["circuit-count-5xx"] == "on",
    )


def outliers_of(options: Options) -> OutlierSettings:
    """
    The outlier ejection settings ``options`` set.
    """
    return OutlierSettings(
        enabled=options["outlier-ejection"] == "on",
        consecutive_failures=options["outlier-consecutive-failures"],
        consecutive_5xx=options["outlier-consecutive-5xx"],
        latency_factor=options["outlier-latency-factor"],
        latency_min_samples=options["outlier-latency-min-samples"],
        latency_floor=options["outlier-latency-floor"],
        latency_window=options["outlier-latency-window"],
        ejection_time=options["outlier-ejection-time"],
        max_ejection_time=options["outlier-max-ejection-time"],
        max_ejected_percent=options["outlier-max-ejected-percent"],
    )


def makeService(options: Options, reactor: Any | None = None) -> IService:
    """
    Build the daemon: the upstream client, the multiplexer, the app and its
    listeners.

    :param options: the parsed command line.
    :param reactor: the reactor; the global one by default.
    :return: the root service.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if options.is_master:
        master = Master(options, reactor, options["workers"])
        master.logs = options.get("logs")
        return master
    limits = limits_of(options)
    # One registry per daemon, never prometheus_client's global one; so
    # the process's own statistics (memory, start time) are added to it.
    metrics = Metrics()
    metrics.watch_process()
    pool = PoolSettings(
        max_idle_per_host=options["pool-max-idle-per-host"],
        idle_timeout=options["pool-idle-timeout"],
        connect_timeout=options["connect-timeout"],
        max_per_host=options["pool-max-per-host"],
        max_total=options["pool-max-total"],
        max_requests=options["pool-max-requests"],
        max_age=options["pool-max-age"],
        connect_grace=options["pool-connect-grace"],
    )
    resolver = CachingResolver(
        reactor,
        names_client.Resolver(servers=options["dns-server"] or nameservers(), reactor=reactor),
        DNSSettings(
            min_ttl=options["dns-min-ttl"],
            max_ttl=options["dns-max-ttl"],
            negative_ttl=options["dns-negative-ttl"],
            stale_grace=options["dns-stale-grace"],
        ),
        metrics=metrics,
    )
    root = _Octoplex(
        options["listen"] + options["listen-tls"], limits, reactor, resolver, pool.max_total
    )
    root.logs = options.get("logs")
    client = UpstreamClient(
        reactor,
        pool,
        limits.max_response_bytes,
        options["upstream-tls"],
        resolver,
        options["egress"],
        limits.max_header_count,
        limits.max_header_bytes,
        metrics,
        circuits_of(options),
        outliers_of(options),
    )
    client.setServiceParent(root)
    buffers = BufferBudget(limits.max_buffered_bytes)
    metrics.watch_buffers(lambda: buffers.used, lambda: buffers.limit)
    # Large bodies and answers go back to the system as soon as freed,
    # the rest once a burst is over.
    return_large_blocks()
    MemoryReturner(reactor, buffers).setServiceParent(root)
    hedge_budgets = HedgeBudgets(
        reactor, options["hedge-budget-percent"], options["hedge-budget-min-per-second"]
    )
    multiplexer = Multiplexer(
        reactor,
        client,
        limits.max_batch_response_bytes,
        metrics,
        buffers=buffers,
        hedge_budgets=hedge_budgets,
    )
    metrics_listen = options["metrics-listen"]
    admission = Admission(limits, metrics)
    app = OctoplexApp(
        multiplexer,
        limits,
        reactor,
        options["tokens"],
        metrics,
        metrics_routes=not metrics_listen,
        admission=admission,
    )
    root.drain_timeout, root.drain_delay = options["drain-timeout"], options["drain-delay"]
    site = OctoplexSite(app, reactor, buffers)
    root.app, root.client, root.site, root.options = app, client, site, options
    root.buffers = buffers
    root.admission = admission
    worker = options["worker-id"]
    if worker is not None:
        app.worker = f"{worker}:{os.getpid()}"
        root.worker = True
    for description in options["listen"]:
        _listener(description, site, reactor, worker is not None).setServiceParent(root)
    for description in options["listen-tls"]:
        secure = TLSMemoryBIOFactory(options["tls-options"], False, site)
        _listener(description, secure, reactor, worker is not None).setServiceParent(root)
    if metrics_listen:
        metrics_site = MetricsSite(metrics, reactor)
        strports.service(metrics_listen, metrics_site, reactor=reactor).setServiceParent(root)
    if options["grpc-listen"] or options["grpc-listen-tls"]:
        root.grpc = _grpc_listener(options, multiplexer, admission, reactor, metrics, limits)
        root.grpc.setServiceParent(root)
    return root


def _grpc_listener(
    options: Options,
    multiplexer: Multiplexer,
    admission: Admission,
    reactor: Any,
    metrics: Metrics,
    limits: Limits,
) -> Any:
    """
    The gRPC listener, on the same multiplexer and admission as the HTTP
    listeners.
    """
    from octoplex.grpc_server import (
        GRPCListener,
        MultiplexerServicer,
        check_reactor,
        credentials,
    )

    check_reactor(reactor)
    servicer = MultiplexerServicer(multiplexer, admission, reactor, options["tokens"], metrics)
    tls = None if options["grpc-tls"] is None else credentials(options["grpc-tls"])
    addresses: list[tuple[str, Any]] = [(address, None) for address in options["grpc-listen"]]
    addresses += [(address, tls) for address in options["grpc-listen-tls"]]
    return GRPCListener(
        servicer,
        addresses,
        limits,
        reuse_port=options["worker-id"] is not None,
        # The calls in flight are drained with the HTTP batches; this is
        # only the bound past which grpc cancels what is left.
        grace=options["drain-timeout"] + options["drain-delay"] + CLOSE_GRACE,
    )
