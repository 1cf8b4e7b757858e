"""Actor ``call`` round trips per second, next to a bare request/reply floor timed in the same run.

The floor is a bare request/reply over one Trio memory channel: a server task that reads
``(request, slot)`` pairs and answers each through the cheapest correct per-request reply, a
two-field slot on ``wait_task_rescheduled`` / ``reschedule`` (no Event, no channel per request).
It uses the same two channel shortcuts as the actor (``send_nowait`` while the channel has room,
``receive_nowait`` while requests are queued), so the ratio prices only what the actor adds: a
timeout on every call, liveness and self-call checks, ``ServerDown`` bookkeeping, deferred
replies, a ``handle_call`` per request. For context it also times the plain idiom
(``await send()`` / ``async for``), which yields once per request on both sides.

The actor returns its request from ``handle_call``; it is called through ``ActorRef.call`` and
through ``supervisor.call(name)``, which resolves the name in the registry at every call (what
a service that follows its actors across restarts does). Every call has the default 5 s
timeout. Each case makes the same number of calls from 1 and from 50 concurrent callers (or the
caller counts given), all variants alternating, best of several rounds. The ratio is actor /
floor; the target, >= 0.75, is set at 1 and 50 callers. The floor's own rate against the plain
idiom is reported too, and ``run.py bench`` reuses the floor for the memory store's target.

    python bench/actor_calls.py [--calls N] [--rounds N] [--callers 1,50]

or import and call :func:`run` (it returns :mod:`bench.records` records).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import outcome
import trio
from trio.lowlevel import Abort, current_task, reschedule, wait_task_rescheduled

if __package__ in (None, ""):  # run as ``python bench/actor_calls.py``: import from this repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import supervisor
from bench.records import Record, throughput
from bench.report import print_table
from supervisor import Actor

TARGET = 0.75
CALLERS = (1, 50)
#: The caller counts the issue sets the target at; other counts (the plot's) are only reported.
TARGET_CALLERS = (1, 50)
FLOOR = "channel request/reply"


def floor_name(callers: int) -> str:
    """The floor's name in the records at ``callers`` concurrent callers."""
    return f"{FLOOR} x{callers}"


def channel_floor(records: Sequence[Record], callers: Sequence[int]) -> dict[int, float]:
    """The floor's rate at each of ``callers``, read back from :func:`run`'s records."""
    rates = {r["floor_name"]: r["floor_ops_per_s"] for r in records}
    return {n: rates[floor_name(n)] for n in callers}


class _Slot:
    """The floor's per-request reply: park the caller, reschedule it with the answer."""

    __slots__ = ("result", "task", "waiting")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.result: Any = None
        self.waiting = False

    def reply(self, value: Any) -> None:
        # The server can answer while the caller is still inside send(); keep it for later.
        if self.waiting:
            reschedule(self.task, outcome.Value(value))
        else:
            self.result = outcome.Value(value)

    async def wait(self) -> Any:
        if self.result is not None:
            return self.result.unwrap()
        self.waiting = True
        return await wait_task_rescheduled(lambda _: Abort.SUCCEEDED)


async def _floor_server(receive: trio.MemoryReceiveChannel[tuple[Any, _Slot]]) -> None:
    while True:
        try:
            request, slot = receive.receive_nowait()
        except trio.WouldBlock:
            request, slot = await receive.receive()
        slot.reply(request)


async def _plain_server(receive: trio.MemoryReceiveChannel[tuple[Any, _Slot]]) -> None:
    async for request, slot in receive:
        slot.reply(request)


class Echo(Actor):
    async def handle_call(self, request: Any) -> Any:
        return request


async def _drive(call: Callable[[Any], Awaitable[Any]], callers: int, calls: int) -> float:
    """Calls per second when ``callers`` tasks share ``calls`` calls."""

    async def caller(n: int) -> None:
        for i in range(n):
            await call(i)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller, calls // callers)
    return (calls // callers * callers) / (time.perf_counter() - start)


async def _measure(calls: int, rounds: int, callers: Sequence[int]) -> list[Record]:
    records = []
    async with trio.open_nursery() as nursery:
        send, receive = trio.open_memory_channel[tuple[Any, _Slot]](Echo.mailbox_size)
        nursery.start_soon(_floor_server, receive)
        plain_send, plain_receive = trio.open_memory_channel[tuple[Any, _Slot]](Echo.mailbox_size)
        nursery.start_soon(_plain_server, plain_receive)

        async def floor_call(request: Any) -> Any:
            slot = _Slot(current_task())
            try:
                send.send_nowait((request, slot))
            except trio.WouldBlock:
                await send.send((request, slot))
            return await slot.wait()

        async def plain_call(request: Any) -> Any:
            slot = _Slot(current_task())
            await plain_send.send((request, slot))
            return await slot.wait()

        ref = await nursery.start(functools.partial(Echo.start, name="echo"))
        paths = {
            "ActorRef.call": ref.call,
            "call(name)": functools.partial(supervisor.call, "echo"),
        }
        for n in callers:
            floor = plain = 0.0
            best = dict.fromkeys(paths, 0.0)
            for _ in range(rounds):
                floor = max(floor, await _drive(floor_call, n, calls))
                plain = max(plain, await _drive(plain_call, n, calls))
                for path, fn in paths.items():
                    best[path] = max(best[path], await _drive(fn, n, calls))
            target = TARGET if n in TARGET_CALLERS else None
            for path, actor in best.items():
                records.append(throughput(f"{path} x{n}", actor, floor_name(n), floor, target))
            # What the floor's two shortcuts buy over the plain idiom, for context.
            records.append(throughput(floor_name(n), floor, f"plain async-for x{n}", plain))
        nursery.cancel_scope.cancel()
    return records


def run(calls: int = 20_000, rounds: int = 5, callers: Sequence[int] = CALLERS) -> list[Record]:
    """Time every path at each of ``callers``: a record per (path, callers), plus the floor's."""
    return trio.run(_measure, calls, rounds, callers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best one counts")
    parser.add_argument(
        "--callers", default="1,50", help="comma-separated concurrent caller counts (default 1,50)"
    )
    args = parser.parse_args()
    print_table(run(args.calls, args.rounds, tuple(int(n) for n in args.callers.split(","))))


if __name__ == "__main__":
    main()
