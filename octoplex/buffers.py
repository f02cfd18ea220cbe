"""
The process-wide budget of buffered bytes: what one daemon holds in memory
on its callers' behalf, whatever they and their upstreams do.

Two things grow with what callers ask and upstreams send, and both count
against one :class:`BufferBudget` (``--max-buffered-bytes``):

- upstream bodies being read and kept for an answer (each batch's
  :class:`~octoplex.body.ResponseBudget` takes its bytes here too);
- answers written to a caller's connection that the caller has not read
  yet, once the connection's send buffer is full
  (:class:`~octoplex.inbound.OctoplexChannel`).

A body read that would pass the budget fails that item with kind
``too_large``; the rest of the batch, and every other batch, is answered.
Each batch may hold :data:`BATCH_FLOOR` bytes of bodies beyond the budget,
so that small batches are served while large ones have used it up.  An
answer is never refused for the budget (its bytes already exist); it is
counted, and held to the send timeout (``--send-timeout``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from collections.abc import Callable

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = [
    "BATCH_FLOOR",
    "BufferBudget",
    "BuffersExhausted",
    "MemoryReturner",
    "default_max_buffered_bytes",
    "release_freed_memory",
    "return_large_blocks",
]

#: Body bytes every batch may read beyond the process budget: the daemon
#: keeps serving small batches when large ones have taken the budget.  With
#: the default caps (1,000 batches in flight) that is at most 64 MiB more.
BATCH_FLOOR = 64 * 1024

_MIB = 1024 * 1024


def _memory_available() -> int | None:
    """
    The memory this process may use: the machine's, or its cgroup's limit
    (a container's) if lower; ``None`` if neither can be read.
    """
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            sizes.append(int(text))
    return min(sizes) if sizes else None


def default_max_buffered_bytes(memory: int | None = None) -> int:
    """
    The default ``--max-buffered-bytes``: an eighth of the memory available
    (:func:`_memory_available` unless ``memory`` is given), at least 64 MiB
    and at most 1 GiB.
    """
    if memory is None:
        memory = _memory_available()
    if memory is None:
        return 512 * _MIB
    return max(64 * _MIB, min(1024 * _MIB, memory // 8))


class BuffersExhausted(Exception):
    """
    An upstream body would take the daemon past its budget of buffered
    bytes; the item fails with kind ``too_large``.
    """

    def __init__(self, used: int, limit: int) -> None:
        super().__init__(used, limit)
        self.used = used
        self.limit = limit

    def __str__(self) -> str:
        return (
            f"octoplex is holding {self.used} bytes of bodies and unsent answers, its budget is "
            f"{self.limit} (--max-buffered-bytes); this body would pass it"
        )


class BufferBudget:
    """
    The bytes buffered by the whole process, held to a limit.

    :ivar limit: the budget, in bytes; settable (a reload changes it).
    :ivar used: the bytes held now.
    :ivar peak: the most held at once since start.
    :ivar high: the most held at once since the last :meth:`MemoryReturner.check`.
    :ivar refused: body reads refused for the budget since start.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.refused = 0
        #: The most held at once since :class:`MemoryReturner` last looked.
        self.high = 0

    def take(self, count: int) -> bool:
        """
        Take ``count`` bytes if the budget has them; ``False`` (taking
        nothing, counted as refused) if not.
        """
        used = self.used + count
        if used > self.limit:
            self.refused += 1
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        if used > self.high:
            self.high = used
        return True

    def force(self, count: int) -> None:
        """
        Count ``count`` bytes that are held already, budget or not.
        """
        self.used += count
        if self.used > self.peak:
            self.peak = self.used
        if self.used > self.high:
            self.high = self.used

    def give_back(self, count: int) -> None:
        """
        Return ``count`` bytes taken or forced earlier.
        """
        self.used -= count


def _libc_function(name: str) -> Callable[..., int] | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        return getattr(ctypes.CDLL(path), name, None)
    except OSError:
        return None


#: glibc's mallopt() parameter that sets the size from which an allocation
#: is its own mapping (M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3


def return_large_blocks(threshold: int = 128 * 1024) -> bool:
    """
    Have glibc give every block of ``threshold`` bytes or more its own
    mapping, returned to the system when freed.

    glibc does this from 128 KiB, but once such a block is freed it raises
    the threshold to that block's size (up to 32 MiB): after one 7 MiB body
    is freed, later bodies of up to that size come from the heap, whose
    freed pages stay in the process.  Setting the threshold fixes it there.
    A large body or answer is one ``bytes`` object, so its memory goes back
    as soon as it is freed.

    :return: whether it was set (only with glibc).
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def release_freed_memory() -> bool:
    """
    Return the heap's free pages to the system (glibc's ``malloc_trim``):
    the many small chunks of a large load are freed into the heap, and glibc
    only gives back what is at its top unless asked.

    :return: whether it ran (only with glibc).
    """
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


#: How much the budget must have held since the last check for the freed
#: memory to be worth returning.
RETURN_AFTER = 16 * _MIB


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), or ``None``."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryReturner(TimerService):
    """
    Every ``interval`` seconds, once a burst of large bodies or answers is
    over (the budget held :data:`RETURN_AFTER` bytes or more since the last
    look, and now holds under a quarter of that), give the freed memory
    back to the system (:func:`release_freed_memory`), and say how much.

    :param clock: the reactor, for the timer.
    :param buffers: the budget to watch.
    :param interval: seconds between looks.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, buffers: BufferBudget, interval: float = 5.0) -> None:
        super().__init__(interval, self.check)
        self.clock = clock
        self._buffers = buffers

    def stopService(self) -> Deferred[None]:
        # A start-up that failed stops every service, this one unstarted
        # (TimerService has no loop until it starts).
        if not hasattr(self, "_loop"):
            return succeed(None)
        return super().stopService()

    def check(self) -> bool:
        """
        Return the freed memory if a burst is over; whether it did.
        """
        buffers = self._buffers
        high = buffers.high
        if high < RETURN_AFTER or buffers.used * 4 >= high:
            return False
        buffers.high = buffers.used
        before = resident_bytes()
        # A connection's objects refer to one another (channel, request,
        # transport), so an aborted one, with the unsent answer in its
        # transport's buffer, is freed by the cycle collector, which an
        # idle process would not run for a long time.
        collected = gc.collect()
        release_freed_memory()
        after = resident_bytes()
        self.log.info(
            "returned {returned_mib:.1f} MiB of freed memory to the system after holding "
            "{high_mib:.1f} MiB of bodies and answers",
            returned_mib=(before - after) / _MIB if before and after else 0.0,
            high_mib=high / _MIB,
            rss_bytes=after,
            collected=collected,
        )
        return True
