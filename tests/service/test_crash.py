"""The manager crashing under load costs callers a typed error, never a hang or a session."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from supervisor import SupervisorShutdown
from supervisor.testing import InjectedFault, crash
from workers import ServiceUnavailable, open_session_service
from workers.faults import FaultyStore
from workers.stores import make_store


@pytest.fixture
def store_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """What make_store needs: the options less the service's own."""
    return {k: v for k, v in options.items() if k not in ("clock", "cleanup_interval")}


async def test_manager_crashes_under_load_lose_no_acknowledged_session(
    options: dict[str, Any], store_kwargs: dict[str, Any]
) -> None:
    store = FaultyStore(make_store(**store_kwargs))
    store.fail("commit", InjectedFault("bug in commit"), calls=[5, 9, 14])
    acknowledged: dict[str, int] = {}
    unavailable = 0

    async def client(n: int) -> None:
        nonlocal unavailable
        for i in range(20):
            try:
                sid = await sessions.create({"client": n, "i": i})
            except ServiceUnavailable:
                unavailable += 1
            else:
                acknowledged[sid] = i

    async with open_session_service(store=store, clock=options["clock"]) as sessions:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(50):
                    nursery.start_soon(client, n)
        assert unavailable > 0 and sessions.restarts >= 3
        for sid, i in acknowledged.items():
            assert (await sessions.peek(sid)).metadata["i"] == i
        assert await sessions.count() == len(acknowledged)


async def test_a_crash_loop_stops_the_tree_with_supervisor_shutdown(
    options: dict[str, Any], store_kwargs: dict[str, Any]
) -> None:
    store = FaultyStore(make_store(**store_kwargs))
    store.fail("commit", InjectedFault("bug in every commit"))
    with pytest.raises(SupervisorShutdown):
        async with open_session_service(store=store, clock=options["clock"]) as sessions:
            while True:
                try:
                    await sessions.create({})
                except ServiceUnavailable:
                    pass


async def test_crashing_the_manager_from_outside_loses_nothing(
    options: dict[str, Any], store_kwargs: dict[str, Any]
) -> None:
    store = FaultyStore(make_store(**store_kwargs))
    store.hang("commit", calls=[3])  # the crash lands while a batch is being committed
    async with open_session_service(store=store, clock=options["clock"]) as sessions:
        ids = [await sessions.create({"i": i}) for i in range(2)]
        async with trio.open_nursery() as nursery:
            failed = trio.Event()

            async def doomed() -> None:
                with pytest.raises(ServiceUnavailable):
                    await sessions.create({"i": 2})
                failed.set()

            nursery.start_soon(doomed)
            while store.calls["commit"] < 3:
                await trio.sleep(0.01)
            reason = await crash(sessions.actors["manager"])
            assert isinstance(reason, InjectedFault)
            await failed.wait()
        assert [(await sessions.peek(i)).metadata["i"] for i in ids] == [0, 1]
        assert await sessions.count() == 2
        assert sessions.restarts >= 1
