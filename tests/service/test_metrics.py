"""The service's figures for operators: ``stats()``, ``metrics()``, ``tree()``, ``health()`` and
the tree's events, embedded (the daemon's figures are tested in tests/cli/test_operating.py)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from supervisor import SupervisorEvent
from supervisor.testing import crash
from workers import ServiceUnavailable, SessionNotFound, StoreError, open_session_service
from workers.core.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Histogram
from workers.faults import FaultyStore
from workers.stores import make_store


def test_histogram_counts_cumulates_and_estimates_quantiles_like_prometheus() -> None:
    h = Histogram((1.0, 2.0, 4.0))
    for value in (0.5, 1.5, 1.5, 3.0, 100.0):
        h.observe(value)
    assert h.count == 5 and h.sum == 106.5
    assert h.cumulative() == [(1.0, 1), (2.0, 3), (4.0, 4), (math.inf, 5)]
    assert h.quantile(0.5) == pytest.approx(1.75)  # rank 2.5: 1.5 of the 2 in (1, 2]
    assert h.quantile(0.99) == 4.0  # in +Inf: the largest finite bound
    assert Histogram((1.0,)).quantile(0.5) is None
    batches = Histogram(BATCH_BUCKETS, floor=1)
    batches.observe(1)
    assert batches.quantile(0.5) == 1  # a batch is never smaller than 1


def test_a_histogram_survives_its_dict_and_gives_what_came_since() -> None:
    h = Histogram(LATENCY_BUCKETS)
    for ms in (0.1, 0.2, 3.0):
        h.observe(ms / 1000)
    earlier = Histogram.from_dict(h.to_dict(1000, "_ms"), 1000, "_ms")
    assert earlier.counts == h.counts and earlier.sum == pytest.approx(h.sum)
    for _ in range(10):
        h.observe(0.040)
    delta = Histogram.from_dict(h.to_dict(1000, "_ms"), 1000, "_ms").since(earlier)
    assert delta.count == 10
    assert 0.025 < delta.quantile(0.5) <= 0.05


async def test_stats_count_time_and_classify_every_request(tmp_path: Path) -> None:
    async with open_session_service(backend="disk", path=str(tmp_path / "s")) as sessions:
        sid = await sessions.create({"user": "u1"})
        for _ in range(3):
            await sessions.retrieve(sid)
        with pytest.raises(SessionNotFound):
            await sessions.retrieve("0" * 32)
        with pytest.raises(ValueError):
            await sessions.create({"bad": object()})
        figures = await sessions.stats()
    assert figures["sessions"] == 1 and figures["backend"] == "disk"
    create, retrieve = figures["methods"]["create"], figures["methods"]["retrieve"]
    assert (create["count"], create["errors"]) == (2, {"InvalidMetadata": 1})
    assert (retrieve["count"], retrieve["errors"]) == (4, {"SessionNotFound": 1})
    assert retrieve["latency"]["count"] == 4 and retrieve["latency"]["buckets"]["+Inf"] == 4
    assert 0 < retrieve["latency"]["p50_ms"] <= retrieve["latency"]["p99_ms"]
    assert figures["errors"] == {"InvalidMetadata": 1, "SessionNotFound": 1}
    assert figures["requests"] == 6  # stats itself is counted once it returns
    # The disk store's cache: the reads after the create were hits, the unknown id a miss.
    assert figures["cache"]["hits"] >= 3 and figures["cache"]["misses"] >= 1
    assert figures["batches"]["count"] >= 1
    assert figures["batches"]["count"] + figures["batches"]["inline"] >= 5
    assert figures["mailbox"] == 0 and figures["restarts_by_child"] == {}


async def test_restarts_per_child_the_tree_and_the_events(autojump_clock: MockClock) -> None:
    events: list[SupervisorEvent] = []
    async with open_session_service(on_event=events.append) as sessions:
        await crash(sessions.actors["manager"])
        await trio.sleep(0.1)
        figures = await sessions.metrics()
        tree = await sessions.tree()
    # rest_for_one: the manager's crash restarts the cleanup actor after it.
    assert figures["restarts_by_child"] == {"cleanup": 1, "manager": 1}
    assert figures["restarts"] == 2
    manager, cleanup = tree["children"]
    assert (manager["id"], manager["running"], manager["restarts"]) == ("manager", True, 1)
    assert manager["last_exit"].startswith("InjectedFault: ")
    assert (cleanup["last_exit"], manager["mailbox"]) == ("shutdown", 0)
    assert (tree["strategy"], tree["intensity"], tree["period"]) == ("rest_for_one", 5, 10.0)
    restarts = [e.child_id for e in events if e.kind == "restart"]
    assert restarts == ["manager", "cleanup"]


async def test_store_errors_health_and_metrics_that_never_ask_the_store(tmp_path: Path) -> None:
    store = FaultyStore(make_store("disk", path=str(tmp_path / "s")))
    async with open_session_service(store=store, cleanup_interval=1e9) as sessions:
        ready = await sessions.health()
        assert (ready["status"], ready["backend"]) == ("ready", "disk")
        store.fail(["load_mark", "commit", "count"], StoreError("disk on fire"))
        with pytest.raises(StoreError, match="disk on fire"):
            await sessions.health()
        with pytest.raises(StoreError):
            await sessions.create({"n": 1})
        figures = await sessions.metrics()  # still answers: it asks the store nothing
        with pytest.raises(StoreError):
            await sessions.stats()  # counts live sessions: the store must answer
    assert figures["store_errors"] == {"StoreError": 2}
    assert figures["methods"]["health"]["errors"] == {"StoreError": 1}
    assert "sessions" not in figures


async def test_no_manager_is_not_ready(autojump_clock: MockClock) -> None:
    store = FaultyStore(make_store("memory"))
    async with open_session_service(store=store, call_timeout=0.5) as sessions:
        store.hang("open")  # the next manager never finishes opening the store
        await crash(sessions.actors["manager"])
        with pytest.raises(ServiceUnavailable):
            await sessions.health()
        tree = await sessions.tree()
        assert [c["running"] for c in tree["children"]] == [False, False]
        store.clear()
        await trio.sleep(0.1)
        assert (await sessions.health())["status"] == "ready"


async def test_debug_logs_one_line_per_request_and_no_metadata(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="workers.core.metrics")
    async with open_session_service() as sessions:
        sid = await sessions.create({"secret": "hunter2"})
        with pytest.raises(SessionNotFound):
            await sessions.peek("0" * 32)
        await sessions.retrieve(sid)
    lines = [r.getMessage() for r in caplog.records if r.name == "workers.core.metrics"]
    assert [line.split()[:2] for line in lines] == [
        ["request", "create"],
        ["request", "peek"],
        ["request", "retrieve"],
    ]
    assert lines[1].endswith(" ms SessionNotFound") and lines[2].endswith(" ms ok")
    assert not any("hunter2" in line or sid in line for line in lines)


def test_figures_are_plain_json(tmp_path: Path) -> None:
    import json

    async def figures() -> dict[str, Any]:
        async with open_session_service() as sessions:
            await sessions.create()
            return await sessions.stats()

    text = json.dumps(trio.run(figures))
    assert "Infinity" not in text and "NaN" not in text
