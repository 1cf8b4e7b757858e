"""The disk store: sessions in a diskcache directory (the seed's ``dets`` file).

:class:`DiskStore` keeps each session as one row of a `diskcache`_ ``Cache``, which is a SQLite
database in a directory. It is durable (a committed session survives a crash of the process, or
a power loss on request), single-owner, and never evicts, unpickles or blocks the Trio thread.

.. _diskcache: https://grantjenks.com/docs/diskcache/

Storage layout
--------------
``path`` is a directory the store owns::

    path/                 0700, like every file in it 0600 (workers.stores.files)
        SESSIONS      the marker that says this directory is a disk session store
        LOCK          flock()ed by the owner, holds its pid
        cache.db      diskcache's SQLite database
        cache.db-wal  SQLite's write-ahead log (gone after a clean close)
        cache.db-shm  the write-ahead log's index

A session is one row of diskcache's ``Cache`` table:

=========  ===================================================================================
column     holds
=========  ===================================================================================
``key``    the session id, as TEXT (``raw=1``); its unique index gives the scan order
``value``  the msgpack record of :func:`workers.record.codec.encode_session`, a BLOB stored inline
``tag``    ``expires_at`` in ms as an INTEGER, NULL for a session that never expires;
           indexed (``tag_index=True``), which is what makes ``expired`` and ``count`` cheap
=========  ===================================================================================

diskcache's other columns are left as it fills them; ``expire_time`` is always NULL, because
expiry follows the service's clock and idle rule, not diskcache's own expiry on ``time.time()``.
The ``Settings`` table holds diskcache's settings, plus ``sessions_format``: the record format
this directory was written in, so a database that is not ours is recognised rather than misread.

Durability
----------
Every ``commit`` is one SQLite transaction (``Cache.transact``), however many writes it carries:
that is what makes the manager's group commit pay one sync for a whole batch. The journal is
always WAL; ``durability`` chooses when a commit is on stable storage:

- ``"process"`` (default; ``synchronous=NORMAL``): a committed transaction is in the WAL before
  ``commit`` returns, so it survives the process being killed at any point. A power loss or
  kernel crash may lose the last transactions (never corrupting the database). Fast: no fsync
  per commit.
- ``"power"`` (``synchronous=FULL``): the WAL is fsynced at every commit, so a commit also
  survives power loss. One fsync per batch, which group commit keeps affordable.

No eviction, ever
-----------------
diskcache is a cache: by default it evicts least-recently-stored rows once the database passes
``size_limit`` (1 GB). A session store must never drop a session silently, so every open passes
``eviction_policy="none"``, ``cull_limit=0`` (diskcache then never even looks for rows to drop)
and the largest ``size_limit``. Settings persist in the database, but they are passed on every
open anyway, so a directory whose settings were changed by another program is put right.
A full disk therefore shows up as a failed commit (:class:`~workers.record.errors.StoreError`), and
capacity is the manager's business (``max_sessions``), never the store's.

Inline values
-------------
diskcache writes values of ``disk_min_file_size`` (32 KiB) and above to separate files. A
session record is at most ``max_metadata_bytes`` (64 KiB by default) plus a few bytes, so by
default a large one would live outside the database: outside its transactions, one more file
to sync, and a file that a crash can leave behind. Records are therefore always inline
(:class:`SessionDisk` never writes a file); SQLite stores a BLOB of this size efficiently.

Never pickle
------------
diskcache pickles any key or value that is not a plain str, bytes, int or float, and unpickles
whatever its rows say is a pickle. :class:`SessionDisk` replaces its serialisation: keys are str
session ids, values are bytes, anything else is refused with StoreError on the way in, and on
the way out only raw TEXT keys and inline BLOB values are returned, so a pickle planted in the
database is an error, never executed.

One thread
----------
SQLite connections belong to the thread that made them (diskcache keeps one per thread), and
blocking calls must stay off the Trio thread. Each store therefore owns one
:class:`~workers.stores.thread.StoreThread`, started by ``open`` and stopped by ``close``, and
every diskcache and SQLite call (opening the database included) runs on it, one at a time. The
thread serialises the store's calls, so no lock is needed, and a batch costs one thread hop.
The one exception is the checkpoint thread below, which only checkpoints.

Checkpoints
-----------
In WAL mode SQLite appends committed pages to ``cache.db-wal``, and the connection whose commit
takes the WAL past 1000 pages copies them into ``cache.db`` and syncs both files (a
checkpoint) before that commit returns. A batch that touches sessions at random (a sweep
deleting hundreds, the deferred access times of a busy second) writes about a page per
session, so every few commits paid a checkpoint: 10 to 190 ms on the store thread, during
which no request of the service is answered. A :class:`_Checkpointer` thread with a connection
of its own checkpoints after every commit (``PRAGMA wal_checkpoint(PASSIVE)``, woken by
``commit``): SQLite lets it run alongside the store thread's reads and writes, and the GIL is
released while it copies and syncs. The store thread's connection keeps SQLite's own
checkpoint every 1000 pages (it restarts the WAL), which finds most pages already copied and
synced and costs little. Measured on a sweep of 1M sessions: commit p99 20 -> 5 ms, worst
60-190 -> 11 ms. ``close`` stops the checkpoint thread first, so the store's connection is the
last one and checkpoints the WAL away as before.

One owner
---------
``open`` takes the directory's flock first, before reading anything, so a second DiskStore on
the same directory, in this process or another, fails ``open`` with a StoreError naming the
holder's pid. The kernel drops the lock when its owner dies, so a SIGKILLed owner leaves no
stale lock. (:class:`~workers.stores.files.StoreFiles` does this and the rest of the directory's
rules: what is made, what is recognised, what may be moved.)

Corruption
----------
``open`` checks the database before diskcache touches it: SQLite must be able to read it, and
it must be a diskcache database carrying our format marker (an empty one is adopted). When it
is not (a truncated or garbage file, a foreign database), ``on_corrupt`` decides:

- ``"quarantine"`` (default): the store's own files (``cache.db`` and its WAL files) are moved
  into ``<path>.corrupt-<UTC time>/``, an ERROR names both places, and the store starts empty
  in the same directory, under the same lock. Only a directory carrying our ``SESSIONS``
  marker is ever touched: anything else (another application's ``cache.db``, say) is refused
  with StoreError and left as it is.
- ``"fail"``: ``open`` raises StoreError with that message and leaves the directory as it was.

Only corruption (SQLite's ``SQLITE_CORRUPT`` and ``SQLITE_NOTADB``) and a foreign format are
quarantined: an I/O or permission error is raised as StoreError and moves nothing. A record
that is damaged later (it fails to decode) makes the call that reads it raise StoreError.

Read-only
---------
``read_only=True`` (the admin verbs that only read) opens an existing store without writing a
byte: no directory or file is made, nothing is quarantined (a damaged store is an error), no
settings are written (the queries run on a read-only SQLite connection of their own, not on
diskcache's ``Cache``, which writes its settings when it opens), and ``commit`` is refused.
``create=False`` (the admin verbs that write) opens an existing store only.

Beyond diskcache's public API
-----------------------------
Three things use diskcache's internals; all depend on a schema that has been stable since
diskcache 4 and is pinned by this module's tests:

- :func:`_select` runs read-only SQL on the cache's own connection (``Cache._sql``), for the
  queries diskcache has no API for: ids by expiry range (``expired``), the number of expired
  rows (``count``), keys after a cursor in sorted order (``scan``; ``iterkeys`` always starts
  at the first key), and many keys at once (``load``). Without it, ``expired`` and ``count``
  would read every row.
- Writes are SQL on the ``Cache`` table too, inside diskcache's own ``transact()``: the row a
  ``Put`` inserts or updates and the row a ``Delete`` removes are the rows ``Cache.add``,
  ``Cache.set`` and ``Cache.delete`` would write or remove for a str key and an inline value
  (``SessionDisk.put`` and ``SessionDisk.store`` still check the key and value), and
  diskcache's triggers keep its count and size. The reason is cost: each ``Cache`` call
  opens a transaction context and re-reads its connection, which took 3 to 5 times longer
  than SQLite's own work (profiled on a sweep: 15 ms of every 500-session batch), and a
  conditional delete read and decoded the record where ``tag < ?`` (the tag is the session's
  ``expires_at``) says the same.
- :func:`_inspect` opens ``cache.db`` with :mod:`sqlite3` before diskcache does, because
  ``Cache()`` starts by writing its settings, and a foreign database must be left untouched.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import diskcache
from diskcache.core import DBNAME, MODE_RAW, UNKNOWN

from ..record.codec import decode_session, encode_session
from ..record.errors import StoreError
from ..record.session import Session
from .base import Delete, Mark, Put, Write, apply_in_order, may_delete, source_holds, write_ids
from .files import Durability, OnCorrupt, StoreFiles, check_file_options, create_private
from .thread import ThreadedStore

logger = logging.getLogger(__name__)

T = TypeVar("T")


#: Settings key of the format marker, and the format this module writes.
FORMAT_KEY = "sessions_format"
#: The clock high-water mark (:class:`~workers.stores.base.Mark`), in the Settings table.
MARK_KEY = "sessions_mark"
FORMAT = 1

_SQLITE_MAX_INT = 2**63 - 1
#: The files diskcache and SQLite keep in the store's directory (what quarantine moves).
_OWN_FILES = frozenset({DBNAME, f"{DBNAME}-wal", f"{DBNAME}-shm"})
_SYNCHRONOUS: dict[str, int] = {"process": 1, "power": 2}  # NORMAL, FULL
#: Settings every open passes (see the module docstring for why each one).
_PINNED_SETTINGS: dict[str, Any] = {
    "eviction_policy": "none",
    "cull_limit": 0,
    "size_limit": _SQLITE_MAX_INT,
    "disk_min_file_size": _SQLITE_MAX_INT,
    "tag_index": 1,
    "statistics": 0,  # statistics would turn every read into a write transaction
    "sqlite_journal_mode": "wal",
}
#: diskcache settings a caller may tune: they change speed or file size, never what is kept.
TUNABLE_SETTINGS = frozenset({"sqlite_cache_size", "sqlite_mmap_size", "sqlite_auto_vacuum"})
#: Defaults of ours for tunable settings. diskcache maps the first 64 MiB of the database into
#: the process (``sqlite_mmap_size``); under reads at random all of that window ends up in the
#: process's resident memory (measured serving 1M sessions: peak VmRSS 161-165 MB with it,
#: 102 MB without) for no measurable gain in throughput, since SQLite's own page cache and
#: the kernel's page cache serve the same pages.
_DEFAULT_SETTINGS: dict[str, Any] = {"sqlite_mmap_size": 0}

# Expiry lives in Session.expired_at (now_ms > expires_at); in SQL over the tag column it reads
# ``tag < now_ms``, which leaves out the NULL tags of sessions that never expire.
_EXPIRED_IDS = "SELECT key, raw FROM Cache WHERE tag < ? ORDER BY tag LIMIT ?"
_EXPIRED_COUNT = "SELECT COUNT(*) FROM Cache WHERE tag < ?"
_PAGE = "SELECT key, raw, mode, filename, value FROM Cache WHERE key > ? ORDER BY key LIMIT ?"
#: Sessions by id; ``{marks}`` is one ``?`` per id, at most _LOAD_CHUNK of them.
_LOAD = "SELECT key, raw, mode, filename, value FROM Cache WHERE key IN ({marks}) AND raw = 1"
_LOAD_CHUNK = 500
# The writes, as diskcache's own add / set / delete write a row (its _row_insert, _row_update,
# __delitem__) for a str key (raw = 1) and an inline value (size 0, no file, no expire_time);
# the count and size in Settings follow by diskcache's triggers.
_INSERT = (
    "INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, "
    "size, mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, ?, 0, ?, NULL, ?) "
    "ON CONFLICT (key, raw) DO NOTHING"
)
_CURRENT = "SELECT rowid, mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
_UPDATE = (
    "UPDATE Cache SET store_time = ?, expire_time = NULL, access_time = ?, access_count = 0, "
    "tag = ?, size = 0, mode = ?, filename = NULL, value = ? WHERE rowid = ?"
)
_DELETE = "DELETE FROM Cache WHERE key = ? AND raw = 1"
_DELETE_EXPIRED = "DELETE FROM Cache WHERE key = ? AND raw = 1 AND tag < ?"
_DELETE_ROW = "DELETE FROM Cache WHERE rowid = ?"


class SessionDisk(diskcache.Disk):
    """diskcache serialisation for sessions: str keys, inline bytes values, never pickle."""

    def put(self, key: Any) -> tuple[str, bool]:
        if type(key) is not str:
            raise StoreError(f"a disk store key is a str session id, not {type(key).__name__}")
        return key, True

    def get(self, key: Any, raw: bool) -> str:
        if not raw or type(key) is not str:
            raise StoreError(
                f"refusing a stored key that is not a plain str (raw={raw!r}, "
                f"{type(key).__name__}): the database holds rows this store did not write"
            )
        return key

    def store(
        self, value: Any, read: bool, key: Any = UNKNOWN
    ) -> tuple[int, int, None, sqlite3.Binary]:
        if read or type(value) is not bytes:
            raise StoreError(f"a disk store value is bytes, not {type(value).__name__}")
        return 0, MODE_RAW, None, sqlite3.Binary(value)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> bytes:
        if read or mode != MODE_RAW or filename is not None or type(value) is not bytes:
            raise StoreError(
                f"refusing a stored value that is not inline bytes (mode {mode!r}, "
                f"{type(value).__name__}): the database holds rows this store did not write"
            )
        return value

    def remove(self, file_path: str) -> None:
        # diskcache calls this with the file name a replaced or deleted row claims. This store
        # never writes value files, so a name can only come from a planted row: never act on it.
        pass


class DiskStore(ThreadedStore):
    """A durable, single-owner store in the directory ``path``. See the module docstring."""

    backend = "disk"
    shared = False
    errors = (sqlite3.Error, diskcache.Timeout, OSError)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "process",
        on_corrupt: OnCorrupt = "quarantine",
        create: bool = True,
        read_only: bool = False,
        **diskcache_settings: Any,
    ) -> None:
        check_file_options(durability, on_corrupt)
        refused = sorted(set(diskcache_settings) - TUNABLE_SETTINGS)
        if refused:
            raise ValueError(
                f"a disk store does not take {', '.join(refused)}: the diskcache settings that "
                f"decide what is kept are fixed; {', '.join(sorted(TUNABLE_SETTINGS))} may be tuned"
            )
        self.path = Path(path)
        self.durability = durability
        self.on_corrupt = on_corrupt
        self._settings: dict[str, Any] = {
            **_DEFAULT_SETTINGS,
            **diskcache_settings,
            **_PINNED_SETTINGS,
            "sqlite_synchronous": _SYNCHRONOUS[durability],
            FORMAT_KEY: FORMAT,
        }
        self.label = f"disk store {self.path}"
        self._cache: diskcache.Cache | None = None
        #: Make the store if the directory does not hold one (otherwise: StoreError).
        self.create = create and not read_only
        #: Open without writing anything (see "Read-only"): commits are refused.
        self.read_only = read_only
        self._files = StoreFiles(self.path, self.backend, _OWN_FILES)
        self._checkpoints: _Checkpointer | None = None

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        outcomes = await super().commit(writes)
        if self._checkpoints is not None:
            self._checkpoints.notify()
        return outcomes

    # Everything below runs on the store thread.

    def _db(self) -> diskcache.Cache | _ReadOnlyCache:
        assert self._cache is not None, "the store thread runs calls only while it is open"
        return self._cache

    def _open(self) -> None:
        files = self._files
        files.open(create=self.create, read_only=self.read_only)
        try:
            problem = _inspect(self.path / DBNAME)
            if problem is not None:
                self._set_aside(problem)
            cache = self._connect()
            if not self.read_only:
                files.mark_and_narrow()
        except (sqlite3.Error, OSError) as exc:
            files.release()
            raise StoreError(f"cannot open {self.label}: {exc}") from exc
        except BaseException:
            files.release()
            raise
        self._cache = cache
        if not self.read_only:
            self._checkpoints = _Checkpointer(self.path / DBNAME, _SYNCHRONOUS[self.durability])

    def _connect(self) -> diskcache.Cache | _ReadOnlyCache:
        if self.read_only:
            return _ReadOnlyCache(self.path / DBNAME)
        create_private(self.path / DBNAME)  # 0600; SQLite gives its -wal and -shm the same
        try:
            return self._new_cache()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            # Damage past what _inspect reads (a settings or index page, say).
            self._set_aside(f"corrupt SQLite database: {exc}")
            create_private(self.path / DBNAME)
            return self._new_cache()

    def _new_cache(self) -> diskcache.Cache:
        return diskcache.Cache(str(self.path), disk=SessionDisk, **self._settings)

    def _set_aside(self, problem: str) -> None:
        """Apply ``on_corrupt`` to an unusable database (read-only opens never move anything)."""
        if self.on_corrupt == "fail" or self.read_only:
            raise StoreError(
                f"{self.label} cannot be used: {problem}; it was left as it is "
                f"({'read-only' if self.read_only else 'on_corrupt=fail'}): move it aside or "
                "restore a backup"
            )
        self._files.quarantine(problem)

    def _close(self) -> None:
        cache, self._cache = self._cache, None
        checkpoints, self._checkpoints = self._checkpoints, None
        try:
            if checkpoints is not None:
                checkpoints.stop()  # first, so that the store's connection is the last one
            if cache is not None:
                cache.close()  # the last connection checkpoints the WAL into cache.db
        finally:
            self._files.release()

    def _load(self, ids: list[str]) -> dict[str, Session]:
        # One query per _LOAD_CHUNK ids rather than a Cache.get each: a sweep loads hundreds of
        # sessions at a time, and diskcache's per-call Python cost more than SQLite's lookups.
        cache = self._db()
        disk = cache.disk
        found: dict[str, Session] = {}
        for start in range(0, len(ids), _LOAD_CHUNK):
            chunk = ids[start : start + _LOAD_CHUNK]
            query = _LOAD.format(marks=",".join("?" * len(chunk)))
            for key, raw, mode, filename, value in _select(cache, query, tuple(chunk)):
                sid = disk.get(key, raw)
                found[sid] = _decode(sid, disk.fetch(mode, filename, value, False))
        return found

    def _commit(self, writes: list[Write]) -> list[bool]:
        # Check and encode everything before the transaction: a bad batch changes nothing, and
        # the write lock is held for SQLite work only.
        if self.read_only:
            raise StoreError(f"{self.label} is open read-only: nothing can be written")
        cache = self._db()
        prepared: list[tuple[Put, bytes] | Delete | Mark] = []
        for write in writes:
            if isinstance(write, Put):
                prepared.append((write, encode_session(write.session)))
            else:
                prepared.append(write)
        if not prepared:
            return []
        with cache.transact():  # one transaction: all of the batch, or none of it on error
            execute = cache._sql  # the store thread's connection, inside that transaction
            now = time.time()
            return apply_in_order(
                prepared,
                lambda item: write_ids(item[0] if isinstance(item, tuple) else item),
                lambda item: (
                    _apply_put(execute, cache.disk, now, *item)
                    if isinstance(item, tuple)
                    else _apply_delete(execute, cache.disk, item)
                    if isinstance(item, Delete)
                    else _apply_mark(execute, item)
                ),
            )

    def _load_mark(self) -> int:
        cache = self._db()
        rows = _select(cache, "SELECT value FROM Settings WHERE key = ?", (MARK_KEY,))
        return int(rows[0][0]) if rows else 0

    def _scan(
        self, now_ms: int, cursor: str | None, limit: int
    ) -> tuple[list[Session], str | None]:
        # The cursor is the last id read; ids are never empty, so "" reads from the first one.
        cache = self._db()
        rows = _select(cache, _PAGE, (cursor or "", limit))
        disk = cache.disk
        page: list[Session] = []
        for key, raw, mode, filename, value in rows:
            sid = disk.get(key, raw)
            session = _decode(sid, disk.fetch(mode, filename, value, False))
            if not session.expired_at(now_ms):
                page.append(session)
        # A short read is the end; a full one may be followed by more (or by nothing).
        if len(rows) < limit:
            return page, None
        return page, disk.get(rows[-1][0], rows[-1][1])

    def _expired(self, now_ms: int, limit: int) -> list[str]:
        cache = self._db()
        disk = cache.disk
        return [disk.get(key, raw) for key, raw in _select(cache, _EXPIRED_IDS, (now_ms, limit))]

    def _count(self, now_ms: int) -> int:
        # len() is diskcache's trigger-maintained row count: O(1). The expired rows are counted
        # on the tag index, so this costs O(expired), and sweeps keep that small.
        cache = self._db()
        ((expired,),) = _select(cache, _EXPIRED_COUNT, (now_ms,))
        return len(cache) - expired


def _apply_put(
    execute: Callable[..., sqlite3.Cursor],
    disk: diskcache.Disk,
    now: float,
    put: Put,
    record: bytes,
) -> bool:
    """``Cache.add`` or ``Cache.set`` of a session, in SQL (see the module docstring)."""
    session = put.session
    # SessionDisk still decides what may go in: a str key, an inline bytes value.
    key, _ = disk.put(session.id)
    _, mode, _, value = disk.store(record, False)
    if put.moved_from is not None:
        source = _current(execute, disk, put.moved_from)
        if not source_holds(put, None if source is None else source[1]):
            return False
    if put.expected_version is None:
        cursor = execute(_INSERT, (key, now, now, session.expires_at, mode, value))
        return cursor.rowcount == 1
    current = _current(execute, disk, key)
    if current is None or current[1].version != put.expected_version:
        return False
    execute(_UPDATE, (now, now, session.expires_at, mode, value, current[0]))
    return True


def _current(
    execute: Callable[..., sqlite3.Cursor], disk: diskcache.Disk, session_id: str
) -> tuple[int, Session] | None:
    """The row id and the stored session of ``session_id``, if there is one."""
    key, _ = disk.put(session_id)
    row = execute(_CURRENT, (key,)).fetchone()
    if row is None:
        return None
    rowid, mode, filename, stored = row
    return rowid, _decode(key, disk.fetch(mode, filename, stored, False))


def _apply_mark(execute: Callable[..., sqlite3.Cursor], mark: Mark) -> bool:
    # In diskcache's Settings table, not the Cache table: never a session, never counted. Not
    # passed to diskcache.Cache() as a setting, which would reset it on every open.
    execute(
        "INSERT INTO Settings (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
        (MARK_KEY, mark.ms),
    )
    return True


def _apply_delete(
    execute: Callable[..., sqlite3.Cursor], disk: diskcache.Disk, delete: Delete
) -> bool:
    if delete.expected_version is not None:  # the version is in the record: read it
        current = _current(execute, disk, delete.id)
        if current is None or not may_delete(delete, current[1]):
            return False
        return execute(_DELETE_ROW, (current[0],)).rowcount > 0
    # The tag is the session's expires_at, so "expired at t" (t > expires_at) is ``tag < t``:
    # the stored record need not be read and decoded, and NULL (never expires) never matches.
    if delete.if_expired_at is None:
        return execute(_DELETE, (delete.id,)).rowcount > 0
    return execute(_DELETE_EXPIRED, (delete.id, delete.if_expired_at)).rowcount > 0


class _ReadOnlyCache:
    """What the store's queries use of a diskcache ``Cache`` (its connection's ``_sql``, its
    ``disk`` and its row count), over a read-only SQLite connection.

    diskcache's ``Cache()`` writes its settings when it opens, so a read-only open cannot use
    it. Without a write-ahead log left over (a clean close removes it) the database is opened
    ``immutable``, so SQLite makes no -wal or -shm file either; with one (a crash), read-only,
    so that the committed transactions in it are seen.
    """

    def __init__(self, db: Path) -> None:
        wal = db.with_name(f"{db.name}-wal")
        mode = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
        self._con = sqlite3.connect(f"{db.as_uri()}?{mode}", uri=True, isolation_level=None)
        self._sql = self._con.execute
        self.disk = SessionDisk(str(db.parent))

    def __len__(self) -> int:
        row = self._sql("SELECT value FROM Settings WHERE key = 'count'").fetchone()
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        self._con.close()


class _Checkpointer:
    """Runs SQLite's WAL checkpoints on a thread and a connection of their own.

    Woken by each commit (``notify``), it runs a PASSIVE checkpoint, which copies the frames
    committed so far into the database without waiting for, or blocking, the store thread's
    readers and writer. Commits that come while it works are covered by the next one. A
    failure is logged and tried again at the next commit; meanwhile the store thread's own
    checkpoints (every 1000 pages, SQLite's default) do the work, as they did without this.
    """

    def __init__(self, db: Path, synchronous: int) -> None:
        self._db = db
        self._synchronous = synchronous
        self._due = threading.Event()
        self._stopping = threading.Event()
        #: Checkpoints run so far, and an Event set after each (for tests and diagnostics).
        self.runs = 0
        self.ran = threading.Event()
        self._thread = threading.Thread(
            target=self._work, name=f"disk store checkpoints {db}", daemon=True
        )
        self._thread.start()

    def notify(self) -> None:
        """A commit added frames to the WAL. Thread-safe; costs one Event.set."""
        self._due.set()

    def stop(self) -> None:
        """Finish the checkpoint under way, if any, close the connection and end the thread."""
        self._stopping.set()
        self._due.set()
        self._thread.join()

    def _work(self) -> None:
        try:
            con = sqlite3.connect(self._db, isolation_level=None)
        except sqlite3.Error as exc:
            logger.error("disk store %s: no checkpoint thread (%s)", self._db.parent, exc)
            return
        try:
            # Per connection, and a checkpoint's syncs follow the checkpointing connection's.
            con.execute(f"PRAGMA synchronous = {self._synchronous}")
            while True:
                self._due.wait()
                if self._stopping.is_set():
                    return
                self._due.clear()
                try:
                    con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    logger.warning("disk store %s: checkpoint failed: %s", self._db.parent, exc)
                else:
                    self.runs += 1
                    self.ran.set()
        finally:
            con.close()


def _decode(sid: str, data: bytes) -> Session:
    session = decode_session(data)
    if session.id != sid:
        raise StoreError(f"the record stored under {sid!r} is session {session.id!r}")
    return session


def _select(cache: diskcache.Cache, statement: str, params: tuple[Any, ...]) -> list[Any]:
    """Run a read-only query on the cache's own SQLite connection (diskcache internals).

    ``Cache._sql`` is the ``execute`` of the calling thread's connection: the store thread's,
    so the query sees the store's own committed writes. Trade-off: a private attribute, which
    a diskcache release could rename; the disk store tests would catch that at once.
    """
    return cache._sql(statement, params).fetchall()


def _inspect(db_path: Path) -> str | None:
    """Why the database at ``db_path`` is not one of ours, or None if it is (or is absent).

    Reads it with plain :mod:`sqlite3` (diskcache internals: its file name and table names)
    because opening a diskcache ``Cache`` writes its settings, and a database that is not ours
    must be left untouched. Raises only for errors that are not about the database's content.
    """
    if not db_path.exists():
        return None
    try:
        con = sqlite3.connect(db_path, isolation_level=None)
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            return f"unreadable SQLite database: {exc}"
        raise
    try:
        tables = {
            name
            for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not name.startswith("sqlite_")  # SQLite's own, e.g. sqlite_stat1 after ANALYZE
        }
        if not tables:
            return None  # an empty database: nothing in it to lose or misread
        if "Settings" not in tables or not tables <= {"Settings", "Cache"}:
            return f"not a diskcache database (tables: {', '.join(sorted(tables))})"
        marker = con.execute("SELECT value FROM Settings WHERE key = ?", (FORMAT_KEY,)).fetchone()
        if marker is not None:
            if marker[0] != FORMAT:
                return f"session store format {marker[0]!r}; this release reads format {FORMAT}"
            return None
        if "Cache" in tables and con.execute("SELECT 1 FROM Cache LIMIT 1").fetchone():
            return "a diskcache database that this store did not write (no format marker)"
        return None  # diskcache's tables without a single row (say, a first open cut short)
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            return f"unreadable SQLite database: {exc}"
        raise
    finally:
        con.close()


def _is_corruption(exc: sqlite3.Error) -> bool:
    """True for damage to the database's content, False for I/O, locking, or permissions."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
