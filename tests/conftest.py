"""
Fixtures shared by the tests: real servers on 127.0.0.1, and a guard that
fails any test which leaves an unhandled error in the log or a batch's
deadline still scheduled.

pytest-twisted has no dirty-reactor check, so this file is it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from octoplex.multiplexer import _BatchRun

from .servers import Caller, Octoplex, Upstream, start_octoplex, start_upstream
from .timeouts import pytest_timeout_set_timer  # noqa: F401 (a hook for pytest-timeout)


@pytest.fixture(autouse=True)
def clean_log_and_reactor() -> Iterator[list[dict[str, Any]]]:
    """
    Collect every log event of the test; afterwards fail it if any event is
    an error or an unhandled failure, or if a batch deadline is left behind.
    """
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
    errors = [
        event
        for event in events
        if event.get("isError") or ("log_failure" in event and not event.get("expected_failure"))
    ]
    assert not errors, f"unexpected errors logged: {errors}"
    leftover = [
        call
        for call in reactor.getDelayedCalls()
        if isinstance(getattr(call.func, "__self__", None), _BatchRun)
    ]
    assert not leftover, f"batch deadlines left scheduled: {leftover}"


@pytest.fixture
def log_events(clean_log_and_reactor: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    The log events of the running test.
    """
    return clean_log_and_reactor


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """
    A scriptable HTTP upstream on 127.0.0.1.
    """
    server = start_upstream()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def octoplex() -> Iterator[Octoplex]:
    """
    Octoplex with default limits on 127.0.0.1.
    """
    server = start_octoplex()
    yield server
    pytest_twisted.blockon(server.stop())


@pytest.fixture
def caller() -> Caller:
    """
    An HTTP client for talking to Octoplex.
    """
    return Caller()
