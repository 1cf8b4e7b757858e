"""One long-lived worker thread per store, so blocking I/O never runs on the Trio thread.

:class:`StoreThread` is the thread; :class:`ThreadedStore` is the Store protocol for a store
whose library blocks (diskcache, lmdb), written once: every call checked, then run on the
store's thread, the library's own failures turned into :class:`~workers.StoreError`.

The calls that may run now
--------------------------
A hop to the worker thread and back costs 40-90 us on a small machine, several times what
LMDB or SQLite take to answer from memory. So a :class:`ThreadedStore` is also an
:class:`~workers.stores.base.ImmediateStore`: :meth:`~ThreadedStore.load_now` and
:meth:`~ThreadedStore.commit_now` run a load or a commit of at most :attr:`inline_max` ids or
writes on the caller's thread (the Trio thread), when :meth:`~ThreadedStore.loads_now` and
:meth:`~ThreadedStore.commits_now` say they may. They may only while

- the worker thread has no job of ours queued or running (so calls keep their order, and
  the library is never used from two threads at once);
- the :class:`~workers.stores.stall.StallGuard` allows it: a call that was slow (a page read
  from a slow disk) sends every call to the thread for a while; that is what bounds a stall;
- the store says so (``_may_run_now``): never a commit that would fsync (``durability="power"``,
  SQLite's WAL header), never while SQLite checkpoints on its own thread.

``inline=False`` turns this off: every call then hops, as before.

``trio.to_thread.run_sync`` would also keep I/O off the Trio thread, but it may hand each call
to a different thread. Stores want one: SQLite connections (diskcache) are per thread, an LMDB
write transaction must stay on the thread that began it, and one thread serialises the store's
calls without a lock. Jobs run in submission order.

A Trio task waiting for its job cannot abandon it: a cancelled caller waits until the job has
finished (the job may be a commit that callers were told about), then sees the cancellation.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import outcome
import trio

from ..record.errors import StoreError
from ..record.session import Session
from .base import Write, check_limit, check_writes
from .stall import StallGuard

log = logging.getLogger(__name__)

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
            if token is not None:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            elif isinstance(result, outcome.Error):
                log.error("%s: a background job failed", self._thread.name, exc_info=result.error)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread and return (or raise) its result."""
        if not self._thread.is_alive():
            raise RuntimeError("the store thread has stopped")
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        self._jobs.put((fn, args, trio.lowlevel.current_trio_token(), task))
        # Abort.FAILED: the job cannot be recalled, so cancellation waits for it to finish.
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def is_current(self) -> bool:
        """Whether the calling thread is this worker thread."""
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the worker thread after the jobs already queued, without waiting
        for it: a chore whose result nobody needs (a failure is logged)."""
        self._jobs.put((fn, args, None, None))

    def stop(self) -> None:
        """Let the thread exit after the jobs already queued. Idempotent."""
        self._jobs.put(_STOP)


class ThreadedStore:
    """The Store protocol for a blocking library, on one :class:`StoreThread` per open store.

    A subclass writes the blocking side, each run on the thread (or, for ``_load`` and
    ``_commit``, on the caller's thread when the module docstring's rules allow): ``_open``
    and ``_close`` (taking and releasing whatever the store holds), and ``_load``, ``_commit``,
    ``_load_mark``, ``_scan``, ``_expired`` and ``_count`` with the arguments of the protocol's
    methods. Here they are checked (a bad limit or a batch of non-writes is refused before
    anything runs), run in order, and the exceptions named by :attr:`errors` become
    :class:`StoreError`. A subclass sets :attr:`label` and calls :meth:`_init_inline`.
    """

    #: The store's name in messages and its thread's name.
    label: str
    #: What the library raises for its own failures (I/O, a full map...).
    errors: ClassVar[tuple[type[Exception], ...]] = (OSError,)
    #: Most ids a ``load_now`` and writes a ``commit_now`` may take: bounded work only, tens of
    #: microseconds (a store sets its own: it depends on what a write costs there).
    inline_max: ClassVar[int] = 4
    #: A commit is a transaction: concurrent callers' writes are better committed together.
    group_commit: ClassVar[bool] = True

    _thread: StoreThread | None = None
    #: Whether calls may run on the caller's thread at all (the ``inline`` option).
    inline: bool = False
    #: Times those calls and turns them off after a slow one.
    stall_guard: StallGuard
    #: Our jobs queued on the thread or running there (calls run now only when none are).
    _jobs_out: int = 0

    def _init_inline(self, inline: bool) -> None:
        self.inline = inline
        self.stall_guard = StallGuard(self.label)

    def __repr__(self) -> str:
        return f"<{self.label}>"

    async def open(self) -> None:
        """Start the thread and open the store on it; StoreError naming the cause if it fails
        (everything taken is released again), or if the store is open already."""
        if self._thread is not None:
            raise StoreError(f"{self.label} is already open")
        self._thread = StoreThread(self.label)
        try:
            await self._run(self._open)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the store and stop its thread. Idempotent; also after a failed open.

        Runs to the end even when the caller is cancelled: a close skipped here would keep the
        store's lock, refusing every later owner (a restarted manager in this very process).
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with trio.CancelScope(shield=True):
            try:
                await thread.run(self._close)
            except self.errors as exc:
                raise StoreError(f"{self.label}: closing failed: {exc}") from exc
            finally:
                thread.stop()

    async def load(self, ids: Iterable[str]) -> dict[str, Session]:
        return await self._run(self._load, list(ids))

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        check_writes(writes)
        if not writes:
            return []
        return await self._run(self._commit, list(writes))

    async def load_mark(self) -> int:
        return await self._run(self._load_mark)

    async def scan(
        self, now_ms: int, cursor: str | None, limit: int
    ) -> tuple[list[Session], str | None]:
        check_limit(limit)
        return await self._run(self._scan, now_ms, cursor, limit)

    async def expired(self, now_ms: int, limit: int) -> list[str]:
        check_limit(limit)
        return await self._run(self._expired, now_ms, limit)

    async def count(self, now_ms: int) -> int:
        return await self._run(self._count, now_ms)

    # -- on the caller's thread (see the module docstring) ----------------------------------

    def loads_now(self, count: int) -> bool:
        """Whether :meth:`load_now` of ``count`` ids may run on the caller's thread now."""
        return self._runs_now(count, commit=False)

    def commits_now(self, count: int) -> bool:
        """Whether :meth:`commit_now` of ``count`` writes may run on the caller's thread now."""
        return self._runs_now(count, commit=True)

    def _runs_now(self, count: int, *, commit: bool) -> bool:
        return (
            self.inline
            and not self._jobs_out
            and count <= self.inline_max
            and self._thread is not None
            and self.stall_guard.allows
            and self._may_run_now(commit)
        )

    def load_now(self, ids: Sequence[str]) -> dict[str, Session]:
        """:meth:`load`, on the caller's thread: only when :meth:`loads_now` said so."""
        return self._now(self._load, list(ids))

    def commit_now(self, writes: Sequence[Write]) -> list[bool]:
        """:meth:`commit`, on the caller's thread: only when :meth:`commits_now` said so."""
        check_writes(writes)
        if not writes:
            return []
        return self._now(self._commit, list(writes))

    def _now(self, fn: Callable[..., T], *args: Any) -> T:
        if self._thread is None:
            raise StoreError(f"{self.label} is not open")
        try:
            return self.stall_guard.run(fn, *args)
        except self.errors as exc:
            raise StoreError(f"{self.label}: {exc or type(exc).__name__}") from exc

    def _may_run_now(self, commit: bool) -> bool:
        """The store's own conditions for a call on the caller's thread (the module's list)."""
        return True

    # -- on the store's thread ---------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the store thread; the library's failures become StoreError."""
        thread = self._thread
        if thread is None:
            raise StoreError(f"{self.label} is not open")
        self._jobs_out += 1
        try:
            return await thread.run(fn, *args)
        except self.errors as exc:
            raise StoreError(f"{self.label}: {exc or type(exc).__name__}") from exc
        finally:
            self._jobs_out -= 1

    def _in_background(self, fn: Callable[..., object], *args: Any) -> None:
        """Run a chore on the store thread without waiting for it (it does not count as a job
        of ours: calls on the caller's thread go on meanwhile, so it must be safe alongside
        them); at once when called on the store thread itself."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_current():
            fn(*args)
        else:
            thread.submit(fn, *args)

    # The blocking side: see the class docstring.

    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _load(self, ids: list[str]) -> dict[str, Session]:
        raise NotImplementedError

    def _commit(self, writes: list[Write]) -> list[bool]:
        raise NotImplementedError

    def _load_mark(self) -> int:
        raise NotImplementedError

    def _scan(
        self, now_ms: int, cursor: str | None, limit: int
    ) -> tuple[list[Session], str | None]:
        raise NotImplementedError

    def _expired(self, now_ms: int, limit: int) -> list[str]:
        raise NotImplementedError

    def _count(self, now_ms: int) -> int:
        raise NotImplementedError
