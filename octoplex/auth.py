"""
Who may call: bearer tokens.

When the operator configures tokens, ``POST /multiplex`` needs
``Authorization: Bearer <token>``.  Tokens have names; logs carry the name,
never the token.  A presented token is compared with every configured one in
constant time, so the time an answer takes says nothing about how much of a
guess was right.
"""

from __future__ import annotations

import hmac
import os
import stat

__all__ = ["TokenError", "Tokens", "load_tokens"]


class TokenError(ValueError):
    """
    A token setting is malformed; the message names the value or the file.
    """


class Tokens:
    """
    The configured API tokens.

    :param tokens: token name to token.
    """

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = [(name, token.encode("utf-8")) for name, token in tokens.items()]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def identify(self, authorization: bytes | None) -> str | None:
        """
        The name of the token an ``Authorization`` header carries, or
        ``None`` if it carries none that is configured.
        """
        if authorization is None:
            return None
        scheme, _, presented = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            return None
        presented = presented.strip()
        found = None
        # Every token is compared, whatever matched, so that timing does not
        # tell how many tokens there are or which one came close.
        for name, token in self._tokens:
            if hmac.compare_digest(presented, token) and found is None:
                found = name
        return found


def _parse(entry: str, where: str) -> tuple[str, str]:
    name, separator, token = entry.partition("=")
    name, token = name.strip(), token.strip()
    if not separator or not name or not token:
        raise TokenError(f"{where}: expected NAME=TOKEN, got an entry without both")
    if len(token) < 16:
        raise TokenError(
            f"{where}: the token named {name!r} is {len(token)} characters; at least 16 are needed"
        )
    if any(c.isspace() for c in token):
        raise TokenError(f"{where}: the token named {name!r} contains white space")
    return name, token


def _check_file(path: str, status: os.stat_result, uid: int) -> None:
    """
    A tokens file must be safe from other users, as ssh holds its key files:
    writable by nobody but its owner, and owned by the daemon's user or root.
    """
    mode = stat.S_IMODE(status.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TokenError(
            f"the API tokens file {path} has mode {mode:04o}: its group or others may write "
            "to it; allow writing by its owner only (chmod go-w)"
        )
    if status.st_uid not in (uid, 0):
        raise TokenError(
            f"the API tokens file {path} is owned by uid {status.st_uid}, neither the "
            f"daemon's user (uid {uid}) nor root"
        )


def _euid(uid: int | None) -> int:
    return os.geteuid() if uid is None else uid


def load_tokens(entries: list[str], path: str | None, uid: int | None = None) -> Tokens:
    """
    The tokens given as ``NAME=TOKEN`` entries and in a file of such lines
    (blank lines and ``#`` comments skipped).  The file must be writable
    by its owner alone and owned by the daemon's user or root.

    :param uid: the daemon's user; by default the effective user now.
    :raises TokenError: naming the entry, line or file.
    """
    tokens: dict[str, str] = {}

    def add(name: str, token: str, where: str) -> None:
        if name in tokens:
            raise TokenError(f"{where}: the token name {name!r} is given twice")
        tokens[name] = token

    for index, entry in enumerate(entries, 1):
        add(*_parse(entry, f"--api-token #{index}"), f"--api-token #{index}")
    if path is not None:
        try:
            with open(path, "rb") as tokens_file:
                # The file as opened, not the path, is checked.
                _check_file(path, os.fstat(tokens_file.fileno()), _euid(uid))
                lines = tokens_file.read().decode("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise TokenError(f"cannot read the API tokens file {path}: {e}") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                where = f"{path} line {number}"
                add(*_parse(line, where), where)
    return Tokens(tokens)
