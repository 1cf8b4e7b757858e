"""Following a Sentinel failover from the sentinels' own announcements.

coredis asks the sentinels where the primary is only when it opens a connection. During a
failover that is not enough: from the moment the leading sentinel tells the replica to stop
replicating (``SLAVEOF NO ONE``) until it demotes the old primary (seconds later: sentinels
poll with ``INFO``), the old primary goes on accepting writes on the connections it has, and
every one of them is dropped when it becomes a replica. Acknowledged, then lost.

So a sentinel store subscribes to every sentinel's event channels and:

- on ``+failover-state-send-slaveof-noone`` (the replica is about to be promoted) refuses
  writes, with :class:`~workers.ServiceUnavailable`, until the failover ends, at most
  :data:`PAUSE_LIMIT` seconds (a sentinel that dies mid-failover must not stop writes for good);
- on ``+switch-master`` (the new primary is announced) closes every pooled connection, so the
  next command asks the sentinels again and finds the new primary, and takes writes again;
- on a failover abort takes writes again, on the primary it had.

Writes acknowledged by the old primary between its replica's promotion and the store hearing
of it (the time a pub/sub message takes) can still be lost; ``wait_replicas`` closes that gap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import trio

from ..record.errors import ServiceUnavailable

log = logging.getLogger(__name__)

#: Seconds writes stay refused after a promotion began, if no end of the failover is heard.
PAUSE_LIMIT = 10.0
PROMOTING = "+failover-state-send-slaveof-noone"
SWITCHED = "+switch-master"
ABORTED = (
    "-failover-abort-not-elected",
    "-failover-abort-no-good-slave",
    "-failover-abort-slave-timeout",
    "+failover-end-for-timeout",
)
CHANNELS = (PROMOTING, SWITCHED, *ABORTED)


def master_of(channel: str, data: str) -> str | None:
    """The name of the primary a sentinel event is about, as the sentinels call it."""
    words = data.split()
    if channel == SWITCHED:  # <name> <old ip> <old port> <new ip> <new port>
        return words[0] if words else None
    if "@" in words:  # <type> <name> <ip> <port> @ <master name> <master ip> <master port>
        at = words.index("@")
        return words[at + 1] if at + 1 < len(words) else None
    if len(words) > 1 and words[0] == "master":  # master <name> <ip> <port>
        return words[1]
    return None


class FailoverWatch:
    """What one sentinel store knows of a failover of its primary ``service`` (module doc).

    ``disconnect`` closes the store's pooled connections to the primary. :meth:`event` is the
    sans-IO part; :meth:`run` feeds it from the sentinels' pub/sub.
    """

    def __init__(self, service: str, disconnect: Callable[[], None]) -> None:
        self.service = service
        self._disconnect = disconnect
        #: Trio time until which writes are refused, None when they are taken.
        self.paused_until: float | None = None

    def check_writable(self, where: str) -> None:
        """Raise ServiceUnavailable while a promotion is under way."""
        if self.paused_until is not None:
            if trio.current_time() < self.paused_until:
                raise ServiceUnavailable(f"Redis at {where} is failing over: writes wait")
            self.paused_until = None

    def event(self, channel: str, data: str) -> None:
        """Act on one sentinel event."""
        if master_of(channel, data) != self.service:
            return
        if channel == PROMOTING:
            log.warning("Redis Sentinel is promoting a replica of %s: writes wait", self.service)
            self.paused_until = trio.current_time() + PAUSE_LIMIT
        elif channel == SWITCHED:
            log.warning("Redis Sentinel: the primary %s is now %s", self.service, data)
            self._disconnect()
            self.paused_until = None
        elif self.paused_until is not None:
            log.warning("Redis Sentinel gave up failing %s over (%s)", self.service, channel)
            self.paused_until = None

    async def run(self, sentinels: Iterable[Any]) -> None:
        """Listen to every sentinel (coredis clients) until cancelled."""
        async with trio.open_nursery() as nursery:
            for sentinel in sentinels:
                nursery.start_soon(self._listen, sentinel)

    async def _listen(self, sentinel: Any) -> None:
        while True:
            try:
                async with sentinel.pubsub(
                    channels=list(CHANNELS), ignore_subscribe_messages=True
                ) as messages:
                    async for message in messages:
                        self.event(_text(message["channel"]), _text(message["data"]))
            except Exception as exc:  # this sentinel is down: the others still tell us
                log.warning("cannot follow failovers through %r (%s)", sentinel, leaf(exc))
                await trio.sleep(1.0)


def leaf(exc: BaseException) -> BaseException:
    """The first plain exception inside ``exc``'s exception groups (coredis's task groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
