"""What the lmdb store adds to the Store contract (``test_store_contract.py`` runs that too).

Ownership, corrupt and foreign files, the growing map, durability across SIGKILL, and the expiry
index. No clock fixture: the store works on a thread Trio cannot see, and every time here is an
explicit wall-clock millisecond.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import lmdb
import pytest
import trio
from helpers import ROOT

from workers.record.errors import StoreError
from workers.record.session import Session
from workers.stores.base import Delete, Put
from workers.stores.lmdb import DATA_FILE, FORMAT, LmdbStore

T0 = 1_700_000_000_000
MINUTE = 60_000


def session(sid: str, *, timeout_ms: int | None = MINUTE, **metadata: object) -> Session:
    return Session(sid, T0, T0, timeout_ms, {"user_id": sid, **metadata}, 1)


async def opened(path: Path, **options: object) -> LmdbStore:
    store = LmdbStore(path, **options)  # type: ignore[arg-type]
    await store.open()
    return store


async def index_entries(store: LmdbStore) -> int:
    """Entries in the expiry index (read on the store's own thread)."""

    def read() -> int:
        with store._env.begin() as txn:
            return txn.stat(store._expiry)["entries"]

    return await store._run(read)


def quarantined(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


# --- options ---


@pytest.mark.parametrize(
    "options",
    [
        {"durability": "disk"},
        {"on_corrupt": "ignore"},
        {"map_size": 0},
        {"map_size": 1 << 30, "max_map_size": 1 << 20},
        {"unmap_every": 0},
        {"unmap_every": True},
    ],
)
def test_bad_options_are_refused(tmp_path: Path, options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LmdbStore(tmp_path / "s", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("durability", "synced"), [("process", False), ("power", True)])
async def test_durability_sets_lmdb_sync(tmp_path: Path, durability: str, synced: bool) -> None:
    store = await opened(tmp_path / "s", durability=durability)
    try:
        flags = store._env.flags()
        assert (flags["sync"], flags["metasync"], flags["writemap"]) == (synced, synced, False)
    finally:
        await store.close()


# --- one owner ---


async def test_a_second_owner_is_refused_naming_the_holder(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s")
    try:
        with pytest.raises(StoreError, match=f"pid {os.getpid()}"):
            await opened(tmp_path / "s")
    finally:
        await store.close()
    again = await opened(tmp_path / "s")  # the lock went with the first owner
    await again.close()


async def test_close_completes_even_when_cancelled(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s")
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.close()  # shielded inside: the lock must not outlive its owner
    again = await opened(tmp_path / "s")
    await again.close()


# --- durability ---

CHILD = """
import os, signal, sys, trio
from workers.record.session import Session
from workers.stores.base import Put
from workers.stores.lmdb import LmdbStore

async def main(path):
    store = LmdbStore(path)  # durability="process": no fsync at all
    await store.open()
    for i in range(50):
        s = Session(f"s{i:03}", 1, 2, None, {"i": i, "pad": "x" * 300}, 1)
        assert await store.commit([Put(s, None)]) == [True]
        print(s.id, flush=True)  # acknowledged
    os.kill(os.getpid(), signal.SIGKILL)

trio.run(main, sys.argv[1])
"""


@pytest.mark.slow
async def test_acknowledged_writes_survive_sigkill_without_fsync(tmp_path: Path) -> None:
    path = tmp_path / "s"
    child = await trio.run_process(
        [sys.executable, "-c", CHILD, str(path)], capture_stdout=True, check=False, cwd=ROOT
    )
    assert child.returncode == -signal.SIGKILL
    acknowledged = child.stdout.decode().split()
    assert len(acknowledged) == 50
    store = await opened(path)
    try:
        loaded = await store.load(acknowledged)
        assert sorted(loaded) == acknowledged
        assert loaded["s007"] == Session("s007", 1, 2, None, {"i": 7, "pad": "x" * 300}, 1)
    finally:
        await store.close()


# --- corrupt and foreign stores ---


async def make_store_with(path: Path, n: int) -> None:
    store = await opened(path)
    await store.commit([Put(session(f"s{i:04}", pad="x" * 200), None) for i in range(n)])
    await store.close()


async def test_garbage_is_moved_aside_and_the_store_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s"
    await make_store_with(path, 3)
    (path / DATA_FILE).write_bytes(b"this is not an LMDB file" * 1000)
    with caplog.at_level(logging.ERROR, logger="workers.stores.lmdb"):
        store = await opened(path)
    try:
        (moved,) = quarantined(path)
        assert (moved / DATA_FILE).read_bytes().startswith(b"this is not")
        (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert str(path) in record.getMessage() and str(moved) in record.getMessage()
        assert await store.count(T0) == 0
        assert await store.commit([Put(session("new"), None)]) == [True]
    finally:
        await store.close()


async def test_on_corrupt_fail_refuses_and_moves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s"
    await make_store_with(path, 3)
    (path / DATA_FILE).write_bytes(b"\0" * 20000)
    with pytest.raises(StoreError, match=str(path)):
        await opened(path, on_corrupt="fail")
    assert quarantined(path) == []
    store = await opened(path)  # the failed open released its lock
    await store.close()
    assert len(quarantined(path)) == 1


TRUNCATED = """
import sys, trio
from workers.stores.lmdb import LmdbStore

async def main(path):
    store = LmdbStore(path)
    await store.open()
    print(await store.count(0))
    await store.close()

trio.run(main, sys.argv[1])
"""


@pytest.mark.slow
async def test_a_truncated_file_is_moved_aside_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "s"
    await make_store_with(path, 2000)
    data = path / DATA_FILE
    with data.open("r+b") as f:
        f.truncate(data.stat().st_size // 2)
    # In a child process: reading a page past the end of a mapped file is SIGBUS.
    child = await trio.run_process(
        [sys.executable, "-c", TRUNCATED, str(path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=ROOT,
    )
    assert child.returncode == 0, child.stderr.decode()
    assert child.stdout.decode().split() == ["0"]
    assert b"truncated" in child.stderr
    assert len(quarantined(path)) == 1


def write_foreign_environment(path: Path, marker: bytes | None) -> None:
    """An LMDB environment with our databases but ``marker`` (None: no marker)."""
    env = lmdb.open(str(path), max_dbs=3)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        env.open_db(b"sessions", txn=txn)
        env.open_db(b"expiry", txn=txn)
        if marker is not None:
            txn.put(b"format", marker, db=meta)
    env.close()


@pytest.mark.parametrize("marker", [None, b"trio-sessions lmdb 99"])
async def test_a_wrong_format_marker_is_detected(tmp_path: Path, marker: bytes | None) -> None:
    path = tmp_path / "s"
    write_foreign_environment(path, marker)
    with pytest.raises(StoreError, match="format marker"):
        await opened(path, on_corrupt="fail")
    with pytest.raises(StoreError, match="no SESSIONS marker, so nothing was moved"):
        await opened(path)  # not ours: never quarantined
    assert quarantined(path) == []


async def test_another_applications_lmdb_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "s"
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else")
    env.close()
    with pytest.raises(StoreError, match="not a session store"):
        await opened(path, on_corrupt="fail")


async def test_a_directory_of_other_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.mkdir()
    (path / "cache.db").write_bytes(b"a disk store, say")
    with pytest.raises(StoreError, match="not a session store"):
        await opened(path)
    assert quarantined(path) == []
    assert (path / "cache.db").exists() and not (path / DATA_FILE).exists()


async def test_a_new_store_writes_its_format_marker(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s")
    await store.close()
    env = lmdb.open(str(tmp_path / "s"), max_dbs=3, readonly=True)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            assert txn.get(b"format", db=meta) == FORMAT
    finally:
        env.close()


# --- the map ---


async def test_the_map_grows_when_full(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = await opened(path, map_size=64 * 1024, max_map_size=64 << 20)
    try:
        batch = [Put(session(f"s{i:04}", pad="x" * 1000), None) for i in range(1000)]
        assert await store.commit(batch) == [True] * 1000
        assert store._env.info()["map_size"] > 1 << 20
    finally:
        await store.close()
    store = await opened(path, map_size=64 * 1024)  # smaller than the data: LMDB keeps it
    try:
        assert await store.count(T0) == 1000
        assert await store.commit([Put(session("more", pad="y" * 5000), None)]) == [True]
    finally:
        await store.close()


async def test_a_batch_past_max_map_size_fails_whole(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s", map_size=64 * 1024, max_map_size=256 * 1024)
    try:
        await store.commit([Put(session("before"), None)])
        too_big = [Put(session(f"s{i:04}", pad="x" * 1000), None) for i in range(1000)]
        with pytest.raises(StoreError, match="max_map_size"):
            await store.commit([Delete("before"), *too_big])
        assert await store.count(T0) == 1
        assert await store.load(["before", "s0000"]) == {"before": session("before")}
        assert await store.commit([Put(session("after"), None)]) == [True]  # still usable
    finally:
        await store.close()


# --- the expiry index ---


async def test_the_expiry_index_holds_exactly_the_expiring_sessions(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s")
    try:
        sessions = [session(f"e{i}") for i in range(3)] + [
            session(f"n{i}", timeout_ms=None) for i in range(2)
        ]
        await store.commit([Put(s, None) for s in sessions])
        assert await index_entries(store) == 3
        e0, n0 = sessions[0], sessions[3]
        moved = Session(e0.id, T0, T0 + MINUTE, MINUTE, e0.metadata, 2)  # refreshed
        never = Session(e0.id, T0, T0 + MINUTE, None, e0.metadata, 3)  # set_ttl(None)
        expiring = Session(n0.id, T0, T0, 1, n0.metadata, 2)  # set_ttl(0.001)
        assert await store.commit([Put(moved, 1), Put(never, 2), Put(expiring, 1)]) == [True] * 3
        assert await index_entries(store) == 3  # e1, e2 and n0: no stale entry left behind
        assert await store.commit([Delete("e1"), Delete("n0", if_expired_at=T0 + 2)]) == [True] * 2
        assert await index_entries(store) == 1
        assert await store.expired(T0 * 2, 10) == ["e2"]
    finally:
        await store.close()


async def test_times_before_the_epoch_keep_their_order(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s")
    try:
        early = Session("early", -5000, -5000, 1000, {}, 1)  # expires at -4000
        late = Session("late", 0, 0, 1000, {}, 1)  # expires at 1000
        await store.commit([Put(late, None), Put(early, None)])
        assert await store.expired(-3999, 10) == ["early"]
        assert await store.expired(1001, 10) == ["early", "late"]
        assert await store.count(0) == 1
    finally:
        await store.close()


async def test_an_id_too_long_for_lmdb_is_refused(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s")
    try:
        with pytest.raises(StoreError, match="byte limit"):
            await store.commit([Put(session("é" * 256), None)])
        assert await store.count(T0) == 0
    finally:
        await store.close()


# --- memory ---


def rss_file_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
async def test_pages_read_are_unmapped_after_a_while(tmp_path: Path) -> None:
    # Pages read stay mapped (RssFile) until dropped; dropped, they read back the same.
    store = await opened(tmp_path / "s", map_size=1 << 20)  # grows: a new mapping each time
    try:
        sessions = [session(f"s{i:05}", pad="x" * 300) for i in range(10_000)]
        for start in range(0, len(sessions), 1000):
            await store.commit([Put(s, None) for s in sessions[start : start + 1000]])
        assert store._env.info()["map_size"] > 1 << 20
        mapped = store._mapped
        drops = mapped.drops
        before = rss_file_kb()
        loaded = {}
        for start in range(0, len(sessions), 100):
            loaded.update(await store.load([s.id for s in sessions[start : start + 100]]))
        assert loaded == {s.id: s for s in sessions}
        assert mapped.every is not None
        assert mapped.drops - drops >= len(sessions) // (mapped.every + 100)
        await store._run(mapped.drop)
        # The data file is about 4 MB and was read whole; none of it stays mapped.
        assert rss_file_kb() - before < 1024
        assert await store.load([sessions[0].id]) == {sessions[0].id: sessions[0]}
    finally:
        await store.close()


async def test_unmap_every_none_keeps_the_pages_mapped(tmp_path: Path) -> None:
    # For a store whose resident size does not matter: no drops, no faults to map pages again.
    store = await opened(tmp_path / "s", unmap_every=None)
    try:
        sessions = [session(f"s{i:05}") for i in range(3000)]
        await store.commit([Put(s, None) for s in sessions])
        assert len(await store.load([s.id for s in sessions])) == len(sessions)
        assert store._mapped.drops == 0
    finally:
        await store.close()
