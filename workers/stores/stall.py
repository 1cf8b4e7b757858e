"""What bounds a stall of the Trio thread when a store runs a call on it.

The disk and lmdb stores run small, bounded calls on the caller's thread (a load by id, a
commit of a few writes: see :class:`~workers.stores.thread.ThreadedStore`) because they are
normally served from memory: SQLite's and LMDB's pages in the page cache, writes handed to
the page cache with ``write(2)``, no fsync. "Normally" is not "always": a page that is not in
memory is read from the disk, and the kernel may make a writer wait while it flushes dirty
pages. On a slow disk either can take milliseconds, and on the Trio thread that stops every
task of the program.

:class:`StallGuard` times every such call, and reads what the kernel counted for the thread
meanwhile (``getrusage(RUSAGE_THREAD)``). A call slower than :data:`DEFAULT_LIMIT` is taken
for a slow disk when

- it read from the disk (a major page fault, or blocks read): at once;
- or it blocked in the kernel (a voluntary context switch), for the second time within a
  backoff (:data:`DEFAULT_BACKOFF`): a write throttled by the kernel shows only this way,
  but so does a wait for the GIL that another thread held while the machine was busy, which
  one slow call alone cannot tell from the disk.

A thread merely preempted by other programs on a busy machine is slow too, but that says
nothing about the disk, and is not counted. A slow disk turns calls on the caller's thread
off for a backoff (at first :data:`DEFAULT_BACKOFF`): meanwhile every call goes to the
store's worker thread, as it would without this fast path, and the Trio thread only waits for
it like for any I/O. Trips that follow each other (the next one comes within one backoff of
the end of the last window) double the backoff, up to :data:`DEFAULT_MAX_BACKOFF`; a trip
after a quiet spell starts again from :data:`DEFAULT_BACKOFF`. So a slow disk stalls the
Trio thread for at most two calls per backoff window, and less and less often while it stays
slow; how long such a call takes is the disk's business (a few page reads or writes: the
calls that may run here are bounded in size).
Where ``getrusage`` cannot say (not Linux), every slow call counts as the disk.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

try:
    import resource
except ImportError:  # not on Unix
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A call on the Trio thread slower than this (seconds) may turn the fast path off.
DEFAULT_LIMIT = 0.002
DEFAULT_BACKOFF = 1.0
DEFAULT_MAX_BACKOFF = 60.0


class Usage(NamedTuple):
    """What the kernel counted for a thread so far: its waits, and its disk I/O."""

    blocked: int  # voluntary context switches
    io: int  # major page faults + blocks read (blocks written count every page a write
    # dirties, slow or not: no sign of a slow disk)


def thread_usage() -> Usage:
    """The calling thread's :class:`Usage` (Linux: ``RUSAGE_THREAD``)."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return Usage(usage.ru_nvcsw, usage.ru_majflt + usage.ru_inblock)


def unknown_usage() -> Usage:
    """Where the kernel cannot say: every slow call counts as the disk."""
    return Usage(-1, -1)


class StallGuard:
    """Times calls run on the caller's thread; after a slow disk shows, :attr:`allows` is False
    for a while (see the module docstring). ``timer`` (seconds, monotonic) and ``usage`` are
    injectable for tests."""

    def __init__(
        self,
        label: str,
        *,
        timer: Callable[[], float] = time.perf_counter,
        usage: Callable[[], Usage] | None = None,
    ) -> None:
        self.label = label
        self.timer = timer
        if usage is None:
            known = resource is not None and hasattr(resource, "RUSAGE_THREAD")
            usage = thread_usage if known else unknown_usage
        self.usage = usage
        self._backoff = DEFAULT_BACKOFF
        #: Calls on the caller's thread are off until this time (timer's clock).
        self.off_until = -math.inf
        #: When a slow call last blocked in the kernel without reading the disk.
        self._suspected = -math.inf
        #: Slow disks seen so far (each one opened a window).
        self.trips = 0
        #: Called with the duration of every call (seconds), when set: for benchmarks.
        self.record: Callable[[float], object] | None = None

    @property
    def allows(self) -> bool:
        """Whether a call may run on the caller's thread now."""
        return self.off_until <= self.timer()

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` now, timed: if the disk is slow, later calls go to the store's thread."""
        timer = self.timer
        before = self.usage()
        start = timer()
        try:
            return fn(*args)
        finally:
            took = timer() - start
            if took > DEFAULT_LIMIT:
                self._slow(took, before)
            if self.record is not None:
                self.record(took)

    def _slow(self, took: float, before: Usage) -> None:
        after = self.usage()
        now = self.timer()
        if after.io != before.io or after.io < 0:
            self._trip(took, now)
        elif after.blocked != before.blocked:
            if now - self._suspected < DEFAULT_BACKOFF:
                self._trip(took, now)
            else:
                self._suspected = now

    def _trip(self, took: float, now: float) -> None:
        if now - self.off_until < self._backoff:
            self._backoff = min(self._backoff * 2, DEFAULT_MAX_BACKOFF)
        else:
            self._backoff = DEFAULT_BACKOFF
        self.off_until = now + self._backoff
        self._suspected = -math.inf
        self.trips += 1
        log.warning(
            "%s: a call on the event loop's thread took %.1f ms (limit %.1f ms): the disk is "
            "slow, so for %.0f s every call runs on the store's thread",
            self.label,
            took * 1000,
            DEFAULT_LIMIT * 1000,
            self._backoff,
        )
