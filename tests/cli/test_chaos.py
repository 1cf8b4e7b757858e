"""Bounded chaos runs (issue 6): crashes and kills under load lose no acknowledged write.

These run on real time (a daemon is another process, and the embedded run is a soak), about
five seconds each.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers.daemon_process import run_verb

from workers.cli.chaos import ChaosConfig, run_chaos
from workers.stores import Write
from workers.stores.memory import MemoryStore

#: Every test here starts processes (see the slow marker in pyproject.toml).
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL)  # hundreds of crash reports are the point here


async def test_embedded_chaos_loses_nothing() -> None:
    report = await run_chaos(ChaosConfig(duration=5, backend="memory", seed=1))
    assert report.ok, report.table()
    assert report.lost_writes == report.overdue_calls == 0
    assert report.crashes >= 5 and report.restarts >= report.crashes
    assert report.errors["ServiceUnavailable"] > 0  # the crashes were felt
    assert report.sessions_checked > 1000


async def test_embedded_chaos_on_disk_loses_nothing(tmp_path: Path) -> None:
    config = ChaosConfig(duration=3, backend="disk", path=str(tmp_path / "store"), seed=2)
    report = await run_chaos(config)
    assert report.ok, report.table()
    assert report.crashes >= 3 and report.sessions_checked > 100


def test_daemon_chaos_survives_sigkills() -> None:
    done = run_verb(
        "chaos", "--daemon", "--backend", "disk", "--duration", "5", "--seed", "3", "--json"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["lost_writes"] == 0 and report["overdue_calls"] == 0
    assert report["kills"] >= 2 and report["restarts"] == report["kills"]
    assert report["crashes"] > 0  # the actors inside the daemon were crashed too
    assert report["sessions_checked"] > 100
    assert "chaos " in done.stderr  # the progress line


def test_daemon_chaos_refuses_the_memory_backend() -> None:
    done = run_verb("chaos", "--daemon", "--backend", "memory", "--duration", "1")
    assert done.returncode == 2
    assert "--daemon needs" in done.stderr


class ForgetfulStore(MemoryStore):
    """Acknowledges every 50th commit without writing it: the ledger must notice."""

    commits = 0

    def commit_now(self, writes: Sequence[Write]) -> list[bool]:
        # The memory store's commit runs this too: it is the one place its writes happen.
        self.commits += 1
        if self.commits % 50 == 0:
            return [True] * len(writes)
        return super().commit_now(writes)


async def test_the_ledger_catches_a_lost_write() -> None:
    report = await run_chaos(ChaosConfig(duration=1, store=ForgetfulStore(), seed=4))
    assert not report.ok
    assert report.lost_writes > 0 and report.problems
