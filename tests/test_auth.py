"""
Bearer tokens: parsing the operator's settings, and ``/multiplex`` refusing
callers without a configured token, over real sockets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.python import usage
from twisted.web.client import Agent

from octoplex.auth import TokenError, Tokens, load_tokens
from octoplex.client import PoolSettings, UpstreamClient
from octoplex.limits import Limits
from octoplex.multiplexer import Multiplexer
from octoplex.tap import Options
from octoplex.web import OctoplexApp, OctoplexSite

from .schema import check_answer
from .servers import LOOPBACK, Upstream, _QuietPool, local_resolver

TOKEN = "s3cret-token-of-bidder-7"


def test_identify_accepts_only_a_configured_bearer_token() -> None:
    """Missing, other-scheme, wrong and one-byte-changed tokens fail; the right one is named."""
    tokens = Tokens({"bidder-7": TOKEN, "other": "another-long-token-xyz"})
    changed = TOKEN[:-1] + ("x" if TOKEN[-1] != "x" else "y")
    assert len(changed) == len(TOKEN)
    assert tokens.identify(None) is None
    assert tokens.identify(f"Basic {TOKEN}".encode()) is None
    assert tokens.identify(b"Bearer ") is None
    assert tokens.identify(b"Bearer wrong") is None
    assert tokens.identify(f"Bearer {changed}".encode()) is None
    assert tokens.identify(f"Bearer {TOKEN}".encode()) == "bidder-7"
    assert tokens.identify(f"bearer  {TOKEN} ".encode()) == "bidder-7"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("no-separator", "expected NAME=TOKEN"),
        ("=token-without-a-name-123", "expected NAME=TOKEN"),
        ("short=abc", "is 3 characters; at least 16 are needed"),
        ("spaced=token with spaces inside", "contains white space"),
    ],
)
def test_bad_token_entries_are_named(entry: str, message: str) -> None:
    """A malformed --api-token entry is an error that says which entry and why."""
    with pytest.raises(TokenError) as caught:
        load_tokens([entry], None)
    assert caught.value.args[0].startswith("--api-token #1: ")
    assert message in str(caught.value)


def test_tokens_file(tmp_path: Path) -> None:
    """A tokens file holds NAME=TOKEN lines; comments, blanks and duplicates are handled."""
    path = tmp_path / "tokens"
    path.write_text(f"# bidders\n\nbidder-7={TOKEN}\n")
    assert load_tokens([], str(path)).identify(f"Bearer {TOKEN}".encode()) == "bidder-7"
    path.write_text(f"a={TOKEN}\na={TOKEN}\n")
    with pytest.raises(TokenError, match=r"line 2: the token name 'a' is given twice"):
        load_tokens([], str(path))
    with pytest.raises(TokenError, match="cannot read the API tokens file"):
        load_tokens([], str(tmp_path / "missing"))


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602, 0o660])
def test_a_tokens_file_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    """A tokens file its group or others may write stops the load, naming its mode."""
    path = tmp_path / "tokens"
    path.write_text(f"bidder-7={TOKEN}\n")
    path.chmod(mode)
    with pytest.raises(TokenError, match=rf"{path} has mode {mode:04o}: .*chmod go-w"):
        load_tokens([], str(path))
    path.chmod(0o600)
    assert load_tokens([], str(path)).identify(f"Bearer {TOKEN}".encode()) == "bidder-7"
    path.chmod(0o644)
    assert load_tokens([], str(path))


def test_a_tokens_file_of_another_user_is_refused(tmp_path: Path) -> None:
    """A tokens file owned by neither the daemon's user nor root stops the load."""
    path = tmp_path / "tokens"
    path.write_text(f"bidder-7={TOKEN}\n")
    path.chmod(0o600)
    if os.geteuid() == 0:
        # Root may give the file away: then it belongs to someone else.
        os.chown(path, 4321, -1)
        daemon = 0
    else:
        daemon = os.geteuid() + 1
    owner = path.stat().st_uid
    with pytest.raises(TokenError, match=rf"owned by uid {owner}, neither the daemon's user"):
        load_tokens([], str(path), uid=daemon)
    # Its owner's daemon may read it.
    assert load_tokens([], str(path), uid=owner)


def test_options_load_tokens_and_name_bad_ones(tmp_path: Path) -> None:
    """The tap turns token settings into Tokens, and a bad one into a UsageError."""
    options = Options()
    options.parseOptions(["--api-token", f"bidder-7={TOKEN}"])
    assert options["tokens"].identify(f"Bearer {TOKEN}".encode()) == "bidder-7"
    plain = Options()
    plain.parseOptions([])
    assert not plain["tokens"]
    with pytest.raises(usage.UsageError, match="at least 16"):
        Options().parseOptions(["--api-token", "x=short"])


@pytest_twisted.ensureDeferred
async def test_multiplex_needs_a_token(
    upstream: Upstream, log_events: list[dict[str, Any]]
) -> None:
    """Without a configured token /multiplex is 401 with a challenge; /healthz stays open."""
    limits = Limits()
    client = UpstreamClient(
        reactor, PoolSettings(), limits.max_response_bytes, None, local_resolver(), LOOPBACK
    )
    client.startService()
    app = OctoplexApp(Multiplexer(reactor, client), limits, reactor, Tokens({"bidder-7": TOKEN}))
    port = reactor.listenTCP(0, OctoplexSite(app, reactor), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    http = HTTPClient(Agent(reactor, pool=_QuietPool(reactor, persistent=False)))
    batch = json.dumps({"timeout_msec": 2000, "requests": [{"uri": upstream.url + "/hello"}]})
    changed = TOKEN[:-1] + ("x" if TOKEN[-1] != "x" else "y")

    async def post(headers: dict[str, str]) -> tuple[int, Any, Any]:
        response = await http.post(base + "/multiplex", data=batch.encode(), headers=headers)
        answer = json.loads(await treq.content(response))
        check_answer(response.code, answer)
        return response.code, response.headers, answer

    try:
        status, headers, body = await post({})
        assert status == 401
        assert headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="octoplex"']
        assert body == {"error": "this server needs an Authorization: Bearer <token> header"}

        for wrong in ("Bearer nope", f"Bearer {changed}", f"Basic {TOKEN}"):
            status, headers, body = await post({"Authorization": wrong})
            assert status == 401
            assert headers.getRawHeaders(b"www-authenticate") == [
                b'Bearer realm="octoplex", error="invalid_token"'
            ]
            assert body == {"error": "the bearer token is not one this server accepts"}

        status, _, body = await post({"Authorization": f"Bearer {TOKEN}"})
        assert status == 200
        assert body["responses"][0]["Success"]["content"] == "Hello world!"

        health = await http.get(base + "/healthz")
        assert health.code == 200
        assert json.loads(await treq.content(health)) == {"healthy": True}
    finally:
        await port.stopListening()
        await client.stopService()
    [event] = [e for e in log_events if e.get("log_format", "").startswith("batch {batch_id}")]
    assert event["client"].endswith("[token bidder-7]")
    # The token itself, or the changed one, is never in a log event.
    for logged in log_events:
        text = repr(logged)
        assert TOKEN not in text and changed not in text
