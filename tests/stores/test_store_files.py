"""The file stores' directories: private modes, nothing made or moved unless asked."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from workers.record.errors import StoreError
from workers.record.session import Session
from workers.stores.base import Put, Store
from workers.stores.disk import DiskStore
from workers.stores.lmdb import LmdbStore

T0 = 1_700_000_000_000
STORES = {"disk": DiskStore, "lmdb": LmdbStore}


def session(sid: str) -> Session:
    return Session(sid, T0, T0, 60_000, {"user": sid}, 1)


@pytest.fixture(params=sorted(STORES))
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The most permissive umask: whatever a store makes, its own modes must hold."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes(path: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(path.stat().st_mode)}
    found.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()})
    return found


def snapshot(path: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``path`` with its mode, mtime and content."""
    return {
        str(p.relative_to(path)): (p.stat().st_mode, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


async def filled(backend: str, path: Path, **options: object) -> None:
    store: Store = STORES[backend](path, **options)
    await store.open()
    try:
        await store.commit([Put(session(f"s{i}"), None) for i in range(5)])
    finally:
        await store.close()


async def test_a_new_store_is_private_whatever_the_umask(
    backend: str, tmp_path: Path, open_umask: None
) -> None:
    path = tmp_path / "a" / "store"
    store = STORES[backend](path)
    await store.open()
    try:
        await store.commit([Put(session("s"), None)])
        seen = modes(path)  # the write-ahead log and its index exist while the store is open
    finally:
        await store.close()
    assert seen.pop(".") == 0o700
    assert seen and set(seen.values()) == {0o600}, seen
    assert set(modes(path).values()) <= {0o700, 0o600}


async def test_an_existing_store_is_narrowed_when_opened(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "store"
    await filled(backend, path)
    os.chmod(path, 0o755)
    for p in path.iterdir():
        os.chmod(p, 0o644)
    await filled(backend, path)
    assert modes(path).pop(".") == 0o700
    assert set(modes(path).values()) == {0o700, 0o600}


async def test_read_only_opens_write_nothing(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "store"
    await filled(backend, path)
    before = snapshot(tmp_path)
    store = STORES[backend](path, read_only=True)
    await store.open()
    try:
        assert len(await store.load(["s0", "s1", "absent"])) == 2
        assert await store.count(T0) == 5
        assert len((await store.scan(T0, None, 10))[0]) == 5
        with pytest.raises(StoreError, match="read-only"):
            await store.commit([Put(session("new"), None)])
        with pytest.raises(StoreError, match="locked by another owner"):
            await STORES[backend](path).open()  # a reader still owns the store alone
    finally:
        await store.close()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("option", ["read_only", "create"])
async def test_a_missing_store_is_not_made_unless_asked(
    backend: str, tmp_path: Path, option: str
) -> None:
    where = tmp_path / "no" / "such" / "store"
    with pytest.raises(StoreError, match=f"no {backend} store at {where}"):
        await STORES[backend](where, **{option: option == "read_only"}).open()
    assert list(tmp_path.iterdir()) == []


async def test_an_empty_directory_is_no_store_to_read(backend: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="directory is empty"):
        await STORES[backend](tmp_path, read_only=True).open()
    assert list(tmp_path.iterdir()) == []


async def test_a_file_is_not_a_store(backend: str, tmp_path: Path) -> None:
    where = tmp_path / "file"
    where.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        await STORES[backend](where).open()
    assert where.read_text() == "x"


async def test_a_damaged_store_read_only_is_an_error_and_moves_nothing(
    backend: str, tmp_path: Path
) -> None:
    path = tmp_path / "store"
    await filled(backend, path)
    data = "cache.db" if backend == "disk" else "data.mdb"
    (path / data).write_bytes(b"\x00garbage" * 4096)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match="left as it is"):
        await STORES[backend](path, read_only=True).open()
    assert snapshot(tmp_path) == before


async def test_another_backends_store_is_refused(tmp_path: Path) -> None:
    await filled("disk", tmp_path / "store")
    with pytest.raises(StoreError, match="not a store of the lmdb backend"):
        await LmdbStore(tmp_path / "store").open()


async def test_a_store_made_before_markers_is_adopted_and_marked(
    backend: str, tmp_path: Path
) -> None:
    path = tmp_path / "store"
    await filled(backend, path)
    (path / "SESSIONS").unlink()
    await trio.to_thread.run_sync(lambda: None)
    store = STORES[backend](path)
    await store.open()
    try:
        assert await store.count(T0) == 5
    finally:
        await store.close()
    assert (path / "SESSIONS").read_text() == f"trio-sessions {backend} store\n"
