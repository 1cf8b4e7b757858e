"""The sweeper: every ``cleanup_interval`` seconds it has the manager sweep expired sessions.

It is the tree's ``cleanup`` child (the seed's periodic cleanup).

A sweep is a series of bounded batches (``sweep_batch`` sessions each), each one request to the
manager, so other requests keep flowing while a large sweep runs. Expired sessions are already
invisible before a sweep; sweeping only frees their space.

A sweep that fails because the store or the manager is unavailable is logged and tried again at
the next interval; it never crashes the actor, so a sick store cannot turn the cleanup into a
restart loop that takes the service down.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from supervisor import Actor

from ..record.errors import ServiceUnavailable, StoreError

log = logging.getLogger(__name__)

SWEEP = "sweep"


class Sweeper(Actor):
    """Sweeps on a timer; ``cast(ref, "sweep")`` asks for one now."""

    async def init(self, sweep: Callable[[], Awaitable[int]], interval: float) -> None:
        self.sweep = sweep
        self.interval = interval
        self.timer = self.send_after(interval, SWEEP)

    async def handle_cast(self, message: object) -> None:
        if message != SWEEP:
            raise ValueError(f"the cleanup actor understands only {SWEEP!r}, got {message!r}")
        self.timer.cancel()
        try:
            removed = await self.sweep()
        except (ServiceUnavailable, StoreError) as exc:
            log.warning("sweep failed, retrying in %.0f s: %s", self.interval, exc)
        else:
            if removed:
                log.info("swept %d expired sessions", removed)
        self.timer = self.send_after(self.interval, SWEEP)
