"""Faults that must end well (issue 6): a full disk, a hung store, clock steps, a crash loop.

What "never deletes a live session because of the jump alone" means, as pinned here: the
service's notion of now is the latest wall-clock time it has seen (any call or sweep lets it see
the time) and never goes backwards (see :mod:`workers.core.manager`), so a backward step of the wall
clock deletes nothing, revives nothing that was expired by then, and only postpones expiry until
the clock has caught up. A forward step is taken as time really passing: the sessions whose idle
timeout lies before the new time expire (and only those), as they would after that much idleness.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from supervisor import SupervisorShutdown
from supervisor.testing import crash, crash_repeatedly
from workers import (
    ServiceUnavailable,
    SessionExpired,
    SessionNotFound,
    StoreError,
    open_session_service,
)
from workers.faults import FaultyStore, JumpingClock
from workers.stores import make_store


def faulty_store(options: dict[str, Any]) -> FaultyStore:
    kwargs = {k: v for k, v in options.items() if k not in ("clock", "cleanup_interval")}
    return FaultyStore(make_store(**kwargs))


@pytest.mark.parametrize("backend", ["memory", "disk"])
async def test_a_full_disk_gives_store_errors_then_recovers(
    options: dict[str, Any], vclock: trio.testing.MockClock
) -> None:
    store = faulty_store(options)
    async with open_session_service(
        store=store, clock=options["clock"], cleanup_interval=1.0
    ) as sessions:
        kept = await sessions.create({"n": 0})
        store.fail("commit", OSError(errno.ENOSPC, "No space left on device"))
        for _ in range(30):  # far more failures than the restart budget (5 in 10 s)
            with pytest.raises(StoreError, match="No space left"):
                await sessions.create({})
            with pytest.raises(StoreError):
                await sessions.patch(kept, {"n": 1})
        await trio.sleep(5)  # sweeps fail too, and are only logged
        assert (await sessions.peek(kept)).metadata == {"n": 0}  # reads still work
        assert sessions.restarts == 0
        store.clear()  # space comes back
        assert (await sessions.patch(kept, {"n": 2})).metadata == {"n": 2}
        await sessions.create({})
        assert await sessions.count() == 2
        assert sessions.restarts == 0


@pytest.mark.parametrize("backend", ["memory"])
async def test_a_hung_store_costs_callers_their_timeout_not_more(
    options: dict[str, Any], vclock: trio.testing.MockClock
) -> None:
    store = faulty_store(options)
    async with open_session_service(store=store, clock=options["clock"], call_timeout=2) as s:
        sid = await s.create({})
        store.hang("commit")
        start = trio.current_time()
        with pytest.raises(ServiceUnavailable, match="did not answer"):
            await s.patch(sid, {"n": 1})
        assert trio.current_time() - start == pytest.approx(2)
        store.clear()
        assert (await s.patch(sid, {"n": 2})).metadata == {"n": 2}


async def test_exceeding_the_restart_budget_stops_the_tree(
    wall: Callable[[], float], vclock: trio.testing.MockClock
) -> None:
    with pytest.raises(SupervisorShutdown):
        async with open_session_service(clock=wall, intensity=3, period=10) as s:
            await crash_repeatedly(s.actors["manager"], itertools.repeat(0.5))


@pytest.fixture
def clock(wall: Callable[[], float]) -> JumpingClock:
    """The service's wall clock, which the test can step."""
    return JumpingClock(wall)


async def test_a_backward_jump_never_revives_an_expired_session(
    clock: JumpingClock, vclock: trio.testing.MockClock
) -> None:
    async with open_session_service(clock=clock, cleanup_interval=1e9) as sessions:
        old = await sessions.create({}, ttl=60)
        await trio.sleep(61)
        assert await sessions.count() == 0  # any call lets the service see the time
        clock.jump(-3600)
        for read in (sessions.peek, sessions.retrieve, sessions.touch):
            with pytest.raises(SessionExpired):
                await read(old)
        assert await sessions.count() == 0
        await crash(sessions.actors["manager"])  # the mark survives a manager restart
        with pytest.raises(SessionExpired):
            await sessions.peek(old)
        assert await sessions.cleanup_expired() == 1
        with pytest.raises(SessionNotFound):
            await sessions.peek(old)


async def test_a_backward_jump_never_deletes_a_live_session(
    clock: JumpingClock, vclock: trio.testing.MockClock
) -> None:
    async with open_session_service(clock=clock, cleanup_interval=10) as sessions:
        live = await sessions.create({"n": 1}, ttl=60)
        before = (await sessions.peek(live)).last_accessed
        await trio.sleep(30)
        clock.jump(-3600)
        assert await sessions.cleanup_expired() == 0
        newer = await sessions.create({}, ttl=60)
        assert (await sessions.peek(newer)).last_accessed >= before  # no time travel
        await trio.sleep(50)  # 80 s since `live` was used, but the clock stands still
        assert (await sessions.retrieve(live)).metadata == {"n": 1}
        assert await sessions.count() == 2


async def test_a_forward_jump_expires_exactly_the_sessions_idle_past_their_timeout(
    clock: JumpingClock, vclock: trio.testing.MockClock
) -> None:
    async with open_session_service(clock=clock, cleanup_interval=1e9) as sessions:
        short = await sessions.create({}, ttl=60)
        long = await sessions.create({"keep": True}, ttl=7200)
        forever = await sessions.create({}, ttl=None)
        clock.jump(3600)
        with pytest.raises(SessionExpired):
            await sessions.retrieve(short)
        assert await sessions.cleanup_expired() == 1
        assert (await sessions.retrieve(long)).metadata == {"keep": True}
        assert {s.id for s in await sessions.list_sessions()} == {long, forever}


@pytest.mark.parametrize("backend", ["disk", "lmdb"])
async def test_a_clock_set_back_across_a_restart_revives_nothing(
    backend: str, tmp_path: Path
) -> None:
    wall = [1_700_000_000.0]
    path = str(tmp_path / "store")
    async with open_session_service(backend=backend, path=path, clock=lambda: wall[0]) as s:
        sid = await s.create({"u": 1}, ttl=60)
        wall[0] += 120  # past its expiry
        with pytest.raises(SessionExpired):
            await s.touch(sid)
    wall[0] -= 100  # back before the expiry, and a new process
    async with open_session_service(backend=backend, path=path, clock=lambda: wall[0]) as s:
        with pytest.raises(SessionExpired):
            await s.touch(sid)
        with pytest.raises(SessionExpired):
            await s.peek(sid)
        assert await s.list_sessions() == []
        assert await s.count() == 0
