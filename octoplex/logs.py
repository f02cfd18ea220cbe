"""
The daemon's logs: one observer that writes the log as JSON Lines (or as
readable text), filtered by level and rotated by size, and the access log,
one JSON line per batch.

How it plugs into twistd
------------------------
twistd builds the application (``makeService``) *before* its ``AppLogger``
starts logging, and ``AppLogger.start`` takes, in this order: the factory
named by twistd's ``--logger``; else an ``ILogObserver`` component of the
application (the documented hook for ``.tac`` files); else the observer of
twistd's ``--logfile`` / ``--syslog`` / standard output.  A plugin never
sees the application, except once: twistd hands the service that
``makeService`` returned to ``setServiceParent(application)``.  The root
service passes it to :meth:`Logs.attach`, which sets Octoplex's observer
as that component.  So twistd's ``AppLogger`` logs to Octoplex's observer
and to nothing else: no double logging, no ``twistd.log`` beside it, and
twistd installs no ``SIGUSR1`` handler of its own (it does so only when it
opens its own log file).

``--logger`` could not be used instead: the ``AppLogger`` reads it when
twistd's runner is built, and twistd imports its value by name after the
plugin's options are parsed, so a plugin cannot set it to an object.

Octoplex steps aside when twistd's own ``--logfile``, ``--syslog`` or
``--logger`` is given: twistd then logs as it always did (its ``--logfile``
rotates at 1 MB and keeps every rotated file), and Octoplex's options for
that log (``--log-file``, ``--log-format``, a ``--log-level`` other than
info) are refused rather than silently ignored.  ``--access-log`` works
either way: without the component, :meth:`Logs.start` adds the observer to
the global publisher itself.

Without ``--log-file``: with ``-n`` the log goes to standard output, as
text; as a daemon it goes to ``twistd.log``, as twistd's would, but rotated
and bounded like any Octoplex log file.

``SIGUSR1`` reopens the files, for logrotate's move-and-signal: the root
service installs the handler when it starts (chaining to any handler that
was there) and restores the previous one when it stops.

The cost on the hot path is one level check per event; an event that is
written is formatted once (``formatEvent`` and one ``json.dumps``) and
written with one ``write`` call, unbuffered, as twistd's own log file does.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import attr
from twisted.application.app import ServerOptions
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from zope.interface import implementer

__all__ = ["LogOptions", "Logs", "json_line", "open_log_file"]

#: The defaults of ``--log-max-bytes`` and ``--log-keep``.
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP = 5

#: The file a daemon (no ``-n``) logs to without ``--log-file``, as twistd's.
DAEMON_LOG_FILE = "twistd.log"

_LEVELS = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical)
_LEVEL_NAMES = ("debug", "info", "warn", "error")
_FORMATS = ("json", "text")

#: Keys of the old twisted.python.log events that the JSON line already
#: carries in its own fields (message, time, level, system, failure).
_LEGACY_KEYS = frozenset({"message", "time", "isError", "system", "format", "why", "failure"})


def _level(text: str) -> str:
    name = text.strip().lower()
    if name not in _LEVEL_NAMES:
        raise ValueError(f"{text!r} is not a log level; use one of {', '.join(_LEVEL_NAMES)}")
    return name


def _format(text: str) -> str:
    name = text.strip().lower()
    if name not in _FORMATS:
        raise ValueError(f"{text!r} is not a log format; use json or text")
    return name


def _whole(least: int, what: str) -> Callable[[str], int]:
    def coerce(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if value < least:
            raise ValueError(f"{text!r} must be {least} or more")
        return value

    coerce.coerceDoc = what  # type: ignore[attr-defined]
    return coerce


class LogOptions(usage.Options):
    """
    The logging options of ``twistd octoplex``; :class:`octoplex.tap.Options`
    extends this class, and its ``postOptions`` calls :meth:`open_logs`.
    """

    optParameters = [
        [
            "log-file",
            None,
            None,
            "Write the log to this file, rotated by size. Without it: standard "
            "output with -n, else twistd.log.",
        ],
        [
            "log-format",
            None,
            None,
            "json (one object per line) or text; default: json to a file, text to standard output.",
            _format,
        ],
        [
            "log-level",
            None,
            "info",
            "The least severe events written to the log: debug, info, warn or error.",
            _level,
        ],
        [
            "log-max-bytes",
            None,
            DEFAULT_MAX_BYTES,
            "Bytes at which --log-file and --access-log are rotated (PATH becomes "
            "PATH.1); 0: never, for logrotate.",
            _whole(0, "Must be a whole number, 0 or more."),
        ],
        [
            "log-keep",
            None,
            DEFAULT_KEEP,
            "Rotated files kept of each log (PATH.1 to PATH.N); older ones are deleted.",
            _whole(1, "Must be a whole number, 1 or more."),
        ],
        [
            "access-log",
            None,
            None,
            "Also write each batch's event to this file, one JSON line each, rotated the same way.",
        ],
    ]

    def open_logs(self) -> None:
        """
        Decide where the log goes, and open its files now, so that a path
        that cannot be written stops start-up with a sentence.  Sets
        ``self["logs"]`` to a :class:`Logs`.
        """
        twistd = getattr(self, "parent", None)
        if not isinstance(twistd, ServerOptions):
            twistd = None
        twistd_logs = twistd is not None and any(
            twistd.get(option) for option in ("logfile", "syslog", "logger")
        )
        if twistd_logs:
            ours = [
                f"--{option}" for option in ("log-file", "log-format") if self[option] is not None
            ] + (["--log-level"] if self["log-level"] != "info" else [])
            if ours:
                verb = "are" if len(ours) > 1 else "is"
                raise usage.UsageError(
                    f"{' and '.join(ours)} {verb} for Octoplex's own log, which twistd's "
                    "--logfile, --syslog or --logger replaces: give Octoplex's log options "
                    "or twistd's, not both"
                )
        path = self["log-file"]
        if path is None and twistd is not None and not twistd_logs:
            if not (twistd.get("nodaemon") or twistd.get("debug")):
                path = DAEMON_LOG_FILE
        max_bytes, keep = self["log-max-bytes"], self["log-keep"]
        main: _Sink | None = None
        if path is not None:
            main = open_log_file(path, max_bytes, keep, "--log-file")
        elif twistd is not None and not twistd_logs:
            # Captured now: once twistd logs, sys.stdout is redirected into the log.
            main = _Stream(sys.stdout)
        access = None
        if self["access-log"] is not None:
            access = open_log_file(self["access-log"], max_bytes, keep, "--access-log")
        log_format = self["log-format"] or ("text" if isinstance(main, _Stream) else "json")
        self["logs"] = Logs(main, log_format, self["log-level"], access)


class _Sink:
    """
    Where lines are written.
    """

    path: str | None = None

    def write(self, line: bytes) -> None:
        raise NotImplementedError()

    def reopen(self) -> None:
        """
        Reopen the file at its path (a stream has none).
        """

    def close(self) -> None:
        """
        Close the file.
        """


class _Stream(_Sink):
    """
    Standard output, or another text stream.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._buffer = getattr(stream, "buffer", None)

    def write(self, line: bytes) -> None:
        if self._buffer is not None:
            self._stream.flush()
            self._buffer.write(line)
            self._buffer.flush()
        else:
            self._stream.write(line.decode("utf-8"))
            self._stream.flush()


class _RotatingFile(LogFile):
    """
    Twisted's size-rotated ``LogFile``, which reopens its path by opening the
    new file before closing the old, so that a failed reopen (a directory
    that is gone) leaves the log writing where it was.
    """

    def reopen(self) -> None:
        previous = self._file
        self._openFile()
        previous.close()


class _File(_Sink):
    def __init__(self, log_file: _RotatingFile) -> None:
        self._file = log_file
        self.path = log_file.path

    def write(self, line: bytes) -> None:
        # LogFile counts the length of what it is given: bytes, to rotate on
        # bytes rather than characters.
        self._file.write(line)

    def reopen(self) -> None:
        self._file.reopen()

    def close(self) -> None:
        self._file.close()


def open_log_file(path: str, max_bytes: int, keep: int, option: str = "the log") -> _Sink:
    """
    Open ``path`` for appending, rotated when it reaches ``max_bytes``
    (never if 0), keeping ``keep`` rotated files: ``path.1`` (the newest)
    to ``path.<keep>``.

    :raises usage.UsageError: naming ``option`` when the file cannot be opened.
    """
    try:
        log_file = _RotatingFile.fromFullPath(
            path, rotateLength=max_bytes or None, maxRotatedFiles=keep
        )
    except OSError as e:
        raise usage.UsageError(f"{option} {path!r} cannot be opened: {e.strerror}") from None
    return _File(log_file)


class _Clock:
    """
    ISO 8601 UTC with milliseconds, the seconds formatted once per second.
    """

    def __init__(self) -> None:
        self._last: tuple[int, str] = (-1, "")

    def __call__(self, when: float | None) -> str | None:
        if when is None:
            return None
        seconds = int(when)
        last_seconds, text = self._last
        if seconds != last_seconds:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            self._last = (seconds, text)
        return f"{text}.{int((when - seconds) * 1000):03d}Z"


_iso_time = _Clock()


def _jsonable(value: Any) -> Any:
    """
    ``json.dumps``'s fallback: an attrs instance as its fields, a set as a
    list, anything else as its ``str``.
    """
    if attr.has(type(value)):
        return attr.asdict(value, recurse=False)
    if isinstance(value, (set, frozenset)):
        return list(value)
    return str(value)


_encode = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_jsonable
).encode


def _text(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return object.__repr__(value)


def _traceback(failure: Any) -> str:
    try:
        return str(failure.getTraceback())
    except Exception as e:
        return f"(the traceback could not be formatted: {_text(e)})"


def _message(event: dict[str, Any]) -> str:
    """
    The event's text: ``str.format_map`` where the template is a plain one,
    ten times cheaper than ``formatEvent``; ``formatEvent`` (which also
    calls ``{method()}`` fields and describes what it cannot format) for
    everything else.
    """
    template = event.get("log_format")
    if type(template) is str:
        try:
            return template.format_map(event)
        except Exception:
            pass
    return formatEvent(event)


def json_line(event: dict[str, Any]) -> bytes:
    """
    ``event`` as one line of JSON: ``time`` (ISO 8601 UTC, milliseconds),
    ``level``, ``namespace``, ``message`` (the formatted text), ``system``
    when the event has one, then the event's own fields (Twisted's
    ``log_*`` keys left out; what JSON cannot hold as its ``str``) and, for
    a failure, its traceback under ``failure``.

    :param event: a ``twisted.logger`` event.
    :return: the line, UTF-8, ending in a newline.
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _iso_time(event.get("log_time")),
        "level": None if level is None else level.name,
        "namespace": event.get("log_namespace"),
        "message": _message(event),
    }
    system = event.get("log_system")
    if system is not None and system != "-":
        record["system"] = system
    for key, value in event.items():
        if key in record or key in _LEGACY_KEYS or key.startswith("log_"):
            continue
        record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = _traceback(failure)
    try:
        text = _encode(record)
    except Exception:
        # A value JSON cannot hold even with the fallback: a dict with keys
        # that are not strings, NaN, a cycle.  Only those become strings.
        safe = {}
        for key, value in record.items():
            try:
                _encode(value)
            except Exception:
                value = _text(value)
            safe[key] = value
        text = _encode(safe)
    return text.encode("utf-8", "backslashreplace") + b"\n"


class _SecondStamp:
    """
    twistd's timestamp (``2026-11-28T11:08:58+0000``), formatted once per
    second: Twisted's ``formatTime`` works out the time zone on every call,
    most of the cost of a text line.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        if second != self._second:
            self._text = formatTime(second)
            self._second = second
        return self._text


_stamp = _SecondStamp()


def _system(event: dict[str, Any]) -> str:
    """The ``[system]`` of a classic line, as Twisted's ``eventAsText`` writes it."""
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        return f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    try:
        return str(system)
    except Exception:
        return "UNFORMATTABLE"


def _text_line(event: dict[str, Any]) -> bytes | None:
    """
    twistd's classic line for ``event``: for a plain template and no
    failure, put together here with ``str.format_map`` (Twisted's
    ``formatEvent`` runs a ``string.Formatter`` in Python, about 20 us a
    line); for anything else, by ``formatEventAsClassicLogText``.  Byte for
    byte the same either way (tests/test_logs.py).
    """
    template = event.get("log_format")
    if type(template) is str and "log_failure" not in event:
        try:
            message = template.format_map(event)
        except Exception:
            message = ""
        if message:
            line = f"{_stamp(event.get('log_time'))} [{_system(event)}] {message}"
            return (line.replace("\n", "\n\t") + "\n").encode("utf-8", "backslashreplace")
    text = formatEventAsClassicLogText(event, formatTime=_stamp)
    return None if text is None else text.encode("utf-8", "backslashreplace")


@implementer(ILogObserver)
class Logs:
    """
    The observer of Octoplex's logs.

    :param main: where the log goes, or ``None`` when twistd's own log
        observer writes it.
    :param log_format: ``json`` or ``text``, for ``main``.
    :param level: the least severe level written to ``main``: ``debug``,
        ``info``, ``warn`` or ``error`` (which takes ``critical`` too).
    :param access: the access log: every event with ``access=True`` (each
        batch's, whatever its level) as a JSON line; or ``None``.
    """

    log = Logger()

    def __init__(
        self, main: _Sink | None, log_format: str, level: str, access: _Sink | None
    ) -> None:
        self._main = main
        self._text = log_format == "text"
        self.set_level(level)
        self._access = access
        #: Whether twistd's AppLogger logs to this observer.
        self.attached = False
        self._publisher: LogPublisher | None = None
        self._reactor: Any = None
        self._previous_handler: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        main = self._main is not None and event.get("log_level", LogLevel.info) in self._levels
        access = self._access is not None and event.get("access") is True
        if not (main or access):
            return
        line = None
        if main:
            assert self._main is not None
            if self._text:
                text = _text_line(event)
                if text is not None:
                    self._main.write(text)
            else:
                line = json_line(event)
                self._main.write(line)
        if access:
            assert self._access is not None
            self._access.write(line or json_line(event))

    def set_level(self, level: str) -> None:
        """
        Write events of ``level`` and more severe from now on (a reload).

        :param level: ``debug``, ``info``, ``warn`` or ``error``.
        """
        self._levels = frozenset(_LEVELS[_LEVEL_NAMES.index(_level(level)) :])

    @property
    def files(self) -> list[_Sink]:
        """
        The files written: the log's, then the access log's.
        """
        return [sink for sink in (self._main, self._access) if sink is not None and sink.path]

    def attach(self, parent: Any) -> None:
        """
        Make this the observer twistd's ``AppLogger`` logs to, if ``parent``
        is twistd's application and this observer writes the log.

        :param parent: what the root service is given as its parent.
        """
        if self._main is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self)
            self.attached = True

    def start(self, reactor: Any, publisher: LogPublisher = globalLogPublisher) -> None:
        """
        Take ``SIGUSR1`` to reopen the files, and observe ``publisher`` if
        twistd's ``AppLogger`` does not log to this observer.

        :param reactor: the reactor, which runs the reopening.
        :param publisher: the publisher to observe.
        """
        self._reactor = reactor
        if not self.attached and self._publisher is None and (self._main or self._access):
            publisher.addObserver(self)
            self._publisher = publisher
        if self.files and self._previous_handler is None:
            self._previous_handler = signal.signal(signal.SIGUSR1, self._on_sigusr1)

    def stop(self) -> None:
        """
        Give ``SIGUSR1`` back to its previous handler, and stop observing
        the publisher if :meth:`start` did.
        """
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)
            self._previous_handler = None
        if self._publisher is not None:
            self._publisher.removeObserver(self)
            self._publisher = None

    def _on_sigusr1(self, number: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reopen)
        previous = self._previous_handler
        if callable(previous):
            # twistd's handler rotates its own --logfile, when it has one.
            previous(number, frame)

    def reopen(self) -> None:
        """
        Reopen the files at their paths: after logrotate has moved them,
        the log goes on in new files.
        """
        for sink in self.files:
            try:
                sink.reopen()
            except OSError as e:
                self.log.error(
                    "could not reopen {path}: {error}; still writing where it was",
                    path=sink.path,
                    error=e.strerror,
                )
        self.log.info("log files reopened: {paths}", paths=[sink.path for sink in self.files])

    def close(self) -> None:
        """
        Close the files.
        """
        for sink in self.files:
            sink.close()
