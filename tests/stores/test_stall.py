"""What bounds a stall of the Trio thread: the stall guard of the stores' calls run on it.

The guard's clock and the kernel's counts are injected, so a "slow disk" here is a fake timer
that jumps while a call runs: no real time, no real slow disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from workers import open_session_service
from workers.record.session import Session
from workers.stores.base import Put
from workers.stores.lmdb import LmdbStore
from workers.stores.stall import StallGuard, Usage

T0 = 1_700_000_000_000


class FakeKernel:
    """A timer, and the counts getrusage would give, that a test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.blocked = 0
        self.io = 0

    def timer(self) -> float:
        return self.now

    def usage(self) -> Usage:
        return Usage(self.blocked, self.io)

    def call(self, seconds: float, *, blocked: int = 0, io: int = 0) -> object:
        """A call that takes ``seconds`` and makes the kernel count that much."""

        def run() -> str:
            self.now += seconds
            self.blocked += blocked
            self.io += io
            return "done"

        return run


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel()


def guard(kernel: FakeKernel) -> StallGuard:
    return StallGuard("test store", timer=kernel.timer, usage=kernel.usage)


def test_a_call_that_read_the_disk_slowly_turns_the_fast_path_off_for_a_while(
    kernel: FakeKernel,
) -> None:
    g = guard(kernel)
    assert g.run(kernel.call(0.0005, io=1)) == "done"  # fast, though it read: fine
    assert g.allows
    assert g.run(kernel.call(0.010, io=2, blocked=2)) == "done"  # slow, and it read the disk
    assert not g.allows and g.trips == 1
    kernel.now += 0.999
    assert not g.allows
    kernel.now += 0.002
    assert g.allows  # after the backoff (1 s), the fast path is back


def test_a_call_slow_without_waiting_for_the_kernel_is_not_the_disk(kernel: FakeKernel) -> None:
    # Preempted by other programs on a busy machine: slow, but no sign of the disk.
    g = guard(kernel)
    for _ in range(5):
        g.run(kernel.call(0.050))
    assert g.allows and g.trips == 0


def test_blocking_without_reading_counts_the_second_time_within_a_backoff(
    kernel: FakeKernel,
) -> None:
    # A write the kernel throttled, or a wait for the GIL: one alone proves nothing.
    g = guard(kernel)
    g.run(kernel.call(0.005, blocked=1))
    assert g.allows
    kernel.now += 2.0  # long after: the first one is forgotten
    g.run(kernel.call(0.005, blocked=1))
    assert g.allows
    kernel.now += 0.5
    g.run(kernel.call(0.005, blocked=1))
    assert not g.allows and g.trips == 1


def test_a_disk_that_stays_slow_backs_off_longer_each_time(kernel: FakeKernel) -> None:
    g = guard(kernel)
    windows = []
    for _ in range(8):
        g.run(kernel.call(0.010, io=1))
        windows.append(round(g.off_until - kernel.now))
        kernel.now = g.off_until  # the first call allowed again is slow again
    assert windows == [1, 2, 4, 8, 16, 32, 60, 60]
    kernel.now += 600  # a quiet spell: the next slow call starts from the shortest window
    g.run(kernel.call(0.010, io=1))
    assert round(g.off_until - kernel.now) == 1


async def test_a_slow_disk_sends_the_stores_calls_to_its_thread(
    tmp_path: Path, kernel: FakeKernel
) -> None:
    # One slow call on the Trio thread, then every call goes to the store's thread until the
    # backoff is over: the service keeps answering, the event loop no longer waits on the disk.
    store = LmdbStore(tmp_path / "store")
    store.stall_guard = guard(kernel)
    calls: list[float] = []
    store.stall_guard.record = calls.append
    load = store._load

    def slow_load(ids: list[str]) -> dict[str, Session]:
        kernel.now += 0.050
        kernel.io += 1  # a page read from the disk
        return load(ids)

    with trio.fail_after(30):
        async with open_session_service(store=store, cache_size=0) as sessions:
            sid = await sessions.create({"n": 1})
            assert store.loads_now(1)
            store._load = slow_load  # type: ignore[method-assign]
            assert (await sessions.peek(sid)).metadata == {"n": 1}  # on the Trio thread: slow
            assert len(calls) >= 1 and calls[-1] >= 0.049
            assert not store.loads_now(1) and not store.commits_now(1)
            on_trio_thread = len(calls)
            for _ in range(3):  # answered all the same, by the store's thread
                assert (await sessions.peek(sid)).metadata == {"n": 1}
            assert len(calls) == on_trio_thread
            kernel.now += 1.0
            store._load = load  # type: ignore[method-assign]
            assert store.loads_now(1)  # the disk is fast again: back on the Trio thread
            assert store.commit_now([Put(Session("x", T0, T0, None, {}, 1), None)]) == [True]
