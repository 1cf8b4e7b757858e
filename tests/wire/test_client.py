"""The clients against the real daemon: every scenario runs under asyncio and under Trio.

The async client is written on anyio, so each scenario is one coroutine that ``run`` (below)
starts on each event loop in turn; ``SyncClient`` is driven from a worker thread of the same
loop. Time here is real (the daemon is another process), but nothing waits a fixed time.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from helpers.daemon_process import DaemonProcess, serving

from workers import InvalidRequest
from workers.client import SyncClient, connect
from workers.record.errors import (
    InvalidMetadata,
    InvalidTTL,
    ServiceUnavailable,
    SessionNotFound,
    VersionConflict,
)
from workers.record.session import Session

TOKEN = "test-token-0123456789"

pytestmark = pytest.mark.slow


@pytest.fixture(params=["asyncio", "trio"])
def run(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``run(async_fn, *args)``: run a scenario to completion on the test's event loop."""
    return partial(anyio.run, backend=request.param)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon (disk store, with a token) shared by the tests that do not stop it."""
    with serving(tmp_path_factory.mktemp("daemon"), "--token", TOKEN) as d:
        yield d


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon of the test's own, for tests that stop it (killed at teardown if still up)."""
    d = DaemonProcess(tmp_path).start()
    yield d
    d.send_signal(signal.SIGCONT)
    d.close()


class Threaded:
    """A SyncClient seen through async methods (each call on a worker thread), so one scenario
    tests both clients."""

    def __init__(self, client: SyncClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await anyio.to_thread.run_sync(partial(method, *args, **kwargs))

        return call


async def whole_api(c: Any) -> None:
    sid = await c.create({"user_id": "u1", "auth_method": "api_key"}, ttl=60)
    assert len(sid) == 32
    s = await c.retrieve(sid)
    assert isinstance(s, Session)
    assert (s.metadata, s.version, s.timeout_ms) == (
        {"user_id": "u1", "auth_method": "api_key"},
        1,
        60_000,
    )
    assert (await c.peek(sid)).last_accessed == s.last_accessed  # peek does not refresh
    s2 = await c.update(sid, set={"theme": "dark"}, unset=["auth_method"], expected_version=1)
    assert (s2.metadata, s2.version) == ({"user_id": "u1", "theme": "dark"}, 2)
    with pytest.raises(VersionConflict):
        await c.update(sid, set={"theme": "light"}, expected_version=1)
    assert (await c.patch(sid, {"n": 1})).version == 3
    with pytest.raises(TypeError):
        await c.update(sid, lambda m: m)
    await c.touch(sid)
    await c.set_ttl(sid, None)
    assert (await c.peek(sid)).timeout_ms is None
    with pytest.raises(InvalidTTL):
        await c.set_ttl(sid, -1)
    with pytest.raises(InvalidMetadata):
        await c.create({1: "non-string key"})
    new = await c.rotate(sid)
    with pytest.raises(SessionNotFound):
        await c.retrieve(sid)
    assert (await c.peek(new)).metadata["user_id"] == "u1"
    others = [await c.create({"user_id": "u2", "i": i}) for i in range(5)]
    assert await c.delete_where("user_id", "u2") == 5
    with pytest.raises(SessionNotFound):
        await c.peek(others[0])
    ids = {await c.create({"page": i}) for i in range(7)}
    seen: set[str] = set()
    cursor = None
    while True:
        page, cursor = await c.list_page(cursor, 3)
        assert len(page) <= 3
        seen |= {s.id for s in page}
        if cursor is None:
            break
    assert ids | {new} <= seen
    assert {s.id for s in await c.list_sessions()} == seen
    assert await c.count() == len(seen)
    assert await c.cleanup_expired() == 0
    assert await c.get_backend() == "disk"
    stats = await c.stats()
    assert stats["backend"] == "disk"
    assert stats["connections"] >= 1
    assert await c.ping() == "pong"
    assert await c.delete(new) is True
    assert await c.delete(new) is False
    copy = Session("f" * 32, 1, 2, None, {"restored": True}, 4)
    assert await c.import_sessions([copy]) == 1
    assert await c.import_sessions([copy]) == 0
    assert await c.peek(copy.id) == copy
    for i in ids | {copy.id}:
        await c.delete(i)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_whole_api_through_the_async_client(
    daemon: DaemonProcess, transport: str, run: Callable[..., Any]
) -> None:
    async def scenario() -> None:
        async with connect(getattr(daemon, transport), token=TOKEN) as c:
            await whole_api(c)

    run(scenario)


def test_whole_api_through_the_sync_client(daemon: DaemonProcess, run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        with SyncClient(daemon.unix, token=TOKEN) as c:
            await whole_api(Threaded(c))

    run(scenario)


def test_pipelined_calls_on_one_connection(daemon: DaemonProcess, run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with connect(daemon.tcp, token=TOKEN) as c:
            ids: list[str] = []

            async def create(i: int) -> None:
                ids.append(await c.create({"i": i}))

            async with anyio.create_task_group() as tasks:
                for i in range(300):  # far more than max_in_flight: backpressure, not errors
                    tasks.start_soon(create, i)
            sessions = [await c.peek(sid) for sid in ids]
            assert sorted(s.metadata["i"] for s in sessions) == list(range(300))
            assert (await c.stats())["connections"] == 1
            for sid in ids:
                await c.delete(sid)

    run(scenario)


def test_a_cancelled_call_leaves_the_connection_usable(
    daemon: DaemonProcess, run: Callable[..., Any]
) -> None:
    async def scenario() -> None:
        async with connect(daemon.tcp, token=TOKEN) as c:
            for _ in range(20):
                with anyio.move_on_after(0):  # cancelled before or after the request went out
                    await c.count()
            assert await c.ping() == "pong"
            assert (await c.stats())["connections"] == 1  # the same connection throughout

    run(scenario)


def test_oversized_request_is_refused_by_the_client_first(
    daemon: DaemonProcess, run: Callable[..., Any]
) -> None:
    async def scenario() -> None:
        async with connect(daemon.tcp, token=TOKEN, max_message_size=65536) as c:
            with pytest.raises(InvalidRequest):
                await c.create({"blob": "x" * 70_000})
            assert await c.ping() == "pong"

    run(scenario)


def test_client_reconnects_after_a_restart(fresh: DaemonProcess, run: Callable[..., Any]) -> None:
    async def scenario() -> None:
        async with connect(fresh.tcp, reconnect_timeout=30) as c:
            sid = await c.create({"survives": True})
            assert await anyio.to_thread.run_sync(fresh.stop) == 0
            fresh.start(wait=False)
            assert (await c.peek(sid)).metadata == {"survives": True}  # reconnects, backs off

    run(scenario)


def test_a_stopped_daemon_costs_a_call_its_timeout_not_forever(
    fresh: DaemonProcess, run: Callable[..., Any]
) -> None:
    """SIGSTOP: the kernel still accepts connections, but nothing answers them."""

    async def scenario() -> None:
        async with connect(fresh.unix, timeout=0.3) as c:
            sid = await c.create({"kept": True})
            fresh.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(ServiceUnavailable, match=r"did not answer peek within 0\.3 s"):
                    await c.peek(sid)
                with pytest.raises(ServiceUnavailable, match="did not answer auth"):
                    await c.peek(sid)  # a new connection, whose auth gets no answer either
                with pytest.raises(ServiceUnavailable, match="did not answer auth"):
                    async with connect(fresh.tcp, timeout=0.3, reconnect_timeout=0):
                        pass  # pragma: no cover
            finally:
                fresh.send_signal(signal.SIGCONT)
            assert (await c.peek(sid)).metadata == {"kept": True}  # a new connection again
        await anyio.to_thread.run_sync(blocking)

    def blocking() -> None:
        with SyncClient(fresh.tcp, timeout=0.3) as sync:
            fresh.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(ServiceUnavailable, match=r"did not answer count within 0\.3 s"):
                    sync.count()
            finally:
                fresh.send_signal(signal.SIGCONT)
            assert sync.ping() == "pong"

    run(scenario)


def test_lazy_connect_waits_for_the_first_call(tmp_path: Path, run: Callable[..., Any]) -> None:
    d = DaemonProcess(tmp_path)

    async def scenario() -> None:
        async with connect(d.tcp, lazy=True, reconnect_timeout=0) as c:
            with pytest.raises(ServiceUnavailable, match="cannot reach the daemon"):
                await c.ping()
            d.start()
            assert await c.ping() == "pong"

    try:
        run(scenario)
    finally:
        d.close()


def test_timeouts_are_positive_numbers() -> None:
    with pytest.raises(ValueError, match="timeout"):
        SyncClient("tcp://127.0.0.1:1", timeout=0)

    async def scenario() -> None:
        async with connect("tcp://127.0.0.1:1", timeout=-1, lazy=True):
            pass  # pragma: no cover

    with pytest.raises(ValueError, match="timeout"):
        anyio.run(scenario)
