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

#: The virtual wall clock starts here (late 2025), so timestamps look like real ones.
EPOCH = 1_764_000_000.0

BACKENDS = ["memory", "disk"]


@pytest.fixture
def vclock() -> trio.testing.MockClock:
    """Trio's clock for the test (pytest-trio uses a fixture that returns a Clock)."""
    return trio.testing.MockClock(autojump_threshold=0.2)


@pytest.fixture
def wall(vclock: trio.testing.MockClock) -> Callable[[], float]:
    """The service's wall clock: seconds since the epoch, moving with Trio's virtual time."""
    return lambda: EPOCH + trio.current_time()


def store_options(backend: str, tmp_path: Path) -> dict[str, Any]:
    """What ``open_session_service`` needs, besides ``backend``, to open a fresh store."""
    if backend == "memory":
        return {}
    return {"path": str(tmp_path / f"{backend}-store")}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def options(backend: str, tmp_path: Path, wall: Callable[[], float]) -> dict[str, Any]:
    """Options for a fresh service on ``backend`` with the virtual wall clock."""
    return {"backend": backend, "clock": wall, **store_options(backend, tmp_path)}
