"""What the disk store promises beyond the Store contract: one owner, durability across a
SIGKILL, corruption handled, no pickle, no eviction, inline records, one worker thread.

No clock fixture: the store's worker thread is invisible to Trio (see DESIGN.md). Child
processes are bounded by ``trio.fail_after``, never by sleeps.
"""

from __future__ import annotations

import logging
import os
import pickle
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import diskcache
import pytest
import trio
from helpers import ROOT

from workers.record.errors import StoreError
from workers.record.session import Session
from workers.stores import disk, make_store
from workers.stores.base import Delete, Put
from workers.stores.disk import FORMAT_KEY, DiskStore, SessionDisk
from workers.stores.memory import MemoryStore

T0 = 1_700_000_000_000


async def on_store_thread(store: DiskStore, fn: Any) -> Any:
    """``fn(database)`` on the store's thread, with the store's own connection."""
    return await store._run(lambda: fn(store._db()))


def session(sid: str, **changes: Any) -> Session:
    fields: dict[str, Any] = {
        "id": sid,
        "created_at": T0,
        "last_accessed": T0,
        "timeout_ms": 60_000,
        "metadata": {"user_id": f"user-{sid}", "n": 1},
        "version": 1,
    }
    return Session(**{**fields, **changes})


@asynccontextmanager
async def opened(path: Path, **options: Any) -> AsyncIterator[DiskStore]:
    store = DiskStore(path, **options)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def fill(path: Path, n: int) -> list[Session]:
    sessions = [session(f"s{i:04}") for i in range(n)]
    async with opened(path) as store:
        assert await store.commit([Put(s, None) for s in sessions]) == [True] * n
    return sessions


def settings_of(path: Path) -> dict[str, Any]:
    """The Settings table as it is on disk, read without diskcache."""
    con = sqlite3.connect(path / "cache.db")
    try:
        return dict(con.execute("SELECT key, value FROM Settings"))
    finally:
        con.close()


def sql(path: Path, statement: str, params: tuple[Any, ...] = ()) -> None:
    """Change a closed store's database behind diskcache's back."""
    con = sqlite3.connect(path / "cache.db", isolation_level=None)
    try:
        con.execute(statement, params)
    finally:
        con.close()


def plant_row(path: Path, key: Any, raw: int, mode: int, value: Any, tag: Any = None) -> None:
    sql(
        path,
        "INSERT INTO Cache (key, raw, store_time, expire_time, access_time, access_count,"
        " tag, size, mode, filename, value) VALUES (?, ?, 0, NULL, 0, 0, ?, 0, ?, NULL, ?)",
        (key, raw, tag, mode, value),
    )


async def run_child(code: str, *args: str) -> trio.Process:
    """Start ``python -c code args...`` with its stdin and stdout piped to us."""
    return await trio.lowlevel.open_process(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )


async def read_lines(stream: trio.abc.ReceiveStream, n: int) -> list[str]:
    data = b""
    while data.count(b"\n") < n:
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()[:n]


# --- one owner ---


async def test_a_second_owner_in_this_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store"
    async with opened(path):
        second = DiskStore(path)
        with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
            await second.open()
        await second.close()  # after a failed open: harmless
    async with opened(path) as store:  # released by the first owner's close
        assert await store.count(T0) == 0


HOLDER = """
    import sys, trio
    from workers.stores.disk import DiskStore

    async def main():
        store = DiskStore(sys.argv[1])
        await store.open()
        print("locked", flush=True)
        await trio.wrap_file(sys.stdin).readline()  # hold the store until told to go
        await store.close()

    trio.run(main)
"""


@pytest.mark.slow
async def test_a_second_owner_in_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with trio.fail_after(20):
        child = await run_child(HOLDER, str(path))
        try:
            assert await read_lines(child.stdout, 1) == ["locked"]
            with pytest.raises(StoreError, match=f"locked by another owner \\(pid {child.pid}\\)"):
                await DiskStore(path).open()
            await child.stdin.send_all(b"go\n")
            assert await child.wait() == 0
        finally:
            child.kill()
        async with opened(path) as store:
            assert await store.count(T0) == 0


async def test_a_cancelled_close_still_releases_the_lock(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store")
    await store.open()
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.close()
    async with opened(tmp_path / "store"):
        pass


async def test_a_path_that_is_a_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    path.write_bytes(b"someone's file")
    with pytest.raises(StoreError, match="cannot open disk store"):
        await DiskStore(path).open()
    assert path.read_bytes() == b"someone's file"


# --- durability ---

WRITER = """
    import sys, trio
    from workers.record.session import Session
    from workers.stores.base import Put
    from workers.stores.disk import DiskStore

    async def main():
        store = DiskStore(sys.argv[1], durability=sys.argv[2])
        await store.open()
        i = 0
        while True:  # until killed
            batch = [Session(f"s{i + j:06}", 1, 2, None, {"i": i + j, "pad": "x" * 50}, 1)
                     for j in range(3)]
            assert await store.commit([Put(s, None) for s in batch]) == [True] * 3
            print(" ".join(s.id for s in batch), flush=True)  # acknowledged
            i += 3

    trio.run(main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["process", "power"])
async def test_every_acknowledged_write_survives_sigkill(tmp_path: Path, durability: str) -> None:
    path = tmp_path / "store"
    with trio.fail_after(20):
        child = await run_child(WRITER, str(path), durability)
        try:
            acknowledged = " ".join(await read_lines(child.stdout, 40)).split()
        finally:
            child.kill()  # SIGKILL, in the middle of later commits
        await child.wait()
    assert len(acknowledged) == 120
    async with opened(path) as store:  # the kernel dropped the dead owner's lock
        loaded = await store.load(acknowledged)
        assert sorted(loaded) == sorted(acknowledged)
        for sid, s in loaded.items():
            assert s == Session(sid, 1, 2, None, {"i": int(sid[1:]), "pad": "x" * 50}, 1)
        assert await store.count(T0) >= 120


@pytest.mark.slow
async def test_power_durability_syncs_every_commit(tmp_path: Path) -> None:
    async with opened(tmp_path / "a", durability="power") as store:
        assert await on_store_thread(
            store, lambda database: database.execute("PRAGMA synchronous").fetchall()
        ) == [
            (2,)  # FULL
        ]
    async with opened(tmp_path / "b") as store:
        pragmas = "PRAGMA synchronous", "PRAGMA journal_mode"
        assert await on_store_thread(
            store, lambda database: [database.execute(p).fetchone()[0] for p in pragmas]
        ) == [
            1,  # NORMAL
            "wal",
        ]


# --- never lose a session: no eviction, records inline ---


async def test_no_eviction_settings_are_restored_on_every_open(tmp_path: Path) -> None:
    path = tmp_path / "store"
    sessions = await fill(path, 50)
    # Another program switched eviction back on, with a tiny size limit.
    for key, value in [
        ("eviction_policy", "least-recently-stored"),
        ("size_limit", 1),
        ("cull_limit", 10),
        ("disk_min_file_size", 1),
    ]:
        sql(path, "UPDATE Settings SET value = ? WHERE key = ?", (value, key))
    async with opened(path) as store:
        more = [session(f"more{i}") for i in range(50)]  # would have culled under LRS
        assert await store.commit([Put(s, None) for s in more]) == [True] * 50
        assert await store.count(T0) == 100
        assert len(await store.load([s.id for s in sessions + more])) == 100
    settings = settings_of(path)
    assert settings["eviction_policy"] == "none"
    assert settings["cull_limit"] == 0
    assert settings["size_limit"] == 2**63 - 1
    assert settings["disk_min_file_size"] == 2**63 - 1
    assert settings["tag_index"] == 1
    assert settings[FORMAT_KEY] == 1


async def test_records_are_stored_inline_whatever_their_size(tmp_path: Path) -> None:
    path = tmp_path / "store"
    big = session("big", metadata={"blob": b"x" * 200_000, "text": "y" * 100_000})
    async with opened(path) as store:
        assert await store.commit([Put(big, None)]) == [True]
        assert await store.load(["big"]) == {"big": big}
    assert sorted(p.name for p in path.iterdir()) == ["LOCK", "SESSIONS", "cache.db"]


@pytest.mark.parametrize(
    "settings",
    [{"eviction_policy": "least-recently-used"}, {"size_limit": 2**30}, {"statistics": 1}],
)
def test_settings_that_decide_what_is_kept_are_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"does not take {next(iter(settings))}"):
        DiskStore("unused", **settings)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="durability"):
        DiskStore("unused", durability="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_corrupt"):
        DiskStore("unused", on_corrupt="ignore")  # type: ignore[arg-type]
    DiskStore("unused", sqlite_cache_size=2**12, sqlite_mmap_size=0)  # tuning is fine


def test_make_store_builds_memory_and_disk_stores(tmp_path: Path) -> None:
    assert isinstance(make_store("ets"), MemoryStore)
    disk = make_store("dets", path=str(tmp_path / "s"), durability="power")
    assert isinstance(disk, DiskStore) and disk.durability == "power"
    with pytest.raises(StoreError, match="needs path"):
        make_store("disk")


# --- corruption ---


def garbage(path: Path) -> None:
    path.mkdir()
    (path / "cache.db").write_bytes(bytes(range(256)) * 40)


def truncated(path: Path) -> None:
    trio.run(fill, path, 400)
    db = path / "cache.db"
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size // 2)


def foreign_diskcache(path: Path) -> None:
    with diskcache.Cache(str(path)) as cache:  # a plain cache: pickled values, default settings
        cache["config"] = {"pickled": True}


def other_sqlite(path: Path) -> None:
    path.mkdir()
    sql(path, "CREATE TABLE users (name TEXT)")


def newer_format(path: Path) -> None:
    trio.run(fill, path, 3)
    sql(path, "UPDATE Settings SET value = 99 WHERE key = ?", (FORMAT_KEY,))


def damaged_pages(path: Path) -> None:
    """Ours, with page 1 and the Settings pages intact but the rest overwritten: the check
    before diskcache opens it passes, and diskcache then fails rebuilding a dropped index."""
    trio.run(fill, path, 400)
    db = path / "cache.db"
    con = sqlite3.connect(db)
    con.execute("DROP INDEX Cache_tag_rowid")
    intact = {1} | {
        page
        for (page,) in con.execute(
            "SELECT rootpage FROM sqlite_master"
            " WHERE name IN ('Settings', 'sqlite_autoindex_Settings_1')"
        )
    }
    ((page_size,),) = con.execute("PRAGMA page_size")
    con.close()
    with db.open("r+b") as f:
        for page in range(2, db.stat().st_size // page_size + 1):
            if page not in intact:
                f.seek((page - 1) * page_size)
                f.write(b"\xa5" * page_size)


def garbage_in_our_store(path: Path) -> None:
    trio.run(fill, path, 3)
    (path / "cache.db").write_bytes(bytes(range(256)) * 40)


#: How to damage a store, what the error says, whether it is seen before diskcache writes,
#: and whether the directory is one of ours (it carries our marker): only ours are moved.
DAMAGE = {
    "garbage": (garbage, "unreadable SQLite database", True, False),
    "garbage in our store": (garbage_in_our_store, "unreadable SQLite database", True, True),
    "truncated": (truncated, "unreadable SQLite database", True, True),
    "foreign diskcache": (foreign_diskcache, "did not write", True, False),
    "other sqlite": (other_sqlite, "not a diskcache database", True, False),
    "newer format": (newer_format, "format 99", True, True),
    "damaged pages": (damaged_pages, "corrupt SQLite database", False, True),
}
OURS = sorted(name for name, (*_, ours) in DAMAGE.items() if ours)
FOREIGN = sorted(name for name, (*_, ours) in DAMAGE.items() if not ours)


@pytest.mark.parametrize("damage", OURS)
async def test_an_unusable_store_is_quarantined(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sessions"
    make_damage, reason, *_ = DAMAGE[damage]
    await trio.to_thread.run_sync(make_damage, path)
    original = (path / "cache.db").read_bytes()

    with caplog.at_level(logging.ERROR, logger="workers.stores.files"):
        async with opened(path) as store:
            assert await store.count(T0) == 0
            assert await store.commit([Put(session("new"), None)]) == [True]

    (moved,) = tmp_path.glob("sessions.corrupt-*")
    assert (moved / "cache.db").read_bytes() == original
    assert not {p.name for p in moved.iterdir()} & {"LOCK", "SESSIONS"}  # only its own files
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert str(path) in record.getMessage() and str(moved) in record.getMessage()
    assert reason in record.getMessage()
    async with opened(path) as store:  # the fresh store is an ordinary one
        assert list(await store.load(["new"])) == ["new"]


@pytest.mark.parametrize("damage", FOREIGN)
async def test_a_database_that_is_not_ours_is_never_moved(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "sessions"
    make_damage, reason, *_ = DAMAGE[damage]
    await trio.to_thread.run_sync(make_damage, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    with pytest.raises(StoreError, match="no SESSIONS marker, so nothing was moved") as raised:
        await DiskStore(path).open()
    assert reason in str(raised.value)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.name != "LOCK"} == before
    assert list(tmp_path.glob("*.corrupt-*")) == []


async def test_a_directory_of_other_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "somewhere"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"holds notes\.txt and no SESSIONS marker"):
        await DiskStore(path).open()
    assert [p.name for p in path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
async def test_on_corrupt_fail_refuses_and_moves_nothing(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "sessions"
    make_damage, reason, seen_before_writing, _ = DAMAGE[damage]
    await trio.to_thread.run_sync(make_damage, path)
    before = (path / "cache.db").read_bytes()

    with pytest.raises(StoreError, match="on_corrupt=fail") as raised:
        await DiskStore(path, on_corrupt="fail").open()
    assert str(path) in str(raised.value) and reason in str(raised.value)
    if seen_before_writing:  # else diskcache had rewritten its settings before it failed
        assert (path / "cache.db").read_bytes() == before
    assert list(tmp_path.glob("*.corrupt-*")) == []
    with pytest.raises(StoreError, match="on_corrupt=fail"):  # not "locked": it let go
        await DiskStore(path, on_corrupt="fail").open()


async def test_an_empty_database_file_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "store"
    path.mkdir()
    (path / "cache.db").touch()  # a zero-length file is an empty SQLite database
    async with opened(path, on_corrupt="fail") as store:
        assert await store.commit([Put(session("a"), None)]) == [True]


async def test_a_record_that_does_not_decode_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "store"
    await fill(path, 3)
    sql(path, "UPDATE Cache SET value = ? WHERE key = 's0001'", (b"\xc1 not msgpack",))
    sql(path, "UPDATE Cache SET key = 'renamed' WHERE key = 's0002'")
    async with opened(path) as store:
        with pytest.raises(StoreError, match="unreadable session record"):
            await store.load(["s0001"])
        with pytest.raises(StoreError, match="is session 's0002'"):
            await store.load(["renamed"])
        with pytest.raises(StoreError):
            await store.scan(T0, None, 10)
        # The damage is confined to those records; the store itself still works.
        assert list(await store.load(["s0000"])) == ["s0000"]
        assert await store.commit([Delete("s0001"), Delete("renamed")]) == [True, True]
        assert [s.id for s in (await store.scan(T0, None, 10))[0]] == ["s0000"]


# --- no pickle ---


class Exploit:
    """Unpickling this makes a directory: the proof that a pickle was executed."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.proof),))


async def test_a_planted_pickle_is_refused_never_executed(tmp_path: Path) -> None:
    path, proof = tmp_path / "store", tmp_path / "pwned"
    await fill(path, 2)
    payload = pickle.dumps(Exploit(proof))
    plant_row(path, "pickled-value", 1, 4, payload)  # mode 4: diskcache's MODE_PICKLE
    plant_row(path, "text-value", 1, 1, "a str, not bytes")
    plant_row(path, payload, 0, 1, b"x")  # raw=0: a pickled key
    async with opened(path) as store:
        with pytest.raises(StoreError, match="not inline bytes"):
            await store.load(["pickled-value"])
        with pytest.raises(StoreError, match="not inline bytes"):
            await store.load(["text-value"])
        with pytest.raises(StoreError):
            await store.scan(T0, None, 100)
        with pytest.raises(StoreError):  # overwriting goes through the same refusals
            await store.commit([Put(session("pickled-value", version=2), 1)])
        assert len(await store.load(["s0000", "s0001"])) == 2
        # A plain delete reads no value, so planted rows can be removed.
        assert await store.commit([Delete("pickled-value"), Delete("text-value")]) == [True] * 2
        # The pickled key sorts after every str key, so a scan reaches it last.
        page, cursor = await store.scan(T0, None, 2)
        assert [s.id for s in page] == ["s0000", "s0001"] and cursor is not None
        with pytest.raises(StoreError, match="not a plain str"):
            await store.scan(T0, cursor, 2)
    assert not proof.exists()


def test_the_disk_refuses_anything_but_str_keys_and_bytes_values(tmp_path: Path) -> None:
    disk = SessionDisk(str(tmp_path))
    for key in (b"bytes", 1, ("tuple",)):
        with pytest.raises(StoreError):
            disk.put(key)
    for value in ("str", 1, {"a": 1}, None):
        with pytest.raises(StoreError):
            disk.store(value, False)
    with pytest.raises(StoreError):
        disk.store(b"file-like", True)
    assert disk.fetch(1, None, b"record", False) == b"record"
    disk.remove("../../anything")  # a name from a row is never acted on
    assert list(tmp_path.iterdir()) == []


# --- one thread ---


async def test_every_async_call_runs_on_the_one_store_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, threading.Thread]] = []

    def recording(name: str, original: Any) -> Any:
        def hook(*args: Any, **kwargs: Any) -> Any:
            seen.append((name, threading.current_thread()))
            return original(*args, **kwargs)

        return hook

    for name in ("put", "get", "store", "fetch"):
        monkeypatch.setattr(SessionDisk, name, recording(name, getattr(SessionDisk, name)))
    for name in ("__init__", "close"):
        monkeypatch.setattr(
            diskcache.Cache, name, recording(f"Cache.{name}", getattr(diskcache.Cache, name))
        )
    monkeypatch.setattr(sqlite3, "connect", recording("sqlite3.connect", sqlite3.connect))

    store = DiskStore(tmp_path / "store")
    await store.open()
    await store.commit([Put(session("a"), None), Put(session("b"), None)])
    await store.commit([Put(session("a", version=2), 1), Delete("b", if_expired_at=T0 * 2)])
    await store.load(["a", "b"])
    await store.scan(T0, None, 10)
    await store.expired(T0 * 2, 10)
    await store.count(T0)
    await store.close()

    names = {name for name, _ in seen}
    expected = {"put", "get", "store", "fetch", "Cache.__init__", "Cache.close"}
    assert expected | {"sqlite3.connect"} <= names
    # Besides the store thread, only the checkpoint thread connects, and does nothing else.
    others = {thread for name, thread in seen if thread.name.startswith("disk store checkpoints")}
    assert [name for name, thread in seen if thread in others] == ["sqlite3.connect"]
    threads = {thread for _, thread in seen} - others
    assert len(threads) == 1
    (thread,) = threads
    assert thread is not threading.main_thread()
    await trio.to_thread.run_sync(thread.join, 5)
    assert not thread.is_alive(), "close stops the store thread"


async def test_small_calls_run_now_and_bulk_ones_on_the_thread(tmp_path: Path) -> None:
    # Loads and commits of up to inline_max run on the caller's thread when allowed; every
    # call runs on the store thread with inline=False, or while a job of ours is out.
    async with opened(tmp_path / "store") as store:
        checkpoints = store._checkpoints
        assert checkpoints is not None
        # An empty write-ahead log: the first commit writes its header, which SQLite syncs.
        assert store.loads_now(1) and not store.commits_now(1)
        await store.commit([Put(session("a"), None)])  # on the thread; it starts a checkpoint
        assert await trio.to_thread.run_sync(checkpoints.ran.wait, 10)
        assert not checkpoints.running
        # Every frame is in the database now: the next commit would start the log again.
        assert not store.commits_now(1)
        await store.commit([Put(session("b"), None)])
        assert store.commits_now(1)
        assert store.commit_now([Put(session("c"), None)]) == [True]
        assert store.loads_now(1) and store.load_now(["a"]) == {"a": session("a")}
        assert not store.loads_now(store.inline_max + 1)
        assert not store.commits_now(store.inline_max + 1)
        busy = threading.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._run, busy.wait)  # a job of ours holds the thread
            await trio.testing.wait_all_tasks_blocked()
            assert not store.loads_now(1) and not store.commits_now(1)  # calls keep their order
            busy.set()
        assert store.loads_now(1)
    async with opened(tmp_path / "store", inline=False) as store:
        assert not store.loads_now(1) and not store.commits_now(1)
    async with opened(tmp_path / "store", durability="power") as store:
        assert store.loads_now(1) and not store.commits_now(1)  # a commit would fsync
    async with opened(tmp_path / "store", read_only=True) as store:
        assert store.loads_now(1) and store.load_now(["a"]) == {"a": session("a")}


async def test_queries_use_their_indexes(tmp_path: Path) -> None:
    # The 1M-session promises: a sweep and a count read the expired rows only, a page its own.
    async with opened(tmp_path / "store") as store:

        def plans(database: Any) -> list[str]:
            explain = database.execute
            return [
                " ".join(str(row[-1]) for row in explain(f"EXPLAIN QUERY PLAN {q}", p).fetchall())
                for q, p in [
                    (disk._EXPIRED_IDS, (T0, 10)),
                    (disk._EXPIRED_COUNT, (T0,)),
                    (disk._PAGE, ("", 10)),
                ]
            ]

        expired_ids, expired_count, page = await on_store_thread(store, plans)
    assert "INDEX Cache_tag_rowid (tag<?)" in expired_ids
    assert "INDEX Cache_tag_rowid (tag<?)" in expired_count
    assert "INDEX Cache_key_raw (key>?)" in page


# --- checkpoints and SQL writes ---


async def test_checkpoints_run_on_a_thread_of_their_own(tmp_path: Path) -> None:
    # A WAL checkpoint copies every page written since the last one and syncs: on the store
    # thread it stalled one commit in a few by tens of ms (a sweep's p99).
    async with opened(tmp_path / "store") as store:
        checkpoints = store._checkpoints
        assert checkpoints is not None
        await store.commit([Put(session(f"s{i}"), None) for i in range(100)])
        assert await trio.to_thread.run_sync(checkpoints.ran.wait, 10)
        assert checkpoints.runs >= 1
        thread = checkpoints._thread
    assert not thread.is_alive(), "close stops the checkpoint thread"
    # It stopped first, so the store's own connection was the last: the WAL is gone.
    assert not (tmp_path / "store" / "cache.db-wal").exists()


async def test_sql_writes_keep_diskcaches_bookkeeping(tmp_path: Path) -> None:
    # Writes are SQL on diskcache's schema: its count must follow, and diskcache must read
    # the rows back as its own.
    async with opened(tmp_path / "store") as store:
        created = [session(f"s{i}") for i in range(10)]
        assert await store.commit([Put(s, None) for s in created]) == [True] * 10
        assert await store.commit([Put(session("s0"), None)]) == [False]  # id in use
        updated = session("s1", version=2, last_accessed=T0 + 5, timeout_ms=None)
        assert await store.commit([Put(updated, 1), Put(session("s2", version=3), 2)]) == [
            True,
            False,  # stale version
        ]
        later = T0 + 60_001
        assert await store.commit(
            [Delete("s3"), Delete("s4", if_expired_at=T0), Delete("s5", if_expired_at=later)]
        ) == [True, False, True]
        assert await store.commit([Delete("s1", if_expired_at=later * 10)]) == [False]

        def diskcache_view(_: Any) -> tuple[int, Any, Any, list[str]]:
            # diskcache's own Cache, on a connection of its own, reads the rows as its own.
            cache = diskcache.Cache(str(tmp_path / "store"), disk=SessionDisk)
            try:
                row = cache.get("s1", tag=True)
                # check() compares the count and size in Settings with the rows.
                problems = [str(w.message) for w in cache.check()]
                ours = ("LOCK", "SESSIONS")  # files of ours diskcache does not know
                problems = [p for p in problems if not any(name in p for name in ours)]
                return len(cache), row, cache.get("s3"), problems
            finally:
                cache.close()

        count, (_, tag), gone, problems = await on_store_thread(store, diskcache_view)
    assert count == 8 and gone is None and problems == []
    assert tag is None  # never expires: no tag, so no sweep finds it
    assert (await store_load(tmp_path, "s1")) == updated


async def store_load(tmp_path: Path, sid: str) -> Session | None:
    async with opened(tmp_path / "store") as store:
        return (await store.load([sid])).get(sid)


async def test_the_database_is_not_memory_mapped_unless_asked(tmp_path: Path) -> None:
    # diskcache's 64 MiB mmap window made that much of a large store resident for nothing.
    def mmap_size(database: Any) -> int:
        return database.execute("PRAGMA mmap_size").fetchone()[0]

    async with opened(tmp_path / "store") as store:
        assert await on_store_thread(store, mmap_size) == 0
    async with opened(tmp_path / "store", sqlite_mmap_size=1 << 20) as store:
        assert await on_store_thread(store, mmap_size) == 1 << 20
