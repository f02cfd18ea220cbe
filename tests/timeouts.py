"""
A per-test timeout that works under pytest-twisted.

pytest-timeout's "signal" method raises its failure from the SIGALRM handler,
in whatever code runs at that moment. Under pytest-twisted that is nearly
always the reactor, which runs in its own greenlet while the test waits in
``blockon``: the failure lands in the reactor's main loop, which logs it and
runs on, and the hung test hangs on (checked with a test that awaits a
Deferred that never fires). So when the alarm finds the reactor running,
this fails the Deferred the test waits on instead, which hands the failure to
the test, and cancels the test's coroutine so that it does not run on in the
reactor under the next test. When the alarm finds code running (the test's,
or whatever blocks the reactor), it fails there, as pytest-timeout does.
Should the test still not finish within
``GRACE`` seconds (a test that blocks the reactor itself), pytest-timeout's
"thread" handling ends the whole run: it fails, it does not hang.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import greenlet
import pytest
import pytest_timeout
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

GRACE = 30.0

# The reactor methods that wait for I/O: an alarm there finds the reactor idle.
_WAITING = frozenset({"doPoll", "doSelect", "doIteration"})


def _awaited(main: Any) -> Deferred[Any] | None:
    """
    The Deferred that ``main``, a greenlet parked in pytest-twisted's
    ``blockon``, waits on; None if it waits on none.
    """
    frame: FrameType | None = main.gr_frame
    while frame is not None:
        if frame.f_code is pytest_twisted.blockon_default.__code__:
            waited = frame.f_locals.get("d")
            return waited if isinstance(waited, Deferred) else None
        frame = frame.f_back
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """
    Arm SIGALRM for ``item``, with a handler that knows about the reactor's
    greenlet; leave other methods to pytest-timeout.
    """
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None
    message = pytest_timeout.PYTEST_FAILURE_MESSAGE % settings.timeout

    def give_up(signum: int, frame: FrameType | None) -> None:
        pytest_timeout.timeout_timer(item, settings)

    def handler(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        signal.signal(signal.SIGALRM, give_up)
        signal.setitimer(signal.ITIMER_REAL, GRACE)
        reactor_greenlet = pytest_twisted._instances.gr_twisted
        current = greenlet.getcurrent()
        idle = frame is not None and frame.f_code.co_name in _WAITING
        waited = _awaited(current.parent) if current is reactor_greenlet and idle else None
        if waited is None or waited.called:
            # Code runs here, the test's or what it called (outside the
            # reactor, or blocking it): fail it where it runs.
            pytest.fail(message)
        assert waited is not None
        test = waited._chainedTo
        if test is not None:
            # Once cancelled below, the test's coroutine fails with
            # CancelledError, which reaches the Deferred failed here: swallow it.
            test.addErrback(lambda _: None)
        # Hands the failure to the waiting test at once; this call returns
        # when the reactor next runs (for the test's teardown).
        waited.errback(Failure(pytest.fail.Exception(message, pytrace=False)))
        if test is not None:
            test.cancel()

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True
