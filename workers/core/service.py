"""The embedded session service: the supervision tree and the API applications call.

::

    session service supervisor   rest_for_one, intensity 5 / period 10 s
    ├─ SessionManager            owns the store (opens it in init, closes it in terminate)
    ├─ Sweeper ("cleanup")       sweeps expired sessions every cleanup_interval
    └─ extra children            e.g. the daemon's listener

rest_for_one because each child depends on the ones before it. Callers never talk to an actor
object: :class:`SessionService` resolves the manager by its registered name on every call, so a
call made while the manager restarts waits briefly for the new one instead of failing, and a
call that was waiting on a manager that crashed gets :class:`ServiceUnavailable` at once.

Bad input is refused here, in the caller's task, before a request reaches the manager. A
request that needs no store I/O while the manager is idle is answered by the manager's own
code in the caller's task, with no message (``SessionManager.handle_call_inline``): the
answer is the same either way, only cheaper.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from time import perf_counter
from typing import Any

import sniffio
import trio

import workers
from supervisor import (
    ActorRef,
    CallTimeout,
    ChildSpec,
    NoProc,
    ServerDown,
    StartError,
    Strategy,
    Supervisor,
    SupervisorEvent,
    call,
    exit_actor,
    send_request,
    unwrap,
    whereis,
)

from ..record.codec import DEFAULT_MAX_METADATA_BYTES, canonical_metadata, copy_metadata
from ..record.errors import (
    InvalidMetadata,
    InvalidRequest,
    ServiceUnavailable,
    SessionError,
    describe,
)
from ..record.session import (
    DEFAULT,
    Session,
    build_session,
    check_id,
    check_record,
    new_id,
    ttl_to_ms,
)
from ..stores import Store, canonical_backend, make_store
from .api import METHODS, Kind, Method
from .manager import ManagerCounters, ManagerSettings, ServiceClock, SessionManager
from .metrics import Metrics
from .operations import (
    CleanupExpired,
    Count,
    Create,
    Delete,
    DeleteWhere,
    ImportSessions,
    Limits,
    ListPage,
    Operation,
    Patch,
    Peek,
    Probe,
    Retrieve,
    Rotate,
    SetTTL,
    Touch,
    Update,
)
from .sweeper import Sweeper

log = logging.getLogger(__name__)

_instances = itertools.count(1)

#: Stores owned alone on disk, where the manager caches reads and defers access-time writes.
DEFERS_ACCESS = ("disk", "lmdb")
#: Their defaults: sessions cached, and seconds an access-time refresh may wait.
DEFAULT_CACHE_SIZE = 16_384
DEFAULT_ACCESS_WRITE_DELAY = 10.0
#: Seconds ``crash_actor`` waits for an actor that is being restarted to be running again.
CRASH_NAME_WAIT = 5.0
#: Most sessions one ``list_page`` returns: a page is built in memory and sent whole.
MAX_PAGE_SIZE = 10_000
#: Longest cursor ``list_page`` accepts (cursors are ids, or a store's short prefix and an id).
MAX_CURSOR_LENGTH = 1024
#: Longest text ``tree()`` gives for a child's last exit.
MAX_EXIT_TEXT = 200


class InjectedCrash(RuntimeError):
    """The reason of a crash asked for with :meth:`SessionService.crash_actor` (fault injection)."""


class SessionService:
    """The handle applications use. Every method is async and safe to call from many tasks.

    Get one from :func:`open_session_service` or :func:`run_session_service`.
    """

    def __init__(
        self,
        *,
        backend: str,
        name: str,
        default_ttl: float | None,
        max_metadata_bytes: int,
        call_timeout: float,
        sweep_batch: int,
        page_size: int,
    ) -> None:
        #: The canonical backend name: "memory", "disk", "lmdb" or "redis".
        self.backend = backend
        self._manager = f"{name}.manager"
        self._default_timeout_ms = ttl_to_ms(default_ttl)
        self._max_metadata_bytes = max_metadata_bytes
        self._call_timeout = call_timeout
        self._sweep_batch = sweep_batch
        self._page_size = page_size
        self._started = time.monotonic()
        #: The registered names of the service's actors by child id ("manager", "cleanup"), for
        #: :meth:`crash_actor` and diagnostics.
        self.actors = {"manager": self._manager, "cleanup": f"{name}.cleanup"}
        #: The figures ``stats()`` reports (kept across manager restarts).
        self.telemetry = Metrics()
        #: The supervision tree, once built (read by ``tree()``).
        self._tree: Supervisor | None = None
        #: What the managers count for operators (store warnings), across their restarts.
        self.counters = ManagerCounters()

    @property
    def restarts(self) -> int:
        """Restarts of the service's children since it started (read by ``stats``)."""
        return sum(self.telemetry.restarts.values())

    async def _call(self, op: Operation) -> Any:
        try:
            return await call(self._manager, op, timeout=self._call_timeout)
        except (NoProc, ServerDown, CallTimeout) as exc:
            raise self._unavailable(exc) from exc

    async def _request(self, method: str, build: Callable[..., Operation], *args: Any) -> Any:
        """``build(*args)`` run by the manager: one request of ``method``, counted and timed
        (its arguments' errors too). The hot path of every single-operation method, so the
        recording is written out here rather than in a context manager (see ``metrics``)."""
        start = perf_counter()
        try:
            result = await call(self._manager, build(*args), timeout=self._call_timeout)
        except (NoProc, ServerDown, CallTimeout) as exc:
            error = self._unavailable(exc)
            self.telemetry.observe(method, perf_counter() - start, error)
            raise error from exc
        except Exception as exc:
            self.telemetry.observe(method, perf_counter() - start, exc)
            raise
        self.telemetry.observe(method, perf_counter() - start)
        return result

    def _unavailable(self, exc: Exception) -> ServiceUnavailable:
        if isinstance(exc, CallTimeout):
            why = f"the session manager did not answer within {self._call_timeout} s"
        else:
            why = f"the session manager is not running ({exc}); retry"
        return ServiceUnavailable(why)

    def _ttl(self, ttl: object) -> int | None:
        return self._default_timeout_ms if ttl is DEFAULT else ttl_to_ms(ttl)

    # -- the builders: one per operation method of the table, arguments checked in the
    # caller's task; every parameter is given (the table fills in the defaults) -------------

    def _build_create(self, metadata: dict[str, Any] | None, ttl: Any) -> Create:
        timeout_ms = self._ttl(ttl)
        return Create(canonical_metadata(metadata, self._max_metadata_bytes), timeout_ms)

    def _build_retrieve(self, session_id: str) -> Retrieve:
        return Retrieve(check_id(session_id))

    def _build_peek(self, session_id: str) -> Peek:
        return Peek(check_id(session_id))

    def _build_patch(
        self, session_id: str, set: dict[str, Any] | None, unset: Iterable[str], version: int | None
    ) -> Patch:
        changes = canonical_metadata(set, self._max_metadata_bytes)
        keys = tuple(unset)
        if not all(isinstance(k, str) for k in keys):
            raise InvalidMetadata("unset takes metadata keys, which are strings")
        return Patch(check_id(session_id), changes, keys, _version(version))

    def _build_update(
        self, session_id: str, fn: Callable[[dict[str, Any]], dict[str, Any]], version: Any
    ) -> Update:
        if not callable(fn):
            raise TypeError(f"update takes a function metadata -> dict, not {fn!r}")
        return Update(check_id(session_id), fn, _version(version))

    def _build_touch(self, session_id: str) -> Touch:
        return Touch(check_id(session_id))

    def _build_set_ttl(self, session_id: str, ttl: float | None) -> SetTTL:
        return SetTTL(check_id(session_id), ttl_to_ms(ttl))

    def _build_delete(self, session_id: str) -> Delete:
        return Delete(check_id(session_id))

    def _build_rotate(self, session_id: str) -> Rotate:
        return Rotate(check_id(session_id))

    def operation(self, method: str | Method, *args: Any) -> Operation:
        """The manager operation behind ``method``, for :meth:`submit` and :meth:`run`.

        ``method`` is an entry of kind ``OPERATION`` of a method table (or its name in
        :data:`~workers.core.api.METHODS`); it is built by the builder the entry names, with
        ``args``, its parameters in the table's order, checked exactly as the method checks
        them and raising the same errors (nothing has been sent when it raises).
        """
        entry = METHODS.get(method) if isinstance(method, str) else method
        if entry is None or entry.kind is not Kind.OPERATION:
            raise InvalidRequest(f"{describe(method)} is not a method that is one operation")
        build: Callable[..., Operation] = getattr(self, entry.builder)
        return build(*args)

    async def run(self, op: Operation) -> Any:
        """Have the manager run ``op`` and return its answer as it is (shared with the store:
        read-only; the public methods hand out copies). Counted as a request of its method."""
        return await self._request(op.method, _given, op)

    def submit(self, op: Operation, on_reply: Callable[[Any, Exception | None], object]) -> None:
        """Send ``op`` to the manager without waiting; ``on_reply(value, error)`` gets the answer.

        What a connection with pipelined requests uses instead of a task per request. It gets
        what :meth:`run` would return, or the error it would raise (:class:`ServiceUnavailable`
        for a manager that died or did not answer within ``call_timeout``), once. When the
        manager answers inline, ``on_reply`` runs before this returns. Raises
        :class:`~supervisor.NoProc` when no manager is running right now and
        :class:`trio.WouldBlock` when its mailbox is full: nothing was sent, and the caller
        falls back to :meth:`run`, which waits for both.
        """

        telemetry, start = self.telemetry, perf_counter()

        def settle(value: Any, error: Exception | None) -> object:
            if isinstance(error, (ServerDown, CallTimeout)):
                error = self._unavailable(error)
            telemetry.observe(op.method, perf_counter() - start, error)
            return on_reply(value, error)

        send_request(self._manager, op, settle, self._call_timeout)

    # -- the API -----------------------------------------------------------------------------

    async def create(self, metadata: dict[str, Any] | None = None, ttl: Any = DEFAULT) -> str:
        """Store a new session and return its id. ``ttl`` is idle seconds, None for never."""
        return await self._request("create", self._build_create, metadata, ttl)

    async def retrieve(self, session_id: str) -> Session:
        """The live session ``session_id``; refreshes its access time."""
        return _copy(await self._request("retrieve", self._build_retrieve, session_id))

    async def peek(self, session_id: str) -> Session:
        """The live session ``session_id``, leaving its access time alone."""
        return _copy(await self._request("peek", self._build_peek, session_id))

    async def update(
        self,
        session_id: str,
        fn: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        expected_version: int | None = None,
    ) -> Session:
        """Replace the metadata by ``fn(metadata)``, atomically; returns the updated session.

        ``fn`` runs on the manager's turn (keep it quick and synchronous: nothing else is
        answered meanwhile), in the manager's task or, when the manager is idle, in yours,
        on a copy of the metadata; if it raises or returns a non-dict, :class:`UpdateFailed`
        and nothing changes.
        """
        return _copy(
            await self._request("update", self._build_update, session_id, fn, expected_version)
        )

    async def patch(
        self,
        session_id: str,
        set: dict[str, Any] | None = None,
        unset: Iterable[str] = (),
        *,
        expected_version: int | None = None,
    ) -> Session:
        """Set some metadata keys and remove others (the daemon's form of ``update``)."""
        patch = self._build_patch
        return _copy(await self._request("patch", patch, session_id, set, unset, expected_version))

    async def touch(self, session_id: str) -> None:
        """Refresh the access time of a live session."""
        await self._request("touch", self._build_touch, session_id)

    async def set_ttl(self, session_id: str, ttl: float | None) -> None:
        """Change a live session's idle timeout (seconds, None for never)."""
        await self._request("set_ttl", self._build_set_ttl, session_id, ttl)

    async def delete(self, session_id: str) -> bool:
        """Remove a session; True if a live one was removed. Deleting twice is fine."""
        return await self._request("delete", self._build_delete, session_id)

    async def rotate(self, session_id: str) -> str:
        """Move a live session to a fresh id, retiring the old one (session-fixation defence)."""
        return await self._request("rotate", self._build_rotate, session_id)

    async def delete_where(self, key: str, value: Any) -> int:
        """Delete every session whose ``metadata[key] == value`` ("log out everywhere")."""
        with self.telemetry.measure("delete_where"):
            if not isinstance(key, str):
                raise InvalidMetadata("metadata keys are strings")
            removed, cursor = 0, None
            while True:
                n, cursor = await self._call(DeleteWhere(key, value, cursor, self._page_size))
                removed += n
                if cursor is None:
                    return removed

    async def list_page(
        self, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Session], str | None]:
        """One page of live sessions and the cursor of the next page (None after the last)."""
        with self.telemetry.measure("list_page"):
            return await self._list_page(cursor, limit)

    async def _list_page(self, cursor: str | None, limit: int) -> tuple[list[Session], str | None]:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit is an int from 1 to {MAX_PAGE_SIZE}, got {describe(limit)}")
        if cursor is not None and (not isinstance(cursor, str) or len(cursor) > MAX_CURSOR_LENGTH):
            raise ValueError("cursor is the string a previous page gave, or None")
        page, next_cursor = await self._call(ListPage(cursor, limit))
        return [_copy(s) for s in page], next_cursor

    async def list_sessions(self) -> list[Session]:
        """Every live session (pages through the store; prefer ``list_page`` for large ones)."""
        with self.telemetry.measure("list_sessions"):
            sessions: list[Session] = []
            cursor = None
            while True:
                page, cursor = await self._list_page(cursor, self._page_size)
                sessions.extend(page)
                if cursor is None:
                    return sessions

    async def count(self) -> int:
        """The number of live sessions."""
        return await self._request("count", Count)

    async def cleanup_expired(self) -> int:
        """Remove every expired session now, in bounded batches; returns how many went."""
        with self.telemetry.measure("cleanup_expired"):
            removed = 0
            while True:
                n = await self._call(CleanupExpired(self._sweep_batch))
                removed += n
                if n < self._sweep_batch:
                    return removed

    async def import_sessions(self, sessions: Sequence[Session]) -> int:
        """Store sessions from a backup as they are; ids already in use are skipped.

        Each record is checked first (:func:`~workers.record.session.check_record`, and its
        metadata as ``create`` checks it): one bad record refuses the whole call
        (:class:`InvalidSession`, :class:`InvalidMetadata`...), and nothing is written.
        """
        with self.telemetry.measure("import_sessions"):
            checked = [
                build_session(
                    s.id,
                    s.created_at,
                    s.last_accessed,
                    s.timeout_ms,
                    canonical_metadata(check_record(s).metadata, self._max_metadata_bytes),
                    s.version,
                )
                for s in sessions
            ]
            return await self._call(ImportSessions(checked))

    async def get_backend(self) -> str:
        """The canonical backend name (the seed's ``get_backend``)."""
        with self.telemetry.measure("get_backend"):
            return self.backend

    async def stats(self) -> dict[str, Any]:
        """Figures for operators: :meth:`metrics` plus ``sessions``, the live sessions (which
        asks the store, so refreshes waiting to be written are written first)."""
        with self.telemetry.measure("stats"):
            sessions = await self._call(Count())
            figures = self._figures()
            return {"backend": figures.pop("backend"), "sessions": sessions, **figures}

    async def metrics(self) -> dict[str, Any]:
        """Figures for operators, without asking the store anything.

        ``backend``, ``version``, ``pid``, ``uptime_s``, ``restarts`` (all children) and
        ``restarts_by_child``; ``requests`` and, per method, ``methods[name]`` with its
        ``count``, ``errors`` by class and its ``latency`` histogram (``count``, ``sum_ms``,
        ``p50_ms``, ``p99_ms``, cumulative ``buckets`` by upper bound in seconds); ``errors``
        by class over all methods; ``batches`` (the manager's batch sizes, same form, and
        ``inline``: requests answered in the caller's task); ``cache`` (``hits``, ``misses``,
        ``hit_rate``; zero without a read cache); ``store_errors`` by class; the manager's
        ``mailbox`` depth; ``store_warnings``; and, in a daemon, its own: ``connections``
        (open), ``unauthenticated``, ``buffered_bytes``, ``connections_accepted``,
        ``connections_refused``, ``connections_evicted``, ``auth_failures``, ``timeouts`` and
        ``invalid_messages``. See :mod:`workers.core.metrics`.
        """
        with self.telemetry.measure("metrics"):
            return self._figures()

    def _figures(self) -> dict[str, Any]:
        try:
            mailbox: int | None = whereis(self._manager).message_queue_len
        except NoProc:
            mailbox = None  # restarting
        return {
            "backend": self.backend,
            "version": workers.__version__,
            "pid": os.getpid(),
            "store_warnings": self.counters.store_warnings,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "restarts": self.restarts,
            "mailbox": mailbox,
            **self.telemetry.snapshot(),
        }

    async def tree(self) -> dict[str, Any]:
        """The supervision tree as it is now, for observers (``sessiond top``).

        ``{"supervisor": name, "strategy", "intensity", "period", "children": [...]}``, a
        child being ``{"id", "running", "restarts", "last_exit", "restart"}`` (``last_exit``:
        None, ``"normal"``, ``"shutdown"`` or ``"ErrorClass: message"``) plus ``mailbox``, the
        messages waiting, for a running actor.
        """
        with self.telemetry.measure("tree"):
            tree = self._tree
            if tree is None:
                raise ServiceUnavailable("the service tree is not running")
            try:
                infos = tree.which_children()
            except NoProc:
                raise ServiceUnavailable("the service tree is not running") from None
            children = []
            for info in infos:
                child: dict[str, Any] = {
                    "id": str(info.id),
                    "running": info.running,
                    "restarts": info.restarts,
                    "last_exit": _exit_text(info.last_exit),
                    "restart": info.restart.value,
                }
                if isinstance(info.value, ActorRef):
                    child["mailbox"] = info.value.message_queue_len
                children.append(child)
            return {
                "supervisor": tree.name,
                "strategy": Strategy.REST_FOR_ONE.value,
                "intensity": tree.intensity,
                "period": tree.period,
                "children": children,
            }

    async def health(self) -> dict[str, Any]:
        """Ready only when the manager runs and the store answers: one small store read
        through the manager's mailbox. ``{"status": "ready", "backend", "store_ms"}``, or the
        error that says why not (``ServiceUnavailable``, ``StoreError``)."""
        with self.telemetry.measure("health"):
            start = perf_counter()
            await self._call(Probe())
            elapsed_ms = round((perf_counter() - start) * 1000, 3)
            return {"status": "ready", "backend": self.backend, "store_ms": elapsed_ms}

    async def crash_actor(self, name: str) -> bool:
        """Fault injection: crash the service's ``"manager"`` or ``"cleanup"`` actor now.

        The crash is real (:func:`supervisor.exit_actor`): callers waiting on the actor get
        ``ServiceUnavailable``, the tree restarts it (and, rest_for_one, every child after it)
        and counts the restart against its budget. For chaos runs and tests; a daemon offers it
        only when started with ``allow_fault_injection``. Waits up to a few seconds for an
        actor that is being restarted; ``ServiceUnavailable`` if none comes.
        """
        with self.telemetry.measure("crash_actor"):
            actor = self.actors.get(name) if isinstance(name, str) else None
            if actor is None:
                known = ", ".join(self.actors)
                raise InvalidRequest(f"crash_actor: no actor {describe(name)} (known: {known})")
            log.warning("fault injection: crashing the %s actor", name)
            try:
                await exit_actor(
                    actor, InjectedCrash(f"injected crash of {name}"), name_wait=CRASH_NAME_WAIT
                )
            except NoProc:
                raise ServiceUnavailable(f"the {name} actor is not running; retry") from None
            return True


def _version(expected_version: object) -> int | None:
    """``expected_version`` if it is an int or None; a TypeError names anything else."""
    if expected_version is not None and type(expected_version) is not int:
        raise TypeError(
            f"expected_version is an int or None, not {type(expected_version).__name__}"
        )
    return expected_version


def _given(op: Operation) -> Operation:
    """The builder of an operation built already (``run``)."""
    return op


def _exit_text(reason: object) -> str | None:
    """A child's last exit as ``tree()`` shows it."""
    if reason is None or isinstance(reason, str):
        return reason
    text = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
    return text[:MAX_EXIT_TEXT]


def _copy(session: Session) -> Session:
    """The copy of a manager's (shared, read-only) session that a caller may change freely."""
    metadata = session.metadata
    # Flat metadata (the common case) needs no deep copy: its values cannot be changed.
    if _CONTAINERS.isdisjoint(map(type, metadata.values())):
        metadata = dict(metadata)
    else:
        metadata = copy_metadata(metadata)
    s = session
    return build_session(s.id, s.created_at, s.last_accessed, s.timeout_ms, metadata, s.version)


#: What canonical metadata can hold that a caller could change in place.
_CONTAINERS = frozenset((dict, list))


async def run_session_service(
    *,
    backend: str = "memory",
    path: str | None = None,
    url: str | None = None,
    default_ttl: float | None = 3600.0,
    cleanup_interval: float = 300.0,
    clock: Callable[[], float] | None = None,
    max_sessions: int | None = None,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
    id_factory: Callable[[], str] = new_id,
    call_timeout: float = 5.0,
    sweep_batch: int = 100,
    page_size: int = 500,
    max_batch: int = 256,
    cache_size: int | None = None,
    access_write_delay: float | None = None,
    intensity: int = 5,
    period: float = 10.0,
    extra_children: Callable[[SessionService], Sequence[ChildSpec]] | None = None,
    store: Store | None = None,
    read_only: bool = False,
    on_event: Callable[[SupervisorEvent], object] | None = None,
    task_status: trio.TaskStatus[SessionService] = trio.TASK_STATUS_IGNORED,
    **store_options: Any,
) -> None:
    """Run the service tree until cancelled; ``task_status.started`` gives the SessionService.

    For ``await nursery.start(run_session_service, ...)`` in an application's own nursery. Any
    option not named here goes to the store (``durability``, ``on_corrupt``, ``prefix``...).
    ``cache_size`` (sessions the manager keeps in memory) and ``access_write_delay`` (how many
    seconds old the stored access time may be while a refresh waits to be written, so that a
    read is not a disk write; a process killed outright can make a session expire at most that
    much early, and at most a tenth of its idle timeout early) default to 16384 and 10.0 for
    the disk and lmdb stores and to 0 for the others: the memory store needs neither and a
    redis store is shared, so nothing may be cached or deferred above it.

    ``store`` runs the service on a store object of your own (a wrapper, say) instead of building
    one from ``backend``. ``read_only=True`` opens an existing store without writing anything to it
    (no clock marks; the disk and lmdb stores open read-only and refuse commits), for tools that
    only look. A store that cannot be opened raises its ``StoreError`` here, bare. If the tree
    exceeds its restart budget this raises ``SupervisorShutdown`` after stopping everything.

    ``on_event(event)`` is called with every :class:`~supervisor.SupervisorEvent` of the tree
    (``event.kind``: ``"start"``, ``"restart"``, ``"exit"``, ``"escalate"``...; ``child_id``;
    ``reason``, the exception of a crash), in the tree's own task: keep it quick, and do not
    raise (an exception from it is logged and ignored). The same counts are in ``stats()``.
    """
    _check_options(cleanup_interval, max_sessions, max_metadata_bytes)
    if store is None:
        if read_only and canonical_backend(backend) in ("disk", "lmdb"):
            store_options["read_only"] = True
        store = make_store(backend, path=path, url=url, **store_options)
    backend = canonical_backend(store.backend)
    n = next(_instances)
    service = SessionService(
        backend=backend,
        name=f"sessions-{n}",
        default_ttl=default_ttl,
        max_metadata_bytes=max_metadata_bytes,
        call_timeout=call_timeout,
        sweep_batch=sweep_batch,
        page_size=page_size,
    )
    if store.shared and (cache_size or access_write_delay):
        raise ValueError(
            f"the {backend} store is shared with other processes: nothing may be cached "
            "or deferred above it (leave cache_size and access_write_delay unset)"
        )
    owned_on_disk = backend in DEFERS_ACCESS and not store.shared
    settings = ManagerSettings(
        Limits(max_metadata_bytes, max_sessions, id_factory),
        max_batch,
        cache_size=(DEFAULT_CACHE_SIZE if owned_on_disk else 0)
        if cache_size is None
        else cache_size,
        access_write_delay=(DEFAULT_ACCESS_WRITE_DELAY if owned_on_disk else 0.0)
        if access_write_delay is None
        else access_write_delay,
    )
    children = [
        SessionManager.child_spec(
            "manager",
            store,
            settings,
            ServiceClock(clock or time.time, persist=not read_only),
            service.counters,
            service.telemetry,
            name=service._manager,
        ),
        Sweeper.child_spec(
            "cleanup", service.cleanup_expired, cleanup_interval, name=service.actors["cleanup"]
        ),
        *(extra_children(service) if extra_children else ()),
    ]

    def tree_event(event: SupervisorEvent) -> None:
        service.telemetry.child_event(event.kind, event.child_id)
        if on_event is not None:
            on_event(event)

    tree = service._tree = Supervisor(
        children,
        strategy=Strategy.REST_FOR_ONE,
        intensity=intensity,
        period=period,
        name=f"sessions-{n}",
        on_event=tree_event,
    )
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(tree.run)
        except StartError as exc:
            cause = exc.cause
            if isinstance(cause, SessionError):
                raise cause from None
            raise
        task_status.started(service)


def _check_options(
    cleanup_interval: float, max_sessions: int | None, max_metadata_bytes: int
) -> None:
    if not cleanup_interval > 0:
        raise ValueError(f"cleanup_interval is a positive number of seconds: {cleanup_interval!r}")
    if max_sessions is not None and max_sessions < 1:
        raise ValueError(f"max_sessions is a positive int or None, got {max_sessions!r}")
    if max_metadata_bytes < 1:
        raise ValueError(f"max_metadata_bytes is a positive int, got {max_metadata_bytes!r}")


@asynccontextmanager
async def open_session_service(**options: Any) -> AsyncIterator[SessionService]:
    """Start the service tree for the ``async with`` block and stop it in reverse order after.

    Takes the options of :func:`run_session_service`. Errors from starting the tree (a store
    that cannot be opened: ``StoreError``) and from the tree giving up
    (``SupervisorShutdown``) are raised bare, not wrapped in an exception group.

    Under asyncio the tree runs in Trio's guest mode on asyncio's own loop, and the object
    yielded has the same methods as asyncio coroutines (:mod:`workers.core.guest`).
    """
    if sniffio.current_async_library() == "trio":
        manager = open_trio_service(**options)
    else:
        from .guest import open_guest_service  # loaded only by asyncio programs

        manager = open_guest_service(**options)  # type: ignore[assignment]
    async with manager as service:
        yield service


@asynccontextmanager
async def open_trio_service(**options: Any) -> AsyncIterator[SessionService]:
    """:func:`open_session_service` for Trio code."""
    try:
        async with trio.open_nursery() as nursery:
            service = await nursery.start(partial(run_session_service, **options))
            try:
                yield service
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise unwrap(group) from None


__all__ = ["DEFAULT", "SessionService", "open_session_service", "run_session_service"]
