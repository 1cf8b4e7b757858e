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
from helpers import BACKENDS, EPOCH, store_options

pytest_plugins = ["helpers.redis_server"]  # fixtures: redis_url, redis_prefix, private_redis


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
