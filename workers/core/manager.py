"""The session manager: the one actor that owns the store, answering requests in batches.

Every request is an :class:`~workers.core.operations.Operation`. A request the manager cannot
answer inline (below) is queued with a deferred reply slot, and when the mailbox is empty (or
the queue is full) the queued operations run as one batch: one ``load``, the operations
applied in arrival order, one ``commit`` (one store transaction: group commit), and only then
the replies. Under load a batch carries many requests, so the cost of a transaction is
shared; with a single caller a batch is that caller's request alone.

Failures, by kind:

- an operation's own error (``SessionNotFound``, ``UpdateFailed``...) goes to its caller only;
- a store's error (``StoreError``, ``ServiceUnavailable`` from a shared store) on a load or a
  scan goes to every caller of the batch; on a commit (one transaction: nothing of it was
  written) it goes to every operation that wrote, and to every operation whose answer depends
  on a write that failed (a later read of the same session, a page or a count after it). An
  operation that wrote nothing and read nothing the failed writes touched is answered;
- a store spread over shards (Redis Cluster) may complete a batch in some and fail it in
  others (:class:`~workers.stores.base.PartialCommit`, ``PartialLoad``): each operation is
  then answered from its own shard's outcome by the same rules, and an operation is never
  answered as written unless all of its writes were;
- a ``retrieve`` or ``touch`` whose only write, its access-time refresh, is refused by the
  store with ``StoreError`` (a Redis at ``maxmemory`` with ``noeviction``) is still answered
  with the session: a full store keeps serving reads. Each such read is counted
  (:attr:`ManagerCounters.store_warnings`, in ``stats()``) and logged as a WARNING, at most
  once per :data:`WARN_EVERY` seconds;
- anything else is a bug or an injected fault: the actor crashes, every waiting caller gets
  ``ServerDown`` at once (the service turns it into ``ServiceUnavailable``), the supervisor
  starts a new manager, which re-opens the store. Committed writes survive it.

Shared stores that can refresh access times while loading
(:class:`~workers.stores.base.TouchingStore`, redis) load the sessions of ``retrieve`` and
``touch`` that way: a read costs one round trip, not a load and then a commit.

Reads and access times: a manager that owns its store alone keeps a bounded cache of the
sessions it read and committed (``cache_size``), and with ``access_write_delay`` it writes the
access-time refreshes of ``retrieve`` and ``touch`` at most that often instead of with their
batch, so a read is not a disk write. Refreshes not yet written are kept in memory, seen by
every request, written before any request that reads the store as a whole (a scan, a count, a
sweep) and in ``terminate``. Memory is bounded: when ``max(cache_size, max_batch)`` of them
wait, they are written at once, and until then a further refresh goes with its batch. A
refresh is deferred only while the access time the store holds for the session is less than
``access_write_delay`` old, and less than a tenth of the session's idle timeout
(:data:`~workers.core.operations.DEFER_SHARE`); an older one is written with its batch. So a
process killed outright can make a session expire early by less than ``access_write_delay``
and less than a tenth of its timeout, however long the writes take and however close to its
timeout the session was. (Bounding only how long a refresh waits is not enough: a session
read once just before its stored expiry would be lost with that one refresh; the chaos run
found it.) Metadata writes are never deferred.

Inline answers: while the manager is idle (nothing queued, nothing in its mailbox, no batch
under way) a request is answered in the caller's task, as a batch of its own
(:meth:`SessionManager.handle_call_inline`), with no message and no wake-up of the manager,
when its store work can run there too: what it reads is cached, or the store can load it now
(not for a request of ``send_request``, see :meth:`SessionManager._loads_now`), and what it
writes the store can commit now (an :class:`~workers.stores.base.ImmediateStore`:
the memory store always; the disk and lmdb stores for a few ids or writes, on their terms,
see :mod:`workers.stores.thread`). A write goes inline only for a caller that is alone
(``Actor.callers == 1``) or a store whose commit costs nothing of its own (memory): with
company, writes go through the mailbox and share one commit (group commit), which is what
makes 50 callers cheaper per write than one. The rules are the batch's: same view, same
operations, same order of effects, so nothing but the cost depends on which way a request
went. An inline read that finds the clock mark due to be persisted asks the manager to write
it (a ``_HOUSEKEEP`` message to itself) and does not wait for it. Housekeeping (the deferred
refreshes, then the mark) runs when no request is queued; callers wait for it like for any
batch.

Pipelining: a batch whose commit goes to the store's thread (too many writes to commit now,
or a store that is never immediate: redis) is *out*: the manager goes back to its mailbox and
gathers, loads and applies the next batch meanwhile, on top of the writes that are out
(``pending``: the sessions as the batch out leaves them). That next batch waits for the one
out before it commits or answers anything that read its sessions, so replies always follow
their own commit, and a session touched twice sees the first write. If the commit out fails,
nothing of it was written: its callers get the error, and the next batch, which saw its
writes, runs again from what is stored (none of its callers gets that error); if some of its
writes lost a race to another process (a shared store), the next batch joins the operations
retried, after them. One batch at most is out.

Waiting for the store: while a handler waits for the store's thread (a load, a scan, the
commit out before it) it answers inline meanwhile whatever names none of the sessions of its
batch (``Actor.answering``), so a read that misses the cache does not hold up reads of cached
sessions; and a batch that neither reads what the commit out writes nor writes is answered
without waiting for it. At most :data:`BUSY_BUDGET` requests are answered while the store
works: a Trio thread kept busy by callers never gives the GIL up of its own accord, and the
store's thread, which needs it between its library's calls, then gets it only every 5 ms (a
sweep's commit of 100 deletes took a second instead of 2 ms, and a sweep of 190,000 sessions 25
times as long).

The store is opened in ``init`` and closed in ``terminate`` (which runs after a crash too), so
each incarnation holds the store's single-owner lock exactly while it lives.

Time: a batch's "now" is the wall clock, never earlier than any "now" the service has used
before (:meth:`ServiceClock.now_ms`; the mark lives in the service's clock, so it survives
manager restarts). A wall clock that jumps backwards therefore changes nothing: no session
expired at the latest time the service saw becomes live again, none is deleted, no
``last_accessed`` moves back; time simply stands still until the clock catches up. A forward
jump is taken as real time passing: sessions whose idle timeout lies before the new time are
expired, as they would be after that much idleness.

The mark also survives process restarts: a batch whose "now" is at least ``MARK_EVERY_MS``
past the mark last persisted commits a :class:`~workers.stores.base.Mark` with it (in the
same transaction when the batch writes; alone, so at most once a second, when it only reads),
and ``init`` starts from the stored mark. So after a restart with a wall clock set back, no
session the service had seen expired (more than ``MARK_EVERY_MS`` before the last mark) is
live again.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import outcome
import trio

from supervisor import Actor, ReplySlot, TimerHandle

from ..record.errors import SessionError, StoreError
from ..record.session import Session
from ..stores.base import (
    Delete,
    ImmediateStore,
    Mark,
    PartialCommit,
    PartialLoad,
    Put,
    Store,
    TouchingStore,
    Write,
    write_id,
    write_ids,
)
from .cache import ReadCache
from .metrics import Metrics
from .operations import Limits, Operation, View

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The clock high-water mark is persisted when it moved on by this much (ms) since the last time
#: (or since the last attempt that failed).
MARK_EVERY_MS = 1000
#: Seconds between two WARNING lines about reads answered without their access-time write.
WARN_EVERY = 10.0
#: How often an operation whose conditional write lost a race is tried before giving up.
MAX_ATTEMPTS = 16
#: Backoff before the n-th retry: uniform in [0, min(RETRY_CAP, RETRY_BASE * 2**n)] seconds.
RETRY_BASE = 0.001
RETRY_CAP = 0.05


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    """How a manager works: fixed for the life of the service."""

    limits: Limits
    #: Most operations in one batch (one store transaction).
    max_batch: int = 256
    #: Sessions kept in the read cache (0: none; only for a store owned alone).
    cache_size: int = 0
    #: Seconds an access-time refresh may wait before it is written (0: with its batch).
    access_write_delay: float = 0.0


@dataclass(slots=True)
class ServiceClock:
    """The service's "now": the wall clock, never going backwards, and its persisted mark.

    Owned by the service, not by a manager incarnation, so the high-water mark survives
    manager restarts (see the module docstring, "Time").
    """

    #: Wall clock in seconds since the epoch (injectable for tests).
    clock: Callable[[], float]
    #: Whether marks are written at all (a read-only service writes nothing).
    persist: bool = True
    #: The latest "now" handed out by :meth:`now_ms`.
    high_water_ms: int = 0
    #: The high water last committed to the store (a Mark write), or read from it.
    persisted_ms: int = 0
    #: The high water of the last Mark whose commit failed: a failing store (a full Redis) is
    #: not sent a Mark with every batch, only once per MARK_EVERY_MS.
    tried_ms: int = 0

    def now_ms(self) -> int:
        """The wall clock in ms, held back so that it never goes backwards."""
        self.high_water_ms = max(self.high_water_ms, int(self.clock() * 1000))
        return self.high_water_ms

    def mark(self) -> Mark | None:
        """A Mark write for the batch when the high water moved on by MARK_EVERY_MS since the
        last one (it rides on the batch's single commit: no transaction of its own)."""
        if not self.persist:
            return None
        if self.high_water_ms - max(self.persisted_ms, self.tried_ms) < MARK_EVERY_MS:
            return None
        return Mark(self.high_water_ms)

    def restored(self, mark: int) -> None:
        """Start no earlier than ``mark``, the mark a store held when it was opened."""
        self.high_water_ms = max(self.high_water_ms, mark)
        self.persisted_ms = max(self.persisted_ms, mark)


@dataclass(slots=True)
class ManagerCounters:
    """Figures the managers keep for operators. Owned by the service (like
    :class:`ServiceClock`), so they add up across manager restarts."""

    #: Reads answered although the store refused to write their access time (module docstring).
    store_warnings: int = 0
    #: Of those, how many the log has not mentioned yet, and when it last did (Trio time).
    unlogged: int = 0
    logged_at: float = -WARN_EVERY

    def warn(self, reads: int, error: SessionError) -> None:
        """Count ``reads`` answered without their access-time write; log it, rate-limited."""
        self.store_warnings += reads
        self.unlogged += reads
        now = trio.current_time()
        if now - self.logged_at >= WARN_EVERY:
            log.warning(
                "%d reads answered without writing their access time (the store refused the "
                "write; sessions may expire early until it takes writes again): %s",
                self.unlogged,
                error,
            )
            self.unlogged, self.logged_at = 0, now


@dataclass(slots=True)
class _Queued:
    op: Operation
    slot: ReplySlot
    attempts: int = 0


@dataclass(slots=True)
class _Retry:
    """A timer message: these operations lost a race and their backoff is over."""

    items: list[_Queued]


@dataclass(slots=True)
class _Failed:
    """What an operation that failed on its own answers (after the commit: see _Batch)."""

    error: SessionError


#: (item, result or _Failed, first write, end of its writes): one operation of a batch.
_Applied = tuple[_Queued, Any, int, int]


@dataclass(slots=True)
class _Batch:
    """A batch applied to its view, waiting for (or past) its commit.

    Operations that failed on their own are in ``applied`` too (with a :class:`_Failed` and no
    writes): what made them fail may be a write of this batch, or of the batch before, that is
    not committed yet, so they are answered after the commit, like the others.
    """

    applied: list[_Applied]
    view: View
    #: The view's writes, with the clock mark when one is due.
    writes: list[Write]
    mark: Mark | None
    #: Set when the commit is over; ``ok`` says whether every write took effect, ``retry``
    #: holds the operations whose writes lost a race (a shared store), to be run again.
    done: trio.Event = field(default_factory=trio.Event)
    ok: bool = False
    retry: list[_Queued] = field(default_factory=list)


#: Messages to self: the deferred access-time refreshes are due to be written (a timer), and
#: housekeeping was asked for from a caller's task (it only wakes the manager).
_WRITE_ACCESS = "write access times"
_HOUSEKEEP = "housekeeping is due"
#: Requests answered (inline, or in batches that do not wait) while the manager waits for its
#: store's thread (a commit out, a load or a scan in a handler); past that, requests wait for
#: the store too. A store thread needs the GIL between its library's calls, and a Trio thread
#: kept busy by callers that are answered at once (never idle, so never giving the GIL up of
#: its own accord) hands it over only every sys.getswitchinterval() (5 ms): a sweep's commit of
#: 100 deletes took a second, where it takes 2 ms.
BUSY_BUDGET = 32
#: The most writes one operation answered inline makes (rotate: a put and a delete), plus
#: the clock mark: what must be able to go now before an operation that writes runs inline
#: (a store's inline_max is at least this).
_OP_WRITES = 3


class SessionManager(Actor):
    """Owns one store; see the module docstring. Requests are Operation instances."""

    async def init(
        self,
        store: Store,
        settings: ManagerSettings,
        clock: ServiceClock,
        counters: ManagerCounters,
        telemetry: Metrics,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.counters = counters
        #: The service's figures (batch sizes, inline answers, cache hits, store errors).
        self.telemetry = telemetry
        self.queue: list[_Queued] = []
        self.cache = ReadCache(settings.cache_size)
        #: Refreshed sessions whose new access time is not written yet, by id, and the access
        #: time the store holds for each.
        self.unwritten: dict[str, Session] = {}
        self.stored_access: dict[str, int] = {}
        #: The batch whose commit is out (see "Pipelining"), and the sessions it writes, as
        #: it leaves them (None: deleted), by id.
        self.out: _Batch | None = None
        self.pending: dict[str, Session | None] = {}
        #: While a handler waits for the store: the sessions its batch is about (a request that
        #: names one waits for it). And requests answered while the store works (BUSY_BUDGET).
        self.busy: set[str] | None = None
        self.busy_answers = 0
        #: Housekeeping to do when no request is queued: the refreshes' timer fired; an inline
        #: read asked for the clock mark, or max_unwritten refreshes wait.
        self.access_due = False
        self.mark_asked = False
        self.access_timer: TimerHandle | None = None
        #: The store, when it can (at times) be used without waiting: inline answers use it.
        self.immediate = store if isinstance(store, ImmediateStore) else None
        self.defer_ms = round(settings.access_write_delay * 1000)
        self.max_unwritten = max(settings.cache_size, settings.max_batch)
        #: The store, when it refreshes access times as it loads (only if none are deferred).
        self.touching = store if isinstance(store, TouchingStore) and not self.defer_ms else None
        await store.open()
        # After a process restart, "now" starts no earlier than the latest time persisted.
        clock.restored(await store.load_mark())

    async def terminate(self, reason: object) -> None:
        try:
            if self.unwritten:
                await self._write_access_times()
        except SessionError as exc:
            log.error("%d access-time refreshes not written: %s", len(self.unwritten), exc)
        finally:
            await self.store.close()

    async def handle_call(self, request: Operation) -> None:
        self.queue.append(_Queued(request, self.defer_reply()))
        if len(self.queue) >= self.settings.max_batch:
            await self._run_batch()

    async def handle_cast(self, message: _Retry | str) -> None:
        if isinstance(message, _Retry):
            self.queue.extend(message.items)
        elif message == _WRITE_ACCESS:
            self.access_timer = None
            self.access_due = True
        elif message != _HOUSEKEEP:
            raise ValueError(f"the session manager got an unknown message {message!r}")

    def handle_call_inline(self, op: Operation) -> outcome.Outcome[Any] | None:
        """Answer ``op`` now, as a batch of its own, if its store I/O can run now (see module)."""
        store = self.immediate
        access_only = op.access_only
        if op.reads_store(self.settings.limits):
            return None
        if store is None:
            if not (access_only and self.defer_ms):
                return None
        elif not access_only and not self._writes_now(store, _OP_WRITES):
            return None  # it writes, and the store cannot take its write now
        busy = self.busy
        if self.out is not None or busy is not None:
            if self.busy_answers >= BUSY_BUDGET:
                return None  # let the store's thread have the GIL: wait for the store
            self.busy_answers += 1
        view = self._view()
        try:
            op.prepare(view)
            ids = op.ids()
            pending = self.pending
            if pending and any(session_id in pending for session_id in ids):
                return None  # its session is in the commit that is out: the next batch waits
            if busy and not busy.isdisjoint(ids):
                return None  # the batch under way is about it
            missing = self._known(view, ids) if ids else ids
            if missing:
                if store is None or not self._loads_now(store, len(missing)):
                    return None
                view.sessions.update(self._loaded(store.load_now(missing)))
            result = op.apply(view)
            outcomes: list[bool] = []
            writes, mark = self._with_mark(view.writes)
            if writes:
                if store is not None and (
                    (not access_only and len(writes) <= _OP_WRITES)
                    or self._writes_now(store, len(writes))
                ):
                    outcomes = store.commit_now(writes)
                    if mark is not None:
                        del outcomes[-1]
                        self._marked(mark, True)
                elif view.writes:
                    return None  # access-only (checked above): apply changed nothing but the view
                else:
                    self._ask_for_mark()  # only the mark is due: the manager writes it
        except SessionError as exc:
            self._ask_for_mark()
            self.telemetry.inline += 1
            return outcome.Error(exc)
        if self.cache.capacity or self.unwritten or view.touched:
            self._remember(view, outcomes)
        self.telemetry.inline += 1
        return outcome.Value(op.finish(result, outcomes))

    def _writes_now(self, store: ImmediateStore, count: int) -> bool:
        """Whether an inline answer may commit ``count`` writes: when the store can take them
        now and, for a store whose commit has a cost of its own (group commit: a transaction,
        a write to the file), when the caller is alone (``callers`` is 1: a caller waiting in
        its own task, and no other). With company, the writes go through the mailbox and are
        committed together; a request sent by ``send_request`` (the daemon's reactor, which
        may have more right behind it) counts as company."""
        return (self.callers == 1 or not store.group_commit) and store.commits_now(count)

    def _loads_now(self, store: ImmediateStore, count: int) -> bool:
        """Whether ``count`` sessions may be loaded on the caller's thread now: when the store
        can, except for a store whose calls have a cost of their own and a request sent by
        ``send_request`` (``callers`` is 0: the daemon's reactor, with more requests right
        behind it). Its misses load on the store's thread, where SQLite and LMDB read without
        the GIL while the reactor goes on, and the misses queued meanwhile share one load: a
        daemon under 50 connections reading more sessions than the cache holds served 10-12%
        more that way. 50 callers in their own tasks served 8-17% less with their misses on
        the thread, so they keep loading at once."""
        return (self.callers != 0 or not store.group_commit) and store.loads_now(count)

    async def handle_drained(self) -> None:
        while self.queue or self.access_due or self.mark_asked:
            if self.queue:
                await self._run_batch()
            else:
                await self._housekeep()

    async def _housekeep(self) -> None:
        """Write the deferred refreshes if their timer fired, then the clock mark if it is due.

        On a store error nothing is lost: the refreshes stay unwritten and are tried again
        after ``access_write_delay``.
        """
        access_due, self.access_due, self.mark_asked = self.access_due, False, False
        await self._drain()
        try:
            if access_due and self.unwritten:
                await self._write_access_times()
        except SessionError as exc:
            self.telemetry.store_error(exc)
            log.warning(
                "housekeeping failed (%d access times unwritten, kept for the next try): %s",
                len(self.unwritten),
                exc,
            )
        else:
            await self._persist_mark()
        self._arm_access_timer()

    def _ask_for_mark(self) -> None:
        """Have the manager write the clock mark, if one is due (from a caller's task)."""
        if not self.mark_asked and self.clock.mark() is not None:
            self.mark_asked = True
            self.send_after(0, _HOUSEKEEP)

    def _arm_access_timer(self) -> None:
        if self.unwritten and not self.access_timer:
            self.access_timer = self.send_after(self.settings.access_write_delay, _WRITE_ACCESS)

    async def _meanwhile(self, awaitable: Awaitable[T]) -> T:
        """Await the store in a handler, answering meanwhile what needs none of it (see
        ``busy``; while ``busy`` is None the handler's batch is not known yet: its reads of the
        store as a whole take no session a read inline could change)."""
        if self.busy is None:
            self.busy = set()
            try:
                return await self._meanwhile(awaitable)
            finally:
                self.busy = None
        self.busy_answers = 0
        return await self.answering(awaitable)

    async def _drain(self) -> None:
        """Wait until no commit is out."""
        while self.out is not None:
            await self.out.done.wait()

    async def _commit(self, writes: list[Write]) -> list[bool]:
        """Commit ``writes`` now if the store can, else on its terms (nothing may be out)."""
        store = self.immediate
        if store is not None and store.commits_now(len(writes)):
            return store.commit_now(writes)
        return await self.store.commit(writes)

    async def _write_access_times(self) -> None:
        """Commit every deferred access-time refresh (each a Put of an unchanged version)."""
        sessions = list(self.unwritten.values())
        # In chunks: refreshes are independent, and one huge transaction pins the store's
        # write buffers (LMDB keeps them as long as the environment is open).
        size = self.settings.max_batch
        for start in range(0, len(sessions), size):
            chunk = sessions[start : start + size]
            await self._commit([Put(s, s.version) for s in chunk])
            for s in chunk:
                if self.unwritten.get(s.id) is s:
                    del self.unwritten[s.id]
                    del self.stored_access[s.id]

    def _view(self) -> View:
        settings = self.settings
        # Memory is bounded: past max_unwritten waiting refreshes, new ones go with their batch.
        defer_ms = self.defer_ms if len(self.unwritten) < self.max_unwritten else 0
        return View(self.store, self.clock.now_ms(), settings.limits, defer_ms, self.stored_access)

    def _known(self, view: View, ids: Iterable[str]) -> list[str]:
        """Put the sessions ``ids`` held in memory (the commit that is out, unwritten
        refreshes, the cache) into ``view``; the ids that must be loaded from the store."""
        missing = []
        pending = self.pending
        found = 0
        for session_id in ids:
            if session_id in pending:
                view.sessions[session_id] = pending[session_id]
                continue
            session = self.unwritten.get(session_id) or self.cache.get(session_id)
            if session is None:
                missing.append(session_id)
            else:
                view.sessions[session_id] = session
                found += 1
        if self.cache.capacity:  # a manager without a cache has no hit rate to report
            self.telemetry.cache_hits += found
            self.telemetry.cache_misses += len(missing)
        return missing

    async def _load(self, view: View, ids: set[str], touch: set[str]) -> dict[str, SessionError]:
        """Put the sessions ``ids`` into ``view``: unwritten refreshes, cache, then store.

        Those in ``touch`` are refreshed by the store as it loads them, if it can. Returns the
        error of each id a sharded store could not load (the other shards' were loaded).
        """
        missing = self._known(view, ids)
        if not missing:
            return {}
        errors: dict[str, SessionError] = {}
        store = self.immediate
        try:
            if self.touching is not None and touch:
                loaded = await self.touching.load_touching(missing, touch, view.now_ms)
            elif store is not None and self._loads_now(store, len(missing)):
                loaded = store.load_now(missing)
            else:
                loaded = await self._meanwhile(self.store.load(missing))
        except PartialLoad as exc:
            loaded, errors = exc.found, exc.errors
            self.telemetry.store_error(next(iter(errors.values()), exc))
        view.sessions.update(self._loaded(loaded))
        return errors

    def _loaded(self, loaded: dict[str, Session]) -> dict[str, Session]:
        for session in loaded.values():
            self.cache.put(session)
        return loaded

    def _with_mark(self, writes: list[Write]) -> tuple[list[Write], Mark | None]:
        """``writes`` with the clock mark added when one is due (it rides on their commit)."""
        mark = self.clock.mark()
        return (writes, None) if mark is None else ([*writes, mark], mark)

    async def _persist_mark(self) -> None:
        """Commit the clock mark alone if it is due; a failure is logged, and a batch at least
        MARK_EVERY_MS later tries again (the mark only moves up).

        Not while a commit is out (nothing else may be committed then): that commit carries
        the mark if it was due when it went; if not, housekeeping writes it once it is over."""
        out = self.out
        if out is not None:
            if out.mark is None:
                self._ask_for_mark()
            return
        mark = self.clock.mark()
        if mark is None:
            return
        try:
            await self._commit([mark])
        except SessionError as exc:
            self.telemetry.store_error(exc)
            log.warning("could not persist the clock mark: %s", exc)
            self._marked(mark, False)
        else:
            self._marked(mark, True)

    def _marked(self, mark: Mark | None, ok: bool) -> None:
        """Note that ``mark`` (if any) was committed, or that committing it failed."""
        if mark is not None:
            if ok:
                self.clock.persisted_ms = mark.ms
            else:
                self.clock.tried_ms = mark.ms

    def _remember(self, view: View, outcomes: list[bool]) -> None:
        """Keep the cache and the unwritten refreshes in step with a committed batch."""
        if not (self.cache.capacity or self.unwritten or view.touched):
            return  # nothing cached, nothing deferred (the memory store): nothing to keep
        written: dict[str, Session] = {}
        for write, ok in zip(view.writes, outcomes, strict=True):
            if ok:
                self.unwritten.pop(write_id(write), None)
                self.stored_access.pop(write_id(write), None)
                if isinstance(write, Put):
                    self.cache.put(write.session)
                    written[write.session.id] = write.session
                else:
                    self.cache.drop(write.id)
        for session_id, stored_ms in view.touched.items():
            session = view.sessions.get(session_id)
            if session is not None and written.get(session_id) is not session:
                known = self.unwritten.get(session_id)
                if known is not None and known.version == session.version:
                    if known.last_accessed >= session.last_accessed:
                        continue  # an inline read refreshed it later, while this batch was out
                self.unwritten[session_id] = session
                self.stored_access.setdefault(session_id, stored_ms)
                self.cache.put(session)
        if len(self.unwritten) >= self.max_unwritten and not self.access_due:
            self.access_due = True  # write them now rather than make later reads write
            self.send_after(0, _HOUSEKEEP)  # this may run in a caller's task: wake up
        self._arm_access_timer()

    async def _run_batch(self) -> None:
        size = self.settings.max_batch
        batch, self.queue = self.queue[:size], self.queue[size:]
        self.telemetry.batches.observe(len(batch))
        limits = self.settings.limits
        if any(q.op.reads_store(limits) for q in batch):
            await self._drain()  # it reads the store as a whole: nothing may be out
            if self.unwritten:
                try:
                    await self._write_access_times()
                except SessionError as exc:
                    return self._fail_all(batch, exc)
        base = self.out  # the batch whose writes this one may see before they are committed
        view = self._view()
        ready: list[_Queued] = []
        for item in batch:
            op = item.op
            try:
                op.prepare(view)
            except SessionError as exc:
                item.slot.fail(exc)  # nothing read yet: its own error, whatever happens next
                continue
            if op.reads_store(limits):
                try:
                    await self._meanwhile(op.read(view))
                except SessionError as exc:
                    self.telemetry.store_error(exc)
                    item.slot.fail(exc)
                    continue
            ready.append(item)
        ids = {i for q in ready for i in q.op.ids()}
        # Whether it reads what the batch that is out writes (checked before the await below:
        # that batch may be done by then, and its writes no longer in pending).
        sees_base = not self.pending.keys().isdisjoint(ids)
        try:
            self.busy = ids
            # The ids to refresh as they load: only a TouchingStore (Redis) uses them.
            touch = (
                {i for q in ready if q.op.touches for i in q.op.ids()}
                if self.touching is not None
                else set()
            )
            unloaded = await self._load(view, ids, touch)
        except SessionError as exc:
            return self._fail_all(ready, exc)
        finally:
            self.busy = None

        applied: list[_Applied] = []
        for item in ready:
            start = len(view.writes)
            try:
                if unloaded:
                    missed = next((unloaded[i] for i in item.op.ids() if i in unloaded), None)
                    if missed is not None:
                        raise _fresh(missed)
                result = item.op.apply(view)
            except SessionError as exc:
                result = _Failed(exc)
            applied.append((item, result, start, len(view.writes)))

        if base is not None:
            self.busy_answers += len(batch)
        if base is not None and (sees_base or view.writes or self.busy_answers > BUSY_BUDGET):
            # Its answers may rest on the writes of the batch that is out, or its own writes
            # must be committed after them: it waits for that commit. (A batch that neither
            # reads those sessions nor writes is answered now.)
            self.busy = ids
            try:
                await self._meanwhile(base.done.wait())
            finally:
                self.busy = None
            if base.retry:
                # Some of its writes lost a race, and this batch saw them: it goes with the
                # operations retried, after them (one _Retry list, not delivered yet).
                base.retry.extend(batch)
                return
            if not base.ok:
                # Not all of it was written, and this batch saw its writes: run it again from
                # what is stored.
                self.queue[:0] = batch
                return
        if not view.writes:
            # A batch of reads only: answered now; the mark, if due, gets a commit of its own,
            # at most one a second, whose failure is only logged.
            self._finish(_Batch(applied, view, [], None), [])
            await self._persist_mark()
            return
        writes, mark = self._with_mark(view.writes)
        done = _Batch(applied, view, writes, mark)
        store = self.immediate
        if store is not None and store.commits_now(len(writes)):
            self._finish(done, self._outcomes(store.commit_now, writes))
            return
        # The commit goes out; the next batch is gathered, loaded and applied meanwhile.
        self.out = done
        self.busy_answers = 0
        for write in view.writes:
            for session_id in write_ids(write):
                self.pending[session_id] = view.sessions.get(session_id)
        self.spawn(self._commit_out, done)

    async def _commit_out(self, done: _Batch) -> None:
        """The commit of a batch that is out, then its answers (see "Pipelining")."""
        try:
            try:
                outcomes = list(await self.store.commit(done.writes))
            except SessionError as exc:
                outcomes = _failed_outcomes(exc, len(done.writes))
            self._finish(done, outcomes)
        finally:
            self.pending.clear()
            self.out = None
            done.done.set()

    @staticmethod
    def _outcomes(commit: Callable[[list[Write]], list[bool]], writes: list[Write]) -> list[Any]:
        """Per write, what ``commit(writes)`` said of it: True, False, or the error."""
        try:
            return list(commit(writes))
        except SessionError as exc:
            return _failed_outcomes(exc, len(writes))

    def _fail_all(self, items: list[_Queued], exc: SessionError) -> None:
        self.telemetry.store_error(exc)
        log.warning("store failed a batch of %d requests: %s", len(items), exc)
        for item in items:
            item.slot.fail(_fresh(exc))

    def _finish(self, done: _Batch, outcomes: list[bool | SessionError]) -> None:
        """Answer the batch whose commit gave ``outcomes`` (retry the writes that lost a race)."""
        if done.mark is not None:
            self._marked(done.mark, outcomes[-1] is True)
        writes = done.view.writes
        outcomes = outcomes[: len(writes)]
        done.ok = all(ok is True for ok in outcomes)
        self._remember(done.view, [ok is True for ok in outcomes])
        self._answer(done.applied, writes, outcomes, done.retry)

    def _answer(
        self,
        applied: list[_Applied],
        writes: list[Write],
        outcomes: list[bool | SessionError],
        retry: list[_Queued],
    ) -> None:
        """Answer each applied operation from the outcomes of its writes (module docstring);
        those whose writes lost a race go to ``retry``."""
        limits = self.settings.limits
        lost = _lost_races(writes, outcomes)
        failed_ids: set[str] = set()  # ids with a write that failed with an error, so far
        first_error: SessionError | None = None
        refused: SessionError | None = None  # a refresh the store refused (answered anyway)
        refused_reads = 0
        seen = 0
        for item, result, start, end in applied:
            for write, ok in zip(writes[seen:start], outcomes[seen:start], strict=True):
                if isinstance(ok, SessionError):
                    failed_ids.update(write_ids(write))
                    first_error = first_error or ok
            seen = start
            op = item.op
            mine = outcomes[start:end]
            error = next((ok for ok in mine if isinstance(ok, SessionError)), None)
            if first_error is not None and (
                op.reads_store(limits) or not failed_ids.isdisjoint(op.ids())
            ):
                # What it read includes a write that failed: its answer would report it.
                item.slot.fail(_fresh(first_error))
            elif isinstance(result, _Failed):
                item.slot.fail(result.error)
            elif error is not None:
                if op.access_only and isinstance(error, StoreError):
                    refused, refused_reads = error, refused_reads + 1
                    item.slot.reply(op.finish(result, [False] * len(mine)))
                else:
                    item.slot.fail(_fresh(error))
            elif not any(lost[start:end]):
                item.slot.reply(op.finish(result, mine))
            elif item.attempts + 1 < MAX_ATTEMPTS:
                item.attempts += 1
                retry.append(item)
            else:
                item.slot.fail(StoreError("the session kept changing under this write; retry"))
        errors = [ok for ok in outcomes if isinstance(ok, SessionError)]
        if errors:
            self.telemetry.store_error(errors[0])
            log.warning("store failed %d of %d writes: %s", len(errors), len(writes), errors[0])
        if refused is not None:
            self.counters.warn(refused_reads, refused)
        if retry:
            # Jittered exponential backoff, one timer for the batch: managers that keep losing
            # to each other stop colliding, and the retried operations stay one batch (one
            # load, one commit). Other requests are served meanwhile.
            n = max(item.attempts for item in retry)
            self.send_after(random.uniform(0, min(RETRY_CAP, RETRY_BASE * 2**n)), _Retry(retry))


def _failed_outcomes(exc: SessionError, count: int) -> list[Any]:
    """Per write, what a commit of ``count`` writes that raised ``exc`` says of it: a partial
    commit's own outcomes, else the error for each."""
    return exc.outcomes if isinstance(exc, PartialCommit) else [exc] * count


def _lost_races(writes: list[Write], outcomes: list[bool | SessionError]) -> list[bool]:
    """Per write, whether it failed because the store did not hold what the batch expected.

    A failed Put, or a failed Delete that named the version it loaded, lost a race to another
    writer of a shared store. A later write of the batch to the same id then fails too (the
    failed-write rule of ``stores/base.py``), any Delete included: computed from the state the
    failed write expected, it is retried with its operation, never answered as if there had
    been nothing to delete. A write that failed with an error lost no race.
    """
    failed: set[str] = set()
    lost: list[bool] = []
    for write, ok in zip(writes, outcomes, strict=True):
        ids = write_ids(write)
        race = isinstance(write, Put) or (
            isinstance(write, Delete) and write.expected_version is not None
        )
        lost.append(ok is False and (race or not failed.isdisjoint(ids)))
        if ok is False:
            failed.update(ids)
    return lost


def _fresh(exc: SessionError) -> SessionError:
    # A fresh instance per caller: one exception object raised in many tasks would collect
    # all their tracebacks.
    return type(exc)(str(exc))
