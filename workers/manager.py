"""The session manager: the one actor that owns the store, answering requests in batches.

Every request is an :class:`~workers.operations.Operation`. The manager does not answer a call
when it arrives: it queues the operation with a deferred reply slot, and when its mailbox is
empty (or the queue is full) it runs the queued operations as one batch: one ``load``, the
operations applied in arrival order, one ``commit`` (one store transaction: group commit), and
only then the replies. Under load a batch carries many requests, so the cost of a transaction
is shared; with a single caller a batch is that caller's request alone.

Failures, by kind:

- an operation's own error (``SessionNotFound``, ``UpdateFailed``...) goes to its caller only;
- a store's error (``StoreError``, ``ServiceUnavailable`` from a shared store) goes to every
  caller of the batch, and nothing of the batch was written (commit is one transaction);
- anything else is a bug or an injected fault: the actor crashes, every waiting caller gets
  ``ServerDown`` at once (the service turns it into ``ServiceUnavailable``), the supervisor
  starts a new manager, which re-opens the store. Committed writes survive it.

The store is opened in ``init`` and closed in ``terminate`` (which runs after a crash too), so
each incarnation holds the store's single-owner lock exactly while it lives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from supervisor import Actor, ReplySlot

from .errors import SessionError, StoreError
from .operations import Limits, Operation, View
from .stores.base import Put, Store

log = logging.getLogger("workers.manager")

#: How often an operation whose conditional write lost a race is retried before giving up.
MAX_ATTEMPTS = 8


@dataclass(slots=True)
class ManagerSettings:
    limits: Limits
    #: Wall clock in seconds since the epoch (injectable for tests).
    clock: Callable[[], float]
    #: Most operations in one batch (one store transaction).
    max_batch: int = 256


@dataclass(slots=True)
class _Queued:
    op: Operation
    slot: ReplySlot
    attempts: int = 0


class SessionManager(Actor):
    """Owns one store; see the module docstring. Requests are Operation instances."""

    async def init(self, store: Store, settings: ManagerSettings) -> None:
        self.store = store
        self.settings = settings
        self.queue: list[_Queued] = []
        await store.open()

    async def terminate(self, reason: object) -> None:
        await self.store.close()

    async def handle_call(self, request: Operation) -> None:
        self.queue.append(_Queued(request, self.defer_reply()))
        if len(self.queue) >= self.settings.max_batch:
            await self._run_batch()

    async def handle_drained(self) -> None:
        while self.queue:
            await self._run_batch()

    async def _run_batch(self) -> None:
        size = self.settings.max_batch
        batch, self.queue = self.queue[:size], self.queue[size:]
        view = View(self.store, int(self.settings.clock() * 1000), self.settings.limits)

        ready: list[_Queued] = []
        for item in batch:
            try:
                await item.op.read(view)
            except SessionError as exc:
                item.slot.fail(exc)
            else:
                ready.append(item)
        try:
            view.sessions.update(await self.store.load({i for q in ready for i in q.op.ids()}))
        except SessionError as exc:
            return _fail_all(ready, exc)

        applied = []
        for item in ready:
            start = len(view.writes)
            try:
                result = item.op.apply(view)
            except SessionError as exc:
                item.slot.fail(exc)
            else:
                applied.append((item, result, start, len(view.writes)))

        outcomes: list[bool] = []
        if view.writes:
            try:
                outcomes = await self.store.commit(view.writes)
            except SessionError as exc:
                return _fail_all([item for item, *_ in applied], exc)

        for item, result, start, end in applied:
            mine = outcomes[start:end]
            writes = zip(view.writes[start:end], mine, strict=True)
            lost_race = any(not ok and isinstance(w, Put) for w, ok in writes)
            if not lost_race:
                item.slot.reply(item.op.finish(result, mine))
            elif item.attempts + 1 < MAX_ATTEMPTS:
                item.attempts += 1
                self.queue.append(item)
            else:
                item.slot.fail(StoreError("the session kept changing under this write; retry"))


def _fail_all(items: list[_Queued], exc: SessionError) -> None:
    log.warning("store failed a batch of %d requests: %s", len(items), exc)
    for item in items:
        # A fresh instance per caller: one exception object raised in many tasks would
        # collect all their tracebacks.
        item.slot.fail(type(exc)(str(exc)))
