"""One long-lived worker thread per store, so blocking I/O never runs on the Trio thread.

``trio.to_thread.run_sync`` would also keep I/O off the Trio thread, but it may hand each call
to a different thread. Stores want one: SQLite connections (diskcache) are per thread, an LMDB
write transaction must stay on the thread that began it, and one thread serialises the store's
calls without a lock. Jobs run in submission order.

A Trio task waiting for its job cannot abandon it: a cancelled caller waits until the job has
finished (the job may be a commit that callers were told about), then sees the cancellation.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_STOP = object()


class StoreThread:
    """A worker thread that runs blocking callables for Trio tasks, one at a time, in order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, token, task = job
            result = outcome.capture(fn, *args)
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread and return (or raise) its result."""
        if not self._thread.is_alive():
            raise RuntimeError("the store thread has stopped")
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        self._jobs.put((fn, args, trio.lowlevel.current_trio_token(), task))
        # Abort.FAILED: the job cannot be recalled, so cancellation waits for it to finish.
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def stop(self) -> None:
        """Let the thread exit after the jobs already queued. Idempotent."""
        self._jobs.put(_STOP)
