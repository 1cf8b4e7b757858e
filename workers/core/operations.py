"""What each request to the session manager does, without any I/O (the manager's sans-IO core).

Rules
-----
1. An expired session is never returned, listed or counted: every operation that names one
   raises :class:`SessionExpired`, whether or not a sweep has removed it yet.
2. ``retrieve``, ``update``, ``patch`` and ``touch`` move ``last_accessed`` to now (never
   backwards); ``peek``, ``set_ttl`` and listing do not. ``version`` counts metadata changes.
3. A failing operation writes nothing and raises a :class:`SessionError` for its caller alone;
   the other operations of the batch are unaffected.
4. A session in a result may be the stored object itself, shared with the store and the read
   cache: read-only. Whoever hands it to code that could change it copies it first
   (:meth:`SessionService` does; the daemon only encodes it).

Theory of operation
-------------------
The manager answers requests in batches. For a batch it builds a :class:`View` over the store:
each operation first runs its ``prepare`` step (drawing new ids) and, if it ``reads_store``, its
``read`` step (store queries it needs, such as a scan), then the manager loads every session
the batch names in one call, then each operation's ``apply`` runs
against the view, in arrival order, seeing the writes of the operations before it. The view
collects the writes; the manager commits them in one store transaction and answers the callers.
If a conditional write did not take effect (only possible when several processes share a store)
the operation that made it is retried in a later batch.

Everything but ``read`` is synchronous and deterministic given the view, the clock reading
and the loaded sessions, so it is tested without a store thread or an actor, and the manager
can run an operation that needs no store I/O as a batch of its own in the caller's task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ..record.codec import canonical_metadata, copy_metadata
from ..record.errors import (
    CapacityExceeded,
    SessionError,
    SessionExpired,
    SessionNotFound,
    UpdateFailed,
    VersionConflict,
)
from ..record.session import MAX_VERSION, Session, build_session, check_id, new_id
from ..stores import base as writes
from ..stores.base import BucketedStore, Store, Write


@dataclass(slots=True)
class Limits:
    """The manager's settings that operations need."""

    max_metadata_bytes: int
    max_sessions: int | None
    id_factory: Callable[[], str]


#: A deferred refresh may leave at most this share (1/DEFER_SHARE) of a session's idle timeout
#: at risk: a session with a short timeout gets its refreshes written sooner.
DEFER_SHARE = 10


class View:
    """The sessions of one batch: loaded ones plus the batch's own writes, in order."""

    __slots__ = (
        "defer_ms",
        "limits",
        "live_total",
        "now_ms",
        "sessions",
        "store",
        "stored_access",
        "touched",
        "writes",
    )

    def __init__(
        self,
        store: Store,
        now_ms: int,
        limits: Limits,
        defer_ms: int = 0,
        stored_access: Mapping[str, int] | None = None,
    ) -> None:
        self.store = store
        self.now_ms = now_ms
        self.limits = limits
        self.sessions: dict[str, Session | None] = {}
        self.writes: list[Write] = []
        #: How old (ms) the stored access time of a session may be for a refresh of it to be
        #: left to the manager to write later (``touched``); 0: every refresh is written now.
        self.defer_ms = defer_ms
        #: The stored access time of the sessions whose refresh is not written yet; any other
        #: session's own ``last_accessed`` is the stored one.
        self.stored_access = stored_access or {}
        #: Refreshes left for later, by id, with the access time the store holds for each.
        self.touched: dict[str, int] = {}
        #: Live sessions as of this batch's writes so far; known once live_count() was awaited.
        self.live_total: int | None = None

    async def live_count(self) -> int:
        """Live sessions in the store before this batch's writes (asked once per batch)."""
        if self.live_total is None:
            self.live_total = await self.store.count(self.now_ms)
        return self.live_total

    def stored(self, session_id: str) -> Session | None:
        """The session as the batch sees it, expired or not; None if there is none."""
        return self.sessions.get(session_id)

    def live(self, session_id: str) -> Session:
        """The live session ``session_id``, or raise SessionExpired / SessionNotFound."""
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        if session.expired_at(self.now_ms):
            raise SessionExpired(f"session {session_id!r} has expired")
        return session

    def refresh(self, session: Session) -> Session:
        """``session`` with its access time moved to now, written now or left for later.

        Left for later only while the stored access time is less than ``defer_ms`` old, and
        less than a :data:`DEFER_SHARE`-th of the session's idle timeout: a process killed
        before the write then makes the session expire less than that early.
        """
        refreshed = session.accessed(self.now_ms)
        if refreshed is session:
            return session
        window = self.defer_ms
        if window:
            if session.timeout_ms is not None:
                window = min(window, session.timeout_ms // DEFER_SHARE)
            stored_ms = self.stored_access.get(session.id, session.last_accessed)
            if self.now_ms - stored_ms < window:
                self.sessions[session.id] = refreshed
                self.touched.setdefault(session.id, stored_ms)
                return refreshed
        self.put(refreshed)
        return refreshed

    def put(self, session: Session, moved_from: str | None = None) -> int:
        """Write ``session`` over what the view holds for its id; returns the write's index.

        ``moved_from``: a rotate's put, valid only while that id holds this very version.
        """
        previous = self.sessions.get(session.id)
        version = None if previous is None else previous.version
        self.writes.append(writes.Put(session, version, moved_from))
        self.sessions[session.id] = session
        if self.live_total is not None and (previous is None or previous.expired_at(self.now_ms)):
            self.live_total += 1
        return len(self.writes) - 1

    def delete(self, session_id: str, if_expired: bool = False, if_unchanged: bool = False) -> int:
        """Remove ``session_id``; with ``if_expired``, only while the store finds it expired;
        with ``if_unchanged``, only while it holds the version this batch sees (no update made
        elsewhere since it was loaded is deleted unseen)."""
        previous = self.sessions.get(session_id)
        version = previous.version if if_unchanged and previous is not None else None
        self.writes.append(writes.Delete(session_id, self.now_ms if if_expired else None, version))
        self.sessions[session_id] = None
        was_live = previous is not None and not previous.expired_at(self.now_ms)
        if self.live_total is not None and was_live:
            self.live_total -= 1
        return len(self.writes) - 1


@dataclass(slots=True)
class Operation:
    """One request to the manager. Subclasses define ``ids``, ``read`` and ``apply``."""

    #: The method of the service it serves (the name its requests are counted under).
    method: ClassVar[str] = ""
    #: Whether its only write is an access-time refresh, which a manager that defers those
    #: keeps in memory: then it needs no store I/O when its session is cached.
    access_only: ClassVar[bool] = False
    #: Whether it refreshes the access time of the session it names, which a shared store can
    #: do while loading it (:class:`~workers.stores.base.TouchingStore`): one round trip.
    touches: ClassVar[bool] = False

    def ids(self) -> Iterable[str]:
        """The session ids to load before ``apply``."""
        return ()

    def reads_store(self, limits: Limits) -> bool:
        """Whether ``read`` queries the store as a whole (a scan, a count, expiry order)."""
        return False

    def prepare(self, view: View) -> None:
        """What the operation settles before anything is loaded (new ids are drawn here)."""

    async def read(self, view: View) -> None:
        """Store queries this operation needs before the batch's sessions are loaded (only
        when ``reads_store``)."""

    def apply(self, view: View) -> Any:
        """Compute the result and record the writes in ``view``; raise SessionError to fail."""
        raise NotImplementedError

    def finish(self, result: Any, outcomes: Sequence[bool]) -> Any:
        """The caller's answer once the writes this operation made are committed."""
        return result


@dataclass(slots=True)
class OnSession(Operation):
    """An operation on the one session named by ``id``."""

    id: str

    def ids(self) -> Iterable[str]:
        return (self.id,)


@dataclass(slots=True)
class Create(Operation):
    method: ClassVar[str] = "create"

    metadata: dict[str, Any]
    timeout_ms: int | None
    id: str = ""
    #: Only a custom id_factory's ids need looking up: 128 random bits never repeat.
    custom_id: bool = False

    def prepare(self, view: View) -> None:
        # The id is drawn here so that a custom id_factory's repeats are loaded and seen.
        self.id = _draw_id(view)
        self.custom_id = view.limits.id_factory is not new_id

    async def read(self, view: View) -> None:
        await view.live_count()

    def ids(self) -> Iterable[str]:
        return (self.id,) if self.custom_id else ()

    def reads_store(self, limits: Limits) -> bool:
        return limits.max_sessions is not None

    def apply(self, view: View) -> str:
        limit = view.limits.max_sessions
        if limit is not None and view.live_total is not None and view.live_total >= limit:
            raise CapacityExceeded(f"the store holds max_sessions={limit} live sessions")
        _check_free(view, self.id)
        now = view.now_ms
        view.put(build_session(self.id, now, now, self.timeout_ms, self.metadata, 1))
        return self.id


def _draw_id(view: View) -> str:
    """A new id from the id_factory; its failures are the caller's error, not a crash."""
    factory = view.limits.id_factory
    if factory is new_id:
        return new_id()  # 32 hex digits: nothing to check
    try:
        session_id = factory()
    except Exception as exc:
        raise SessionError(f"id_factory raised {exc!r}") from exc
    return check_id(session_id)


#: Draws a rotate makes, per bucket of the store, to find a new id in the old id's bucket: a
#: random id misses all of them with probability (1 - 1/n) ** (64 n) < e ** -64.
DRAWS_PER_BUCKET = 64


def _draw_id_near(view: View, session_id: str) -> str:
    """A new id in the bucket of ``session_id`` (any new id for a store without buckets).

    On a :class:`~workers.stores.base.BucketedStore` (Redis Cluster) each bucket is committed
    atomically on its own, so a rotate keeps the session in its bucket to move it atomically.
    The bucket is a hash of the id, so ids are drawn until one falls in it: with n buckets, n
    draws on average; the new id stays as random as any (its bucket is known: log2(n) bits).
    """
    store = view.store
    # Cheap exit first: a runtime-checkable Protocol's isinstance costs ~18 us.
    if getattr(store, "bucket_of", None) is None or not isinstance(store, BucketedStore):
        return _draw_id(view)
    bucket = store.bucket_of(session_id)
    for _ in range(DRAWS_PER_BUCKET * max(1, store.buckets)):
        new = _draw_id(view)
        if store.bucket_of(new) == bucket:
            return new
    raise SessionError(
        f"id_factory gave no id in bucket {bucket} of the store in "
        f"{DRAWS_PER_BUCKET * store.buckets} draws: rotate needs ids spread like random ones"
    )


def _check_free(view: View, session_id: str) -> None:
    existing = view.stored(session_id)
    if existing is not None and not existing.expired_at(view.now_ms):
        raise UpdateFailed(f"id_factory returned {session_id!r}, which is already in use")


@dataclass(slots=True)
class Retrieve(OnSession):
    """``retrieve``: the live session, its access time refreshed."""

    method: ClassVar[str] = "retrieve"
    access_only: ClassVar[bool] = True
    touches: ClassVar[bool] = True

    def apply(self, view: View) -> Session:
        return view.refresh(view.live(self.id))


@dataclass(slots=True)
class Peek(OnSession):
    """``peek``: the live session as it is."""

    method: ClassVar[str] = "peek"
    access_only: ClassVar[bool] = True

    def apply(self, view: View) -> Session:
        return view.live(self.id)


@dataclass(slots=True)
class Touch(OnSession):
    method: ClassVar[str] = "touch"
    access_only: ClassVar[bool] = True
    touches: ClassVar[bool] = True

    def apply(self, view: View) -> None:
        view.refresh(view.live(self.id))


@dataclass(slots=True)
class SetTTL(OnSession):
    method: ClassVar[str] = "set_ttl"

    timeout_ms: int | None

    def apply(self, view: View) -> None:
        s = view.live(self.id)
        view.put(
            build_session(
                s.id, s.created_at, s.last_accessed, self.timeout_ms, s.metadata, s.version
            )
        )


def _check_version(session: Session, expected_version: int | None) -> None:
    if expected_version is not None and session.version != expected_version:
        raise VersionConflict(
            f"session {session.id!r} is at version {session.version}, not {expected_version}"
        )


def _store_new_metadata(view: View, session: Session, metadata: object) -> Session:
    if session.version >= MAX_VERSION:
        raise UpdateFailed(f"session {session.id!r} is at the highest version, {MAX_VERSION}")
    new = build_session(
        session.id,
        session.created_at,
        max(session.last_accessed, view.now_ms),
        session.timeout_ms,
        canonical_metadata(metadata, view.limits.max_metadata_bytes),
        session.version + 1,
    )
    view.put(new)
    return new


@dataclass(slots=True)
class Update(OnSession):
    """``update(id, fn)``: ``fn(metadata) -> dict`` runs here, so it is atomic per session."""

    method: ClassVar[str] = "update"

    fn: Callable[[dict[str, Any]], dict[str, Any]]
    expected_version: int | None = None

    def apply(self, view: View) -> Session:
        session = view.live(self.id)
        _check_version(session, self.expected_version)
        try:
            metadata = self.fn(copy_metadata(session.metadata))
        except Exception as exc:
            raise UpdateFailed(f"the update function raised {exc!r}") from exc
        if not isinstance(metadata, dict):
            raise UpdateFailed(
                f"the update function returned {type(metadata).__name__}, not a dict"
            )
        return _store_new_metadata(view, session, metadata)


@dataclass(slots=True)
class Patch(OnSession):
    """The wire form of update: set some keys, remove others."""

    method: ClassVar[str] = "update"

    set: dict[str, Any]
    unset: tuple[str, ...]
    expected_version: int | None = None

    def apply(self, view: View) -> Session:
        session = view.live(self.id)
        _check_version(session, self.expected_version)
        metadata = {**session.metadata, **self.set}
        for key in self.unset:
            metadata.pop(key, None)
        return _store_new_metadata(view, session, metadata)


@dataclass(slots=True)
class Delete(OnSession):
    """``delete(id)``: idempotent; True if a live session was removed."""

    method: ClassVar[str] = "delete"

    def apply(self, view: View) -> bool:
        session = view.stored(self.id)
        if session is None:
            return False
        view.delete(self.id)
        return not session.expired_at(view.now_ms)


@dataclass(slots=True)
class Rotate(OnSession):
    """Give a session a new id and retire the old one, in one transaction."""

    method: ClassVar[str] = "rotate"

    new_id: str = ""

    def prepare(self, view: View) -> None:
        self.new_id = _draw_id_near(view, self.id)

    def ids(self) -> Iterable[str]:
        return (self.id, self.new_id)

    def apply(self, view: View) -> str:
        session = view.live(self.id)
        _check_free(view, self.new_id)
        # Both writes take effect or neither (see stores/base.py, "No lost update"): the put
        # only while the old id holds the version loaded, then the delete of that version.
        view.put(replace(session.accessed(view.now_ms), id=self.new_id), moved_from=self.id)
        view.delete(self.id, if_unchanged=True)
        return self.new_id


@dataclass(slots=True)
class CleanupExpired(Operation):
    """Remove up to ``limit`` expired sessions; the answer is how many went."""

    method: ClassVar[str] = "cleanup_expired"

    limit: int
    candidates: list[str] = field(default_factory=list)

    def reads_store(self, limits: Limits) -> bool:
        return True

    async def read(self, view: View) -> None:
        self.candidates = await view.store.expired(view.now_ms, self.limit)

    def ids(self) -> Iterable[str]:
        return self.candidates

    def apply(self, view: View) -> None:
        for session_id in self.candidates:
            session = view.stored(session_id)
            if session is not None and session.expired_at(view.now_ms):
                view.delete(session_id, if_expired=True)

    def finish(self, result: Any, outcomes: Sequence[bool]) -> int:
        return sum(outcomes)


@dataclass(slots=True)
class ListPage(Operation):
    """One page of live sessions; with ``where``, deletes the page's sessions that match."""

    method: ClassVar[str] = "list_page"

    cursor: str | None
    limit: int
    page: list[Session] = field(default_factory=list)
    next_cursor: str | None = None

    def reads_store(self, limits: Limits) -> bool:
        return True

    async def read(self, view: View) -> None:
        self.page, self.next_cursor = await view.store.scan(view.now_ms, self.cursor, self.limit)

    def apply(self, view: View) -> tuple[list[Session], str | None]:
        # The page was read before this batch's writes: show what the batch left of it.
        current = [view.sessions.get(s.id, s) for s in self.page]
        live = [s for s in current if s is not None and not s.expired_at(view.now_ms)]
        return live, self.next_cursor


@dataclass(slots=True)
class DeleteWhere(Operation):
    """Delete the sessions of one page whose ``metadata[key] == value``; (count, next cursor)."""

    method: ClassVar[str] = "delete_where"

    key: str
    value: Any
    cursor: str | None
    limit: int
    matches: list[str] = field(default_factory=list)
    next_cursor: str | None = None

    def reads_store(self, limits: Limits) -> bool:
        return True

    async def read(self, view: View) -> None:
        page, self.next_cursor = await view.store.scan(view.now_ms, self.cursor, self.limit)
        self.matches = [s.id for s in page if s.metadata.get(self.key, _MISSING) == self.value]

    def ids(self) -> Iterable[str]:
        return self.matches

    def apply(self, view: View) -> None:
        for session_id in self.matches:
            session = view.stored(session_id)
            if session is not None and session.metadata.get(self.key, _MISSING) == self.value:
                view.delete(session_id, if_unchanged=True)  # it matched as loaded

    def finish(self, result: Any, outcomes: Sequence[bool]) -> tuple[int, str | None]:
        return sum(outcomes), self.next_cursor


@dataclass(slots=True)
class Count(Operation):
    method: ClassVar[str] = "count"

    def reads_store(self, limits: Limits) -> bool:
        return True

    async def read(self, view: View) -> None:
        await view.live_count()

    def apply(self, view: View) -> int | None:
        return view.live_total


@dataclass(slots=True)
class Probe(Operation):
    """``health``: one small read of the store (its clock mark) through the manager's
    mailbox, so the answer says that the manager runs and the store answers. Answer: None."""

    method: ClassVar[str] = "health"

    def reads_store(self, limits: Limits) -> bool:
        return True

    async def read(self, view: View) -> None:
        await view.store.load_mark()

    def apply(self, view: View) -> None:
        return None


@dataclass(slots=True)
class ImportSessions(Operation):
    """Restore sessions from a backup; those whose id is in use are skipped. Answer: how many."""

    method: ClassVar[str] = "import_sessions"

    sessions: list[Session]

    def ids(self) -> Iterable[str]:
        return [s.id for s in self.sessions]

    def apply(self, view: View) -> None:
        for session in self.sessions:
            if view.stored(session.id) is None and not session.expired_at(view.now_ms):
                view.put(session)

    def finish(self, result: Any, outcomes: Sequence[bool]) -> int:
        return sum(outcomes)


_MISSING = object()
