"""
``python -m octoplex.send FILE|-``: send a batch file to a daemon and print
its outcomes, as a table or (``--json``) as one JSON line per outcome.

It uses :func:`octoplex.caller.send_blocking`, the standard library alone.
The exit status says how it went: 0 the batch was answered (whatever its
items' outcomes), 1 the daemon refused it, 2 a usage error or a file that
is not a batch, 3 no answer (the daemon could not be reached, or what came
back is not an answer).
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from octoplex.caller import (
    DEFAULT_URL,
    BadAnswer,
    Batch,
    BatchRefused,
    Outcome,
    default_timeout,
    send_blocking,
)

__all__ = ["EXIT_REFUSED", "EXIT_UNANSWERED", "EXIT_USAGE", "TOKEN_ENV", "main", "table"]

#: Where the token is read from when ``--token`` is not given.
TOKEN_ENV = "OCTOPLEX_TOKEN"

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNANSWERED = 3

PROG = "python -m octoplex.send"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Send a batch (the JSON of POST /multiplex) to Octoplex and print "
        "each request's outcome.",
        epilog="Exit status: 0 answered (even if items failed), 1 the batch was refused, "
        "2 bad usage or batch file, 3 no answer.",
    )
    parser.add_argument("file", metavar="FILE", help="the batch as a JSON file, or - for stdin")
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the daemon's /multiplex (default: {DEFAULT_URL})"
    )
    parser.add_argument(
        "--token",
        help=f"a bearer token, for a daemon with tokens (default: ${TOKEN_ENV}, which, "
        "unlike this option, other users cannot see in the process list)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long to wait for the daemon at each step (default: the batch's "
        "timeout_msec plus 30 s)",
    )
    parser.add_argument(
        "--cafile", help="a PEM file of the CAs to trust for an https URL (default: the system's)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print one JSON line per outcome, {"index": N, "Success"|"Failure": {...}}',
    )
    return parser


def table(outcomes: Sequence[Outcome]) -> list[str]:
    """
    The lines of the outcomes' table: index, status, kind, duration and
    body size per item, the id if any item has one, and a failure's error
    last; columns aligned, numbers to the right.
    """
    with_id = any(outcome.id is not None for outcome in outcomes)
    header = ["index", "status", "kind", "duration_ms", "body_bytes"]
    rows = []
    for outcome in outcomes:
        row = [
            str(outcome.index),
            "-" if outcome.status is None else str(outcome.status),
            outcome.kind or "-",
            str(outcome.duration_msec),
            str(len(outcome.body)),
        ]
        if with_id:
            row.append(outcome.id or "-")
        row.append(outcome.error or "")
        rows.append(row)
    if with_id:
        header.append("id")
    header.append("error")
    right = {0, 1, 3, 4}
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells[:-1])
        ]
        return "  ".join([*padded, cells[-1]]).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _summary(outcomes: Sequence[Outcome]) -> str:
    answered = sum(outcome.ok for outcome in outcomes)
    timed_out = sum(outcome.timed_out for outcome in outcomes)
    return (
        f"{len(outcomes)} requests: {answered} answered, {len(outcomes) - answered} failed "
        f"({timed_out} timed out)"
    )


def _load(path: str, stdin: TextIO) -> Batch:
    """
    The batch in ``path`` (``-``: stdin).

    :raises ValueError: with a sentence saying what is wrong with it.
    """
    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"the batch file {name} cannot be read: {e}") from None
    try:
        document = json.loads(text)
    except ValueError as e:
        raise ValueError(f"the batch file {name} is not JSON: {e}") from None
    try:
        return Batch.from_json(document)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the batch file {name} is not a valid batch: {e}") from None


def main(
    argv: Sequence[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """
    Run the command with ``argv`` (by default the process's arguments).

    :return: the exit status.
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = _parser()
    options = parser.parse_args(argv)

    def fail(status: int, message: str) -> int:
        print(f"{PROG}: {message}", file=stderr)
        return status

    try:
        batch = _load(options.file, stdin)
    except ValueError as e:
        return fail(EXIT_USAGE, str(e))
    if options.timeout is not None and not options.timeout > 0:
        return fail(
            EXIT_USAGE, f"--timeout must be a number of seconds above 0, got {options.timeout}"
        )
    token = options.token if options.token is not None else os.environ.get(TOKEN_ENV) or None
    timeout = default_timeout(batch) if options.timeout is None else options.timeout
    url = options.url
    try:
        outcomes = send_blocking(batch, url, token=token, timeout=timeout, cafile=options.cafile)
    except BatchRefused as e:
        return fail(EXIT_REFUSED, str(e))
    except ValueError as e:
        # A URL that is not http or https, or a cafile for an http one; a
        # BadAnswer is a ValueError too.
        if isinstance(e, BadAnswer):
            return fail(EXIT_UNANSWERED, f"the answer from {url} is not an Octoplex answer: {e}")
        return fail(EXIT_USAGE, str(e))
    except ConnectionRefusedError:
        return fail(
            EXIT_UNANSWERED,
            f"cannot connect to {url}: connection refused; is the daemon running and "
            "listening there?",
        )
    except TimeoutError:
        return fail(EXIT_UNANSWERED, f"no answer from {url} within {timeout:g} s (--timeout)")
    except ssl.SSLError as e:
        return fail(EXIT_UNANSWERED, f"TLS with {url} failed: {e} (--cafile?)")
    except OSError as e:
        return fail(EXIT_UNANSWERED, f"cannot talk to {url}: {e}")
    if options.json:
        for outcome in outcomes:
            line: dict[str, Any] = {"index": outcome.index}
            if outcome.id is not None:
                line["id"] = outcome.id
            line.update(outcome.to_json())
            print(json.dumps(line, ensure_ascii=False, separators=(",", ":")), file=stdout)
    else:
        for text in table(outcomes):
            print(text, file=stdout)
        print(_summary(outcomes), file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
