"""
The configuration file: every key an option, the command line winning,
every kind of mistake stopping start-up with the file and the key named,
and SIGHUP applying what can change safely.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.python import usage

from octoplex.config import KEYS, RELOADABLE
from octoplex.egress import EgressPolicy
from octoplex.tap import Options, makeService

from .servers import Caller, start_upstream
from .test_twistd import (
    EXIT_TIMEOUT,
    environment,
    free_port,
    sleep,
    stop,
    twistd,
    wait_for_exit,
    wait_until_healthy,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "etc" / "octoplex.toml"


def parse(*argv: str) -> Options:
    # No own interface addresses: the egress policies compared are plain.
    options = Options(list)
    options.parseOptions(list(argv))
    return options


def test_every_option_has_a_key() -> None:
    """Each setting of the command line can be set in the file too."""
    options = set(Options()._dispatch) - {"help", "version", "config", "api-token", "worker-id"}
    assert options == {key.option for key in KEYS}
    assert options >= RELOADABLE


def test_the_sample_is_valid_and_holds_the_defaults() -> None:
    """etc/octoplex.toml parses, sets every key it shows, and each is the default but listen."""
    from_sample = parse("--config", str(SAMPLE))
    defaults = parse()
    assert from_sample["listen"] == ["tcp:8080:interface=127.0.0.1:backlog=1024"]
    sample, plain = from_sample.effective(), defaults.effective()
    differing = {k for k in sample if sample[k] != plain[k]}
    assert differing == {"listen", "config"}
    # The sample shows (mostly commented) every key of every section.
    text = SAMPLE.read_text()
    for key in KEYS:
        assert f"[{key.section}]" in text
        assert f"{key.name} =" in text or f"# {key.name} =" in text, key


def test_command_line_wins(tmp_path: Path) -> None:
    """An option on the command line beats its key; the file fills in the rest."""
    config = tmp_path / "octoplex.toml"
    config.write_text(
        "[server]\nlisten = ['tcp:0:interface=127.0.0.1']\n"
        "[limits]\nmax_batch_size = 7\nheader_timeout = 2.5\n"
        "[egress]\nallow = ['10.0.0.0/8']\nports = '80,443'\n"
    )
    options = parse("--config", str(config), "--max-batch-size", "9", "--allow-egress", "::1")
    assert options["max-batch-size"] == 9
    assert options["header-timeout"] == 2.5
    assert options["listen"] == ["tcp:0:interface=127.0.0.1"]
    assert options["egress"] == EgressPolicy.from_strings(allow=["::1"], ports="80,443")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nmax_batch_size = '7'\n", "max_batch_size must be a whole number, got '7'"),
        ("[limits]\nmax_batch_size = true\n", "max_batch_size must be a whole number, got True"),
        ("[limits]\nheader_timeout = 'soon'\n", "header_timeout must be a number, got 'soon'"),
        ("[egress]\nallow = '10.0.0.0/8'\n", "[egress] allow must be an array of strings"),
        ("[egress]\nallow = [10]\n", "[egress] allow must be an array of strings, got [10]"),
        ("[limits]\nmax_batch_size = 0\n", "max_batch_size = 0: '0' must be a finite number"),
        ("[pool]\nmax_age = -1\n", "[pool] max_age = -1: '-1' must be a finite number"),
        ("[limitz]\nx = 1\n", "unknown section [limitz]; expected one of auth, circuit, dns"),
        ("[limits]\nmax_batch = 1\n", "unknown key 'max_batch' in [limits]; expected one of"),
        ("limits = 1\n", "limits must be a table ([limits])"),
        ("[egress]\nallow = ['nope']\n", "[egress] allow: 'nope' is not a CIDR"),
        ("[egress]\nports = '0-5'\n", "[egress] ports: entry '0-5' must lie within 1-65535"),
        ("[server]\nlisten = ['bogus:x']\n", "[server] listen: 'bogus:x' is not usable"),
        ("[dns]\nservers = ['ns.example']\n", "'ns.example' is not an IP address"),
        ("not toml ===\n", "is not valid TOML: Expected '=' after a key"),
    ],
)
def test_mistakes_stop_start_up(tmp_path: Path, text: str, message: str) -> None:
    """Every kind of mistake is a usage error naming the file and the key."""
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(usage.UsageError) as raised:
        parse("--config", str(config))
    assert str(raised.value).startswith(f"config file {config}")
    assert message in str(raised.value)


def test_missing_file() -> None:
    with pytest.raises(usage.UsageError, match=r"cannot read the config file /nonexistent\.toml"):
        parse("--config", "/nonexistent.toml")


def test_effective_configuration_hides_tokens() -> None:
    """The settings in force, as logged at start, show a token's name, never the token."""
    effective = parse("--api-token", "bidder-7=abcdefghijklmnopqrstuvwxyz").effective()
    assert effective["api-token"] == ["bidder-7=<redacted>"]
    assert "abcdefghijklmnopqrstuvwxyz" not in repr(effective)
    assert effective["max-batch-size"] == 50


def test_start_line_names_the_settings_given(tmp_path: Path) -> None:
    """
    The text start-up line names what the command line and the file set,
    tokens hidden, and only that; the JSON event's ``configuration`` holds
    every setting.
    """
    assert parse().given_text() == "every setting at its default"
    config = tmp_path / "octoplex.toml"
    config.write_text("[limits]\nmax_batch_size = 7\n")
    options = parse(
        "--config",
        str(config),
        "--api-token",
        "bidder-7=abcdefghijklmnopqrstuvwxyz",
        "--allow-egress",
        "127.0.0.0/8",
        "--allow-egress",
        "::1",
    )
    assert options.given_text() == (
        "settings given: --allow-egress 127.0.0.0/8 --allow-egress ::1 "
        f"--api-token bidder-7=<redacted> --config {config} --max-batch-size 7; "
        "the rest at their defaults"
    )


async def _batch(caller: Caller, url: str, uri: str, size: int) -> tuple[int, Any]:
    document = {"timeout_msec": 3000, "requests": [{"uri": uri}] * size}
    status, _, body = await caller.post(url + "/multiplex", document)
    return status, body


async def _reloaded(process: subprocess.Popen[bytes], logfile: Path, count: int) -> str:
    """
    Send SIGHUP and wait for the ``count``-th reload event; return the log.
    """
    process.send_signal(signal.SIGHUP)
    for _ in range(100):
        log = logfile.read_text()
        if log.count("configuration reloaded from") + log.count("failed; the running") >= count:
            return log
        await sleep(0.05)
    raise AssertionError(f"no reload logged: {logfile.read_text()}")


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_what_can_change(tmp_path: Path, caller: Caller) -> None:
    """
    SIGHUP applies a new batch size and egress policy at once, says that a
    new listener needs a restart, and keeps everything when the file is bad.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "octoplex.toml"
    logfile, output = tmp_path / "octoplex.log", tmp_path / "output.txt"
    listen = f"[server]\nlisten = ['tcp:{port}:interface=127.0.0.1']\n"
    config.write_text(listen + "[limits]\nmax_batch_size = 2\n[egress]\nallow = ['127.0.0.0/8']\n")
    upstream = start_upstream()
    hello = upstream.url + "/hello"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [
                *twistd(),
                "-n",
                "--pidfile=",
                "--logfile",
                str(logfile),
                "octoplex",
                "--workers",
                "1",
                "--config",
                str(config),
            ],
            cwd=ROOT,
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await wait_until_healthy(process, caller, url, output)
        status, body = await _batch(caller, url, hello, 3)
        assert (status, body) == (400, {"error": "batch has 3 requests; at most 2 are allowed"})

        moved = listen.replace(f"tcp:{port}:", f"tcp:{free_port()}:")
        config.write_text(
            moved + "[limits]\nmax_batch_size = 5\n[egress]\nallow = ['127.0.0.0/8']\n"
        )
        log = await _reloaded(process, logfile, 1)
        assert "applied ['max-batch-size']; changed but needing a restart: ['listen']" in log
        status, body = await _batch(caller, url, hello, 3)
        assert status == 200
        assert [o["Success"]["content"] for o in body["responses"]] == ["Hello world!"] * 3

        config.write_text(listen + "[limits]\nmax_batch_size = 5\n")
        log = await _reloaded(process, logfile, 2)
        assert "applied ['allow-egress']" in log
        status, body = await _batch(caller, url, hello, 1)
        assert (
            body["responses"][0]
            .get("Failure", {})
            .get("error", "")
            .startswith("egress policy refused")
        ), body

        config.write_text(listen + "[limits]\nmax_batch_size = 'five'\n")
        log = await _reloaded(process, logfile, 3)
        assert "failed; the running configuration stays: config file" in log
        assert "[limits] max_batch_size must be a whole number, got 'five'" in log
        status, body = await _batch(caller, url, hello, 5)
        assert status == 200

        process.send_signal(signal.SIGTERM)
        returncode = await wait_for_exit(process, EXIT_TIMEOUT)
    finally:
        stop(process)
        await upstream.stop()
    assert returncode == 0, output.read_text()


@pytest_twisted.ensureDeferred
async def test_start_up_event_holds_the_configuration(log_events: list[dict[str, Any]]) -> None:
    """The settings in force are logged once at start, tokens redacted."""
    token = "abcdefghijklmnopqrstuvwxyz"
    root = makeService(
        parse(
            "--workers", "1", "--listen", "tcp:0:interface=127.0.0.1", "--api-token", f"b7={token}"
        )
    )
    root.startService()
    await root.stopService()
    (event,) = [e for e in log_events if "configuration" in e]
    assert event["configuration"]["api-token"] == ["b7=<redacted>"]
    assert event["configuration"]["max-batch-size"] == 50
    assert event["config_file"] is None
    assert token not in repr(log_events)
