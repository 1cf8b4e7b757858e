"""The fault-injection toolkit itself: supervisor.testing and workers.faults."""

from __future__ import annotations

import errno
import itertools
from typing import Any

import pytest
import trio
import trio.testing

from supervisor import Actor, NoProc, ServerDown, Supervisor, call, whereis
from supervisor.testing import InjectedFault, crash, crash_repeatedly, random_intervals
from workers import StoreError
from workers.faults import FaultyStore, JumpingClock
from workers.stores import make_store


class Sleeper(Actor):
    """Answers ``("sleep", s)`` after s seconds and remembers how each incarnation ended."""

    exits: list[object]

    async def init(self, exits: list[object]) -> None:
        self.exits = exits

    async def handle_call(self, request: Any) -> Any:
        await trio.sleep(request[1])
        return "slept"

    async def terminate(self, reason: object) -> None:
        self.exits.append(reason)


async def test_crash_interrupts_a_busy_actor_and_its_supervisor_restarts_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    exits: list[object] = []
    sup = Supervisor([Sleeper.child_spec("s", exits, name="sleeper")], intensity=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        first = whereis("sleeper")

        async def caller() -> None:
            with pytest.raises(ServerDown):
                await call("sleeper", ("sleep", 100))

        nursery.start_soon(caller)
        await trio.sleep(1)
        boom = ValueError("boom")
        assert await crash("sleeper", boom) is boom
        assert not first.alive
        assert await call("sleeper", ("sleep", 0)) == "slept"  # the next incarnation
        assert exits == [boom]
        assert sup.which_children()[0].restarts == 1
        with pytest.raises(NoProc):
            await crash(first)  # that incarnation is gone
        nursery.cancel_scope.cancel()


async def test_crash_of_a_free_name_is_noproc() -> None:
    with pytest.raises(NoProc):
        await crash("nobody")


async def test_crash_repeatedly_follows_a_name_across_restarts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    exits: list[object] = []
    sup = Supervisor([Sleeper.child_spec("s", exits, name="sleeper")], intensity=10, period=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert await crash_repeatedly("sleeper", itertools.repeat(1.0, 4)) == 4
        assert len(exits) == 4 and all(isinstance(e, InjectedFault) for e in exits)
        await trio.sleep(0.1)  # crash returns once it died; the restart follows
        assert sup.which_children()[0].restarts == 4
        ref = whereis("sleeper")
        nursery.start_soon(crash_repeatedly, ref, itertools.repeat(1.0))
        await trio.sleep(1.5)
        assert not ref.alive and len(exits) == 5  # a ref is crashed once, then the schedule ends
        nursery.cancel_scope.cancel()


def test_random_intervals_are_reproducible() -> None:
    a = list(random_intervals(0.1, 0.5, seed=3, count=20))
    assert a == list(random_intervals(0.1, 0.5, seed=3, count=20))
    assert len(a) == 20 and all(0.1 <= x <= 0.5 for x in a)
    with pytest.raises(ValueError):
        random_intervals(1, 0)


async def faulty(seed: int | None = None) -> FaultyStore:
    store = FaultyStore(make_store("memory"), seed=seed)
    await store.open()
    return store


async def test_fail_on_chosen_calls_and_times() -> None:
    store = await faulty()
    fault = store.fail("count", RuntimeError("bug"), calls=[2, 4])
    store.fail("load", times=1)
    outcomes = []
    for _ in range(5):
        try:
            outcomes.append(await store.count(0))
        except RuntimeError:
            outcomes.append("bug")
    assert outcomes == [0, "bug", 0, "bug", 0]
    assert fault.strikes == 2 and store.calls["count"] == 5
    with pytest.raises(StoreError, match="injected"):
        await store.load([])
    assert await store.load([]) == {}


async def test_an_os_error_becomes_a_store_error_naming_it() -> None:
    store = await faulty()
    store.fail("commit", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(StoreError, match="No space left") as info:
        await store.commit([])
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC


async def test_random_faults_replay_with_the_same_seed() -> None:
    async def pattern(seed: int) -> list[bool]:
        store = await faulty(seed)
        store.fail("count", probability=0.3)
        hits = []
        for _ in range(50):
            try:
                await store.count(0)
            except StoreError:
                hits.append(True)
            else:
                hits.append(False)
        return hits

    first = await pattern(11)
    assert first == await pattern(11)
    assert 5 < sum(first) < 30


async def test_fail_after_runs_the_real_call_first() -> None:
    store = await faulty()
    store.fail("commit", RuntimeError("crash after commit"), after=True)
    with pytest.raises(RuntimeError):
        await store.commit([])
    assert store.calls["commit"] == 1


async def test_hang_until_cleared_and_the_enabled_switch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await faulty()
    store.hang("count")
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def counter() -> None:
            await store.count(0)
            done.set()

        nursery.start_soon(counter)
        await trio.sleep(1000)
        assert not done.is_set()
        store.clear()
        await done.wait()
    store.hang("count", seconds=5)
    store.enabled = False
    with trio.fail_after(0.1):
        await store.count(0)  # paused
    store.enabled = True
    start = trio.current_time()
    await store.count(0)
    assert trio.current_time() - start == pytest.approx(5)


async def test_slow_delays_by_a_fixed_or_random_amount(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = await faulty(seed=2)
    store.slow("count", 0.5)
    start = trio.current_time()
    await store.count(0)
    assert trio.current_time() - start == pytest.approx(0.5)
    store.clear()
    store.slow("count", (1.0, 2.0))
    start = trio.current_time()
    await store.count(0)
    assert 1.0 <= trio.current_time() - start <= 2.0


def test_unknown_methods_and_bad_probabilities_are_refused() -> None:
    store = FaultyStore(make_store("memory"))
    with pytest.raises(ValueError):
        store.fail("commmit")
    with pytest.raises(ValueError):
        store.fail("commit", probability=2)
    assert store.backend == "memory"


def test_jumping_clock() -> None:
    clock = JumpingClock(lambda: 1000.0)
    clock.jump(-60)
    assert clock() == 940.0
    clock.jump(120)
    assert clock() == 1060.0
