"""What the memory store promises beyond the Store contract: it outlives its managers, and its
expiry index and scan stay cheap at scale (looked at from inside, deliberately)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from workers.record.errors import StoreError
from workers.record.session import Session
from workers.stores.base import Delete, Put
from workers.stores.memory import _HEAP_SLACK, MemoryStore

T0 = 1_700_000_000_000


def session(sid: str, *, last_accessed: int = T0, timeout_ms: int | None = 1000) -> Session:
    return Session(sid, T0, last_accessed, timeout_ms, {"user_id": sid}, 1)


async def test_close_keeps_every_session_for_the_next_incarnation() -> None:
    store = MemoryStore()
    await store.open()
    await store.commit([Put(session("a"), None), Put(session("b", timeout_ms=None), None)])
    assert await store.count(T0 + 5000) == 1
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.load(["a"])
    await store.open()  # the next manager borrows the same object
    assert set(await store.load(["a", "b"])) == {"a", "b"}
    assert await store.expired(T0 + 5000, 10) == ["a"]
    assert await store.count(T0) == 2


def test_it_takes_no_options() -> None:
    with pytest.raises(TypeError):
        MemoryStore(path="sessions")  # type: ignore[call-arg]


async def test_touches_push_nothing_and_refreshed_sessions_expire_on_time() -> None:
    store = MemoryStore()
    await store.open()
    sessions = {sid: session(sid) for sid in "abcdefghij"}
    await store.commit([Put(s, None) for s in sessions.values()])
    for step in range(1, 5001):
        # Every retrieve moves last_accessed later: the entry already in the heap comes first.
        writes = []
        for sid, s in sessions.items():
            sessions[sid] = replace(s, last_accessed=T0 + step)
            writes.append(Put(sessions[sid], s.version))
        assert await store.commit(writes) == [True] * 10
    assert len(store._heap) == 10
    # Their entries (at T0 + 1000) come due long before them: each is pushed again, once.
    assert await store.expired(T0 + 2000, 100) == []
    assert await store.count(T0 + 5000 + 1000) == 10
    assert sorted(store._heap) == [(T0 + 6000, sid) for sid in sorted(sessions)]
    assert set(await store.expired(T0 + 5000 + 1001, 100)) == set(sessions)


async def test_a_put_that_moves_the_expiry_earlier_is_found_at_the_earlier_time() -> None:
    store = MemoryStore()
    await store.open()
    long = session("a", timeout_ms=10_000)
    await store.commit([Put(long, None)])
    short = replace(long, timeout_ms=1000, version=2)
    assert await store.commit([Put(short, 1)]) == [True]
    assert await store.expired(T0 + 1001, 10) == ["a"]
    assert await store.count(T0 + 1001) == 0
    back = replace(short, timeout_ms=10_000, last_accessed=T0 + 1001, version=3)
    assert await store.commit([Put(back, 2)]) == [True]  # renewed: live until T0 + 11001
    assert await store.expired(T0 + 10_001, 10) == []  # its old entry comes due: pushed again
    assert await store.expired(T0 + 11_002, 10) == ["a"]
    assert len(store._heap) == 0


async def test_the_expiry_heap_is_rebuilt_when_earlier_moves_pile_up() -> None:
    store = MemoryStore()
    await store.open()
    current = session("a", timeout_ms=10**9)
    await store.commit([Put(current, None)])
    for version in range(2, 3 * _HEAP_SLACK):
        # Each moves the expiry earlier, so each pushes an entry; the old ones go stale.
        new = replace(current, timeout_ms=current.timeout_ms - 1, version=version)
        assert await store.commit([Put(new, current.version)]) == [True]
        current = new
    assert len(store._heap) <= 2 * 1 + _HEAP_SLACK + 1


async def test_a_put_that_keeps_the_expiry_adds_no_heap_entry() -> None:
    # Many requests land in the same millisecond: their Puts must not pile up heap entries.
    store = MemoryStore()
    await store.open()
    current = session("a")
    await store.commit([Put(current, None)])
    for version in range(2, 200):
        new = replace(current, version=version, metadata={"n": version})
        assert await store.commit([Put(new, current.version)]) == [True]
        current = new
    assert store._heap == [(T0 + 1000, "a")]


async def test_a_large_sweep_moves_each_index_entry_once() -> None:
    store = MemoryStore()
    await store.open()
    n = 100_000
    await store.commit([Put(session(f"s{i:06}", last_accessed=T0 + i), None) for i in range(n)])
    later = T0 + n + 1000
    # One batch of a sweep moves about one batch of the index, whatever the backlog.
    assert len(await store.expired(later, 1000)) == 1000
    assert len(store._expired) == 1000 and len(store._heap) == n - 1000
    assert await store.count(later) == 0
    # The first question moved every expired session out of the heap, in one pass.
    assert store._heap == [] and len(store._expired) == n
    swept = 0
    while batch := await store.expired(later, 1000):
        assert len(batch) <= 1000
        done = await store.commit([Delete(sid, if_expired_at=later) for sid in batch])
        assert done == [True] * len(batch)
        swept += len(batch)
    assert swept == n
    assert await store.count(later) == 0 and not store._expired


async def test_a_session_renewed_after_expiring_leaves_the_expired_set() -> None:
    # Only another writer can do this to an expired session (a shared store), but the index
    # must follow any Put.
    store = MemoryStore()
    await store.open()
    old = session("a")
    await store.commit([Put(old, None)])
    assert await store.expired(T0 + 2000, 10) == ["a"]
    renewed = replace(old, last_accessed=T0 + 2000, version=2)
    assert await store.commit([Put(renewed, 1)]) == [True]
    assert await store.expired(T0 + 2000, 10) == []
    assert await store.count(T0 + 2000) == 1
    # And one re-timed to a moment already known to be past lands directly among the expired.
    past = replace(renewed, last_accessed=T0, version=3)
    assert await store.commit([Put(past, 2)]) == [True]
    assert await store.expired(T0 + 2000, 10) == ["a"]
    assert await store.count(T0 + 500) == 1  # and a clock that steps back still sees it live


async def test_a_foreign_cursor_is_refused() -> None:
    store = MemoryStore()
    await store.open()
    for cursor in ("s0001", "x:y", "99999:a", "-1:a"):
        with pytest.raises(StoreError, match="cursor"):
            await store.scan(T0, cursor, 10)


async def test_a_sweep_splits_sessions_that_expire_in_the_same_millisecond() -> None:
    # A restore or one batch of creates gives many sessions one expiry time; a sweep call must
    # still move only about its limit of them, not the whole group.
    store = MemoryStore()
    await store.open()
    n = 5000
    sessions = {f"s{i:05}": session(f"s{i:05}") for i in range(n)}  # all expire at T0 + 1000
    await store.commit([Put(s, None) for s in sessions.values()])
    later = T0 + 5000
    first = await store.expired(later, 100)
    assert len(first) == 100
    assert len(store._expired) == 100 and len(store._heap) == n - 100
    # At the very millisecond they expire at, they are all still live, moved or not.
    assert await store.count(T0 + 1000) == n
    assert await store.expired(T0 + 1000, 10) == []
    # A session moved by the split and renewed leaves the expired set and the sweep.
    renewed = replace(sessions[first[0]], last_accessed=later, version=2)
    assert await store.commit([Put(renewed, 1)]) == [True]
    swept = 0
    while batch := await store.expired(later, 100):
        assert len(batch) <= 100 and first[0] not in batch
        assert len(store._expired) <= 100
        done = await store.commit([Delete(sid, if_expired_at=later) for sid in batch])
        assert done == [True] * len(batch)
        swept += len(batch)
    assert swept == n - 1
    assert await store.count(later) == 1
    assert await store.expired(renewed.expires_at + 1, 10) == [first[0]]
