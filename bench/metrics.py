"""What recording the metrics costs a request: the same loop with recording on and off.

Two hot paths, on the memory store, each request answered inline (no store I/O, no mailbox:
the cheapest requests there are, so the recording's share is at its largest):

* the daemon's: ``Server.submit`` of a ``retrieve`` as the wire delivers it (decode, build,
  answer, encode), without the sockets;
* the embedded service's: ``await sessions.retrieve(sid)``.

The floor is the same loop, in the same run, with :class:`~workers.core.metrics.Metrics`'s
recording replaced by no-ops (the two clock reads around a request and the manager's plain
integer counters stay: a few tens of nanoseconds). Each side runs ``--rounds`` times,
alternating, and the best round counts.

    python -m bench.metrics [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from bench.records import Record, throughput
from bench.report import print_table
from workers import open_session_service
from workers.core.metrics import Metrics
from workers.wire.address import Address
from workers.wire.server import Server


@contextlib.contextmanager
def recording_off() -> Iterator[None]:
    """Metrics that record nothing, for the floor."""
    saved = Metrics.observe, Metrics.refused, Metrics.measure
    null = contextlib.nullcontext()
    Metrics.observe = Metrics.refused = lambda self, *args: None  # type: ignore[method-assign]
    Metrics.measure = lambda self, method: null  # type: ignore[method-assign,assignment,return-value]
    try:
        yield
    finally:
        Metrics.observe, Metrics.refused, Metrics.measure = saved  # type: ignore[method-assign]


async def best_rate(
    loop: Callable[[int], Awaitable[None]], requests: int, rounds: int
) -> tuple[float, float]:
    """(rate with recording, rate without), the best of ``rounds`` alternating rounds each."""
    on: list[float] = []
    off: list[float] = []
    for _ in range(rounds):
        for rates, context in ((on, contextlib.nullcontext()), (off, recording_off())):
            with context:
                start = time.perf_counter()
                await loop(requests)
                rates.append(requests / (time.perf_counter() - start))
    return max(on), max(off)


async def measure(requests: int, rounds: int) -> list[Record]:
    async with open_session_service() as sessions:
        sid = await sessions.create({"user_id": "user123", "theme": "dark"})
        server = Server(sessions, [Address("unix", path="/nonexistent/unused.sock")])
        answers: list[Any] = []

        def reply(value: Any, error: Any) -> None:
            answers.append(error)

        async def daemon_path(n: int) -> None:
            for _ in range(n):
                server.submit("retrieve", [sid], reply)
            assert not any(answers), answers[:1]
            answers.clear()
            await trio.lowlevel.checkpoint()

        async def embedded(n: int) -> None:
            for _ in range(n):
                await sessions.retrieve(sid)

        records = []
        for name, loop in (
            ("daemon submit retrieve", daemon_path),
            ("embedded retrieve", embedded),
        ):
            on, off = await best_rate(loop, requests, rounds)
            records.append(throughput(f"{name}, metrics on", on, f"{name}, metrics off", off))
            cost_us = (1 / on - 1 / off) * 1e6
            print(f"{name}: recording costs {cost_us:.2f} us a request")
        return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of each side")
    args = parser.parse_args()
    print_table(trio.run(measure, args.requests, args.rounds))


if __name__ == "__main__":
    main()
