"""Commit pipelining: while one batch's commit is out, the next is gathered and applied.

What the speed-up must not break: a reply comes only after its own commit; a session written by
the batch that is out is seen as that batch left it; a store that fails the batch that is out
fails no reply of the next one (which runs again, from what is stored, never seeing the failed
writes); and what needs nothing of the store's work in progress is answered meanwhile.

The store here is the memory store behind a gate: its commits wait until the test opens the
gate, and the next one may fail. It is not an ImmediateStore, so every commit of the manager
goes out and is awaited, as a disk or lmdb store's do under load.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from workers import Session, StoreError, open_session_service
from workers.stores.base import Write
from workers.stores.disk import DiskStore
from workers.stores.lmdb import LmdbStore
from workers.stores.memory import MemoryStore


class GatedStore:
    """A memory store whose commits wait for :attr:`gate` (when set) and may fail."""

    backend = "memory"
    shared = False

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.gate: trio.Event | None = None
        self.fail_next = False
        #: Every batch of writes committed (or tried), in order.
        self.commits: list[list[Write]] = []

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def load(self, ids: Sequence[str]) -> dict[str, Session]:
        return await self.inner.load(ids)

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        self.commits.append(list(writes))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise StoreError("injected: the disk is full")
        return await self.inner.commit(writes)

    def __getattr__(self, name: str) -> Any:
        if name.endswith("_now"):  # not an ImmediateStore: its commits go out and are awaited
            raise AttributeError(name)
        return getattr(self.inner, name)  # load_mark, scan, expired, count


@asynccontextmanager
async def gated() -> AsyncIterator[tuple[GatedStore, Any]]:
    store = GatedStore()
    async with open_session_service(store=store, cleanup_interval=1e9) as sessions:
        yield store, sessions


def plus(key: str, n: int) -> Any:
    return lambda m: {**m, key: m.get(key, 0) + n}


async def test_a_reply_waits_for_its_commit_and_the_next_batch_sees_the_writes_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gated() as (store, sessions):
        sid = await sessions.create({"n": 0})
        store.gate = trio.Event()
        committed = len(store.commits)
        done: dict[str, Session] = {}

        async def update(name: str, n: int) -> None:
            done[name] = await sessions.update(sid, plus("n", n))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(update, "first", 1)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(update, "second", 10)
            await trio.testing.wait_all_tasks_blocked()
            assert done == {}  # neither is answered before its commit
            assert len(store.commits) == committed + 1  # the second waits for the first's
            store.gate.set()
        assert done["first"].metadata == {"n": 1} and done["first"].version == 2
        # Applied on top of the first's write while it was still out.
        assert done["second"].metadata == {"n": 11} and done["second"].version == 3
        assert (await sessions.peek(sid)).metadata == {"n": 11}


async def test_a_failed_commit_fails_only_its_own_replies_and_is_never_seen(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gated() as (store, sessions):
        one = await sessions.create({"n": 0})
        other = await sessions.create({"n": 0})
        store.gate = trio.Event()
        results: dict[str, Any] = {}

        async def update(name: str, sid: str, n: int) -> None:
            try:
                results[name] = (await sessions.update(sid, plus("n", n))).metadata
            except StoreError as exc:
                results[name] = exc

        async def peek(name: str, sid: str) -> None:
            results[name] = (await sessions.peek(sid)).metadata

        async with trio.open_nursery() as nursery:
            nursery.start_soon(update, "out", one, 1)  # batch N: its commit is held, then fails
            await trio.testing.wait_all_tasks_blocked()
            # Batch N+1, applied while N is out: two read N's write, one does not.
            nursery.start_soon(update, "after", one, 10)
            nursery.start_soon(peek, "seen", one)
            nursery.start_soon(update, "elsewhere", other, 100)
            await trio.testing.wait_all_tasks_blocked()
            assert results == {}
            store.fail_next = True
            store.gate.set()
        assert isinstance(results["out"], StoreError)
        # N+1 ran again from what is stored: nothing of N, and none of its replies failed.
        assert results["after"] == {"n": 10}
        assert results["seen"] in ({"n": 0}, {"n": 10})  # before or after "after": never 1
        assert results["elsewhere"] == {"n": 100}
        assert (await sessions.peek(one)).metadata == {"n": 10}


async def test_reads_of_other_sessions_are_answered_while_a_commit_is_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gated() as (store, sessions):
        written = await sessions.create({"n": 0})
        elsewhere = await sessions.create({"n": 5})
        store.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sessions.update, written, plus("n", 1))
            await trio.testing.wait_all_tasks_blocked()
            # Not behind the commit: it neither reads that session nor writes.
            assert (await sessions.peek(elsewhere)).metadata == {"n": 5}
            seen: list[dict[str, Any]] = []

            async def peek_written() -> None:
                seen.append((await sessions.peek(written)).metadata)

            nursery.start_soon(peek_written)
            await trio.testing.wait_all_tasks_blocked()
            assert seen == []  # it reads what the commit that is out writes: it waits
            store.gate.set()
        assert seen == [{"n": 1}]


# --- on a real store, with its calls on the Trio thread -----------------------------------


async def test_an_uncached_read_does_not_hold_up_a_cached_one(tmp_path: Path) -> None:
    # The store's thread is held inside a load; a read of a cached session is answered
    # meanwhile, and the held one when the load is done.
    store = DiskStore(tmp_path / "store", inline=False)  # every load goes to the thread
    held = threading.Event()
    loading = threading.Event()
    load = store._load

    def slow_load(ids: list[str]) -> dict[str, Session]:
        loading.set()
        held.wait(10)
        return load(ids)

    with trio.fail_after(30):
        async with open_session_service(store=store, cache_size=1) as sessions:
            cold = await sessions.create({"who": "cold"})
            warm = await sessions.create({"who": "warm"})  # the cache holds one: this one
            store._load = slow_load  # type: ignore[method-assign]
            answers: list[str] = []

            async def read(sid: str) -> None:
                answers.append((await sessions.retrieve(sid)).metadata["who"])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, cold)
                await trio.to_thread.run_sync(loading.wait, 10)
                await read(warm)
                assert answers == ["warm"]
                held.set()
            assert answers == ["warm", "cold"]


@pytest.mark.parametrize("backend", ["disk", "lmdb"])
async def test_a_read_on_the_trio_thread_sees_only_committed_writes(
    backend: str, tmp_path: Path
) -> None:
    # A commit out on the store's thread is seen by nobody until it is done: a read of its
    # session waits for it; a read of another session answered from the store meanwhile sees
    # the last committed state.
    with trio.fail_after(30):
        async with open_session_service(
            backend=backend, path=str(tmp_path / "store"), cache_size=0
        ) as sessions:
            sid = await sessions.create({"n": 0})
            other = await sessions.create({"n": 7})
            store: Any = whereis_store(sessions)
            held = threading.Event()
            commit = store._commit

            def slow_commit(writes: list[Write]) -> list[bool]:
                held.wait(10)
                return commit(writes)

            store._commit = slow_commit
            store.inline_max = 0  # this update's commit goes to the thread
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sessions.update, sid, plus("n", 1))
                await trio.testing.wait_all_tasks_blocked()
                seen: list[dict[str, Any]] = []

                async def peek(session_id: str) -> None:
                    seen.append((await sessions.peek(session_id)).metadata)

                nursery.start_soon(peek, sid)
                nursery.start_soon(peek, other)
                await trio.testing.wait_all_tasks_blocked()
                assert seen == []  # both wait: one for its session, one for the store
                held.set()
            assert sorted(seen, key=lambda m: m["n"]) == [{"n": 1}, {"n": 7}]
            store._commit = commit


def whereis_store(sessions: Any) -> Any:
    from supervisor import whereis

    return whereis(sessions.actors["manager"])._process.actor.store


async def test_a_lone_callers_writes_go_now_and_concurrent_callers_share_commits(
    tmp_path: Path,
) -> None:
    store = LmdbStore(tmp_path / "store")
    commits: list[tuple[int, bool]] = []  # (writes, on the Trio thread)
    commit = store._commit

    def counting(writes: list[Write]) -> list[bool]:
        commits.append((len(writes), threading.current_thread() is threading.main_thread()))
        return commit(writes)

    store._commit = counting  # type: ignore[method-assign]
    with trio.fail_after(30):
        async with open_session_service(store=store) as sessions:
            await sessions.create({})  # the first commit writes the store's clock mark too
            commits.clear()
            for _ in range(5):
                await sessions.create({})
            assert [on_trio for _, on_trio in commits] == [True] * 5  # one each, no hop
            commits.clear()
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(sessions.create, {})
            assert len(commits) < 5 and sum(n for n, _ in commits) >= 20  # group commit


async def test_a_callers_miss_loads_now_and_a_reactors_miss_loads_on_the_thread(
    tmp_path: Path,
) -> None:
    # A request sent by send_request (the daemon's reactor, more requests right behind it)
    # has its miss loaded on the store's thread, where the store reads without the GIL; a
    # caller waiting in its own task has it loaded at once, on the Trio thread. (lmdb: the
    # disk store's checkpoint thread could send the lone caller's load to the thread too.)
    store = LmdbStore(tmp_path / "store")
    loads: list[tuple[int, bool]] = []  # (ids, on the Trio thread)
    load = store._load

    def counting(ids: list[str]) -> dict[str, Session]:
        loads.append((len(ids), threading.current_thread() is threading.main_thread()))
        return load(ids)

    store._load = counting  # type: ignore[method-assign]
    with trio.fail_after(30):
        async with open_session_service(store=store, cache_size=1) as sessions:
            first, second = [await sessions.create({"n": n}) for n in range(2)]
            # The cache holds one session: the second create pushed the first out.
            loads.clear()
            assert (await sessions.retrieve(first)).metadata == {"n": 0}
            assert loads == [(1, True)]
            loads.clear()
            answered = trio.Event()
            answers: list[Any] = []

            def on_reply(value: Any, error: Exception | None) -> None:
                answers.append(error or value.metadata)
                answered.set()

            sessions.submit(sessions.operation("retrieve", second), on_reply)
            await answered.wait()
            assert answers == [{"n": 1}]
            assert loads == [(1, False)]
