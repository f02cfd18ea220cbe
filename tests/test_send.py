"""
``python -m octoplex.send``, run as a subprocess against a real ``twistd
octoplex`` subprocess (with a token): its table and its JSON lines, and its
exit status when the batch is refused, the daemon cannot be reached, or the
file is not a batch.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from octoplex.caller import Outcome
from octoplex.schema import SCHEMA

from .test_twistd import ROOT, START_TIMEOUT, environment, free_port, spawn_twistd

TOKEN = "s3cret-token-of-the-cli-tests"

#: How long one run of the command may take: far more than it takes.
RUN_TIMEOUT = 60.0

_LINE = Draft202012Validator({**SCHEMA, "oneOf": [{"$ref": "#/$defs/StreamLine"}]})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """
    ``twistd -n octoplex`` with one token, on a free port of 127.0.0.1: its
    ``/multiplex`` URL, once it answers ``/healthz``.
    """
    directory = tmp_path_factory.mktemp("daemon")
    port = free_port()
    output = directory / "output.txt"
    process = spawn_twistd(port, directory / "octoplex.log", output, "--api-token", f"cli={TOKEN}")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"twistd exited with {process.returncode}: {output.read_text()}")
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2.0) as answer:
                    assert answer.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, f"twistd did not answer in {START_TIMEOUT} s"
            # The daemon is another process: this wait blocks nothing it needs.
            time.sleep(0.1)
        yield base + "/multiplex"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def hanging() -> Iterator[str]:
    """
    A URL of 127.0.0.1 whose port takes connections (the kernel completes
    them into the backlog) and never answers.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hangs"


def run(
    *argv: str, stdin: str | None = None, token: str | None = TOKEN
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m octoplex.send`` with ``argv``, ``$OCTOPLEX_TOKEN`` set to ``token``."""
    env = environment()
    env.pop("OCTOPLEX_TOKEN", None)
    if token is not None:
        env["OCTOPLEX_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "octoplex.send", *argv],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def mixed(daemon: str, hanging: str) -> dict[str, Any]:
    """A success (the daemon's own /healthz), a refused port and a timeout."""
    return {
        "timeout_msec": 500,
        "requests": [
            {"id": "health", "uri": daemon.replace("/multiplex", "/healthz")},
            {"uri": "http://127.0.0.1:1/"},
            {"uri": hanging},
        ],
    }


def test_outcomes_print_as_an_aligned_table(tmp_path: Path, daemon: str, hanging: str) -> None:
    """Each item's index, status, kind, duration and body size, in aligned columns."""
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps(mixed(daemon, hanging)))
    result = run("--url", daemon, str(batch))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    header, *rows, summary = result.stdout.splitlines()
    assert header.split() == ["index", "status", "kind", "duration_ms", "body_bytes", "id", "error"]
    assert len(rows) == 3
    for name in ("index", "status", "duration_ms", "body_bytes"):
        # Numbers end where their heading ends.
        end = header.index(name) + len(name)
        for row in rows:
            assert row[end - 1] != " " and row[end : end + 1] in ("", " "), (name, row)
    for name in ("kind", "id"):
        start = header.index(name)
        for row in rows:
            assert row[start - 1] == " " and row[start] != " ", (name, row)
    health, refused, timeout = (row.split(maxsplit=6) for row in rows)
    assert health[:3] == ["0", "200", "-"]
    assert health[4:] == [str(len(b'{"healthy":true}')), "health"]
    assert refused[:3] == ["1", "-", "connect"]
    assert refused[4:] == ["0", "-", "connection refused by upstream"]
    assert timeout[:3] == ["2", "-", "timeout"]
    assert int(timeout[3]) >= 500
    assert timeout[6] == "timeout elapsed"
    assert summary == "3 requests: 1 answered, 2 failed (1 timed out)"


def test_json_prints_one_outcome_a_line(daemon: str, hanging: str) -> None:
    """--json, the batch on stdin: one JSON line per outcome, shaped as a streamed line."""
    result = run("--url", daemon, "--json", "-", stdin=json.dumps(mixed(daemon, hanging)))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    for line in lines:
        _LINE.validate(line)
    outcomes = [Outcome.from_json(line) for line in lines]
    assert [o.index for o in outcomes] == [0, 1, 2]
    assert outcomes[0].json() == {"healthy": True}
    assert lines[0]["id"] == outcomes[0].id == "health"
    assert [o.kind for o in outcomes] == [None, "connect", "timeout"]


def test_a_refused_batch_exits_1_with_the_daemons_message(
    tmp_path: Path, daemon: str, hanging: str
) -> None:
    """A batch the daemon refuses (400, 401) exits 1 and says why; --token beats the env."""
    too_long = {"timeout_msec": 3_600_001, "requests": [{"uri": hanging}]}
    result = run("--url", daemon, "-", stdin=json.dumps(too_long))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "python -m octoplex.send: Octoplex refused the batch (400): "
        "timeout_msec is 3600001; at most 3600000 is allowed\n"
    )
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"timeout_msec": 1000, "requests": [{"uri": hanging}]}))
    result = run("--url", daemon, str(batch), token=None)
    assert result.returncode == 1
    assert "(401): this server needs an Authorization: Bearer <token> header" in result.stderr
    result = run("--url", daemon, "--token", "not-the-right-token", str(batch))
    assert result.returncode == 1
    assert "(401): the bearer token is not one this server accepts" in result.stderr
    result = run("--url", daemon, "--token", TOKEN, str(batch), token="not-the-right-token")
    assert result.returncode == 0, result.stderr


def test_no_daemon_exits_3_saying_so(tmp_path: Path) -> None:
    """A URL nothing listens on exits 3 with a sentence, not a traceback."""
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"timeout_msec": 1000, "requests": [{"uri": "http://a/"}]}))
    url = f"http://127.0.0.1:{free_port()}/multiplex"
    result = run("--url", url, str(batch))
    assert result.returncode == 3
    assert result.stderr == (
        f"python -m octoplex.send: cannot connect to {url}: connection refused; "
        "is the daemon running and listening there?\n"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read"),
        ("{not json", "is not JSON"),
        ('{"timeout_msec": 100, "requests": []}', "is not a valid batch: Batch.requests is empty"),
        (
            '{"timeout_msec": 100, "requests": [{"uri": "http://a/", "method": "G T"}]}',
            "is not a valid batch: Request.method 'G T' is not an HTTP method token",
        ),
    ],
)
def test_a_file_that_is_no_batch_exits_2(tmp_path: Path, content: str | None, message: str) -> None:
    """A missing file, one that is not JSON, or one that is not a batch exits 2, saying why."""
    batch = tmp_path / "batch.json"
    if content is not None:
        batch.write_text(content)
    result = run(str(batch))
    assert result.returncode == 2
    assert result.stderr.startswith(f"python -m octoplex.send: the batch file {batch}")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_help_names_the_options() -> None:
    """--help documents the URL, token, timeout and --json, and the exit statuses."""
    result = run("--help")
    assert result.returncode == 0
    for option in ("--url", "--token", "--timeout", "--json", "--cafile", "OCTOPLEX_TOKEN"):
        assert option in result.stdout
    assert "Exit status" in result.stdout


def test_a_daemon_that_does_not_answer_exits_3_after_the_timeout(
    tmp_path: Path, hanging: str
) -> None:
    """A URL that takes the connection and never answers exits 3 after --timeout."""
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"timeout_msec": 1000, "requests": [{"uri": "http://a/"}]}))
    result = run("--url", hanging, "--timeout", "0.5", str(batch))
    assert result.returncode == 3
    assert result.stderr == (
        f"python -m octoplex.send: no answer from {hanging} within 0.5 s (--timeout)\n"
    )
