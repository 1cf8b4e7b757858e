"""The one protocol every store implements, and the writes a manager commits through it.

Theory of operation
-------------------
The :class:`~workers.core.manager.SessionManager` actor is the only code that talks to a store. It
works in batches: it collects the requests queued in its mailbox, ``load``\\ s the sessions they
name in one call, computes every result in memory, and ``commit``\\ s all the resulting writes in
one call, which a store runs as one transaction (group commit). Only then are the callers
answered, so an acknowledged write is a committed write.

Writes are conditional, which is what lets several managers share one store (redis): a
:class:`Put` names the version it expects to replace, and a :class:`Delete` may require the
stored session to be expired, or to be at the version the manager loaded. ``commit`` applies
the writes in order and reports, per write, whether it took effect; a manager that owns its
store alone never sees ``False`` for a ``Put``. Once a write to an id does not take effect, the
later writes of the same batch to that id do not either (they were computed from the state the
failed write expected).

No lost update: every write a manager makes from a session it loaded names the version it
loaded, deletes included (``rotate``, ``delete_where``). Otherwise another process's update,
acknowledged between this manager's load and its commit, would be deleted unseen. A rotate is
a :class:`Put` of the new id that carries ``moved_from`` (it takes effect only while the old id
holds the very version being moved, and otherwise fails both ids) followed by the conditional
``Delete`` of the old id: both take effect or neither, so a session never ends under both ids
or under neither. Only a plain ``delete(id)`` stays unconditional: it removes whatever is there.

A store spread over independent shards (Redis Cluster buckets, see
:class:`BucketedStore`) commits each shard's writes atomically, and a batch over several shards
may complete in some and fail in others: it then raises :class:`PartialCommit` (or, for a load,
:class:`PartialLoad`), saying per write or per id what happened, and the manager answers each
operation from its own shard's outcome.

All methods are async. A store whose library blocks (diskcache, lmdb) runs every call on its
own long-lived worker thread (:class:`~workers.stores.thread.StoreThread`), except the small
loads and commits that are normally served from memory, which it may run on the caller's
thread instead (:class:`ImmediateStore`); a store whose library is async (coredis) awaits it
directly. No store blocks the Trio thread on I/O it could wait for: see
:mod:`workers.stores.stall` for what bounds the rest.

Stores raise :class:`~workers.record.errors.StoreError` for their own failures; ``open`` raises it,
naming the cause, when the store is locked by another owner or is unusable.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from ..record.errors import SessionError, StoreError
from ..record.session import Session


@dataclass(frozen=True, slots=True)
class Put:
    """Store ``session``, replacing the stored version ``expected_version``.

    ``expected_version=None`` means the id must be free (a create). The put does not take effect
    (``commit`` reports ``False``) when the stored state differs from what it expects.

    ``moved_from`` (a rotate) names the id the session moves from: the put takes effect only
    if, besides, that id holds a session at ``session.version`` (a rotate keeps the version)
    and no earlier write of the batch to it failed. When the put fails, later writes of the
    batch to either id fail too, so the ``Delete`` of the old id that follows it fails with it.
    """

    session: Session
    expected_version: int | None
    moved_from: str | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove session ``id``, under conditions.

    With ``if_expired_at``, only if it is expired at that time: a sweep never removes a session
    that another writer refreshed meanwhile. With ``expected_version``, only if it is at that
    version: a delete decided on a loaded session never removes a later update it did not see.
    ``commit`` reports ``True`` when a stored session was removed.
    """

    id: str
    if_expired_at: int | None = None
    expected_version: int | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    """Raise the stored clock high-water mark to ``ms`` (it never goes down); always takes effect.

    The manager's "now" never goes backwards (``ManagerSettings.now_ms``); this write, riding
    on a batch's commit, keeps that true across process restarts. The mark lives under a
    reserved key of the store's own: it is never loaded, listed, counted or swept as a session.
    :meth:`Store.load_mark` reads it back.
    """

    ms: int


Write = Put | Delete | Mark
_WRITE_TYPES = (Put, Delete, Mark)
#: What :func:`write_id` gives for a :class:`Mark`: no session has it (ids are 32 hex digits).
MARK_ID = "<mark>"

T = TypeVar("T")


def write_id(write: Write) -> str:
    """The id of the session ``write`` is about."""
    if isinstance(write, Put):
        return write.session.id
    return MARK_ID if isinstance(write, Mark) else write.id


def write_ids(write: Write) -> tuple[str, ...]:
    """Every id ``write`` depends on: its own, and for a rotate's Put the id it moves from."""
    if isinstance(write, Put) and write.moved_from is not None:
        return (write.session.id, write.moved_from)
    return (write_id(write),)


def apply_in_order(
    items: Iterable[T],
    session_ids: Callable[[T], tuple[str, ...]],
    apply: Callable[[T], bool],
    failed: set[str] | None = None,
) -> list[bool]:
    """``apply`` each item in order under the failed-write rule; per item, whether it took effect.

    Once a write to an id fails, the later writes of the batch to that id were computed from a
    state the store does not hold: they are not applied and report ``False``. A write that
    depends on several ids (:func:`write_ids`) is not applied once any of them failed, and its
    own failure fails them all. Stores call this inside their transaction, with ``items`` in
    whatever form they prepared the writes. ``failed`` is the set of failed ids, updated in
    place: a store that applies a batch in several parts passes the same set to each.
    """
    if failed is None:
        failed = set()
    results: list[bool] = []
    for item in items:
        ok = not (failed and not failed.isdisjoint(session_ids(item))) and apply(item)
        if not ok:
            failed.update(session_ids(item))
        results.append(ok)
    return results


def source_holds(put: Put, source: Session | None) -> bool:
    """Whether the session a rotate moves from (``put.moved_from``) is ``source`` as expected:
    stored, at the version being moved. True for a put that moves nothing."""
    if put.moved_from is None:
        return True
    return source is not None and source.version == put.session.version


def may_delete(delete: Delete, stored: Session) -> bool:
    """Whether ``delete``'s conditions hold for the ``stored`` session."""
    if delete.if_expired_at is not None and not stored.expired_at(delete.if_expired_at):
        return False
    return delete.expected_version is None or stored.version == delete.expected_version


def check_writes(writes: Iterable[object]) -> None:
    """Refuse a batch holding anything but writes, before any of it is applied (a commit is all
    or nothing)."""
    for write in writes:
        if type(write) not in _WRITE_TYPES and not isinstance(write, _WRITE_TYPES):
            raise TypeError(f"not a store write (Put, Delete, Mark): {type(write).__name__}")


def check_limit(limit: int) -> None:
    """Refuse a page or sweep size below 1 (a page of nothing would never advance a scan)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive int, got {limit!r}")


class PartialCommit(StoreError):
    """A commit that took place in some shards of the store and failed in others.

    ``outcomes`` has one entry per write: ``True`` / ``False`` as :meth:`Store.commit` reports
    it, or the error (:class:`StoreError`, :class:`ServiceUnavailable`) that failed the shard
    holding it, whose writes were then not applied (or, for ``ServiceUnavailable``, may have
    been).
    """

    def __init__(self, message: str, outcomes: Sequence[bool | SessionError] = ()) -> None:
        super().__init__(message)
        self.outcomes = list(outcomes)


class PartialLoad(StoreError):
    """A load that read some shards of the store and failed in others: ``found`` holds what was
    read (as :meth:`Store.load` would), ``errors`` the error for each id that could not be."""

    def __init__(
        self,
        message: str,
        found: dict[str, Session] | None = None,
        errors: dict[str, SessionError] | None = None,
    ) -> None:
        super().__init__(message)
        self.found = found or {}
        self.errors = errors or {}


@runtime_checkable
class Store(Protocol):
    """A place sessions live. See the module docstring for how a manager drives it."""

    #: Canonical backend name: "memory", "disk", "lmdb" or "redis".
    backend: str
    #: True when other processes may write the same sessions (no caching above the store).
    shared: bool

    async def open(self) -> None:
        """Acquire and open the store; raise StoreError naming the cause when it cannot, or
        when it is open already."""

    async def close(self) -> None:
        """Flush and release the store. Safe to call twice and after a failed open."""

    async def load(self, ids: Sequence[str]) -> dict[str, Session]:
        """The stored sessions among ``ids``, expired ones included; absent ids are left out."""

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        """Apply ``writes`` in order as one transaction; per write, whether it took effect."""

    async def load_mark(self) -> int:
        """The stored clock high-water mark in ms (the highest :class:`Mark`), 0 if none."""

    async def scan(
        self, now_ms: int, cursor: str | None, limit: int
    ) -> tuple[list[Session], str | None]:
        """Up to ``limit`` live sessions after ``cursor`` (None: from the start).

        Returns the page and the cursor for the next one, None when the scan is complete. A
        session created or deleted during a scan may or may not appear; none appears twice.
        """

    async def expired(self, now_ms: int, limit: int) -> list[str]:
        """Up to ``limit`` ids of sessions expired at ``now_ms`` (candidates for a sweep)."""

    async def count(self, now_ms: int) -> int:
        """The number of live sessions at ``now_ms``."""


@runtime_checkable
class ImmediateStore(Store, Protocol):
    """A store that can also run ``load`` and ``commit`` as plain functions, on the caller's
    thread, so the manager can answer a request in the caller's task
    (``SessionManager.handle_call_inline``) with no thread hop and no wake-up. Same contracts
    as the async forms.

    The memory store always can (nothing it does waits for I/O). The disk and lmdb stores can
    when the work is bounded and normally served from memory, and say when with
    :meth:`loads_now` and :meth:`commits_now` (see :mod:`workers.stores.thread` for their rules
    and :mod:`workers.stores.stall` for what bounds a stall). The manager asks first, and calls
    the plain form only when the answer was yes, with nothing awaited in between.
    """

    #: Whether a commit has a cost of its own, whatever its size (a transaction, a write to
    #: the file): then writes of concurrent callers are better committed together.
    group_commit: bool

    def loads_now(self, count: int) -> bool:
        """Whether :meth:`load_now` of ``count`` ids may run now."""

    def commits_now(self, count: int) -> bool:
        """Whether :meth:`commit_now` of ``count`` writes may run now."""

    def load_now(self, ids: Sequence[str]) -> dict[str, Session]:
        """:meth:`Store.load`, synchronously."""

    def commit_now(self, writes: Sequence[Write]) -> list[bool]:
        """:meth:`Store.commit`, synchronously."""


@runtime_checkable
class TouchingStore(Store, Protocol):
    """A shared store that refreshes access times in the same round trip as it loads them.

    On a store other processes write (redis), a ``retrieve`` would otherwise cost a load and then
    a commit of its new access time: two round trips. The manager loads the sessions of
    ``retrieve`` and ``touch`` with this instead.
    """

    async def load_touching(
        self, ids: Sequence[str], touch: Collection[str], now_ms: int
    ) -> dict[str, Session]:
        """:meth:`Store.load`; and each session in ``touch`` that is live at ``now_ms`` and was
        last accessed before it is stored and returned with ``last_accessed = now_ms`` (its
        version unchanged), atomically with respect to every other writer."""


@runtime_checkable
class BucketedStore(Store, Protocol):
    """A store whose sessions live in buckets, each written atomically on its own (the redis
    store on a cluster). A rotate draws new ids until one falls in the old id's bucket, so that
    its move is one atomic write (see :class:`Put`)."""

    #: How many buckets there are (fixed for the life of the data).
    buckets: int

    def bucket_of(self, session_id: str) -> int:
        """The bucket ``session_id`` belongs to (a pure function of the id)."""
