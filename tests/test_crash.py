"""The manager crashing under load costs callers a typed error, never a hang or a session."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio

from supervisor import SupervisorShutdown
from workers import ServiceUnavailable, open_session_service
from workers.stores import Store, Write, make_store


class CrashingStore:
    """Delegates to a real store; the commits numbered in ``crash_on`` raise a non-store error,
    which is a bug as far as the manager knows, so the manager crashes."""

    def __init__(self, inner: Store, crash_on: Sequence[int] | None = None) -> None:
        self.inner = inner
        self.crash_on = crash_on
        self.commits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        self.commits += 1
        if self.crash_on is None or self.commits in self.crash_on:
            raise RuntimeError(f"injected fault in commit {self.commits}")
        return await self.inner.commit(writes)


@pytest.fixture
def store_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """What make_store needs: the options less the service's own."""
    return {k: v for k, v in options.items() if k not in ("clock", "cleanup_interval")}


async def test_manager_crashes_under_load_lose_no_acknowledged_session(
    options: dict[str, Any], store_kwargs: dict[str, Any]
) -> None:
    store = CrashingStore(make_store(**store_kwargs), crash_on=[5, 9, 14])
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
    store = CrashingStore(make_store(**store_kwargs))  # every commit crashes
    with pytest.raises(SupervisorShutdown):
        async with open_session_service(store=store, clock=options["clock"]) as sessions:
            while True:
                try:
                    await sessions.create({})
                except ServiceUnavailable:
                    pass
