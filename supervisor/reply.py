"""Reply slots: where the answer to one call goes, and how a call times out cheaply.

A call is one message in the actor's mailbox plus one :class:`ReplySlot`: the caller parks its
own task (``wait_task_rescheduled``) and whoever answers reschedules it with the result. No
channel pair and no Event per call. A slot is settled at most once; anything after that (a second
answer, an answer after the caller gave up or after the actor died) is a silent no-op, so a late
reply can never hurt the actor that sends it.

Timeouts do not use a cancel scope per call either: entering and leaving a scope with a deadline
costs more than the rest of a round trip. Each actor keeps its callers' deadlines in order
(:class:`Deadlines`), watched by one task that fails the overdue slots with
:class:`~supervisor.CallTimeout`. The watcher sleeps until the earliest deadline it knows; a
call only moves that wake-up earlier when its own deadline is sooner, which with one common
timeout almost never happens, and answered slots leave from the front as new calls come. The
same structure lists every caller still waiting, which is how all of them get
:class:`~supervisor.ServerDown` at once when the actor dies.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import outcome
import trio
from trio.lowlevel import Abort, enable_ki_protection, reschedule, wait_task_rescheduled

from .errors import CallTimeout

_GAVE_UP: Any = object()  # the settled state of a slot whose caller stopped waiting
_ANSWERED: Any = object()  # the settled state of a CallbackSlot


class ReplySlot:
    """The answer to one call; the actor gets it from :meth:`Actor.defer_reply`.

    :meth:`reply` answers the caller with a value; :meth:`fail` makes the caller's ``call`` raise
    an exception (a typed error for the caller, not a crash of the actor). The first settlement
    wins: later ones, or any after the caller timed out, was cancelled or saw the actor die,
    do nothing.
    """

    __slots__ = ("_result", "_task", "_waiting")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self._task = task
        self._result: outcome.Outcome[Any] | None = None
        self._waiting = False

    @property
    def done(self) -> bool:
        """True once answered, failed, timed out, or abandoned by its caller."""
        return self._result is not None

    def reply(self, value: Any = None) -> None:
        """Answer the caller: its ``call`` returns ``value``."""
        self._settle(outcome.Value(value))

    def fail(self, error: Exception) -> None:
        """Make the caller's ``call`` raise ``error``."""
        if not isinstance(error, Exception):
            raise TypeError(f"fail() takes an Exception instance, got {error!r}")
        self._settle(outcome.Error(error))

    @enable_ki_protection
    def _settle(self, result: outcome.Outcome[Any]) -> None:
        if self._result is None:
            self._result = result
            if self._waiting:
                self._waiting = False
                reschedule(self._task, result)

    def _give_up(self) -> None:
        if self._result is None:
            self._result = _GAVE_UP

    async def _wait(self) -> Any:
        """Wait until settled, and return or raise the result."""
        if self._result is None:
            return await self._park()
        # Settled while the caller was still sending (a full mailbox).
        return self._result.unwrap()

    def _park(self) -> Awaitable[Any]:
        """Park the calling task until settled; only valid while unsettled. A cancelled caller
        gives the slot up. Not a coroutine itself, to spare the hot path one frame."""
        self._waiting = True
        return wait_task_rescheduled(self._abort)

    def _abort(self, raise_cancel: Any) -> Abort:
        self._waiting = False
        self._result = _GAVE_UP
        return Abort.SUCCEEDED

    def __repr__(self) -> str:
        return f"<ReplySlot {'done' if self.done else 'pending'}>"


class CallbackSlot(ReplySlot):
    """A slot whose answer goes to a function, not to a parked task (``ActorRef.send_request``).

    ``on_reply(value, error)`` is called exactly once: with the value the actor answered and
    None, or with None and the failure (what the actor passed to :meth:`fail`,
    :class:`~supervisor.CallTimeout` or :class:`~supervisor.ServerDown`). It runs in the task
    that settles the slot (the actor, its deadline watcher, or the code that ends it), so it
    must be quick and must not raise: an exception from it propagates into that task,
    crashing the actor that answered.
    """

    __slots__ = ("_on_reply",)

    def __init__(self, on_reply: Callable[[Any, Exception | None], object]) -> None:
        # No task: nobody parks on this slot, so _park and _abort are never used.
        self._result = None
        self._on_reply = on_reply

    # No Outcome is built: settling is on the hot path of every pipelined request.
    @enable_ki_protection
    def reply(self, value: Any = None) -> None:
        if self._result is None:
            self._result = _ANSWERED
            self._on_reply(value, None)

    @enable_ki_protection
    def fail(self, error: Exception) -> None:
        if not isinstance(error, Exception):
            raise TypeError(f"fail() takes an Exception instance, got {error!r}")
        if self._result is None:
            self._result = _ANSWERED
            self._on_reply(None, error)


class Deadlines:
    """The pending calls of one actor, by deadline, and the task that times them out.

    Calls made with one timeout arrive in deadline order, so they go in a deque: O(1) in, O(1)
    out. A deadline earlier than the last one queued (a shorter timeout, a caller that waited
    for a name) goes in a heap instead. Settled slots leave either from the front.
    """

    def __init__(self, describe: Callable[[], str]) -> None:
        self._describe = describe  # names the actor in CallTimeout messages
        self._queue: deque[tuple[float, ReplySlot]] = deque()
        self._heap: list[tuple[float, int, ReplySlot]] = []
        self._order = itertools.count()  # heap ties break by arrival, never by comparing slots
        self._pop_heap = functools.partial(heapq.heappop, self._heap)
        self._lanes: tuple[tuple[Sequence[tuple[Any, ...]], Callable[[], tuple[Any, ...]]], ...] = (
            (self._queue, self._queue.popleft),
            (self._heap, self._pop_heap),
        )
        self._wake_at = math.inf
        self._scope: trio.CancelScope | None = None

    @enable_ki_protection
    def watch(self, slot: ReplySlot, deadline: float) -> None:
        queue = self._queue
        while queue and queue[0][-1]._result is not None:
            queue.popleft()
        if not queue or deadline >= queue[-1][0]:
            queue.append((deadline, slot))
        else:
            self._expire(self._heap, self._pop_heap, -math.inf)
            heapq.heappush(self._heap, (deadline, next(self._order), slot))
        if deadline < self._wake_at:
            self._wake_at = deadline
            if self._scope is not None:
                self._scope.deadline = deadline

    def _expire(
        self, lane: Sequence[tuple[Any, ...]], pop: Callable[[], tuple[Any, ...]], now: float
    ) -> None:
        """Drop settled slots from the front of a lane (entries end with their slot), failing
        those due by ``now``."""
        while lane and (lane[0][-1]._result is not None or lane[0][0] <= now):
            slot = pop()[-1]
            if slot._result is None:
                slot.fail(CallTimeout(f"no reply from {self._describe()} within the timeout"))

    async def expire_forever(self) -> None:
        """Fail each slot whose deadline has passed with CallTimeout. Runs until cancelled."""
        while True:
            with trio.CancelScope(deadline=self._wake_at) as self._scope:
                await trio.sleep_forever()
            now = trio.current_time()
            for lane, pop in self._lanes:
                self._expire(lane, pop, now)
            self._wake_at = min([lane[0][0] for lane, _ in self._lanes if lane], default=math.inf)

    def fail_all(self, error: Callable[[], Exception]) -> None:
        """Settle every pending slot with a fresh ``error()``; both lanes are left empty."""
        for lane, _ in self._lanes:
            for entry in lane:
                if entry[-1]._result is None:
                    entry[-1].fail(error())
        self._queue.clear()
        self._heap.clear()
