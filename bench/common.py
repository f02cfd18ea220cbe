"""
Helpers shared by the benchmark scripts bench/run.py and bench/soak.py:
processes, ports, logs, /proc, finding twistd, the daemon's environment,
the machine description and the JSON report.

Stdlib only.  The scripts run as ``python bench/run.py``, with bench/ first
on sys.path, and import this module as ``common``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Callable
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
HOST = "127.0.0.1"
#: twistd writes a plugin cache next to the working tree's plugin.
PLUGIN_CACHE = os.path.join(REPO_ROOT, "twisted", "plugins", "dropin.cache")


class BenchError(Exception):
    """A failure that ends the benchmark with a message, not a traceback."""


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that cleanup runs."""


def raise_on_sigterm() -> None:
    """
    Turn SIGTERM into :class:`Terminated`, so that cleanup runs.
    """

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)


# --------------------------------------------------------------------------
# Processes


class Processes:
    """
    Every long-running process a benchmark starts, stopped in reverse order
    (terminate, then kill after ``grace`` s) by :meth:`stop_all`.
    """

    def __init__(self, grace: float = 5.0) -> None:
        self.grace = grace
        self._procs: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        # A session of its own: Ctrl-C reaches only us, and we stop the
        # children in order.
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self._procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        while self._procs:
            _, proc = self._procs.pop()
            stop(proc, self.grace)


def stop(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """
    Terminate ``proc``, then kill it if it has not exited after ``grace`` s.
    """
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc; None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def tree_cpu_seconds(pid: int) -> float | None:
    """
    utime + stime of a process and of its descendants still running (a
    master's workers), from /proc; None where unavailable.
    """
    total = cpu_seconds(pid)
    if total is None:
        return None
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        children = []
    for child in children:
        total += tree_cpu_seconds(child) or 0.0
    return total


def wait_until(
    check: Callable[[], object],
    proc: subprocess.Popen[Any],
    name: str,
    log: str,
    timeout: float,
    waiting_for: str = "start",
) -> None:
    """
    Call ``check`` every 0.1 s until it returns True.  A string it returns
    instead, or an OSError or URLError it raises, is the last failure shown
    if ``timeout`` runs out; raise :class:`BenchError` then, or as soon as
    ``proc`` exits.  ``waiting_for`` completes "NAME did not ... within".
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} exited with status {proc.returncode} before serving.\n"
                f"--- {log} ---\n{tail(log)}"
            )
        try:
            answer = check()
        except (OSError, urllib.error.URLError) as e:
            last = e
        else:
            if answer is True:
                return
            if isinstance(answer, str):
                last = answer
        time.sleep(0.1)
    raise BenchError(
        f"{name} did not {waiting_for} within {timeout:.0f} s (last: {last}).\n"
        f"--- {log} ---\n{tail(log)}"
    )


def run_guarded(
    body: Callable[[Processes, str], int], failed: str, tmp_prefix: str, grace: float = 5.0
) -> int:
    """
    Run ``body(procs, tmp)`` with a :class:`Processes` and a temporary
    folder, and return its exit status; a :class:`BenchError`, Ctrl-C or
    SIGTERM ends it with a message and 1, 130 or 143.  Then, whatever
    happened, stop the processes, remove the folder, and remove the plugin
    cache twistd writes next to the working tree's plugin if there was none
    before, so that the tree is left as it was found.
    """
    procs = Processes(grace)
    tmp = tempfile.mkdtemp(prefix=tmp_prefix)
    had_plugin_cache = os.path.exists(PLUGIN_CACHE)
    try:
        return body(procs, tmp)
    except BenchError as e:
        print(f"\n{failed} FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    except Terminated:
        print("\nterminated; cleaning up", file=sys.stderr)
        return 143
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        if not had_plugin_cache and os.path.exists(PLUGIN_CACHE):
            try:
                os.remove(PLUGIN_CACHE)
            except OSError:
                pass


# --------------------------------------------------------------------------
# Octoplex


def find_twistd(hint: str = "") -> tuple[str, str]:
    """
    The twistd next to this Python, else the repository's .venv, else PATH,
    and where it was found.  ``hint`` ends the error message if none is.
    """
    candidates = [
        (os.path.join(os.path.dirname(sys.executable), "twistd"), "next to sys.executable"),
        (os.path.join(REPO_ROOT, ".venv", "bin", "twistd"), "the repository's .venv"),
    ]
    for path, where in candidates:
        if os.access(path, os.X_OK):
            return path, where
    found = shutil.which("twistd")
    if found:
        return found, "PATH"
    raise BenchError(
        "cannot find twistd (looked next to "
        f"{sys.executable}, in {REPO_ROOT}/.venv/bin and on PATH); "
        f"run with the virtualenv's python{hint}"
    )


def daemon_env() -> dict[str, str]:
    """
    The daemon's environment: the working tree's octoplex and plugin, not an
    installed copy, and no bytecode written into the tree.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# --------------------------------------------------------------------------
# Report


def describe_machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = ""
    try:
        commit = subprocess.run(
            ["git", "-C", REPO_ROOT, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git": commit or "(no commit)",
    }


def write_json(path: str, document: dict[str, Any]) -> None:
    """
    Write ``document`` to ``path`` (its folder made if need be) and say so.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")
    print(f"Wrote {path}")


# --------------------------------------------------------------------------
# Command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value
