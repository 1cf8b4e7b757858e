"""The service against a plain dict model, with crashes injected between steps (issue 6).

A stateful test written with interactive draws: Hypothesis picks each step after seeing the
state so far (``st.data()``), the step runs against the real service and against the model, and
their answers must agree. Steps include the passing of (virtual) time and crashes of the manager
and the cleanup actor; the model has no notion of crashes, so any effect of one is a failure.
Hypothesis shrinks a failing run to its shortest sequence of steps.

Virtual time stands still unless a step moves it (``MockClock`` without autojump), so a slow
store thread can never let time jump in the middle of a step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers import EPOCH
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.testing import crash
from workers import SessionExpired, SessionNotFound, SessionService, open_session_service

STEPS = (
    "create",
    "retrieve",
    "peek",
    "patch",
    "touch",
    "set_ttl",
    "delete",
    "count",
    "list",
    "sweep",
    "sleep",
    "crash_manager",
    "crash_cleanup",
)
TTLS = st.sampled_from([None, 5.0, 60.0])
EXAMPLES = itertools.count()
VALUES = st.dictionaries(st.sampled_from("abc"), st.integers(-3, 3), max_size=2)


@dataclass
class Model:
    """What the service should hold: every stored session, expired ones included."""

    metadata: dict[str, Any]
    last_ms: int
    timeout_ms: int | None

    def expired(self, now_ms: int) -> bool:
        return self.timeout_ms is not None and now_ms > self.last_ms + self.timeout_ms


def ms(ttl: float | None) -> int | None:
    return None if ttl is None else int(ttl * 1000)


async def play(data: st.DataObject, options: dict[str, Any], steps: int) -> None:
    def now_ms() -> int:
        return int((EPOCH + trio.current_time()) * 1000)

    model: dict[str, Model] = {}
    async with open_session_service(
        **options, clock=lambda: EPOCH + trio.current_time(), cleanup_interval=1e9, intensity=10**6
    ) as s:
        for _ in range(steps):
            await step(data, s, model, now_ms)


async def step(
    data: st.DataObject, s: SessionService, model: dict[str, Model], now_ms: Any
) -> None:
    action = data.draw(st.sampled_from(STEPS), label="step")
    known = list(model)  # creation order: ids are random, their order must not matter
    sid = data.draw(st.sampled_from([*known, "0" * 32]), label="id") if known else "0" * 32
    entry = model.get(sid)
    now = now_ms()

    async def expect_missing(call: Any) -> None:
        expected = SessionExpired if entry is not None else SessionNotFound
        with pytest.raises(SessionNotFound) as info:
            await call
        assert type(info.value) is expected

    live = entry is not None and not entry.expired(now)
    match action:
        case "create":
            metadata, ttl = data.draw(VALUES, label="metadata"), data.draw(TTLS, label="ttl")
            new = await s.create(metadata, ttl=ttl)
            model[new] = Model(metadata, now, ms(ttl))
        case "retrieve" | "peek" | "touch" | "patch" | "set_ttl" if not live:
            await expect_missing(
                {
                    "retrieve": s.retrieve,
                    "peek": s.peek,
                    "touch": s.touch,
                    "patch": lambda i: s.patch(i, {"z": 1}),
                    "set_ttl": lambda i: s.set_ttl(i, 1.0),
                }[action](sid)
            )
        case "retrieve" | "peek":
            got = await (s.retrieve if action == "retrieve" else s.peek)(sid)
            assert got.metadata == entry.metadata and got.timeout_ms == entry.timeout_ms
            if action == "retrieve":
                entry.last_ms = now
            assert got.last_accessed == entry.last_ms
        case "touch":
            await s.touch(sid)
            entry.last_ms = now
        case "patch":
            changes = data.draw(VALUES, label="changes")
            got = await s.patch(sid, changes)
            entry.metadata = {**entry.metadata, **changes}
            entry.last_ms = now
            assert got.metadata == entry.metadata
        case "set_ttl":
            ttl = data.draw(TTLS, label="ttl")
            await s.set_ttl(sid, ttl)
            entry.timeout_ms = ms(ttl)
        case "delete":
            assert await s.delete(sid) is live
            model.pop(sid, None)
        case "count":
            assert await s.count() == sum(not m.expired(now) for m in model.values())
        case "list":
            listed = {x.id: x.metadata for x in await s.list_sessions()}
            assert listed == {i: m.metadata for i, m in model.items() if not m.expired(now)}
        case "sweep":
            gone = [i for i, m in model.items() if m.expired(now)]
            assert await s.cleanup_expired() == len(gone)
            for i in gone:
                del model[i]
        case "sleep":
            seconds = data.draw(st.sampled_from([0.5, 3.0, 30.0, 61.0]), label="sleep")
            clock = trio.lowlevel.current_clock()
            assert isinstance(clock, trio.testing.MockClock)
            clock.jump(seconds)
        case "crash_manager" | "crash_cleanup":
            await crash(s.actors[action.removeprefix("crash_")], name_wait=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_memory_service_matches_the_model(data: st.DataObject) -> None:
    trio.run(play, data, {"backend": "memory"}, 40, clock=trio.testing.MockClock())


@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_disk_service_matches_the_model(data: st.DataObject, tmp_path: Path) -> None:
    path = tmp_path / f"store-{next(EXAMPLES)}"  # a fresh store for every example
    trio.run(play, data, {"backend": "disk", "path": str(path)}, 25, clock=trio.testing.MockClock())
