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
Every ``commit`` is one SQLite transaction, however many writes it carries: that is what makes
the manager's group commit pay one sync for a whole batch. Within it, consecutive writes of one
kind (creates, updates, deletes: a batch under load is mostly one kind) are one prepared
statement run over the rows with ``executemany``, not a call per session. The journal is
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

Threads
-------
Each store owns one :class:`~workers.stores.thread.StoreThread`, started by ``open`` and
stopped by ``close``, and one SQLite connection of its own (``check_same_thread=False``: the
thread that uses it changes; never two at once). Opening, closing, scans, sweeps, counts, and
loads and commits too large to be quick run on the store thread, one at a time. A load of up
to :attr:`DiskStore.inline_max` sessions, and a commit of that many writes, run on the caller's
thread (the Trio thread) instead, when :meth:`~DiskStore.loads_now` / ``commits_now`` allow:
no job of the store's is on its thread, no checkpoint runs (below), the commit would not
write the WAL's header (:class:`_WalIndex`), ``durability`` is ``"process"``, and the
:class:`~workers.stores.stall.StallGuard` has not seen the disk slow. Such a call is SQLite
working on pages in its cache or the kernel's, and a commit is ``write(2)`` to the WAL: tens of
microseconds, where a hop to the store thread and back costs 40-90. What bounds a stall there:
the connection never waits for a lock on the caller's thread (``busy_timeout`` 0 there, and
only this connection and the checkpoint thread's use the database), never checkpoints
(``wal_autocheckpoint`` 0 there) and never syncs; so a call waits only for page I/O (a page
not in memory, a write the kernel throttles), and the stall guard sends every call to the
store thread for a while after one that did. ``inline=False`` runs every call on the store
thread.

Checkpoints
-----------
In WAL mode SQLite appends committed pages to ``cache.db-wal``; a checkpoint copies them into
``cache.db`` and syncs both files. A :class:`_Checkpointer` thread with a connection of its own
does that (``PRAGMA wal_checkpoint(PASSIVE)``) once :data:`CHECKPOINT_WRITES` writes have been
committed, or :data:`CHECKPOINT_AGE` seconds have passed, since the last one: SQLite lets it run
alongside the store's reads and writes, and the GIL is released while it copies and syncs.
While it runs, the store's calls go to its thread (a checkpoint that ends while a commit on the
Trio thread begins could make that commit start the WAL again). Commits on the store thread
still checkpoint by themselves past :data:`_AUTOCHECKPOINT` pages, a bound on the WAL whatever
happens; the checkpoint thread normally gets there long before, so a sweep's commits do not pay
for it (a checkpoint in a commit used to cost 10-190 ms, during which nothing was answered).
``close`` stops the checkpoint thread first, so the store's connection is the last one and
checkpoints the WAL away.

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
settings are written (the store's connection is read-only, and diskcache's ``Cache``, which
writes its settings when it opens, is not used), and ``commit`` is refused.
``create=False`` (the admin verbs that write) opens an existing store only.

Beyond diskcache's public API
-----------------------------
diskcache makes the database: every writable open runs ``diskcache.Cache()`` with the pinned
settings, which creates or puts right the schema, its indexes and triggers and the settings,
and closes it again. Everything after that is SQL of the store's own on diskcache's schema,
on the store's one connection, which takes diskcache's per-connection settings
(``sqlite_synchronous``, ``sqlite_cache_size``, ``sqlite_mmap_size``) as diskcache's own
connections would. All of it depends on a schema that has been stable since diskcache 4 and
is pinned by this module's tests:

- Queries diskcache has no API for: ids by expiry range (``expired``), the number of expired
  rows (``count``), keys after a cursor in sorted order (``scan``; ``iterkeys`` always starts
  at the first key), and many keys at once (``load``). Without them, ``expired`` and ``count``
  would read every row.
- Writes: the row a ``Put`` inserts or updates and the row a ``Delete`` removes are the rows
  ``Cache.add``, ``Cache.set`` and ``Cache.delete`` would write or remove for a str key and an
  inline value (``SessionDisk.put`` and ``SessionDisk.store`` still check the key and value),
  and diskcache's triggers keep its count and size. The reason is cost: each ``Cache`` call
  opens a transaction context and re-reads its connection, which took 3 to 5 times longer
  than SQLite's own work (profiled on a sweep: 15 ms of every 500-session batch), a call per
  session cannot share one prepared statement over a batch, and a conditional delete read and
  decoded the record where ``tag < ?`` (the tag is the session's ``expires_at``) says the same.
- :func:`_inspect` opens ``cache.db`` with :mod:`sqlite3` before diskcache does, because
  ``Cache()`` starts by writing its settings, and a foreign database must be left untouched.
- :class:`_WalIndex` reads two numbers of SQLite's wal-index (documented file format).
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import sqlite3
import struct
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
from .base import (
    Delete,
    Mark,
    Put,
    Write,
    apply_in_order,
    check_writes,
    may_delete,
    source_holds,
    write_ids,
)
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
_LOAD_ONE = "SELECT key, raw, mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
_LOAD_CHUNK = 500
# The writes, as diskcache's own add / set / delete write a row (its _row_insert, _row_update,
# __delitem__) for a str key (raw = 1) and an inline value (size 0, no file, no expire_time);
# the count and size in Settings follow by diskcache's triggers.
_INSERT = (
    "INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count, tag, "
    "size, mode, filename, value) VALUES (?, 1, ?, NULL, ?, 0, ?, 0, ?, NULL, ?) "
    "ON CONFLICT (key, raw) DO NOTHING"
)
_CURRENT = "SELECT rowid, key, mode, filename, value FROM Cache WHERE key IN ({marks}) AND raw = 1"
_CURRENT_ONE = "SELECT rowid, mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
_UPDATE = (
    "UPDATE Cache SET store_time = ?, expire_time = NULL, access_time = ?, access_count = 0, "
    "tag = ?, size = 0, mode = ?, filename = NULL, value = ? WHERE rowid = ?"
)
_DELETE_ROW = "DELETE FROM Cache WHERE rowid = ?"
#: A Delete: (id, time, time) removes a session expired at that time; (id, MAX, NULL) any.
_DELETE = "DELETE FROM Cache WHERE key = ? AND raw = 1 AND (tag < ? OR (? IS NULL AND tag IS NULL))"
#: diskcache's settings that are per connection: ours takes them as diskcache's own would.
_CONNECTION_SETTINGS = frozenset({"sqlite_synchronous", "sqlite_cache_size", "sqlite_mmap_size"})
#: Seconds the store thread's commits wait for SQLite's lock (only another process could hold
#: it); on the caller's thread they never wait (see _Database.mode).
_BUSY_TIMEOUT = 60.0
#: WAL pages past which a commit on the store thread checkpoints by itself (SQLite's default is
#: 1000): a backstop, set well above what the checkpoint thread lets pile up (about two pages
#: a write), so that it never has to run in the middle of a sweep's commits.
_AUTOCHECKPOINT = 10_000
#: Writes, and seconds, between two checkpoints (see _Checkpointer).
CHECKPOINT_WRITES = 1000
CHECKPOINT_AGE = 1.0


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
    """A durable, single-owner store in the directory ``path``. See the module docstring.

    ``inline=False`` runs every call on the store's thread (see "Threads").
    """

    backend = "disk"
    shared = False
    errors = (sqlite3.Error, diskcache.Timeout, OSError)
    #: Measured commits of 1 and of 4 new sessions: 40 and 100 us (p50), each session a page
    #: of the id index written to the WAL.
    inline_max = 4

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "process",
        on_corrupt: OnCorrupt = "quarantine",
        create: bool = True,
        read_only: bool = False,
        inline: bool = True,
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
        self._init_inline(inline)
        self._database: _Database | None = None
        #: Make the store if the directory does not hold one (otherwise: StoreError).
        self.create = create and not read_only
        #: Open without writing anything (see "Read-only"): commits are refused.
        self.read_only = read_only
        self._files = StoreFiles(self.path, self.backend, _OWN_FILES)
        self._checkpoints: _Checkpointer | None = None

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        check_writes(writes)
        if not writes:
            return []
        outcomes = await self._run(self._commit_on_thread, list(writes))
        self._committed(len(writes))
        return outcomes

    def commit_now(self, writes: Sequence[Write]) -> list[bool]:
        outcomes = super().commit_now(writes)
        self._committed(len(writes))
        return outcomes

    def _committed(self, writes: int) -> None:
        if self._checkpoints is not None:
            self._checkpoints.notify(writes)

    def _may_run_now(self, commit: bool) -> bool:
        database = self._database
        if database is None:
            return False
        checkpoints = self._checkpoints
        if checkpoints is None:
            # Read-only (nothing changes the database), or no checkpoint thread: then the
            # store's connection checkpoints by itself, and that syncs, so only the thread may.
            return self.read_only and not commit
        if checkpoints.running:
            return False
        # An fsync per commit, or SQLite's sync of the WAL header when this commit would
        # start the write-ahead log again: for the store thread.
        if commit and (self.durability != "process" or database.wal_restart_due()):
            return False
        database.mode(inline=True)
        return True

    # Everything below runs on the store thread, or, for _load and _commit, on the caller's
    # thread when _may_run_now allowed it: one user of the connection at a time either way.

    def _db(self) -> _Database:
        assert self._database is not None, "the store runs calls only while it is open"
        return self._database

    def _open(self) -> None:
        files = self._files
        files.open(create=self.create, read_only=self.read_only)
        try:
            problem = _inspect(self.path / DBNAME)
            if problem is not None:
                self._set_aside(problem)
            database = self._connect()
            if not self.read_only:
                files.mark_and_narrow()
        except (sqlite3.Error, OSError) as exc:
            files.release()
            raise StoreError(f"cannot open {self.label}: {exc}") from exc
        except BaseException:
            files.release()
            raise
        self._database = database
        if not self.read_only:
            self._checkpoints = _Checkpointer(self.path / DBNAME, _SYNCHRONOUS[self.durability])

    def _connect(self) -> _Database:
        db = self.path / DBNAME
        if self.read_only:
            return _Database(db, read_only=True)
        create_private(db)  # 0600; SQLite gives its -wal and -shm the same
        try:
            return self._with_settings()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            # Damage past what _inspect reads (a settings or index page, say).
            self._set_aside(f"corrupt SQLite database: {exc}")
            create_private(db)
            return self._with_settings()

    def _with_settings(self) -> _Database:
        """diskcache makes (or puts right) the schema and the settings; then our connection."""
        cache = diskcache.Cache(str(self.path), disk=SessionDisk, **self._settings)
        try:
            return _Database(self.path / DBNAME, read_only=False)
        finally:
            cache.close()  # after ours opened, so the write-ahead log stays as it is

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
        database, self._database = self._database, None
        checkpoints, self._checkpoints = self._checkpoints, None
        try:
            if checkpoints is not None:
                checkpoints.stop()  # first, so that the store's connection is the last one
            if database is not None:
                database.close()  # the last connection checkpoints the WAL into cache.db
        finally:
            self._files.release()

    def _load(self, ids: list[str]) -> dict[str, Session]:
        # One query per _LOAD_CHUNK ids rather than a Cache.get each: a sweep loads hundreds of
        # sessions at a time, and diskcache's per-call Python cost more than SQLite's lookups.
        database = self._db()
        disk = database.disk
        execute = database.execute
        found: dict[str, Session] = {}
        for start in range(0, len(ids), _LOAD_CHUNK):
            chunk = ids[start : start + _LOAD_CHUNK]
            query = _LOAD_ONE if len(chunk) == 1 else _LOAD.format(marks=",".join("?" * len(chunk)))
            for key, raw, mode, filename, value in execute(query, chunk).fetchall():
                sid = disk.get(key, raw)
                found[sid] = _decode(sid, disk.fetch(mode, filename, value, False))
        return found

    def _commit_on_thread(self, writes: list[Write]) -> list[bool]:
        self._db().mode(inline=False)
        return self._commit(writes)

    def _commit(self, writes: list[Write]) -> list[bool]:
        if self.read_only:
            raise StoreError(f"{self.label} is open read-only: nothing can be written")
        database = self._db()
        # Check and encode everything before the transaction: a bad batch changes nothing, and
        # the write lock is held for SQLite work only.
        runs = _runs(database.disk, writes)
        execute = database.execute
        execute("BEGIN IMMEDIATE")
        try:
            outcomes = _apply_runs(database, runs, time.time())
            execute("COMMIT")
        except BaseException:
            if database.in_transaction:
                execute("ROLLBACK")
            raise
        return outcomes

    def _load_mark(self) -> int:
        rows = (
            self._db().execute("SELECT value FROM Settings WHERE key = ?", (MARK_KEY,)).fetchall()
        )
        return int(rows[0][0]) if rows else 0

    def _scan(
        self, now_ms: int, cursor: str | None, limit: int
    ) -> tuple[list[Session], str | None]:
        # The cursor is the last id read; ids are never empty, so "" reads from the first one.
        database = self._db()
        rows = database.execute(_PAGE, (cursor or "", limit)).fetchall()
        disk = database.disk
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
        database = self._db()
        disk = database.disk
        rows = database.execute(_EXPIRED_IDS, (now_ms, limit)).fetchall()
        return [disk.get(key, raw) for key, raw in rows]

    def _count(self, now_ms: int) -> int:
        # The row count in Settings is kept by diskcache's triggers: O(1). The expired rows are
        # counted on the tag index, so this costs O(expired), and sweeps keep that small.
        database = self._db()
        ((expired,),) = database.execute(_EXPIRED_COUNT, (now_ms,)).fetchall()
        return len(database) - expired


# --- commits: runs of writes of one kind, each in as few SQLite calls as it allows ---

_INSERT_RUN, _UPDATE_RUN, _DELETE_RUN, _MARK_RUN, _EACH_RUN = range(5)


def _runs(disk: diskcache.Disk, writes: list[Write]) -> list[tuple[int, list[Any]]]:
    """``writes`` as runs of consecutive writes of one kind, each Put with its checked key and
    encoded record: ``(kind, [(put, key, mode, value)...])`` for Puts, ``(kind, [write...])``
    for the others. Runs keep the batch's order (a later write to an id sees the earlier)."""
    runs: list[tuple[int, list[Any]]] = []
    last = -1
    items: list[Any] = []
    for write in writes:
        if isinstance(write, Put):
            if write.moved_from is not None:
                kind = _EACH_RUN  # a rotate: it reads the session it moves from
            else:
                kind = _INSERT_RUN if write.expected_version is None else _UPDATE_RUN
            # SessionDisk still decides what may go in: a str key, an inline bytes value.
            key, _ = disk.put(write.session.id)
            _, mode, _, value = disk.store(encode_session(write.session), False)
            item: Any = (write, key, mode, value)
        elif isinstance(write, Delete):
            # One that names a version reads the record (the version is in it).
            kind = _DELETE_RUN if write.expected_version is None else _EACH_RUN
            item = write
        else:
            kind, item = _MARK_RUN, write
        if kind != last:
            items = []
            runs.append((kind, items))
            last = kind
        items.append(item)
    return runs


def _apply_runs(database: _Database, runs: list[tuple[int, list[Any]]], now: float) -> list[bool]:
    """Apply the runs inside the caller's transaction; per write, whether it took effect (the
    failed-write rule of ``stores/base.py`` across the whole batch)."""
    outcomes: list[bool] = []
    failed: set[str] = set()
    for kind, items in runs:
        if kind == _INSERT_RUN:
            done = _insert_run(database, items, now, failed)
        elif kind == _UPDATE_RUN:
            done = _update_run(database, items, now, failed)
        elif kind == _DELETE_RUN:
            done = _delete_run(database, items, failed)
        elif kind == _EACH_RUN:
            done = _each_run(database, items, now, failed)
        else:
            done = [_apply_mark(database.execute, mark) for mark in items]
        outcomes += done
    return outcomes


def _all_or_each(
    database: _Database,
    statement: str,
    rows: list[tuple[Any, ...]],
    ids: list[str],
    failed: set[str],
    each: Callable[[int], bool],
) -> list[bool]:
    """Run ``statement`` over ``rows`` with one ``executemany`` when every row should take
    effect (the usual case: fresh ids, sweeps of expired sessions); if one did not, undo that
    and find out which with ``each(i)``, row by row, under the failed-write rule."""
    if len(rows) > 1 and failed.isdisjoint(ids):
        database.execute("SAVEPOINT run")
        changed = database.executemany(statement, rows).rowcount
        if changed == len(rows):
            database.execute("RELEASE run")
            return [True] * len(rows)
        database.execute("ROLLBACK TO run")
        database.execute("RELEASE run")
    return apply_in_order(range(len(ids)), lambda i: (ids[i],), each, failed)


def _insert_run(database: _Database, items: list[Any], now: float, failed: set[str]) -> list[bool]:
    rows = [(key, now, now, put.session.expires_at, mode, value) for put, key, mode, value in items]
    ids = [key for _, key, _, _ in items]
    execute = database.execute

    def each(i: int) -> bool:
        return execute(_INSERT, rows[i]).rowcount == 1

    return _all_or_each(database, _INSERT, rows, ids, failed, each)


def _update_run(database: _Database, items: list[Any], now: float, failed: set[str]) -> list[bool]:
    """Puts over stored versions: the versions are read in one query, checked in order (a
    later Put of an id expects what the earlier one wrote), and the rows that pass are
    written with one ``executemany``. One Put alone (one caller's update) goes row by row."""
    if len(items) == 1:
        return _each_run(database, items, now, failed)
    disk = database.disk
    keys = list({key for _, key, _, _ in items})
    stored: dict[str, tuple[int, int]] = {}  # key -> (rowid, version)
    for start in range(0, len(keys), _LOAD_CHUNK):
        chunk = keys[start : start + _LOAD_CHUNK]
        query = _CURRENT.format(marks=",".join("?" * len(chunk)))
        for rowid, key, mode, filename, value in database.execute(query, chunk).fetchall():
            stored[key] = (rowid, _decode(key, disk.fetch(mode, filename, value, False)).version)
    outcomes: list[bool] = []
    rows = []
    for put, key, mode, value in items:
        current = stored.get(key)
        ok = key not in failed and current is not None and current[1] == put.expected_version
        if ok:
            assert current is not None
            session = put.session
            rows.append((now, now, session.expires_at, mode, value, current[0]))
            stored[key] = (current[0], session.version)
        else:
            failed.add(key)
        outcomes.append(ok)
    if rows:
        database.executemany(_UPDATE, rows)
    return outcomes


def _delete_run(database: _Database, items: list[Delete], failed: set[str]) -> list[bool]:
    # The tag is the session's expires_at, so "expired at t" (t > expires_at) is ``tag < t``:
    # the stored record need not be read and decoded, and NULL (never expires) never matches.
    # A conditional and a plain delete take the same statement: the plain one compares with
    # a time past every tag, and the IS NULL leg takes the sessions that never expire.
    rows = [
        (d.id, _SQLITE_MAX_INT if d.if_expired_at is None else d.if_expired_at, d.if_expired_at)
        for d in items
    ]
    execute = database.execute

    def each(i: int) -> bool:
        return execute(_DELETE, rows[i]).rowcount > 0

    return _all_or_each(database, _DELETE, rows, [d.id for d in items], failed, each)


def _each_run(database: _Database, items: list[Any], now: float, failed: set[str]) -> list[bool]:
    """Writes that read what they replace (a rotate's Put, a Delete that names a version), one
    at a time; each depends on every id of :func:`~workers.stores.base.write_ids`."""
    execute, disk = database.execute, database.disk

    def ids(item: Any) -> tuple[str, ...]:
        return write_ids(item[0] if isinstance(item, tuple) else item)

    def apply(item: Any) -> bool:
        if isinstance(item, tuple):
            put, key, mode, value = item
            return _apply_put(execute, disk, now, put, key, mode, value)
        return _apply_delete(execute, disk, item)

    return apply_in_order(items, ids, apply, failed)


def _apply_put(
    execute: Callable[..., sqlite3.Cursor],
    disk: diskcache.Disk,
    now: float,
    put: Put,
    key: str,
    mode: int,
    value: Any,
) -> bool:
    """``Cache.add`` or ``Cache.set`` of one session, in SQL, its conditions checked."""
    session = put.session
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


def _apply_delete(
    execute: Callable[..., sqlite3.Cursor], disk: diskcache.Disk, delete: Delete
) -> bool:
    """A Delete that names a version: the version is in the record, so read it."""
    current = _current(execute, disk, delete.id)
    if current is None or not may_delete(delete, current[1]):
        return False
    return execute(_DELETE_ROW, (current[0],)).rowcount > 0


def _current(
    execute: Callable[..., sqlite3.Cursor], disk: diskcache.Disk, session_id: str
) -> tuple[int, Session] | None:
    """The row id and the stored session of ``session_id``, if there is one."""
    key, _ = disk.put(session_id)
    row = execute(_CURRENT_ONE, (key,)).fetchone()
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


class _Database:
    """The store's one SQLite connection to diskcache's database, and what goes with it.

    Every query and write of the store runs here, on the store thread or, when allowed, on
    the caller's thread: never on both at once (``check_same_thread=False`` only because the
    thread that uses it changes). The connection takes diskcache's per-connection settings
    (the ``sqlite_*`` rows of its Settings table: synchronous, cache size, mmap size), as
    diskcache's own connections do.

    Read-only, it is a read-only connection of its own (see "Read-only"): without a
    write-ahead log left over (a clean close removes it) the database is opened ``immutable``,
    so SQLite makes no -wal or -shm file either; with one (a crash), read-only, so that the
    committed transactions in it are seen.
    """

    def __init__(self, db: Path, *, read_only: bool) -> None:
        if read_only:
            wal = db.with_name(f"{db.name}-wal")
            mode = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
            con = sqlite3.connect(
                f"{db.as_uri()}?{mode}", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            con = sqlite3.connect(
                db, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT
            )
        try:
            self.execute = con.execute
            self.executemany = con.executemany
            for key, value in con.execute("SELECT key, value FROM Settings").fetchall():
                if key in _CONNECTION_SETTINGS:
                    con.execute(f"PRAGMA {key[len('sqlite_') :]} = {int(value)}")
            self._inline = False
            self.wal = None if read_only else _WalIndex(db.with_name(f"{db.name}-shm"))
        except BaseException:
            con.close()
            raise
        self._con = con
        self.disk = SessionDisk(str(db.parent))

    @property
    def in_transaction(self) -> bool:
        return self._con.in_transaction

    def __len__(self) -> int:
        row = self.execute("SELECT value FROM Settings WHERE key = 'count'").fetchone()
        return 0 if row is None else int(row[0])

    def mode(self, *, inline: bool) -> None:
        """Set the connection up for the thread about to use it. On the store thread, a commit
        that takes the WAL past :data:`_AUTOCHECKPOINT` pages checkpoints (it bounds the WAL
        whatever the checkpoint thread manages, which normally gets there long before) and a
        lock held by another process is waited for; on the caller's thread neither (a
        checkpoint syncs; a wait would stall)."""
        if inline != self._inline:
            self.execute(f"PRAGMA wal_autocheckpoint = {0 if inline else _AUTOCHECKPOINT}")
            self.execute(f"PRAGMA busy_timeout = {0 if inline else round(_BUSY_TIMEOUT * 1000)}")
            self._inline = inline

    def wal_restart_due(self) -> bool:
        """Whether the next commit may write the WAL's header, which SQLite syncs (see
        :class:`_WalIndex`)."""
        return self.wal is None or self.wal.restart_due()

    def close(self) -> None:
        try:
            if self.wal is not None:
                self.wal.close()
        finally:
            self._con.close()


class _WalIndex:
    """Reads two numbers of SQLite's wal-index (the ``-shm`` file), to know when a commit would
    write the write-ahead log's header.

    SQLite writes the WAL's header, and syncs it (with ``synchronous=NORMAL`` too: a WAL
    reused without it can be corrupted by a power loss), when a commit finds every frame of
    the log already copied into the database: it then starts the log again from its start.
    That is the one sync a commit in WAL mode makes besides checkpoints, and it must not run
    on the Trio thread. The wal-index records both numbers: ``mxFrame``, the frames in the log
    (0: empty), and ``nBackfill``, the frames copied into the database so far; the log starts
    again when they are equal. Its layout is part of SQLite's documented file format
    (https://sqlite.org/walformat.html: the header's ``mxFrame`` at byte 16, ``nBackfill`` at
    byte 96, in native byte order, ``iVersion`` 3007000 at byte 0). It is read without SQLite's
    locks, which is exact here: it is read only while no commit and no checkpoint runs.
    Anything unexpected (a version this code does not know, a header not initialised) answers
    "due", which is always safe: the commit then runs on the store thread.
    """

    _VERSION = 3007000

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map: mmap.mmap | None = mmap.mmap(fd, _WAL_INDEX_BYTES, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            self._map = None  # too short or not mappable: always "due"
        finally:
            os.close(fd)

    def restart_due(self) -> bool:
        index = self._map
        if index is None:
            return True
        version, init, max_frame = _WAL_HEADER.unpack_from(index, 0)
        if version != self._VERSION or not init:
            return True
        (backfilled,) = _WAL_BACKFILL.unpack_from(index, 96)
        return backfilled >= max_frame

    def close(self) -> None:
        if self._map is not None:
            self._map.close()


#: iVersion (u32 at 0), isInit (u8 at 12), mxFrame (u32 at 16); nBackfill (u32 at 96).
_WAL_HEADER = struct.Struct("=I8xB3xI")
_WAL_BACKFILL = struct.Struct("=I")
_WAL_INDEX_BYTES = 136


class _Checkpointer:
    """Runs SQLite's WAL checkpoints on a thread and a connection of their own.

    The store's connection does not checkpoint by itself on the caller's thread (a checkpoint
    copies pages and syncs). Instead, commits tell this thread how many writes they made
    (``notify``), and once :data:`CHECKPOINT_WRITES` have been made, or
    :data:`CHECKPOINT_AGE` seconds have passed since the last checkpoint, it runs a PASSIVE
    one, which copies the frames committed so far into the database without waiting for, or
    blocking, the store's connection; the GIL is released while it copies and syncs. While it
    runs (:attr:`running`, set by ``notify`` on the Trio thread and cleared here) the store
    runs every call on its own thread, so the Trio thread never meets a checkpoint half way
    (whose end would make its next commit start the WAL again: see :class:`_WalIndex`). A
    failure is logged and tried again at the next checkpoint; commits on the store thread
    still checkpoint by themselves past _AUTOCHECKPOINT pages.
    """

    def __init__(self, db: Path, synchronous: int) -> None:
        self._db = db
        self._synchronous = synchronous
        self._due = threading.Event()
        self._stopping = threading.Event()
        #: Whether a checkpoint is due or under way (read on the Trio thread).
        self.running = False
        self._writes = 0
        self._last = -math.inf
        #: Checkpoints run so far, and an Event set after each (for tests and diagnostics).
        self.runs = 0
        self.ran = threading.Event()
        self._thread = threading.Thread(
            target=self._work, name=f"disk store checkpoints {db}", daemon=True
        )
        self._thread.start()

    def notify(self, writes: int) -> None:
        """A commit of ``writes`` writes added frames to the WAL; start a checkpoint if one is
        due. Called on the Trio thread only (so ``running`` only becomes True there)."""
        self._writes += writes
        if self.running:
            return
        now = time.monotonic()
        if self._writes >= CHECKPOINT_WRITES or now - self._last >= CHECKPOINT_AGE:
            self._writes = 0
            self._last = now
            self.running = True
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
            self.running = True  # for good: the store's own connection checkpoints instead
            return
        try:
            # Per connection, and a checkpoint's syncs follow the checkpointing connection's.
            con.execute(f"PRAGMA synchronous = {self._synchronous}")
            while True:
                self._due.wait()
                if self._stopping.is_set():
                    break
                self._due.clear()
                try:
                    con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    logger.warning("disk store %s: checkpoint failed: %s", self._db.parent, exc)
                else:
                    self.runs += 1
                finally:
                    self.running = False
                    self.ran.set()
        finally:
            con.close()


def _decode(sid: str, data: bytes) -> Session:
    session = decode_session(data)
    if session.id != sid:
        raise StoreError(f"the record stored under {sid!r} is session {session.id!r}")
    return session


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
