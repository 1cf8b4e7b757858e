"""Fault injection for tests: crash actors now, or on a schedule.

Supervision is only as good as the crashes it has survived, so this module lets a test (yours
too) make any actor crash on demand, through the actor machinery itself: the actor's serving
loop is interrupted wherever it waits, the injected exception becomes the exit reason, every
waiting caller gets :class:`~supervisor.ServerDown`, ``terminate`` runs, and the supervisor
restarts the child and counts the restart against its intensity, exactly as for a real bug::

    from supervisor.testing import crash, crash_repeatedly, random_intervals

    async def test_survives_a_crash(autojump_clock):
        async with open_session_service() as sessions:
            sid = await sessions.create({"user": "u1"})
            await crash(sessions.actors["manager"])     # returns once it is dead
            assert (await sessions.peek(sid)).metadata == {"user": "u1"}

    # in a nursery: crash the cleanup actor every 0.1-0.5 s, reproducibly
    nursery.start_soon(crash_repeatedly, "my-actor", random_intervals(0.1, 0.5, seed=7))

Targets are an :class:`~supervisor.ActorRef` (that one incarnation) or a registered name
(whatever incarnation holds it at the time, so a schedule follows an actor across restarts).
The default exception is :class:`InjectedFault`, so a log shows the crash was on purpose.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Hashable, Iterable, Iterator

import trio

from .actor import ActorRef, exit_actor
from .errors import ExitReason, NoProc


class InjectedFault(RuntimeError):
    """The default exception :func:`crash` injects: a crash put there by a test."""


async def crash(
    target: ActorRef | Hashable, exc: Exception | None = None, *, name_wait: float = 0.0
) -> ExitReason:
    """Crash the actor ``target`` with ``exc`` (default :class:`InjectedFault`) now.

    :func:`supervisor.exit_actor` with a default reason that says the crash was on purpose:
    returns once the incarnation is dead, with its exit reason; waits up to ``name_wait``
    seconds for an actor to hold the name ``target``; raises :class:`~supervisor.NoProc` if
    nothing runs under ``target``.
    """
    reason = exc if exc is not None else InjectedFault(f"injected crash of {target!r}")
    return await exit_actor(target, reason, name_wait=name_wait)


async def crash_repeatedly(
    target: ActorRef | Hashable,
    intervals: Iterable[float],
    *,
    exc: type[Exception] = InjectedFault,
    on_crash: Callable[[ActorRef | Hashable], None] | None = None,
) -> int:
    """Crash ``target`` after each of ``intervals`` seconds; returns how many crashes it made.

    Each crash is ``exc(message)``; ``on_crash(target)`` is called after each (to count them
    while the schedule runs). A name is resolved at each crash; while no actor holds it
    (its supervisor is restarting it), the schedule waits for the next incarnation. A ref
    ends the schedule once its incarnation is dead. Run it in a nursery and cancel it to stop
    early, or give finite ``intervals``::

        nursery.start_soon(crash_repeatedly, "db", itertools.repeat(1.0, 5))  # 5 crashes, 1 s apart
    """
    crashes = 0
    for delay in intervals:
        await trio.sleep(delay)
        try:
            await crash(
                target, exc(f"injected crash {crashes + 1} of {target!r}"), name_wait=math.inf
            )
        except NoProc:
            break  # only a ref's incarnation can be gone for good
        crashes += 1
        if on_crash is not None:
            on_crash(target)
    return crashes


def random_intervals(
    low: float, high: float, *, seed: int | None = None, count: int | None = None
) -> Iterator[float]:
    """Delays drawn uniformly from ``[low, high]`` by ``random.Random(seed)``: reproducible.

    Infinite unless ``count`` is given. For :func:`crash_repeatedly`.
    """
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got {low!r}, {high!r}")
    rng = random.Random(seed)
    draws = (rng.uniform(low, high) for _ in itertools.count())
    return draws if count is None else itertools.islice(draws, count)


__all__ = ["InjectedFault", "crash", "crash_repeatedly", "random_intervals"]
