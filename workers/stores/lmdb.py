"""The ``lmdb`` store (the seed's leveldb row): an LMDB environment in a directory, one owner.

Layout
------
The store is a directory (0700, its files 0600) holding our ``SESSIONS`` marker and ``LOCK``
file (:class:`~workers.stores.files.StoreFiles`: what is made, recognised and may be moved) and
LMDB's own ``data.mdb`` and ``lock.mdb``. The environment has three named databases:

``meta``
    ``format`` -> :data:`FORMAT`, written when the store is created. An environment without it
    (or with another value) is not ours, and is handled like a corrupt one.
``sessions``
    session id (UTF-8) -> the msgpack record of :func:`~workers.record.codec.encode_session`.
``expiry``
    ``expires_at`` (8 bytes, big-endian, offset by 2**63 so that the order of the bytes is the
    order of the numbers) + session id -> empty. Only sessions that expire have an entry, and
    every write keeps it in step with ``sessions`` in the same transaction.

:meth:`LmdbStore.expired` reads ``expiry`` from its start up to ``now_ms``, and
:meth:`LmdbStore.count` is ``sessions``' entry count (kept by LMDB, O(1)) minus the expired
entries, so neither ever reads a live session: a sweep costs what it sweeps, however large the
store. :meth:`LmdbStore.scan` walks ``sessions`` in id order; its cursor is the last id returned.

Transactions and threads
------------------------
Every async call runs on the store's :class:`~workers.stores.thread.StoreThread`, started by
:meth:`~LmdbStore.open` and stopped by :meth:`~LmdbStore.close`: an LMDB write transaction
belongs to the thread that began it, and the store's calls never overlap, so LMDB never waits
on a lock. :meth:`~LmdbStore.commit` runs a batch of writes as one write transaction, so a
batch is committed whole or not at all (group commit: one sync per batch under
``durability="power"``).

A load of a few sessions, and a commit of a few writes under ``durability="process"``, may run
on the caller's thread instead (``load_now``, ``commit_now``: see
:mod:`workers.stores.thread`): a read from the memory map, a write transaction whose pages
go to the page cache with ``write(2)`` and no fsync, in a few microseconds, where the hop to
the thread and back costs 40-90. What bounds a stall there is :mod:`workers.stores.stall`: a
page read from a slow disk, or a write the kernel throttles, turns the fast path off for a
while. With ``durability="power"`` every commit syncs, so commits always run on the thread.
Dropping mapped pages (below) is normally a job of the thread's, done after the call that
asked for it; but when as many records again are touched before that drop has run (twice
``unmap_every`` in all), the call that touches them drops the pages in place, so a
``load_now`` or ``commit_now`` may drop them on the caller's thread.

The map size is LMDB's fixed upper bound on the file. It starts at ``map_size`` and doubles
(``Environment.set_mapsize``, then the batch is run again) whenever a batch does not fit, up to
``max_map_size``, past which :meth:`~LmdbStore.commit` raises :class:`StoreError` and writes
nothing. On 64-bit systems a large map costs address space only: the file grows with its data.

Durability
----------
``durability="process"`` (the default) opens the environment with ``sync=False,
metasync=False`` and ``writemap=False``. LMDB then writes each committed transaction's pages
into the file with ``write(2)`` before the commit returns, without ``fsync``: the data is in
the operating system's page cache, which outlives the process, so a crash or SIGKILL of the
owner loses nothing acknowledged (``tests/test_store_lmdb.py`` kills a child process to show
it). A power loss or kernel crash may lose the last transactions; LMDB's documentation
promises an intact database even then only on file systems that keep the order of writes, and
a store that does not open afterwards is quarantined like any corrupt one.
``durability="power"`` keeps LMDB's defaults (``sync=True``): every commit is on stable storage
before it returns. :meth:`~LmdbStore.close` syncs in both modes.

Memory
------
LMDB reads through a read-only shared mapping of ``data.mdb``: a record is read where it lies in the
page cache, never copied. Every page read stays mapped into this process, and Linux maps up to 16
neighbouring pages that are in the page cache along with it at each fault (fault-around, 64 KiB;
``readahead=False``, which is ``MADV_RANDOM``, does not turn it off). So under reads at random a
process serving a 1M-session store (about 450 MB) had all of it in its resident memory (``RssFile``)
within seconds, though it had loaded nothing: the pages are the kernel's page cache, shared, clean
and reclaimable, the same pages a file read with ``read(2)`` leaves cached, which no process's RSS
counts. :class:`~workers.stores.mapped_pages.MappedPages` keeps that figure bounded by dropping the
mapping's pages (``MADV_DONTNEED``) after every ``unmap_every`` records read or written (256, a
write counting three): the page cache keeps them, and a page read again is mapped again by a minor
fault. Serving 1M sessions at random it kept ``RssFile`` at 35-65 MB (512: 55-90 MB), against
380-480 MB. The price is a fault for nearly every page read, as ``read(2)`` would copy it: about a
fifth of the throughput under reads at random across 1M sessions (18,000 against 22,000 operations
a second, A/B; 256 and 512 serve about the same). ``unmap_every=None`` keeps every page mapped
instead, for a store whose resident size does not matter.

What stays in ``RssAnon``: LMDB copies every page a write transaction changes into a buffer of
its own and, after the commit, keeps those buffers for reuse until the environment is closed,
so the process holds as much as the largest transaction ever changed (about 3 pages, 12 KB,
per session written at random). The largest is the manager's commit of a second's deferred
access-time refreshes, one transaction however many: at 1M sessions and 9,000 to 16,000
retrieves a second, 70 to 165 MB. Only a bound on that commit's size bounds it.

Corruption
----------
LMDB keeps no checksums: it detects a file that is not an LMDB file, or from another version,
but a truncated file opens and then kills the process with SIGBUS when a page past the end is
read. :meth:`~LmdbStore.open` therefore checks the file's size against the last page the
environment claims to use before reading anything, and checks the format marker. A store that
fails these checks has its own files (``data.mdb``, ``lock.mdb``) moved into
``<path>.corrupt-<UTC stamp>/`` with an ERROR log naming both places and starts empty, or, with
``on_corrupt="fail"`` or ``read_only=True``, ``open`` raises :class:`StoreError`. Only a
directory carrying our ``SESSIONS`` marker is ever touched; a directory that holds other files
is refused with :class:`StoreError`, never moved: it is most likely another application's.
Damage inside a page that these checks cannot see surfaces as :class:`StoreError` from the call
that reads it.

``read_only=True`` opens an existing store with LMDB's read-only mode and writes nothing;
``create=False`` opens an existing store only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from ..record.codec import decode_session, encode_session
from ..record.errors import StoreError
from ..record.session import Session
from .base import (
    Delete,
    Mark,
    Put,
    Write,
    apply_in_order,
    may_delete,
    source_holds,
    write_id,
    write_ids,
)
from .files import FILE_MODE, Durability, OnCorrupt, StoreFiles, check_file_options
from .mapped_pages import MappedPages
from .thread import ThreadedStore

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The value of the ``format`` key in the ``meta`` database: what this module reads and writes.
FORMAT = b"trio-sessions lmdb 1"
FORMAT_KEY = b"format"
#: The clock high-water mark (:class:`~workers.stores.base.Mark`) in the ``meta`` database:
#: 8 bytes, big-endian.
MARK_KEY = b"mark"
DATA_FILE = "data.mdb"
_DATABASES = (b"meta", b"sessions", b"expiry")
#: The files LMDB keeps in the store's directory (what quarantine moves).
_OWN_FILES = frozenset({DATA_FILE, "lock.mdb"})
#: Errors by which LMDB says a file is damaged or not an environment it can read.
_CORRUPT = (
    lmdb.InvalidError,
    lmdb.CorruptedError,
    lmdb.VersionMismatchError,
    lmdb.PageNotFoundError,
    lmdb.IncompatibleError,
    lmdb.PanicError,
    lmdb.BadChecksumError,
)
_EXPIRY_OFFSET = 1 << 63
#: Most creates written with one putmulti (and counted as touched at once).
_RUN = 64
_MIB = 1 << 20


class _Corrupt(Exception):
    """The store's files are damaged or not ours (internal: handled by ``on_corrupt``)."""


class LmdbStore(ThreadedStore):
    """Sessions in an LMDB environment in directory ``path``, owned by one store object.

    :param durability: ``"process"``: survives a crash of the process (the default);
        ``"power"``: survives a power loss, at the cost of a sync per committed batch.
    :param on_corrupt: ``"quarantine"``: move a damaged store aside and start empty;
        ``"fail"``: refuse to open it.
    :param map_size: initial LMDB map size in bytes (the map doubles when full).
    :param max_map_size: the map never grows past this; a batch that needs more fails.
    :param unmap_every: records read (a write counts three) between drops of the data file's
        mapped pages (see "Memory"); None never drops them.
    :param inline: run small loads and commits on the caller's thread when they may (see
        "Transactions and threads"); False runs every call on the store's thread.
    """

    backend = "lmdb"
    shared = False
    errors = (lmdb.Error, OSError)
    #: Measured commits of 1 and of 8 new sessions: 15-20 and 60-90 us (p50), each session a
    #: page of the tree written to the file.
    inline_max = 8

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "process",
        on_corrupt: OnCorrupt = "quarantine",
        map_size: int = 64 * _MIB,
        max_map_size: int = 16 * 1024 * _MIB,
        unmap_every: int | None = 256,
        create: bool = True,
        read_only: bool = False,
        inline: bool = True,
    ) -> None:
        check_file_options(durability, on_corrupt)
        if unmap_every is not None and (isinstance(unmap_every, bool) or unmap_every < 1):
            raise ValueError(f"unmap_every is a positive int or None, not {unmap_every!r}")
        if not 0 < map_size <= max_map_size:
            raise ValueError(
                f"need 0 < map_size <= max_map_size, got {map_size} and {max_map_size}"
            )
        self.path = Path(path)
        self.durability = durability
        self.on_corrupt = on_corrupt
        self.map_size = map_size
        self.max_map_size = max_map_size
        self.label = f"lmdb store {self.path}"
        self._init_inline(inline)
        #: Make the store if the directory does not hold one (otherwise: StoreError).
        self.create = create and not read_only
        #: Open without writing anything (LMDB's read-only mode): commits are refused.
        self.read_only = read_only
        self._files = StoreFiles(self.path, self.backend, _OWN_FILES)
        self._env: lmdb.Environment | None = None
        self._meta: Any = None
        self._sessions: Any = None
        self._expiry: Any = None
        self._key_limit = 0
        self._mapped = MappedPages(self.path / DATA_FILE, unmap_every, self._drop_later)

    def _may_run_now(self, commit: bool) -> bool:
        return self._env is not None and not (commit and self.durability == "power")

    def _drop_later(self) -> None:
        self._in_background(self._mapped.drop)

    # -- on the store thread (ThreadedStore runs these), or for _load and _commit on the
    # caller's thread when _may_run_now allows it ------------------------------------------

    def _open(self) -> None:
        files = self._files
        files.open(create=self.create, read_only=self.read_only)
        try:
            try:
                self._open_environment()
            except _Corrupt as exc:
                if self.on_corrupt == "fail" or self.read_only:
                    raise StoreError(
                        f"{self.label} is unusable ({exc}); it was left as it is: move it aside "
                        "or restore a backup"
                        + ("" if self.read_only else " (or open it with on_corrupt='quarantine')")
                    ) from None
                files.quarantine(str(exc))
                self._open_environment()
            if not self.read_only:
                files.mark_and_narrow()
        except BaseException:
            self._close()
            raise

    def _open_environment(self) -> None:
        data = self.path / DATA_FILE
        power = self.durability == "power"
        try:
            env = lmdb.open(
                str(self.path),
                map_size=self.map_size,
                max_dbs=len(_DATABASES),
                sync=power,
                metasync=power,
                # writemap=False: commits go through write(2), hence into the page cache, which
                # is what makes "process" durability hold without an fsync.
                writemap=False,
                # Sessions are read by id, at random: read-ahead would fill the page cache with
                # neighbours nobody asked for once the store is larger than memory.
                readahead=False,
                readonly=self.read_only,
                create=not self.read_only,
                # LMDB's reader table (lock.mdb) is written even by readers; our flock already
                # keeps every other process out, so a read-only open leaves it alone.
                lock=not self.read_only,
                mode=FILE_MODE,
            )
        except _CORRUPT as exc:
            raise _Corrupt(str(exc)) from None
        try:
            self._check_size(env, data)
            self._open_databases(env)
        except BaseException:
            env.close()
            raise
        self._env = env

    def _check_size(self, env: lmdb.Environment, data: Path) -> None:
        # Reading a page past the end of the mapped file is SIGBUS, not an exception: make sure
        # every page the environment claims is in the file before any page is read.
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = data.stat().st_size
        if size < needed:
            raise _Corrupt(f"{DATA_FILE} is truncated: {size} bytes, its pages need {needed}")

    def _open_databases(self, env: lmdb.Environment) -> None:
        try:
            with env.begin() as txn:
                names = list(txn.cursor().iternext(values=False))
            if not names and not self.read_only:
                with env.begin(write=True) as txn:
                    handles = [env.open_db(name, txn=txn) for name in _DATABASES]
                    txn.put(FORMAT_KEY, FORMAT, db=handles[0])
            elif sorted(names) == sorted(_DATABASES):
                # Not inside a read transaction: a handle opened there dies with it.
                handles = [env.open_db(name, create=False) for name in _DATABASES]
                with env.begin() as txn:
                    marker = txn.get(FORMAT_KEY, db=handles[0])
                if marker != FORMAT:
                    raise _Corrupt(f"format marker is {marker!r}, expected {FORMAT!r}")
            else:
                raise _Corrupt(f"not a session store (its databases are {names[:5]!r})")
        except _CORRUPT as exc:
            raise _Corrupt(str(exc)) from None
        self._meta, self._sessions, self._expiry = handles
        self._key_limit = env.max_key_size() - 8  # an expiry key is the id and 8 bytes more

    def _close(self) -> None:
        env, self._env = self._env, None
        try:
            if env is not None:
                try:
                    if not self.read_only:
                        env.sync(True)
                finally:
                    with self._mapped.remapping():
                        env.close()
        finally:
            self._files.release()

    def _load(self, ids: list[str]) -> dict[str, Session]:
        found = {}
        with self._env.begin(db=self._sessions) as txn:
            for sid in ids:
                data = txn.get(sid.encode())
                if data is not None:
                    found[sid] = decode_session(data)
        self._mapped.touched(len(ids))
        return found

    def _commit(self, writes: list[Write]) -> list[bool]:
        if self.read_only:
            raise StoreError(f"{self.label} is open read-only: nothing can be written")
        limit = self._key_limit
        for write in writes:
            if isinstance(write, Mark):
                continue
            sid = write.session.id if isinstance(write, Put) else write.id
            if len(sid) > limit // 4 and len(sid.encode()) > limit:
                raise StoreError(f"session id {sid[:40]!r}... is above lmdb's {limit}-byte limit")
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    return self._apply(txn, writes)
            except lmdb.MapFullError:
                # The transaction was aborted: grow the map and run the whole batch again.
                self._grow()

    def _grow(self) -> None:
        size = self._env.info()["map_size"]
        if size >= self.max_map_size:
            raise StoreError(
                f"lmdb store {self.path} is full: its map reached max_map_size="
                f"{self.max_map_size} bytes; open it with a larger max_map_size"
            )
        new_size = min(size * 2, self.max_map_size)
        log.info("lmdb store %s: map size %d -> %d bytes", self.path, size, new_size)
        with self._mapped.remapping():  # never while a drop reads where the map lies
            self._env.set_mapsize(new_size)

    def _apply(self, txn: lmdb.Transaction, writes: list[Write]) -> list[bool]:
        """Apply ``writes`` in ``txn`` under the failed-write rule: a run of creates (the usual
        batch under load) with one ``putmulti`` per database, the rest one at a time."""
        # Three pages a write (the record's, and the expiry index's for its old and new entry),
        # counted as they are touched: a drop may come in the middle of a large commit.
        touched = self._mapped.touched
        outcomes: list[bool] = []
        failed: set[str] = set()
        start, end = 0, len(writes)
        while start < end:
            stop = start
            while stop < end and stop - start < _RUN and _is_create(writes[stop]):
                stop += 1
            if stop - start > 1 and self._create_all(txn, writes[start:stop], failed):
                touched(3 * (stop - start))
                outcomes += [True] * (stop - start)
                start = stop
                continue
            # A run that failed as a whole goes one write at a time, never batched again.
            plain_until = max(stop, start + 1)
            touched(3 * (plain_until - start))
            outcomes += apply_in_order(
                writes[start:plain_until], write_ids, lambda w: self._apply_one(txn, w), failed
            )
            start = plain_until
        return outcomes

    def _apply_one(self, txn: lmdb.Transaction, write: Write) -> bool:
        if isinstance(write, Put):
            return self._put(txn, write)
        if isinstance(write, Delete):
            return self._delete(txn, write)
        return self._mark(txn, write)

    def _create_all(self, txn: lmdb.Transaction, creates: list[Write], failed: set[str]) -> bool:
        """Store every one of ``creates`` (Puts of new ids) in a child transaction, with one
        ``putmulti`` per database; False, having written nothing, unless all took effect."""
        if not failed.isdisjoint(write_id(w) for w in creates):
            return False
        records = []
        expiring = []
        for put in creates:
            session = put.session  # type: ignore[union-attr]
            key = session.id.encode()
            records.append((key, encode_session(session)))
            if session.expires_at is not None:
                expiring.append((_expiry_key(session.expires_at, key), b""))
        child = self._env.begin(write=True, parent=txn)
        try:
            _, added = child.cursor(db=self._sessions).putmulti(records, overwrite=False)
            if added != len(records):
                child.abort()  # an id in use: the caller finds out which, one at a time
                return False
            child.cursor(db=self._expiry).putmulti(expiring)
        except BaseException:
            child.abort()
            raise
        child.commit()
        return True

    def _mark(self, txn: lmdb.Transaction, write: Mark) -> bool:
        stored = txn.get(MARK_KEY, db=self._meta)
        if stored is None or write.ms > int.from_bytes(stored, "big", signed=True):
            txn.put(MARK_KEY, write.ms.to_bytes(8, "big", signed=True), db=self._meta)
        return True

    def _load_mark(self) -> int:
        with self._env.begin(db=self._meta) as txn:
            stored = txn.get(MARK_KEY)
        return 0 if stored is None else int.from_bytes(stored, "big", signed=True)

    def _put(self, txn: lmdb.Transaction, write: Put) -> bool:
        session = write.session
        key = session.id.encode()
        data = txn.get(key, db=self._sessions)
        old_expiry = None
        if write.expected_version is None:
            if data is not None:
                return False
        else:
            if data is None:
                return False
            old = decode_session(data)
            if old.version != write.expected_version:
                return False
            old_expiry = old.expires_at
        if write.moved_from is not None:
            source = txn.get(write.moved_from.encode(), db=self._sessions)
            if not source_holds(write, None if source is None else decode_session(source)):
                return False
        txn.put(key, encode_session(session), db=self._sessions)
        if old_expiry != session.expires_at:
            if old_expiry is not None:
                txn.delete(_expiry_key(old_expiry, key), db=self._expiry)
            if session.expires_at is not None:
                txn.put(_expiry_key(session.expires_at, key), b"", db=self._expiry)
        return True

    def _delete(self, txn: lmdb.Transaction, write: Delete) -> bool:
        key = write.id.encode()
        data = txn.get(key, db=self._sessions)
        if data is None:
            return False
        old = decode_session(data)
        if not may_delete(write, old):
            return False
        txn.delete(key, db=self._sessions)
        if old.expires_at is not None:
            txn.delete(_expiry_key(old.expires_at, key), db=self._expiry)
        return True

    def _scan(
        self, now_ms: int, cursor: str | None, limit: int
    ) -> tuple[list[Session], str | None]:
        page: list[Session] = []
        with self._env.begin(db=self._sessions) as txn:
            cur = txn.cursor()
            if cursor is None:
                more = cur.first()
            else:
                start = cursor.encode()
                more = cur.set_range(start)
                if more and cur.key() == start:
                    more = cur.next()
            while more:
                self._mapped.touched(1)
                session = decode_session(cur.value())
                if not session.expired_at(now_ms):
                    page.append(session)
                    if len(page) == limit:
                        return page, (session.id if cur.next() else None)
                more = cur.next()
        return page, None

    def _expired_keys(self, txn: lmdb.Transaction, now_ms: int) -> Iterable[bytes]:
        # Expired means now_ms > expires_at, i.e. the 8-byte prefix sorts before now_ms's.
        bound = _expiry_prefix(now_ms)
        touched = self._mapped.touched
        for key in txn.cursor(db=self._expiry).iternext(values=False):
            if key[:8] >= bound:
                return
            touched(1)
            yield key

    def _expired(self, now_ms: int, limit: int) -> list[str]:
        ids: list[str] = []
        with self._env.begin() as txn:
            for key in self._expired_keys(txn, now_ms):
                ids.append(key[8:].decode())
                if len(ids) == limit:
                    break
        return ids

    def _count(self, now_ms: int) -> int:
        with self._env.begin() as txn:
            stored = txn.stat(self._sessions)["entries"]
            expired = sum(1 for _ in self._expired_keys(txn, now_ms))
        return stored - expired


def _is_create(write: Write) -> bool:
    return type(write) is Put and write.expected_version is None and write.moved_from is None


def _expiry_prefix(ms: int) -> bytes:
    return (ms + _EXPIRY_OFFSET).to_bytes(8, "big")


def _expiry_key(expires_at: int, key: bytes) -> bytes:
    return _expiry_prefix(expires_at) + key
