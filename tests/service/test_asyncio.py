"""The embedded service inside asyncio programs: the Trio tree in guest mode on asyncio's loop.

Each test is a plain function that runs its scenario with ``asyncio.run`` (or anyio's asyncio
backend, as an MCP server does), on the disk store. Time is the injected wall clock
(:class:`Wall`), moved by hand: no test waits for a timeout to pass.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers import EPOCH

from supervisor import SupervisorShutdown
from supervisor.testing import InjectedFault
from workers import (
    InvalidMetadata,
    InvalidSessionId,
    ServiceUnavailable,
    Session,
    SessionExpired,
    SessionNotFound,
    SessionService,
    StoreError,
    UpdateFailed,
    VersionConflict,
    open_session_service,
)
from workers.core.guest import GuestService
from workers.faults import FaultyStore
from workers.stores import make_store

USER = {"user_id": "user123", "auth_method": "api_key"}


class Wall:
    """The service's wall clock, moved by the test."""

    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def disk(tmp_path: Path) -> dict[str, Any]:
    return {"backend": "disk", "path": str(tmp_path / "store"), "clock": Wall()}


async def until_served(call: Any) -> Any:
    """``await call()``, again while a restarting manager answers ServiceUnavailable."""
    for _ in range(10_000):
        try:
            return await call()
        except ServiceUnavailable:
            await asyncio.sleep(0)
    raise AssertionError("the service never came back")


def test_the_asyncio_object_has_every_method_of_the_service() -> None:
    public = {
        name
        for name, value in vars(SessionService).items()
        if not name.startswith("_") and inspect.iscoroutinefunction(value)
    }
    assert {"create", "retrieve", "update", "crash_actor", "list_page"} <= public
    for name in public:
        method = getattr(GuestService, name)
        assert inspect.iscoroutinefunction(method), name
        assert inspect.signature(method) == inspect.signature(getattr(SessionService, name))


def test_every_method_under_asyncio_run(disk: dict[str, Any]) -> None:
    async def main() -> None:
        async with open_session_service(page_size=3, **disk) as s:
            assert s.backend == "disk" and await s.get_backend() == "disk"
            sid = await s.create(USER, ttl=60)
            got = await s.retrieve(sid)
            assert isinstance(got, Session)
            assert (got.metadata, got.version, got.timeout_ms) == (USER, 1, 60_000)
            assert await s.peek(sid) == got
            threads: list[int] = []

            def change(m: dict[str, Any]) -> dict[str, Any]:
                threads.append(threading.get_ident())
                return {**m, "theme": "dark"}

            assert (await s.update(sid, change)).metadata["theme"] == "dark"
            assert threads == [threading.get_ident()]  # Trio runs in asyncio's own thread
            with pytest.raises(UpdateFailed):
                await s.update(sid, lambda m: 1 / 0)
            assert (await s.patch(sid, {"n": 1}, ["auth_method"], expected_version=2)).version == 3
            with pytest.raises(VersionConflict):
                await s.patch(sid, {"n": 2}, expected_version=2)
            await s.touch(sid)
            await s.set_ttl(sid, None)
            assert (await s.peek(sid)).timeout_ms is None
            new = await s.rotate(sid)
            with pytest.raises(SessionNotFound):
                await s.peek(sid)
            with pytest.raises(InvalidSessionId):
                await s.peek("")
            with pytest.raises(InvalidMetadata):
                await s.create({1: "int key"})
            others = [await s.create({"user_id": "u2"}) for _ in range(4)]
            assert await s.delete_where("user_id", "u2") == 4
            assert not {x.id for x in await s.list_sessions()} & set(others)
            page, cursor = await s.list_page(None, 10)
            assert [x.id for x in page] == [new] and cursor is None
            assert await s.count() == 1
            assert await s.cleanup_expired() == 0
            copy = Session("f" * 32, 1, 2, None, {"restored": True}, 4)
            assert await s.import_sessions([copy]) == 1
            assert (await s.stats())["sessions"] == 2
            assert await s.delete(new) is True
            assert await s.delete(new) is False

    asyncio.run(main())


def test_idle_expiry_follows_the_injected_clock(disk: dict[str, Any]) -> None:
    wall = disk["clock"]

    async def main() -> None:
        async with open_session_service(**disk) as s:
            sid = await s.create(USER, ttl=10)
            keep = await s.create(USER, ttl=100)
            wall.now += 8
            assert (await s.peek(sid)).last_accessed == int(EPOCH * 1000)
            assert (await s.retrieve(sid)).last_accessed == int(wall.now * 1000)  # refreshed
            wall.now += 10.001
            with pytest.raises(SessionExpired):
                await s.retrieve(sid)
            assert [x.id for x in await s.list_sessions()] == [keep]
            assert await s.cleanup_expired() == 1
            with pytest.raises(SessionNotFound) as info:
                await s.peek(sid)
            assert type(info.value) is SessionNotFound

    asyncio.run(main())


def test_sessions_persist_across_close_and_reopen(disk: dict[str, Any]) -> None:
    async def write() -> dict[str, Session]:
        async with open_session_service(**disk) as s:
            a = await s.create({"prefs": {"theme": "dark"}}, ttl=3600)
            await s.create({"bytes": b"\x00\xff"}, ttl=None)
            await s.update(a, lambda m: {**m, "n": 1})
            return {x.id: x for x in await s.list_sessions()}

    async def read() -> dict[str, Session]:
        async with open_session_service(**disk) as s:
            return {x.id: x for x in await s.list_sessions()}

    before = asyncio.run(write())
    assert len(before) == 2
    assert asyncio.run(read()) == before


def test_a_crash_restarts_the_manager_as_under_trio(disk: dict[str, Any]) -> None:
    clock = disk.pop("clock")
    store = FaultyStore(make_store(**disk))
    store.fail("commit", InjectedFault("bug in commit"), calls=[3, 6])

    async def main() -> None:
        async with open_session_service(store=store, clock=clock) as s:
            acknowledged, unavailable = [], 0
            for i in range(12):  # one commit each
                try:
                    acknowledged.append(await s.create({"i": i}))
                except ServiceUnavailable:
                    unavailable += 1
            assert unavailable >= 2 and s.restarts >= 2
            assert await until_served(lambda: s.crash_actor("manager"))  # one from outside too
            assert await until_served(s.count) == len(acknowledged)
            assert s.restarts >= 3
            for sid in acknowledged:
                assert (await s.peek(sid)).id == sid

    asyncio.run(main())


def test_a_tree_that_gives_up_cancels_the_body_and_raises(disk: dict[str, Any]) -> None:
    clock = disk.pop("clock")
    store = FaultyStore(make_store(**disk))
    store.fail("commit", InjectedFault("bug in every commit"))
    reached_after_loop = False

    async def main() -> None:
        nonlocal reached_after_loop
        async with open_session_service(store=store, clock=clock, intensity=2) as s:
            while True:
                try:
                    await s.create({})
                except ServiceUnavailable:
                    pass
        reached_after_loop = True  # pragma: no cover

    with pytest.raises(SupervisorShutdown):
        asyncio.run(main())
    assert not reached_after_loop


@pytest.mark.parametrize("how", ["exception", "cancel", "timeout"])
def test_leaving_the_block_stops_the_tree_and_closes_the_store(
    disk: dict[str, Any], how: str
) -> None:
    """The store is closed when the block is left however it is left: opening it again in the
    same process would otherwise be refused (one owner per store)."""
    started = asyncio.Event()

    async def body() -> None:
        async with open_session_service(**disk) as s:
            await s.create(USER)
            started.set()
            if how == "exception":
                raise KeyError("the application's own error")
            await asyncio.Event().wait()  # until cancelled

    async def main() -> None:
        if how == "exception":
            with pytest.raises(KeyError):
                await body()
        elif how == "cancel":
            task = asyncio.create_task(body())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            loop = asyncio.get_running_loop()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(None) as deadline:
                    # The deadline passes once the session exists (no real time involved).
                    expire = asyncio.ensure_future(started.wait())
                    expire.add_done_callback(lambda _: deadline.reschedule(loop.time()))
                    await body()
        async with open_session_service(**disk) as s:
            assert await s.count() == 1

    asyncio.run(main())


def test_a_store_that_cannot_be_opened_raises_bare(disk: dict[str, Any]) -> None:
    async def main() -> None:
        async with open_session_service(**disk):
            with pytest.raises(StoreError, match="pid"):
                async with open_session_service(**disk):
                    pass  # pragma: no cover

    asyncio.run(main())


def test_a_cancelled_call_is_cancelled_in_trio_too(disk: dict[str, Any]) -> None:
    clock = disk.pop("clock")
    store = FaultyStore(make_store(**disk))

    async def main() -> None:
        async with open_session_service(store=store, clock=clock) as s:
            store.hang("commit")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await s.create({"never": "acknowledged"})
            store.clear()
            assert await s.create({"after": True})

    asyncio.run(main())


def test_under_anyio_task_groups_on_asyncio(disk: dict[str, Any]) -> None:
    """As an MCP server runs: anyio on asyncio, the service in a task that is cancelled."""

    async def main() -> None:
        ready = anyio.Event()

        async def serve() -> None:
            async with open_session_service(**disk) as s:
                await s.create(USER)
                ready.set()
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            await ready.wait()
            tasks.cancel_scope.cancel()
        async with open_session_service(**disk) as s:
            assert await s.count() == 1

    anyio.run(main, backend="asyncio")
