"""Shared test helpers for the supervisor suites (no tests here).

:class:`Probe` makes children that write what happens to them into one log and that a test can
crash, finish or fail at will, so each test can assert the exact order of starts and stops.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing

from supervisor import ChildSpec, Supervisor, cleanup_scope


class Boom(Exception):
    """The crash a probe child raises when told to."""


class _Control:
    def __init__(self) -> None:
        self.event = trio.Event()
        self.action = ""

    def set(self, action: str) -> None:
        self.action = action
        self.event.set()


class Probe:
    """Children that log ``(event, id)``: "start", "stop" (cancelled by the supervisor),
    "crash", "return", "start_failed", "cleaned"."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Hashable]] = []
        self.controls: dict[Hashable, _Control] = {}
        self.fail_start: dict[Hashable, float] = {}  # id -> how many more starts fail
        self.alive: set[Hashable] = set()  # children whose task is running right now
        self.init_delay: dict[Hashable, float] = {}
        self.cleanup_time: dict[Hashable, float] = {}

    def spec(self, child_id: Hashable, **options: Any) -> ChildSpec:
        return ChildSpec(child_id, functools.partial(self.child, child_id), **options)

    @property
    def running(self) -> int:
        return len(self.alive)

    def events(self, kind: str) -> list[Hashable]:
        return [child_id for event, child_id in self.log if event == kind]

    async def child(self, child_id: Hashable, *, task_status: trio.TaskStatus[Any]) -> None:
        if child_id in self.init_delay:
            await trio.sleep(self.init_delay[child_id])
        if self.fail_start.get(child_id, 0) > 0:
            self.fail_start[child_id] -= 1
            self.log.append(("start_failed", child_id))
            raise Boom(f"{child_id} cannot start")
        control = self.controls[child_id] = _Control()
        self.alive.add(child_id)
        try:
            self.log.append(("start", child_id))
            task_status.started(f"value-{child_id}")
            await control.event.wait()
            self.log.append((control.action, child_id))
            if control.action == "crash":
                raise Boom(child_id)
        except trio.Cancelled:
            self.log.append(("stop", child_id))
            if child_id in self.cleanup_time:
                with cleanup_scope():
                    await trio.sleep(self.cleanup_time[child_id])
                    self.log.append(("cleaned", child_id))
            raise
        finally:
            self.alive.discard(child_id)

    def crash(self, child_id: Hashable) -> None:
        self.controls[child_id].set("crash")

    def finish(self, child_id: Hashable) -> None:
        self.controls[child_id].set("return")


async def settle() -> None:
    """Let every task run until all are blocked (the supervisor has handled everything)."""
    await trio.testing.wait_all_tasks_blocked()


@asynccontextmanager
async def supervised(sup: Supervisor) -> AsyncIterator[trio.Nursery]:
    """Run ``sup`` for the block, then cancel it (it stops its children in reverse order)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        yield nursery
        nursery.cancel_scope.cancel()


async def run_driven(
    sup: Supervisor, driver: Callable[[], Awaitable[object]]
) -> BaseException | None:
    """Run ``sup`` in this task while ``driver`` pokes at it; return what ``run`` raised, bare."""
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(driver)
        try:
            await sup.run()
        except BaseException as exc:
            error = exc
        nursery.cancel_scope.cancel()
    return error
