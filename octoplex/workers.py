"""
``--workers N``: one master process supervising N worker processes.

With ``--workers`` above 1 the ``twistd octoplex`` process is a master: it
listens on nothing and serves nothing.  It spawns N workers, each
``twistd -n --pidfile= octoplex`` with the master's own command line (so
the same ``--config`` file, the command line still winning over it) plus
``--workers 1 --worker-id I``.  Each worker binds the same listeners with
``SO_REUSEPORT``; the kernel spreads new connections over them.

Start-up: before spawning, the master binds each listener's address once
itself (``SO_REUSEPORT``, no listen, closed at once), so a port held by
another program or one it may not bind stops start-up with the same
one-line error a single process gives.  Each worker says it is ready, on a
pipe (its file descriptor 3), once its listeners are bound.  A worker whose
first start fails before it is ready (a cause that a restart will not cure:
its lines are relayed just above) stops the master, which exits 1.

Supervision: a worker that exits once it has been ready is started again,
after 1 s doubling to 30 s for a worker that keeps dying, the delay reset
once a worker has lived 60 s.  Every start and exit is logged with the
worker's id, pid and exit status.

Signals: SIGTERM (or SIGINT) to the master is sent on to every worker,
each of which drains as a single daemon does; the master exits 0 once they
all have (those still running after ``--drain-timeout`` plus a grace get
SIGKILL).  SIGHUP and SIGUSR1 are sent on to every worker (each reloads
its configuration, or reopens its log files); SIGHUP reloads the master's
own log level and drain timings, and SIGUSR1 reopens the master's own log
files too.

Logs: a worker with a log file (``--log-file``, ``--access-log``) writes
its own, the path suffixed ``.worker-I``.  What a worker writes to its
standard output or error (its whole log when no ``--log-file`` is given)
the master relays, line by line, into its own log.

Statistics: with ``--metrics-listen`` the master serves ``/metrics`` and
``/stats`` there, the sums of every worker's (see :mod:`octoplex.totals`),
with its own ``octoplex_worker_restarts_total`` and ``process_*``;
each worker serves its own on a private UNIX socket in a temporary
directory, given to it as ``--metrics-listen unix:PATH``.  Without it, each
worker answers ``/metrics`` on the shared listeners with its own numbers.

Each worker watches its standard input, a pipe from the master: when the
master is gone (even killed), the pipe closes and the worker stops
(draining), so no worker outlives its master.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, ProcessCollector
from twisted.application import strports
from twisted.application.service import Service
from twisted.internet import abstract, fdesc
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ReactorNotRunning
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from octoplex import __version__
from octoplex.totals import TotalsSite

__all__ = [
    "Master",
    "ParentWatch",
    "stop_reactor",
    "tell_master_ready",
    "usable_cpus",
    "worker_argv",
]

#: The first delay before a dead worker is started again, and the most.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
#: A worker that lived this long resets the delay.
BACKOFF_RESET = 60.0
#: Seconds past --drain-timeout the workers get to exit before SIGKILL.
STOP_GRACE = 10.0
#: The settings a master applies on SIGHUP (its workers reload theirs).
MASTER_RELOADABLE = ("log-level", "drain-delay", "drain-timeout")
#: The worker's end of the pipe on which it says it is ready.
READY_FD = 3
READY = b"ready\n"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _quota_cpus(root: str) -> float | None:
    """
    The CPUs this process's cgroup may use, from its CPU quota (cgroup v2
    ``cpu.max`` of its group and every group above it, or cgroup v1
    ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``); None with no quota.
    """
    limits = []
    groups = _read(os.path.join(root, "proc/self/cgroup")) or ""
    for line in groups.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            # cgroup v2: the quota of any group above this one applies too.
            parts = [part for part in path.split("/") if part]
            for depth in range(len(parts), -1, -1):
                where = os.path.join(root, "sys/fs/cgroup", *parts[:depth], "cpu.max")
                text = _read(where)
                if text is None:
                    continue
                fields = text.split()
                if len(fields) == 2 and fields[0] != "max":
                    try:
                        limits.append(int(fields[0]) / int(fields[1]))
                    except (ValueError, ZeroDivisionError):
                        pass
    for directory in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = os.path.join(root, "sys/fs/cgroup", directory)
        quota = _read(os.path.join(base, "cpu.cfs_quota_us"))
        period = _read(os.path.join(base, "cpu.cfs_period_us"))
        if quota is None or period is None:
            continue
        try:
            q, p = int(quota), int(period)
        except ValueError:
            continue
        if q > 0 and p > 0:
            limits.append(q / p)
        break
    return min(limits) if limits else None


def usable_cpus(root: str = "/") -> int:
    """
    How many CPUs this process may use: those of its CPU affinity, fewer
    where its cgroup's CPU quota (a container's CPU limit) allows fewer,
    rounded up; at least 1.  The default of ``--workers``.

    :param root: where ``/proc`` and ``/sys`` are found (tests give a copy).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _quota_cpus(root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(cpus, 1)


def worker_argv(
    argv: list[str],
    worker_id: int,
    metrics_socket: str | None = None,
    reactor: str | None = None,
) -> list[str]:
    """
    The command line of worker ``worker_id``: this interpreter running
    twistd in the foreground with the master's options; with
    ``metrics_socket``, it serves its statistics there; with ``reactor``,
    on that twistd reactor (``asyncio`` for a gRPC listener).
    """
    metrics = [] if metrics_socket is None else ["--metrics-listen", f"unix:{metrics_socket}"]
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        *([] if reactor is None else [f"--reactor={reactor}"]),
        "octoplex",
        *argv,
        "--workers",
        "1",
        "--worker-id",
        str(worker_id),
        *metrics,
    ]


#: The temporary directories of the workers' metrics sockets, named after
#: the master's pid.
METRICS_PREFIX = "octoplex-metrics-"


def _remove_orphaned_sockets(directory: str | None = None) -> None:
    """
    Remove the metrics socket directories of masters no longer running
    (killed with SIGKILL, which leaves them behind).
    """
    directory = directory or tempfile.gettempdir()
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        pid, _, rest = name.removeprefix(METRICS_PREFIX).partition("-")
        if not name.startswith(METRICS_PREFIX) or not pid.isdigit() or not rest:
            continue
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def tell_master_ready(fd: int = READY_FD) -> None:
    """
    In a worker: tell the master, on its pipe, that the listeners are
    bound.  Nothing where there is no such pipe.
    """
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        os.write(fd, READY)
        os.close(fd)
    except OSError:
        pass


def stop_reactor(reactor: Any) -> None:
    """
    Stop ``reactor``, unless it is stopping already (a second signal).
    """
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _status(reason: Failure) -> str:
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number is not None:
        try:
            return f"killed by {signal.Signals(signal_number).name}"
        except ValueError:
            return f"killed by signal {signal_number}"
    return f"exit status {getattr(value, 'exitCode', None)}"


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, master: Master, worker_id: int) -> None:
        self._master = master
        self.worker_id = worker_id
        self._partial = {1: b"", 2: b""}
        self.started = 0.0
        self.pid: int | None = None
        #: Whether it said it is ready (its listeners bound).
        self.ready = False
        #: Whether this is the first start of this worker id.
        self.first = False

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == READY_FD:
            if not self.ready and data.startswith(READY):
                self.ready = True
                self._master.is_ready(self)
            return
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            self._master.relay(self.worker_id, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in list(self._partial.items()):
            if rest:
                self._master.relay(self.worker_id, rest)
            self._partial[fd] = b""
        self._master.ended(self, reason)


class Master(Service):
    """
    The root service of a master: it spawns, supervises and signals the
    workers.

    :param options: the parsed options (their ``argv`` is passed on).
    :param reactor: the reactor.
    :param count: how many workers.
    """

    log = Logger()
    logs: Any = None

    def __init__(self, options: Any, reactor: Any, count: int) -> None:
        self.options = options
        self._reactor = reactor
        self.count = count
        self.workers: dict[int, _WorkerProtocol] = {}
        self._delay = {i: BACKOFF_FIRST for i in range(count)}
        self._pending: dict[int, Any] = {}
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        #: Set when a worker could not start: the master exits 1.
        self.failed = False
        self._started: set[int] = set()
        self._previous: dict[int, Any] = {}
        self._metrics: Any = None
        self._metrics_dir: str | None = None
        #: The twistd reactor the workers run: a gRPC listener needs
        #: asyncio's (the master's was checked to be it); else twistd's default.
        self._reactor_name: str | None = None
        if options["grpc-listen"] or options["grpc-listen-tls"]:
            self._reactor_name = "asyncio"
        #: The master's own statistics, served with the workers' sums.
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.restarts = Counter(
            "octoplex_worker_restarts",
            "Workers that exited while the daemon ran, each started again after a delay.",
            registry=self.registry,
        )
        if options["metrics-listen"] is not None:
            _remove_orphaned_sockets()
            self._metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
            sockets = [os.path.join(self._metrics_dir, f"worker-{i}.sock") for i in range(count)]
            site = TotalsSite(reactor, sockets, self.registry)
            self._metrics = strports.service(options["metrics-listen"], site, reactor=reactor)

    def _socket(self, worker_id: int) -> str | None:
        if self._metrics_dir is None:
            return None
        return os.path.join(self._metrics_dir, f"worker-{worker_id}.sock")

    #: How the master ends the process when a worker cannot start (a test
    #: gives its own).
    exit: Any = staticmethod(os._exit)

    def setServiceParent(self, parent: Any) -> None:
        if self.logs is not None:
            self.logs.attach(parent)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        """
        Bind each listener's address once, as the workers will, so that an
        address that cannot be bound stops start-up now, in one line.
        """
        addresses = []
        for option in ("listen", "listen-tls"):
            for description in self.options[option]:
                endpoint: Any = serverFromString(self._reactor, description)
                addresses.append((endpoint._interface, endpoint._port))
        grpc = self.options["grpc-listen"] + self.options["grpc-listen-tls"]
        if grpc:
            # Only with a gRPC listener: grpcio is an extra.
            from octoplex.grpc_server import split_address

            addresses += [split_address(address) for address in grpc]
        for interface, port in addresses:
            family = socket.AF_INET6 if ":" in interface else socket.AF_INET
            probe = socket.socket(family, socket.SOCK_STREAM)
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                probe.bind((interface, port))
            except OSError as e:
                raise SystemExit(
                    f"octoplex: cannot listen on {interface or '*'}:{port}: {e}"
                ) from None
            finally:
                probe.close()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.logs is not None:
            self.logs.start(self._reactor)
        super().startService()
        if self._metrics is not None:
            self._metrics.startService()
        self._reactor.callWhenRunning(self._take_signals)
        self.log.info(
            "octoplex {version} master (pid {pid}) starting {count} workers; {settings}",
            version=__version__,
            pid=os.getpid(),
            count=self.count,
            settings=self.options.given_text(leave_out=()),
            configuration=self.options.effective(),
        )
        for i in range(self.count):
            self._spawn(i)

    def _take_signals(self) -> None:
        if not self.running or threading.current_thread() is not threading.main_thread():
            return
        for number, handler in (
            (signal.SIGTERM, self._on_sigterm),
            (signal.SIGHUP, self._on_forward),
            (signal.SIGUSR1, self._on_sigusr1),
        ):
            self._previous[number] = signal.signal(number, handler)

    def _on_sigterm(self, number: int, frame: Any) -> None:
        # Not the reactor's handler, which would make twistd re-raise the
        # signal: a drained stop is a clean exit.
        self._reactor.callFromThread(stop_reactor, self._reactor)

    def _on_forward(self, number: int, frame: Any) -> None:
        self._reactor.callFromThread(self.forward, number)
        if number == signal.SIGHUP:
            self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        Read the ``--config`` file again for the master's own settings: its
        log level and the drain timings its stop waits for.  (Each worker
        reloads the rest itself, and says what needs a restart.)
        """
        path = self.options["config"]
        if path is None:
            return
        fresh = type(self.options)()
        fresh.reloading = True
        try:
            fresh.parseOptions(self.options.argv)
        except (usage.UsageError, SystemExit) as e:
            self.log.error(
                "master: reload of {path} failed; its settings stay: {error}",
                path=path,
                error=str(e),
            )
            return
        applied = [key for key in MASTER_RELOADABLE if fresh[key] != self.options[key]]
        for key in applied:
            self.options[key] = fresh[key]
        if self.logs is not None:
            self.logs.set_level(self.options["log-level"])
        self.log.info("master reloaded {path}: applied {applied}", path=path, applied=applied)

    def _on_sigusr1(self, number: int, frame: Any) -> None:
        self._reactor.callFromThread(self.forward, number)
        if self.logs is not None and self.logs.files:
            self._reactor.callFromThread(self.logs.reopen)
        previous = self._previous.get(number)
        if callable(previous):
            # twistd's handler rotates its own --logfile, when it has one.
            previous(number, frame)

    def forward(self, number: int) -> None:
        """
        Send signal ``number`` to every worker running.
        """
        name = signal.Signals(number).name
        pids = []
        for protocol in list(self.workers.values()):
            if protocol.transport is None:
                continue
            try:
                protocol.transport.signalProcess(int(number))
            except (ProcessExitedAlready, OSError):
                continue
            pids.append(protocol.pid)
        self.log.info("{signal} sent on to the workers {pids}", signal=name, pids=pids)

    def _spawn(self, worker_id: int) -> None:
        self._pending.pop(worker_id, None)
        if self._stopping:
            return
        protocol = _WorkerProtocol(self, worker_id)
        socket = self._socket(worker_id)
        if socket is not None and os.path.exists(socket):
            # Left by the worker this one replaces.
            os.unlink(socket)
        transport = self._reactor.spawnProcess(
            protocol,
            sys.executable,
            worker_argv(self.options.argv, worker_id, socket, self._reactor_name),
            env=dict(os.environ),
            childFDs={0: "w", 1: "r", 2: "r", READY_FD: "r"},
        )
        protocol.first = worker_id not in self._started
        self._started.add(worker_id)
        protocol.pid = transport.pid
        protocol.started = self._reactor.seconds()
        self.workers[worker_id] = protocol
        self.log.info(
            "worker {worker_id} started, pid {pid}", worker_id=worker_id, pid=transport.pid
        )

    def is_ready(self, protocol: _WorkerProtocol) -> None:
        """
        Worker ``protocol`` says its listeners are bound.
        """
        self.log.info(
            "worker {worker_id} (pid {pid}) ready in {ready_ms} ms",
            worker_id=protocol.worker_id,
            pid=protocol.pid,
            ready_ms=int((self._reactor.seconds() - protocol.started) * 1000),
        )

    def relay(self, worker_id: int, line: bytes) -> None:
        """
        Log a line a worker wrote to its standard output or error.
        """
        text = line.decode("utf-8", "backslashreplace").rstrip("\r")
        if text:
            self.log.info("worker {worker_id}: {line}", worker_id=worker_id, line=text)

    def ended(self, protocol: _WorkerProtocol, reason: Failure) -> None:
        worker_id = protocol.worker_id
        if self.workers.get(worker_id) is protocol:
            del self.workers[worker_id]
        lived = self._reactor.seconds() - protocol.started
        status = _status(reason)
        if self._stopping:
            self.log.info(
                "worker {worker_id} (pid {pid}) exited: {status}",
                worker_id=worker_id,
                pid=protocol.pid,
                status=status,
                clean=reason.check(ProcessDone) is not None,
            )
            if not self.workers and self._stopped is not None:
                stopped, self._stopped = self._stopped, None
                stopped.callback(None)
            return
        if protocol.first and not protocol.ready:
            self._fail(protocol, status)
            return
        if lived >= BACKOFF_RESET:
            self._delay[worker_id] = BACKOFF_FIRST
        delay = self._delay[worker_id]
        self._delay[worker_id] = min(delay * 2, BACKOFF_MAX)
        self.restarts.inc()
        self.log.warn(
            "worker {worker_id} (pid {pid}) exited after {lived:.1f} s: {status}; "
            "restarting it in {delay:g} s",
            worker_id=worker_id,
            pid=protocol.pid,
            status=status,
            lived=lived,
            delay=delay,
        )
        self._pending[worker_id] = self._reactor.callLater(delay, self._spawn, worker_id)

    def _fail(self, protocol: _WorkerProtocol, status: str) -> None:
        """
        Worker ``protocol`` exited on its first start before it was ready:
        stop every worker, then exit 1.
        """
        self.log.critical(
            "worker {worker_id} (pid {pid}) could not start: {status}; its lines above "
            "say why. Stopping the master and every worker: exit status 1",
            worker_id=protocol.worker_id,
            pid=protocol.pid,
            status=status,
        )
        if self.failed:
            return
        self.failed = True
        self._reactor.addSystemEventTrigger("after", "shutdown", self._exit_failed)
        stop_reactor(self._reactor)

    def _exit_failed(self) -> None:
        # twistd exits 0 once its reactor returns; a supervisor must see the
        # failure. Its pidfile goes first, as twistd would remove it.
        pidfile = getattr(self.options, "parent", None) and self.options.parent.get("pidfile")
        if pidfile:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
        sys.stdout.flush()
        sys.stderr.flush()
        self.exit(1)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._metrics is not None and self._metrics.running:
            self._metrics.stopService()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        self.log.info(
            "octoplex {version} master stopping: SIGTERM to {count} workers",
            version=__version__,
            count=len(self.workers),
        )
        done: Deferred[None] = Deferred()
        if not self.workers:
            done.callback(None)
        else:
            self._stopped = done
            self.forward(signal.SIGTERM)
            limit = self.options["drain-timeout"] + self.options["drain-delay"] + STOP_GRACE
            killer = self._reactor.callLater(limit, self._kill)
            done.addBoth(lambda result: (killer.active() and killer.cancel(), result)[1])
        done.addCallback(lambda _: self._stopped_all())
        return done

    def _kill(self) -> None:
        self.log.error("workers still running after the drain: SIGKILL")
        self.forward(signal.SIGKILL)

    def _stopped_all(self) -> None:
        # The handlers stay to the end: a late SIGTERM must not make twistd
        # re-raise it.
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        self.log.info("octoplex {version} master stopped", version=__version__)
        if self.logs is not None:
            self.logs.stop()


class ParentWatch(abstract.FileDescriptor):
    """
    Reads a worker's standard input, the master's pipe, and calls
    ``gone`` once it closes: the master has exited.
    """

    def __init__(self, reactor: Any, gone: Any, fd: int = 0) -> None:
        super().__init__(reactor)
        self._fd = fd
        self._gone = gone
        fdesc.setNonBlocking(fd)
        self.connected = 1

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self._fd, lambda data: None)

    def connectionLost(self, reason: Failure) -> None:
        abstract.FileDescriptor.connectionLost(self, reason)
        self._gone()
