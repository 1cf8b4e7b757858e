"""The memory store: sessions in this process's memory (the seed's ``ets`` table).

The store object belongs to the service and outlives every manager incarnation that borrows it,
like an ETS table with an heir: ``close`` only marks it closed and ``open`` marks it open again,
so a manager crash never wipes a session. Nothing survives the process.

Layout
------
Sessions are held as :class:`~workers.record.session.Session` objects, not encoded bytes: a load
is a dict lookup with no decoding, and the records cost what the manager's own would. A
:class:`~workers.stores.base.Put` hands its session over to the store and ``load`` / ``scan``
return the stored objects themselves, so both sides treat them as read-only. That is safe
because the manager stores only metadata it canonicalised (a fresh copy nobody else holds) and
copies metadata again before replying to a caller.

*Buckets.* Sessions live in ``_BUCKETS`` dicts chosen by ``hash(id)``. A scan walks the buckets
in index order and each bucket in id order, so its cursor is ``"<bucket>:<last id>"``: stateless,
never invalidated by writes, and no id can appear twice. Resuming costs one sort of a single
bucket, so a complete scan is O(n log(n / _BUCKETS)), not quadratic. ``hash`` of a str is
randomised per process, which is fine: the store and its cursors never leave the process.

*Expiry index.* ``expired`` and ``count`` must not visit every session. The index has two parts
and a watermark ``W``, with this invariant: a session with ``expires_at < W`` is in
``_expired``, and any other session with an expiry has an entry in ``_heap`` at or before its
expiry, except that while ``_split`` is set the sessions expiring exactly at ``W`` may be in
either.

- ``_heap``, a min-heap of ``(expires_at, id)`` holding, for each session with
  ``expires_at >= W``, an entry at or before its expiry. It is lazy. A Put that moves an
  expiry later (every refresh does) pushes nothing: the session's entry still comes first,
  and when it is popped early the session is pushed again at its real expiry, so a session
  read a thousand times between sweeps costs one push, not a thousand. A Put that moves an
  expiry earlier pushes a new entry, and an entry whose session is gone, never expires, or
  expires earlier than the entry says (so it has an earlier entry) is dropped when popped.
  When entries outnumber twice the sessions the heap is rebuilt, so it stays O(n) in size.
- ``_expired``, the sessions with ``expires_at < W`` (and, with ``_split``, some with
  ``expires_at == W``): all expired at every ``now_ms > W``, and at ``now_ms == W`` too when
  ``_split`` is clear. Raising ``W`` pops the heap entries below it into ``_expired``, in
  expiry order.

``expired(now, limit)`` raises ``W`` towards ``now`` only until ``_expired`` holds ``limit``
ids, so each call of a sweep costs O(limit log n), whatever the backlog; a sweep of a million
sessions in bounded batches is O(n log n) in total. It may stop in the middle of the sessions
that expire at one millisecond (``W`` is then that millisecond and ``_split`` is set): a
million sessions restored or created in one batch share their expiry time, and moving them
all in one call would hold the manager for seconds. ``count(now)`` raises ``W`` to ``now`` and
answers ``len - len(_expired)``: each session is moved once, so O(1) amortised, but the first
count after a long quiet spell pays for everything that expired meanwhile (a few µs each).
``_expired`` is an ``OrderedDict`` because the sweep deletes from its front, and a plain dict's
iterator would re-skip every deleted slot at each batch. A clock that goes back
(``now_ms < W``, or ``now_ms == W`` with ``_split``) is still answered exactly, by filtering
``_expired`` (rare, O(expired)).

Every method completes without awaiting anything, so each call, a whole ``commit`` included, is
atomic with respect to other Trio tasks without a lock, and costs no scheduler round trip. It is
an :class:`~workers.stores.base.ImmediateStore`: ``load_now`` and ``commit_now`` let the manager
answer a request in the caller's task.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from itertools import islice

from ..record.errors import StoreError, describe
from ..record.session import Session
from .base import (
    Delete,
    Put,
    Write,
    apply_in_order,
    check_limit,
    check_writes,
    may_delete,
    source_holds,
    write_ids,
)

#: Number of dicts the sessions are spread over: the granularity of a scan's resume sort.
_BUCKETS = 1024
_MASK = _BUCKETS - 1
#: Below every wall-clock time: nothing is known to be expired before the first query.
_NO_WATERMARK = -(2**63)
#: Slack before a heap rebuild, so a small store does not rebuild on every few touches.
_HEAP_SLACK = 1024


class MemoryStore:
    """An in-process store that keeps its sessions across ``close`` and ``open``."""

    backend = "memory"
    shared = False
    group_commit = False  # a commit is dict work per write: nothing to share

    def __init__(self) -> None:
        self._buckets: list[dict[str, Session]] = [{} for _ in range(_BUCKETS)]
        self._count = 0
        self._heap: list[tuple[int, str]] = []
        self._expired: OrderedDict[str, int] = OrderedDict()
        self._watermark = _NO_WATERMARK
        #: Whether _expired may hold sessions expiring exactly at the watermark.
        self._split = False
        self._mark = 0
        self._open = False

    async def open(self) -> None:
        """Make the store usable; the sessions of earlier incarnations are all still here."""
        if self._open:
            raise StoreError("the memory store is already open")
        self._open = True

    async def close(self) -> None:
        """Refuse further calls until the next ``open``. Keeps every session."""
        self._open = False

    async def load(self, ids: Sequence[str]) -> dict[str, Session]:
        return self.load_now(ids)

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        return self.commit_now(writes)

    def loads_now(self, count: int) -> bool:
        return True

    def commits_now(self, count: int) -> bool:
        return True

    def load_now(self, ids: Sequence[str]) -> dict[str, Session]:
        self._check_open()
        buckets = self._buckets
        found: dict[str, Session] = {}
        for sid in ids:
            session = buckets[hash(sid) & _MASK].get(sid)
            if session is not None:
                found[sid] = session
        return found

    def commit_now(self, writes: Sequence[Write]) -> list[bool]:
        self._check_open()
        if len(writes) == 1 and type(writes[0]) is Put:  # an inline answer's usual one write
            return [self._put(writes[0])]
        check_writes(writes)
        return apply_in_order(writes, write_ids, self._apply)

    async def load_mark(self) -> int:
        self._check_open()
        return self._mark

    def _apply(self, write: Write) -> bool:
        if isinstance(write, Put):
            return self._put(write)
        if isinstance(write, Delete):
            return self._delete(write)
        self._mark = max(self._mark, write.ms)
        return True

    async def scan(
        self, now_ms: int, cursor: str | None, limit: int
    ) -> tuple[list[Session], str | None]:
        self._check_open()
        check_limit(limit)
        bucket_index, after = _parse_cursor(cursor)
        page: list[Session] = []
        for index in range(bucket_index, _BUCKETS):
            bucket = self._buckets[index]
            for sid in sorted(sid for sid in bucket if sid > after):
                session = bucket[sid]
                if not session.expired_at(now_ms):
                    page.append(session)
                    if len(page) == limit:
                        return page, f"{index}:{sid}"
            after = ""  # every later bucket is read from its start
        return page, None

    async def expired(self, now_ms: int, limit: int) -> list[str]:
        self._check_open()
        check_limit(limit)
        if self._settled(now_ms):
            self._advance(now_ms, enough=limit)
            return list(islice(self._expired, limit))
        return list(islice((sid for sid, at in self._expired.items() if at < now_ms), limit))

    async def count(self, now_ms: int) -> int:
        self._check_open()
        if self._settled(now_ms):
            self._advance(now_ms)
            return self._count - len(self._expired)
        return self._count - sum(1 for at in self._expired.values() if at < now_ms)

    def _settled(self, now_ms: int) -> bool:
        """Whether every session in ``_expired`` is expired at ``now_ms`` (the fast paths)."""
        return now_ms > self._watermark or (now_ms == self._watermark and not self._split)

    def _check_open(self) -> None:
        if not self._open:
            raise StoreError("the memory store is closed")

    def _put(self, put: Put) -> bool:
        session = put.session
        sid = session.id
        bucket = self._buckets[hash(sid) & _MASK]
        old = bucket.get(sid)
        if (None if old is None else old.version) != put.expected_version:
            return False
        if put.moved_from is not None and not source_holds(
            put, self._buckets[hash(put.moved_from) & _MASK].get(put.moved_from)
        ):
            return False
        if old is None:
            self._count += 1
        bucket[sid] = session
        self._reindex(sid, old, session)
        return True

    def _delete(self, delete: Delete) -> bool:
        sid = delete.id
        bucket = self._buckets[hash(sid) & _MASK]
        old = bucket.get(sid)
        if old is None or not may_delete(delete, old):
            return False
        del bucket[sid]
        self._count -= 1
        # Its heap entry, if any, is now stale and is dropped when popped.
        self._expired.pop(sid, None)
        return True

    def _reindex(self, sid: str, old: Session | None, new: Session) -> None:
        """Keep the expiry index true for ``sid`` after ``old`` was replaced by ``new``."""
        expires_at = new.expires_at
        # The expiry that a heap entry of this id is at or before, if any: none once the
        # session moved to _expired (by membership, not by time: a split moves some at W).
        indexed_at = None if old is None else old.expires_at
        if indexed_at is not None and self._expired.pop(sid, None) is not None:
            indexed_at = None
        if expires_at is None or (indexed_at is not None and expires_at >= indexed_at):
            return
        if expires_at < self._watermark:
            self._expired[sid] = expires_at
            return
        heapq.heappush(self._heap, (expires_at, sid))
        if len(self._heap) > 2 * self._count + _HEAP_SLACK:
            self._rebuild_heap()

    def _advance(self, now_ms: int, enough: int | None = None) -> None:
        """Raise the watermark to ``now_ms``, or only until ``_expired`` holds ``enough`` ids.

        Only a settled ``now_ms`` (``_settled``) may be passed, so the watermark never goes
        down. Stopping early leaves the watermark at the earliest expiry still in the heap,
        with ``_split`` set: some sessions expiring then may have moved, the rest have not.
        """
        heap = self._heap
        expired = self._expired
        buckets = self._buckets
        while heap and heap[0][0] < now_ms:
            if enough is not None and len(expired) >= enough:
                self._watermark = heap[0][0]
                self._split = True
                return
            expires_at, sid = heapq.heappop(heap)
            session = buckets[hash(sid) & _MASK].get(sid)
            actual = None if session is None else session.expires_at
            if actual is None or actual < expires_at:
                continue  # stale: gone, never expires, or has an earlier entry of its own
            if actual == expires_at:
                expired[sid] = expires_at  # a duplicate entry just sets the same value again
            else:
                heapq.heappush(heap, (actual, sid))  # refreshed since: due later
        self._watermark = now_ms
        self._split = False

    def _rebuild_heap(self) -> None:
        """Drop every stale heap entry: O(n), at most once per n pushes, so O(1) amortised."""
        expired = self._expired
        self._heap = [
            (session.expires_at, sid)
            for bucket in self._buckets
            for sid, session in bucket.items()
            if session.timeout_ms is not None and sid not in expired
        ]
        heapq.heapify(self._heap)


def _parse_cursor(cursor: str | None) -> tuple[int, str]:
    """The bucket to resume in and the id to resume after ("" for the bucket's start)."""
    if cursor is None:
        return 0, ""
    index, sep, after = cursor.partition(":")
    if sep and index.isdigit() and int(index) < _BUCKETS:
        return int(index), after
    raise StoreError(f"not a memory store scan cursor: {describe(cursor)}")
