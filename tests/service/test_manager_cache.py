"""The manager's read cache and deferred access-time writes (disk and lmdb stores)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from supervisor import whereis
from supervisor.testing import crash
from workers import ServiceUnavailable, open_session_service
from workers.faults import FaultyStore
from workers.stores import make_store


@pytest.fixture(params=["disk", "lmdb"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def options(backend: str, path: str, wall: Any) -> dict[str, Any]:
    """A service that never sweeps by itself and defers refreshes for an hour."""
    return {
        "backend": backend,
        "path": path,
        "clock": wall,
        "cleanup_interval": 1e9,
        "access_write_delay": 3600,
    }


@asynccontextmanager
async def faulty_service(
    backend: str, path: str, wall: Any
) -> AsyncIterator[tuple[FaultyStore, Any]]:
    """A service on a FaultyStore that never sweeps by itself and defers refreshes for 1 s."""
    store = FaultyStore(make_store(backend, path=path))
    async with open_session_service(
        store=store, clock=wall, cleanup_interval=1e9, access_write_delay=1.0
    ) as sessions:
        yield store, sessions


async def test_reads_are_not_disk_writes_until_the_delay(
    backend: str, path: str, wall: Any, vclock: MockClock
) -> None:
    store = FaultyStore(make_store(backend, path=path))
    async with open_session_service(store=store, clock=wall, cleanup_interval=1e9) as sessions:
        sid = await sessions.create({"user_id": "u"}, ttl=600)
        await trio.sleep(5)
        commits, loads = store.calls["commit"], store.calls["load"]
        for _ in range(100):
            s = await sessions.retrieve(sid)
        # 100 reads, no load and no refresh written; at most the clock mark's one commit.
        assert store.calls["load"] == loads and store.calls["commit"] <= commits + 1
        assert (await sessions.peek(sid)).last_accessed == s.last_accessed
        await trio.sleep(11)  # past access_write_delay: the refresh is written
    async with open_session_service(backend=backend, path=path, clock=wall) as sessions:
        assert (await sessions.peek(sid)).last_accessed == s.last_accessed


async def test_unwritten_refreshes_count_for_listing_and_expiry(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(**options) as sessions:
        sid = await sessions.create({"user_id": "u"}, ttl=10)
        await trio.sleep(9)
        await sessions.touch(sid)
        await trio.sleep(6)  # expired by the stored access time, live by the refreshed one
        assert await sessions.count() == 1
        assert [s.id for s in await sessions.list_sessions()] == [sid]
        assert await sessions.cleanup_expired() == 0
        assert (await sessions.retrieve(sid)).id == sid


async def test_a_crashed_manager_writes_its_refreshes_before_it_goes(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(**options) as sessions:
        sid = await sessions.create({"user_id": "u"}, ttl=600)
        await trio.sleep(30)
        refreshed = (await sessions.retrieve(sid)).last_accessed
        await crash(sessions.actors["manager"])
        with trio.fail_after(10):
            while True:  # the tree restarts the manager; a new one reads the store afresh
                try:
                    assert (await sessions.peek(sid)).last_accessed == refreshed
                    break
                except ServiceUnavailable:
                    await trio.sleep(0.01)


async def test_nothing_is_cached_above_a_shared_store() -> None:
    with pytest.raises(ValueError, match="shared"):
        async with open_session_service(backend="redis", cache_size=100):
            pass  # pragma: no cover


async def test_reads_wait_while_the_manager_waits_for_its_store(
    backend: str, path: str, wall: Any, vclock: MockClock
) -> None:
    # Not answered inline meanwhile: callers keeping the Trio thread busy would starve the
    # store thread of the GIL.
    async with faulty_service(backend, path, wall) as (store, sessions):
        sid = await sessions.create({"user_id": "u"}, ttl=600)
        await trio.sleep(0.5)
        await sessions.retrieve(sid)  # a deferred refresh: written in a second
        store.hang("commit")
        await trio.sleep(1.5)
        assert store.calls["commit"] == 2  # the create, then the refresh's write, hanging
        answered: list[str] = []

        async def retrieve() -> None:
            await sessions.retrieve(sid)
            answered.append(sid)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(retrieve)
            await trio.testing.wait_all_tasks_blocked()
            assert answered == []
            store.clear()
        assert answered == [sid]


async def test_an_inline_read_has_the_due_clock_mark_written(
    options: dict[str, Any], vclock: MockClock
) -> None:
    store = FaultyStore(make_store(options["backend"], path=options["path"]))
    options = {**options, "store": store}
    del options["backend"], options["path"]
    async with open_session_service(**options) as sessions:
        sid = await sessions.create({}, ttl=600)
        commits = store.calls["commit"]
        await trio.sleep(5)
        now_ms = int(options["clock"]() * 1000)
        await sessions.retrieve(sid)  # answered inline; the mark is 5 s behind
        await trio.testing.wait_all_tasks_blocked()
        assert store.calls["commit"] == commits + 1
        assert await store.load_mark() == now_ms  # the store thread runs calls in order


async def test_refreshes_whose_write_failed_are_kept_and_written_later(
    backend: str, path: str, wall: Any, vclock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with faulty_service(backend, path, wall) as (store, sessions):
        manager = whereis(sessions.actors["manager"])._process.actor  # type: ignore[attr-defined]
        sid = await sessions.create({}, ttl=600)
        await trio.sleep(0.5)
        await sessions.retrieve(sid)  # deferred: the stored access time is only 0.5 s old
        store.fail("commit", times=1)  # the refresh's write, a second after the retrieve
        await trio.sleep(1.5)
        assert "housekeeping failed (1 access times unwritten" in caplog.text
        assert sid in manager.unwritten
        await trio.sleep(1.5)  # tried again after access_write_delay
        assert manager.unwritten == {}


async def test_a_refresh_is_written_at_once_when_the_stored_access_time_is_too_old(
    backend: str, path: str, wall: Any, vclock: MockClock
) -> None:
    # A session read once just before its stored expiry must not depend on a deferred write:
    # a process killed before it would find the session expired, long before its time.
    async with faulty_service(backend, path, wall) as (store, sessions):
        manager = whereis(sessions.actors["manager"])._process.actor  # type: ignore[attr-defined]
        sid = await sessions.create({}, ttl=10)
        await trio.sleep(9)
        commits = store.calls["commit"]
        await sessions.retrieve(sid)  # stored access time 9 s old: written with its batch
        assert store.calls["commit"] == commits + 1 and manager.unwritten == {}
        await trio.sleep(0.5)
        await sessions.retrieve(sid)  # now 0.5 s old: left for later
        assert store.calls["commit"] == commits + 1 and sid in manager.unwritten


async def test_a_short_timeout_gets_its_refreshes_written_sooner(
    options: dict[str, Any], vclock: MockClock
) -> None:
    # Deferred only while the stored access time is less than a tenth of the timeout old: a
    # kill can cost a session at most that share of its idle life, whatever the delay says.
    async with open_session_service(**options) as sessions:
        manager = whereis(sessions.actors["manager"])._process.actor  # type: ignore[attr-defined]
        sid = await sessions.create({}, ttl=20)
        await trio.sleep(1.5)
        await sessions.retrieve(sid)  # 1.5 s old, under 2 s: left for later
        assert sid in manager.unwritten
        await trio.sleep(1)
        await sessions.retrieve(sid)  # still 1.5 s on disk, now 2.5 s old: written
        assert manager.unwritten == {}
        assert (await sessions.peek(sid)).last_accessed == manager.cache.get(sid).last_accessed


async def test_refreshes_kept_in_memory_are_bounded(
    options: dict[str, Any], vclock: MockClock
) -> None:
    # When max(cache_size, max_batch) refreshes wait, they are written at once.
    async with open_session_service(**options, cache_size=0, max_batch=4) as sessions:
        manager = whereis(sessions.actors["manager"])._process.actor  # type: ignore[attr-defined]
        ids = [await sessions.create({}, ttl=600) for _ in range(6)]
        await trio.sleep(1)
        read = [(await sessions.retrieve(sid)).last_accessed for sid in ids]
        assert len(manager.unwritten) <= 4  # past the bound, a refresh is written with its read
        with trio.fail_after(1):  # and the manager writes the waiting ones as soon as it runs
            while not set(manager.unwritten) <= set(ids[4:]):
                await trio.sleep(0.01)
        for sid, accessed in zip(ids[:4], read[:4], strict=True):  # not cached: from the store
            assert (await sessions.peek(sid)).last_accessed == accessed
