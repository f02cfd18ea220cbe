"""
The configuration file: TOML (``--config PATH``), read with the standard
library's ``tomllib``, every key one command-line option.

:func:`read_config` checks the whole file before anything is applied: an
unknown section or key, a value of the wrong type, or one its option
refuses stops start-up (or a reload) with a message that names the file,
the key and the value.  A command-line option always wins over its key.

``etc/octoplex.toml`` documents every key.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import attr

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["KEYS", "RELOADABLE", "ConfigError", "Key", "read_config"]


class ConfigError(ValueError):
    """
    The configuration file cannot be used; the message says where and why.
    """


@attr.s(frozen=True, auto_attribs=True)
class Key:
    """
    One key of the file.

    :ivar section: its table, e.g. ``limits``.
    :ivar name: its name in the table, e.g. ``max_batch_size``.
    :ivar option: the command-line option it stands for.
    :ivar kind: what TOML value it takes: ``int``, ``number``, ``string``,
        ``strings`` (an array of strings) or ``workers`` (a whole number or
        ``"auto"``).
    """

    section: str
    name: str
    option: str
    kind: str


def _keys(section: str, kind: str, *pairs: str) -> list[Key]:
    # Pairs of key name and option name.
    return [Key(section, pairs[i], pairs[i + 1], kind) for i in range(0, len(pairs), 2)]


#: Every key, by the option it stands for.
KEYS: tuple[Key, ...] = tuple(
    [
        *_keys("server", "strings", "listen", "listen"),
        *_keys("server", "workers", "workers", "workers"),
        *_keys("server", "number", "drain_delay", "drain-delay", "drain_timeout", "drain-timeout"),
        *_keys("auth", "string", "tokens_file", "api-tokens-file"),
        *_keys("tls", "strings", "listen", "listen-tls"),
        *_keys(
            "tls", "string", "cert", "tls-cert", "key", "tls-key", "chain", "tls-chain",
            "client_ca", "tls-client-ca",
        ),
        *_keys(
            "upstream_tls", "string", "ca", "upstream-ca", "client_cert", "upstream-client-cert",
            "client_key", "upstream-client-key",
        ),
        *_keys("dns", "strings", "servers", "dns-server"),
        *_keys(
            "dns", "number", "min_ttl", "dns-min-ttl", "max_ttl", "dns-max-ttl",
            "stale_grace", "dns-stale-grace", "negative_ttl", "dns-negative-ttl",
        ),
        *_keys(
            "limits", "int",
            "max_batch_size", "max-batch-size",
            "max_timeout_msec", "max-timeout-msec",
            "max_request_bytes", "max-request-bytes",
            "max_response_bytes", "max-response-bytes",
            "max_batches_in_flight", "max-batches-in-flight",
            "max_requests_in_flight", "max-requests-in-flight",
            "max_client_batches_in_flight", "max-client-batches-in-flight",
            "max_client_requests_in_flight", "max-client-requests-in-flight",
            "max_batch_response_bytes", "max-batch-response-bytes",
            "max_header_count", "max-header-count",
            "max_header_bytes", "max-header-bytes",
            "max_connections", "max-connections",
            "max_buffered_bytes", "max-buffered-bytes",
        ),
        *_keys(
            "limits", "number", "header_timeout", "header-timeout", "body_timeout",
            "body-timeout", "idle_timeout", "idle-timeout", "send_timeout", "send-timeout",
        ),
        *_keys(
            "egress", "strings", "allow", "allow-egress", "deny", "deny-egress",
            "allow_hosts", "allow-egress-host", "deny_hosts", "deny-egress-host",
        ),
        *_keys(
            "egress", "string", "ports", "egress-ports",
            "own_addresses", "egress-own-addresses",
        ),
        *_keys(
            "pool", "int", "max_idle_per_host", "pool-max-idle-per-host",
            "max_per_host", "pool-max-per-host", "max_total", "pool-max-total",
            "max_requests", "pool-max-requests",
        ),
        *_keys(
            "pool", "number", "idle_timeout", "pool-idle-timeout", "max_age", "pool-max-age",
            "connect_grace", "pool-connect-grace", "connect_timeout", "connect-timeout",
        ),
        *_keys(
            "logging", "string", "file", "log-file", "format", "log-format",
            "access_log", "access-log", "level", "log-level",
        ),
        *_keys("logging", "int", "max_bytes", "log-max-bytes", "keep", "log-keep"),
        *_keys(
            "circuit", "string", "breaking", "circuit-breaking", "count_5xx", "circuit-count-5xx",
        ),
        *_keys(
            "circuit", "number", "failure_ratio", "circuit-failure-ratio",
            "window", "circuit-window", "cooldown", "circuit-cooldown",
            "max_cooldown", "circuit-max-cooldown",
        ),
        *_keys(
            "circuit", "int", "min_requests", "circuit-min-requests", "probes", "circuit-probes",
        ),
        *_keys(
            "outlier", "string", "ejection", "outlier-ejection",
        ),
        *_keys(
            "outlier", "int",
            "consecutive_failures", "outlier-consecutive-failures",
            "consecutive_5xx", "outlier-consecutive-5xx",
            "latency_min_samples", "outlier-latency-min-samples",
            "max_ejected_percent", "outlier-max-ejected-percent",
        ),
        *_keys(
            "outlier", "number",
            "latency_factor", "outlier-latency-factor",
            "latency_floor", "outlier-latency-floor",
            "latency_window", "outlier-latency-window",
            "ejection_time", "outlier-ejection-time",
            "max_ejection_time", "outlier-max-ejection-time",
        ),
        *_keys("hedge", "int", "budget_percent", "hedge-budget-percent"),
        *_keys("hedge", "number", "budget_min_per_second", "hedge-budget-min-per-second"),
        *_keys("metrics", "string", "listen", "metrics-listen"),
        *_keys("grpc", "strings", "listen", "grpc-listen", "listen_tls", "grpc-listen-tls"),
    ]
)  # fmt: skip

#: The options a SIGHUP reload applies; any other that changed needs a
#: restart.
RELOADABLE = frozenset(
    {
        "api-tokens-file",
        "allow-egress",
        "deny-egress",
        "allow-egress-host",
        "deny-egress-host",
        "egress-ports",
        "egress-own-addresses",
        "log-level",
        "drain-delay",
        "drain-timeout",
        *(key.option for key in KEYS if key.section in ("limits", "circuit", "outlier", "hedge")),
    }
)

_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("a whole number", lambda v: type(v) is int),
    "workers": ('a whole number or "auto"', lambda v: type(v) is int or v == "auto"),
    "number": ("a number", lambda v: type(v) in (int, float)),
    "string": ("a string", lambda v: isinstance(v, str)),
    "strings": ("an array of strings", lambda v: isinstance(v, list)
                and all(isinstance(i, str) for i in v)),
}  # fmt: skip


def read_config(path: str, known: Callable[[str], bool]) -> Iterator[tuple[Key, Any]]:
    """
    Read and check the file at ``path``.

    :param known: whether this build has an option (a key whose option it
        lacks is unknown).
    :raises ConfigError: naming the file and the key, on the first problem.
    :return: every key set, with its value.
    """
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    by_place = {(k.section, k.name): k for k in KEYS if known(k.option)}
    sections = {k.section for k in by_place.values()}
    found = []
    for section, table in document.items():
        if section not in sections:
            raise ConfigError(
                f"config file {path}: unknown section [{section}]; "
                f"expected one of {', '.join(sorted(sections))}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: {section} must be a table ([{section}])")
        for name, value in table.items():
            key = by_place.get((section, name))
            if key is None:
                names = sorted(k.name for k in by_place.values() if k.section == section)
                raise ConfigError(
                    f"config file {path}: unknown key {name!r} in [{section}]; "
                    f"expected one of {', '.join(names)}"
                )
            what, check = _KINDS[key.kind]
            if not check(value):
                raise ConfigError(
                    f"config file {path}: [{section}] {name} must be {what}, got {value!r}"
                )
            found.append((key, value))
    return iter(found)
