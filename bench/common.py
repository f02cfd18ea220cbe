"""
Helpers shared by the benchmark scripts bench/run.py, bench/scenarios.py and
bench/soak.py: processes, ports, logs, /proc, pinning, the upstreams (nginx
and bench/upstream.py), finding and starting the daemon, wrk, the machine
description and the JSON report.

Stdlib only.  The scripts run as ``python bench/run.py``, with bench/ first
on sys.path, and import this module as ``common``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
HOST = "127.0.0.1"
#: The wrk script that builds a batch (or a plain GET) and reports in done().
LUA_SCRIPT = os.path.join(BENCH_DIR, "batch.lua")
#: What the upstreams answer.
UPSTREAM_BODY = "hello world\n"
#: The asyncio upstream: the fallback for nginx, and the one that can delay.
PYTHON_UPSTREAM = os.path.join(BENCH_DIR, "upstream.py")
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


def schedstat_ms(pid: int) -> tuple[float, float] | None:
    """
    A process's (main thread's) time on a CPU and time spent runnable but
    waiting for one, in ms, from /proc/PID/schedstat (nanosecond counters,
    unlike the clock ticks of /proc/PID/stat); None where unavailable.
    """
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            fields = f.read().split()
        return int(fields[0]) / 1e6, int(fields[1]) / 1e6
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
# Serving


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def wait_until_serving(
    proc: subprocess.Popen[Any], url: str, name: str, log: str, timeout: float = 20.0
) -> None:
    def serving() -> bool | str:
        status, _ = http_get(url)
        return True if status == 200 else f"HTTP {status}"

    wait_until(serving, proc, name, log, timeout, f"answer GET {url}")


def raise_nofile() -> int:
    """
    Raise this process's soft RLIMIT_NOFILE to its hard limit (inherited by
    the processes it starts after); return the new soft limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def rss_kib(pid: int) -> int:
    """The resident memory of ``pid`` in KiB (``VmRSS`` in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """
    Read one HTTP/1.1 answer with a Content-Length: its status and body.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None:
        raise ValueError("an answer without Content-Length")
    return status, await reader.readexactly(length)


def post_bytes(port: int, path: str, body: bytes) -> bytes:
    """A keep-alive HTTP/1.1 POST of a JSON ``body``, ready to write."""
    return (
        b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (path.encode(), HOST.encode(), port, len(body)) + body
    )


def get_bytes(port: int, path: str) -> bytes:
    """A keep-alive HTTP/1.1 GET, ready to write."""
    return b"GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (path.encode(), HOST.encode(), port)


# --------------------------------------------------------------------------
# Pinning


def cpu_list(text: str) -> set[int]:
    """The CPUs of a taskset-style list such as ``1`` or ``0,2-3``."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


class Pinning:
    def __init__(self, daemon_cpus: str, load_cpus: str, enabled: bool) -> None:
        self.taskset = shutil.which("taskset")
        self.daemon_cpus = daemon_cpus
        self.load_cpus = load_cpus
        self.enabled = enabled
        self.note = ""
        if not enabled:
            self.note = "pinning disabled (--no-pin)"
        elif self.taskset is None:
            self.enabled = False
            self.note = "taskset not found: NOT pinning"
        else:
            available = len(os.sched_getaffinity(0))
            if available < 2:
                self.enabled = False
                self.note = f"only {available} CPU available: NOT pinning"
            else:
                self.note = f"daemon on CPU {daemon_cpus}, upstream and wrk on CPU {load_cpus}"

    def daemon(self, argv: list[str]) -> list[str]:
        return self._wrap(self.daemon_cpus, argv)

    def load(self, argv: list[str]) -> list[str]:
        return self._wrap(self.load_cpus, argv)

    def pin_self_to_load(self) -> None:
        """
        Move this process (a load generator) to the load CPUs; the processes
        it starts later are pinned by :meth:`daemon` and :meth:`load`.
        """
        if self.enabled:
            os.sched_setaffinity(0, cpu_list(self.load_cpus))

    def _wrap(self, cpus: str, argv: list[str]) -> list[str]:
        if not self.enabled:
            return argv
        assert self.taskset is not None
        return [self.taskset, "-c", cpus, *argv]


# --------------------------------------------------------------------------
# Upstreams


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 20000;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
{temp_paths}
{servers}
}}
"""

NGINX_SERVER = """\
    server {{
        listen {host}:{port}{ssl};
{tls}        location / {{
            return 200 "hello world\\n";
        }}
        # Accepted connections, to count the upstream connections Octoplex opens.
        location = /nginx_status {{
            stub_status;
        }}
    }}
"""


def nginx_accepts(
    port: int, scheme: str = "http", context: ssl.SSLContext | None = None
) -> int | None:
    """
    The connections nginx has accepted so far (its stub_status), counting
    the one this call opens.
    """
    url = f"{scheme}://{HOST}:{port}/nginx_status"
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as answer:
            text = answer.read().decode("ascii", "replace")
    except (OSError, urllib.error.URLError):
        return None
    m = re.search(r"^\s*(\d+)\s+\d+\s+\d+\s*$", text, re.M)
    return int(m.group(1)) if m else None


def nginx_version(nginx: str) -> tuple[str, tuple[int, ...]]:
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10)
    text = out.stderr + out.stdout
    m = re.search(r"nginx/(\d+(?:\.\d+)*)", text)
    version = tuple(int(x) for x in m.group(1).split(".")) if m else ()
    return text, version


def nginx_has_ssl(nginx: str) -> bool:
    return "--with-http_ssl_module" in nginx_version(nginx)[0]


def start_nginx(
    nginx: str,
    tmp: str,
    port: int,
    pin: Pinning,
    procs: Processes,
    more_ports: Sequence[int] = (),
    tls_ports: Sequence[int] = (),
    tls: tuple[str, str] | None = None,
) -> tuple[subprocess.Popen[Any], str, str]:
    """
    Start nginx answering ``hello world`` on ``port`` and ``more_ports``, and
    with TLS on ``tls_ports`` (``tls``: the certificate and key PEM files).
    """
    configure, version = nginx_version(nginx)
    temp_paths = [f"    client_body_temp_path {tmp}/client_body;"]
    for module, directive in (
        ("proxy", "proxy_temp_path"),
        ("fastcgi", "fastcgi_temp_path"),
        ("uwsgi", "uwsgi_temp_path"),
        ("scgi", "scgi_temp_path"),
    ):
        if f"--without-http_{module}_module" not in configure:
            temp_paths.append(f"    {directive} {tmp}/{module};")
    servers = [NGINX_SERVER.format(host=HOST, port=p, ssl="", tls="") for p in (port, *more_ports)]
    if tls_ports:
        assert tls is not None, "TLS ports need a certificate and key"
        directives = f"        ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n"
        servers += [
            NGINX_SERVER.format(host=HOST, port=p, ssl=" ssl", tls=directives) for p in tls_ports
        ]
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            NGINX_CONF.format(
                tmp=tmp, temp_paths="\n".join(temp_paths), servers="\n".join(servers).rstrip()
            )
        )
    argv = [nginx, "-p", tmp + "/", "-c", conf]
    if version >= (1, 19, 5):
        # Log to our file from the start, not to the built-in path.
        argv[1:1] = ["-e", os.path.join(tmp, "error.log")]
    log = os.path.join(tmp, "nginx.out")
    with open(log, "wb") as out:
        proc = procs.start("nginx", pin.load(argv), stdout=out, stderr=subprocess.STDOUT, cwd=tmp)
    error_log = os.path.join(tmp, "error.log")
    # nginx binds every listener before it serves any.
    wait_until_serving(proc, f"http://{HOST}:{port}/", "nginx", error_log)
    label = "nginx " + ".".join(map(str, version)) if version else "nginx"
    return proc, label, error_log


def start_python_upstream(
    tmp: str, port: int, pin: Pinning, procs: Processes, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen[Any], str, str]:
    """
    Start bench/upstream.py on ``port``, with ``extra`` options (see its
    ``--help``).
    """
    log = os.path.join(tmp, f"upstream-{port}.log")
    argv = [sys.executable, PYTHON_UPSTREAM, "--host", HOST, "--port", str(port), *extra]
    with open(log, "wb") as out:
        proc = procs.start("upstream", pin.load(argv), stdout=out, stderr=subprocess.STDOUT)

    def listening() -> bool:
        with socket.create_connection((HOST, port), timeout=1):
            return True

    wait_until(listening, proc, "bench/upstream.py", log, 20)
    return proc, "bench/upstream.py (asyncio)", log


# --------------------------------------------------------------------------
# The daemon


def find_wrk(given: str | None) -> str:
    """
    The wrk to run: ``--wrk``, else the one on PATH; exit with status 2,
    saying how to get it, if there is none.
    """
    wrk = given or shutil.which("wrk") or "/usr/bin/wrk"
    if not os.access(wrk, os.X_OK):
        print("error: wrk not found (apt-get install -y wrk, or pass --wrk)", file=sys.stderr)
        raise SystemExit(2)
    return wrk


def use_nginx(choice: str, nginx: str) -> bool:
    """
    Whether nginx is the upstream: ``--upstream nginx``, or ``auto`` with
    nginx installed; exit with status 2 if nginx was asked for and is not
    there.
    """
    found = os.access(nginx, os.X_OK)
    if choice == "nginx" and not found:
        print(f"error: {nginx} not found", file=sys.stderr)
        raise SystemExit(2)
    return choice == "nginx" or (choice == "auto" and found)


def start_upstream(
    use_nginx: bool,
    nginx: str,
    choice: str,
    tmp: str,
    port: int,
    pin: Pinning,
    procs: Processes,
) -> tuple[subprocess.Popen[Any], str, str]:
    """
    The reference upstream on ``port``: nginx if ``use_nginx``, else
    bench/upstream.py, saying why (``choice`` is the ``--upstream`` option:
    ``auto`` means nginx was not found).  Its process, label and log.
    """
    if use_nginx:
        return start_nginx(nginx, tmp, port, pin, procs)
    print(
        f"NOTE: nginx not found at {nginx}" if choice == "auto" else "NOTE: --upstream python",
        "- using the fallback upstream bench/upstream.py (asyncio); its "
        "numbers are not comparable with nginx runs.",
    )
    return start_python_upstream(tmp, port, pin, procs)


def octoplex_argv(
    cmd: str | None, port: int, twistd_options: Sequence[str] = ()
) -> tuple[list[str], str]:
    """
    The daemon's argv listening on ``port``, and where its command came
    from.  ``twistd_options`` (e.g. ``--reactor=asyncio``) go before
    ``octoplex``, so only the default command takes them.
    """
    listen = f"tcp:{port}:interface={HOST}"
    if cmd is None:
        twistd, where = find_twistd(" or pass --octoplex-cmd")
        # The upstream is local, and local addresses are refused by default.
        argv = [twistd, "-n", "--pidfile=", *twistd_options, "octoplex", "--listen", listen]
        argv += ["--allow-egress", "127.0.0.0/8"]
        return argv, f"{twistd} (found {where})"
    if twistd_options:
        raise BenchError(
            f"twistd options {list(twistd_options)} cannot be added to --octoplex-cmd {cmd!r}"
        )
    if "{port}" in cmd or "{listen}" in cmd:
        argv = shlex.split(cmd.replace("{port}", str(port)).replace("{listen}", listen))
    else:
        argv = [*shlex.split(cmd), "--listen", listen]
    return argv, "--octoplex-cmd"


def start_octoplex(
    cmd: str | None,
    tmp: str,
    pin: Pinning,
    procs: Processes,
    workers: int = 1,
    extra: Sequence[str] = (),
    name: str = "",
    twistd_options: Sequence[str] = (),
) -> tuple[subprocess.Popen[Any], int, str, list[str], str]:
    """
    Start the daemon with ``--workers N`` and ``extra`` options (and
    ``twistd_options`` before ``octoplex``, e.g. ``--reactor=asyncio``),
    pinned to the daemon CPUs if it is one process; wait for /healthz.
    Return the process, its port, its log, its argv and where its command
    came from.
    """
    port = free_port()
    argv, source = octoplex_argv(cmd, port, twistd_options)
    # Always given: the default (auto) is one worker per CPU.
    argv += ["--workers", str(workers), *extra]
    env = daemon_env()
    log = os.path.join(tmp, f"octoplex-{name or f'workers-{workers}'}.log")
    with open(log, "wb") as out:
        proc = procs.start(
            "octoplex",
            pin.daemon(argv) if workers == 1 else argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )
    wait_until_serving(proc, f"http://{HOST}:{port}/healthz", "octoplex", log, timeout=30)
    return proc, port, log, argv, source


def batch_document(size: int, upstream_url: str, timeout_msec: int) -> dict[str, Any]:
    return {
        "timeout_msec": timeout_msec,
        "requests": [{"method": "GET", "uri": upstream_url} for _ in range(size)],
    }


def check_one_batch(port: int, size: int, upstream_url: str, timeout_msec: int) -> None:
    """
    POST one batch by hand and insist that every outcome is a Success with
    status 200 and the upstream's body.
    """
    url = f"http://{HOST}:{port}/multiplex"
    body = json.dumps(batch_document(size, upstream_url, timeout_msec)).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_msec / 1000 + 10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except OSError as e:
        raise BenchError(f"check batch of {size}: POST {url} failed: {e}") from None
    shown = raw[:2000].decode("utf-8", "replace")
    if status != 200:
        raise BenchError(f"check batch of {size}: /multiplex answered HTTP {status}: {shown}")
    try:
        responses = json.loads(raw)["responses"]
    except (ValueError, KeyError, TypeError) as e:
        raise BenchError(f"check batch of {size}: unreadable answer ({e}): {shown}") from None
    if not isinstance(responses, list) or len(responses) != size:
        raise BenchError(
            f"check batch of {size}: expected {size} outcomes, got "
            f"{len(responses) if isinstance(responses, list) else type(responses).__name__}"
        )
    bad = []
    for i, outcome in enumerate(responses):
        success = outcome.get("Success") if isinstance(outcome, dict) else None
        if (
            not isinstance(success, dict)
            or success.get("status") != 200
            or success.get("content") != UPSTREAM_BODY
        ):
            bad.append((i, outcome))
    if bad:
        first = ", ".join(f"#{i}: {json.dumps(o)[:400]}" for i, o in bad[:3])
        raise BenchError(
            f"check batch of {size}: {len(bad)} of {size} outcomes are not "
            f"Success/200/{UPSTREAM_BODY!r}; first: {first}"
        )


# --------------------------------------------------------------------------
# wrk


def daemon_code_path(argv: list[str]) -> str:
    """
    Where the daemon started with ``argv`` (twistd first) imports octoplex
    from: the interpreter of twistd's ``#!`` line, asked with the daemon's
    environment and working directory.
    """
    python = sys.executable
    try:
        with open(argv[0], "rb") as f:
            first = f.readline().decode("utf-8", "replace")
        if first.startswith("#!") and first[2:].split():
            python = first[2:].split()[0]
    except OSError:
        pass
    out = subprocess.run(
        [python, "-c", "import octoplex; print(octoplex.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=daemon_env(),
    )
    if out.returncode != 0:
        raise BenchError(f"{python} cannot import octoplex: {out.stderr.strip()}")
    return os.path.dirname(out.stdout.strip())


# --------------------------------------------------------------------------
# wrk


RESULT_LINE = re.compile(r"^BENCH_RESULT (\{.*\})\s*$", re.MULTILINE)


def run_wrk(
    wrk: str,
    pin: Pinning,
    procs_to_watch: list[tuple[str, subprocess.Popen[Any], str]],
    url: str,
    connections: int,
    duration: int,
    script_args: list[str],
) -> tuple[dict[str, Any], str]:
    argv = pin.load(
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            LUA_SCRIPT,
            url,
            "--",
            *script_args,
        ]
    )
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=duration + 60)
    finally:
        stop(proc, grace=2)
    for name, p, log in procs_to_watch:
        if p.poll() is not None:
            raise BenchError(
                f"{name} died (status {p.returncode}) during the run.\n--- {log} ---\n{tail(log)}"
            )
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode}: {' '.join(argv)}\n{out}\n{err}")
    m = RESULT_LINE.search(out)
    if not m:
        raise BenchError(f"no BENCH_RESULT line in wrk's output:\n{out}\n{err}")
    result = json.loads(m.group(1))
    # Cross-check the script's status count against wrk's own report.
    m2 = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    result["wrk_non_2xx_line"] = int(m2.group(1)) if m2 else 0
    return result, out


def summarise_wrk(
    raw: dict[str, Any], batch_size: int, daemon_cpu: float | None, upstream_cpu: float | None
) -> dict[str, Any]:
    seconds = raw["duration_us"] / 1e6
    rate = raw["requests"] / seconds if seconds > 0 else 0.0
    e = raw["errors"]
    socket_errors = e["connect"] + e["read"] + e["write"] + e["timeout"]
    # With the response() check, non_2xx counts every non-2xx answer; without
    # it, wrk's status count (>= 400) is what there is.
    non_2xx = raw["non_2xx"] if raw["checked"] else max(e["status"], raw["wrk_non_2xx_line"])
    return {
        "batch_size": batch_size,
        "requests": raw["requests"],
        "seconds": round(seconds, 3),
        "requests_per_s": round(rate, 1),
        "sub_requests_per_s": round(rate * max(batch_size, 1), 1),
        "p50_ms": raw["latency_us"]["p50"] / 1000,
        "p90_ms": raw["latency_us"]["p90"] / 1000,
        "p99_ms": raw["latency_us"]["p99"] / 1000,
        "max_ms": raw["latency_us"]["max"] / 1000,
        "errors": socket_errors + non_2xx,
        "socket_errors": e,
        "non_2xx": non_2xx,
        "responses_checked": raw["checked"],
        "bad_batches": raw["bad_batches"],
        "failed_sub_requests": raw["failed_subs"],
        "sample_bad_response": raw["sample"],
        "daemon_cpu_pct": None if daemon_cpu is None else round(daemon_cpu, 1),
        "upstream_cpu_pct": None if upstream_cpu is None else round(upstream_cpu, 1),
    }


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


def add_placement_arguments(parser: argparse.ArgumentParser, load: str) -> None:
    """
    The options of where a benchmark's processes run: the upstream, nginx,
    and the CPUs of the daemon and of ``load`` (with the upstream).
    """
    parser.add_argument(
        "--upstream",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="auto: nginx if installed, else bench/upstream.py (default: %(default)s)",
    )
    parser.add_argument(
        "--nginx", default="/usr/sbin/nginx", help="nginx binary (default: %(default)s)"
    )
    parser.add_argument(
        "--daemon-cpus", default="0", help="taskset CPU list for the daemon (default: %(default)s)"
    )
    parser.add_argument(
        "--load-cpus",
        default="1",
        help=f"taskset CPU list for the upstream and {load} (default: %(default)s)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")


def batch_sizes(text: str) -> list[int]:
    """``--batch-sizes``: a comma-separated list of sizes from 1 up."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be at least 1")
    return sizes


def add_wrk_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of wrk's load: its connections and the batch sizes."""
    parser.add_argument(
        "-c",
        "--connections",
        type=positive_int,
        default=8,
        help="wrk connections, on one wrk thread (default: %(default)s)",
    )
    parser.add_argument(
        "-b",
        "--batch-sizes",
        type=batch_sizes,
        default=batch_sizes("1,10,50"),
        metavar="LIST",
        help="comma-separated batch sizes (default: 1,10,50)",
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value
