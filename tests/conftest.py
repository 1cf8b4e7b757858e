"""Fixtures shared by the service-level tests.

Time: tests run on Trio's virtual clock, and the service's wall clock is driven by it
(``wall``), so TTLs and sweeps take no real time. Stores that work on a thread are invisible to
Trio, so the clock only jumps after 0.2 s of real idleness (``autojump_threshold=0.2``), never
while a store thread is busy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from redis_server import find_redis, unique_prefix

#: The virtual wall clock starts here (late 2025), so timestamps look like real ones.
EPOCH = 1_764_000_000.0

BACKENDS = ["memory", "disk", "lmdb", "redis"]


@pytest.fixture
def vclock(request: pytest.FixtureRequest) -> trio.testing.MockClock:
    """Trio's virtual clock for the test.

    pytest-trio runs a test on a Clock only when the test itself takes the fixture, so tests
    that sleep take ``vclock`` as an argument. Only threaded stores need the 0.2 s threshold.
    """
    threaded = "backend" in request.fixturenames and request.getfixturevalue("backend") != "memory"
    return trio.testing.MockClock(autojump_threshold=0.2 if threaded else 0)


@pytest.fixture
def wall(vclock: trio.testing.MockClock) -> Callable[[], float]:
    """The service's wall clock: seconds since the epoch, moving with Trio's virtual time."""
    return lambda: EPOCH + trio.current_time()


def store_options(backend: str, tmp_path: Path) -> dict[str, Any]:
    """What ``open_session_service`` needs, besides ``backend``, to open a fresh store."""
    if backend == "memory":
        return {}
    if backend == "redis":
        return {"url": find_redis(), "prefix": unique_prefix(tmp_path)}
    return {"path": str(tmp_path / f"{backend}-store")}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def options(backend: str, tmp_path: Path, wall: Callable[[], float]) -> dict[str, Any]:
    """Options for a fresh service on ``backend`` with the virtual wall clock.

    Sweeps are off (decades apart) unless a test sets ``cleanup_interval``: every timer that
    fires costs a threaded store's test 0.2 s of real time.
    """
    return {
        "backend": backend,
        "clock": wall,
        "cleanup_interval": 1e9,
        **store_options(backend, tmp_path),
    }
