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
timeout. Each case makes the same number of calls from 1 and from 50 concurrent callers, all
variants alternating, best of several rounds. The ratio is actor / floor; target >= 0.75.

Run ``python bench/actor_calls.py``, or import and call :func:`main` (it returns the rows).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import trio
from trio.lowlevel import Abort, current_task, reschedule, wait_task_rescheduled

import supervisor
from supervisor import Actor

TARGET = 0.75
CALLERS = (1, 50)


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


async def _measure(calls: int, rounds: int) -> list[dict[str, Any]]:
    rows = []
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
        for callers in CALLERS:
            floor = plain = 0.0
            best = dict.fromkeys(paths, 0.0)
            for _ in range(rounds):
                floor = max(floor, await _drive(floor_call, callers, calls))
                plain = max(plain, await _drive(plain_call, callers, calls))
                for path, fn in paths.items():
                    best[path] = max(best[path], await _drive(fn, callers, calls))
            for path, actor in best.items():
                rows.append(
                    {
                        "bench": "actor_calls",
                        "path": path,
                        "callers": callers,
                        "actor_calls_per_s": round(actor),
                        "floor_calls_per_s": round(floor),
                        "ratio": round(actor / floor, 3),
                        "target": TARGET,
                        "ok": actor / floor >= TARGET,
                        "plain_floor_calls_per_s": round(plain),
                        "ratio_vs_plain": round(actor / plain, 3),
                    }
                )
        nursery.cancel_scope.cancel()
    return rows


def main(calls: int = 20_000, rounds: int = 5, quiet: bool = False) -> list[dict[str, Any]]:
    """Run the benchmark; print a line per case unless ``quiet``; return the rows."""
    rows = trio.run(_measure, calls, rounds)
    if not quiet:
        for row in rows:
            print(
                f"{row['path']:<13} {row['callers']:>2} caller(s): "
                f"{row['actor_calls_per_s']:>8,}/s | floor {row['floor_calls_per_s']:>8,}/s "
                f"ratio {row['ratio']:.2f} (target >= {TARGET}: "
                f"{'ok' if row['ok'] else 'BELOW TARGET'}) | plain async-for floor "
                f"{row['plain_floor_calls_per_s']:>8,}/s ratio {row['ratio_vs_plain']:.2f}"
            )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best one counts")
    args = parser.parse_args()
    main(args.calls, args.rounds)
