"""Supervisors: OTP's supervisor behaviour on Trio's structured concurrency.

Theory of operation
-------------------
``await nursery.start(sup.run)`` opens one nursery that holds every child, starts the children
left to right through ``nursery.start`` (so each is ready before the next begins), and reports
itself started. From then on a single loop, in the supervisor's own task, takes one item at a
time from its inbox: either "this child exited on its own" or a management request
(``start_child``, ``terminate_child``, ...). All structural changes happen in that loop, as in
OTP, where the supervisor is one process handling one message at a time; so no locks, and a
management call never races a restart. What follows an exit is decided by the pure rules in
:mod:`supervisor.restart`; this module only carries the decisions out and reports them.

Each child runs in its own task under a cancel scope owned by the supervisor. Once the child has
started, that scope is *shielded*: cancelling the supervisor does not reach the children all at
once. Instead the supervisor, cancelled or giving up, stops them itself, right to left, each
with its own grace (cancel, then wait up to the grace while the child cleans up in
:func:`~supervisor.cleanup_scope`). Only ``Exception`` is a crash. ``Cancelled``,
``KeyboardInterrupt`` and ``SystemExit`` stop the whole tree in order and leave ``run``
unchanged; they are never restarted. ``run`` raises its own errors (:class:`StartError`,
:class:`SupervisorShutdown`) bare, not in an exception group: the nursery body catches whatever
ends the run, stops the children, and raises it after the nursery has closed.

Trio cannot kill a task. A child still running past its grace is reported (``OVERDUE``) and then
waited for, because no task may outlive its supervisor.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar, overload

import trio
from trio.lowlevel import current_task

from .child import ChildCounts, ChildInfo, ChildSpec, Restart
from .errors import (
    ChildExists,
    ChildNotFound,
    ChildRunning,
    ExitReason,
    NoProc,
    StartError,
    SupervisorShutdown,
    TooManyChildren,
    exit_reason,
    unwrap,
)
from .events import EventKind, Reporter, SupervisorEvent
from .grace import Lifetime, enter_lifetime
from .reply import ReplySlot
from .restart import (
    Action,
    AutoShutdown,
    ChildState,
    Exit,
    RestartIntensity,
    RestartPolicy,
    Strategy,
)

T = TypeVar("T")

# How long past its grace a stopping child may take to unwind before it is reported overdue:
# cancellation lands within a few schedule points, not at the same instant as the deadline.
_OVERDUE_MARGIN = 0.1


class _Incarnation:
    """One start of a child: its task's cancel scope and how that task ended."""

    __slots__ = ("child", "done", "lifetime", "reason", "scope", "stopping", "value")

    def __init__(self, child: _Child) -> None:
        self.child = child
        self.scope = trio.CancelScope()
        self.lifetime = Lifetime(child.spec.grace)
        self.done = trio.Event()
        self.reason: ExitReason = "normal"
        self.stopping = False  # the supervisor asked it to stop; its exit is not news
        self.value: Any = None


class _Child:
    __slots__ = ("current", "last_exit", "spec", "starts")

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.current: _Incarnation | None = None
        self.starts = 0
        self.last_exit: ExitReason | None = None

    def state(self) -> ChildState:
        spec = self.spec
        return ChildState(spec.id, spec.restart, spec.significant, self.current is not None)


class _States(Sequence[ChildState]):
    """The children as the restart rules see them, built only where the rules look: a
    one_for_one decision about one of 10,000 dynamic children reads one of them."""

    def __init__(self, children: list[_Child]) -> None:
        self._children = children

    def __len__(self) -> int:
        return len(self._children)

    @overload
    def __getitem__(self, index: int) -> ChildState: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ChildState]: ...
    def __getitem__(self, index: int | slice) -> ChildState | Sequence[ChildState]:
        if isinstance(index, slice):
            return [child.state() for child in self._children[index]]
        return self._children[index].state()


class _ChildStatus:
    """The ``task_status`` a child sees. When the child has really started (its task has moved
    into the supervisor's nursery), it shields the child so that only its supervisor stops it."""

    __slots__ = ("_incarnation", "_nursery", "_status", "_task", "moved")

    def __init__(
        self, status: trio.TaskStatus[Any], nursery: trio.Nursery, incarnation: _Incarnation
    ) -> None:
        self._status = status
        self._nursery = nursery
        self._incarnation = incarnation
        self._task = current_task()
        self.moved = False

    def started(self, value: Any = None) -> None:
        self._incarnation.value = value
        self._status.started(value)
        # Not moved means the start was cancelled: the child must stay cancellable with it.
        if self._task.parent_nursery is self._nursery:
            self._incarnation.scope.shield = True
            self.moved = True


class _Run:
    """The state of one run of a supervisor; ``run`` builds a fresh one every time, so a
    restarted supervisor starts from its original children with an empty restart history."""

    def __init__(self, nursery: trio.Nursery, policy: RestartPolicy) -> None:
        self.nursery = nursery
        self.policy = policy
        self.children: list[_Child] = []  # in start order
        self.by_id: dict[Hashable, _Child] = {}
        self.inbox_send, self.inbox = trio.open_memory_channel[Any](math.inf)
        self.fatal: BaseException | None = None  # a child raised KeyboardInterrupt & co.

    def add(self, spec: ChildSpec) -> _Child:
        child = self.by_id[spec.id] = _Child(spec)
        self.children.append(child)
        return child

    def remove(self, child_id: Hashable) -> None:
        self.children.remove(self.by_id.pop(child_id))


class _Supervision:
    """What static and dynamic supervisors share: the run loop, starting and stopping children,
    reporting, and the management calls that mean the same for both."""

    _dynamic = False

    def __init__(
        self,
        *,
        intensity: int,
        period: float,
        name: str | None,
        on_event: Callable[[SupervisorEvent], object] | None,
    ) -> None:
        RestartIntensity(intensity, period)  # validate now, not at the first crash
        self.intensity = intensity
        self.period = period
        self.name = name if name is not None else f"{type(self).__name__}@{id(self):#x}"
        self._report = Reporter(self.name, on_event)
        self._run: _Run | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {'running' if self._run else 'stopped'}>"

    # -- what subclasses provide ------------------------------------------------------------

    def _policy(self) -> RestartPolicy:
        raise NotImplementedError

    def _initial_specs(self) -> Iterable[ChildSpec]:
        return ()

    # -- running ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every child in order, then supervise them until stopped or out of restarts.

        Use as ``await nursery.start(sup.run)``, which returns this supervisor once every child
        has started. Raises :class:`StartError` if a child fails to start (the started ones are
        stopped first, right to left), :class:`SupervisorShutdown` when restarts exceed the
        intensity, and passes ``Cancelled``, ``KeyboardInterrupt`` and ``SystemExit`` through
        after stopping every child. Returns normally only on auto shutdown.
        """
        if self._run is not None:
            raise RuntimeError(f"{self!r} is already running; start it again once run() returns")
        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            run = self._run = _Run(nursery, self._policy())
            try:
                for spec in self._initial_specs():
                    await self._start(run, run.add(spec))
                task_status.started(self)
                await self._supervise(run)
            except BaseException as exc:
                error = exc
            finally:
                await self._stop_all(run)
                self._run = None
        if run.fatal is not None:
            error = run.fatal
        if error is not None:
            raise error

    async def _supervise(self, run: _Run) -> None:
        while True:
            item = await run.inbox.receive()
            if isinstance(item, _Incarnation):
                if await self._on_exit(run, item):
                    return
            else:
                await self._serve_request(run, *item)
            if run.fatal is not None:
                raise run.fatal

    async def _child_main(
        self, run: _Run, incarnation: _Incarnation, *, task_status: trio.TaskStatus[Any]
    ) -> None:
        """The task of one incarnation: run the child, then report how it ended."""
        enter_lifetime(incarnation.lifetime)
        status = _ChildStatus(task_status, run.nursery, incarnation)
        reason: ExitReason
        try:
            with incarnation.scope:
                await incarnation.child.spec.start(task_status=status)
        except BaseException as exc:
            if not status.moved:
                raise  # a failed start: nursery.start reports it to _start
            reason = exit_reason(exc)
        else:
            if not status.moved:
                return  # returned without started(): nursery.start raises for us
            reason = "shutdown" if incarnation.stopping else "normal"
        incarnation.reason = reason
        incarnation.done.set()
        if not incarnation.stopping:
            run.inbox_send.send_nowait(incarnation)

    async def _start(self, run: _Run, child: _Child) -> Any:
        incarnation = _Incarnation(child)
        try:
            value = await run.nursery.start(
                self._child_main, run, incarnation, name=f"{self.name}/{child.spec.id}"
            )
        except Exception as exc:
            cause = unwrap(exc)
            child.last_exit = cause
            self._report(EventKind.START_FAILED, child.spec.id, cause)
            raise StartError(child.spec.id, cause) from cause
        child.current = incarnation
        child.starts += 1
        self._report(EventKind.START if child.starts == 1 else EventKind.RESTART, child.spec.id)
        return value

    async def _stop(self, run: _Run, child: _Child) -> None:
        """Stop one child: cancel it, give it its grace, wait. Always completes (shielded)."""
        incarnation = child.current
        if incarnation is None:
            return
        if not incarnation.done.is_set():
            incarnation.stopping = True
            deadline = trio.current_time() + child.spec.grace
            incarnation.lifetime.stop_by(deadline)
            incarnation.scope.cancel()
            with trio.CancelScope(shield=True):
                with trio.move_on_at(deadline + _OVERDUE_MARGIN):
                    await incarnation.done.wait()
                if not incarnation.done.is_set():
                    self._report(EventKind.OVERDUE, child.spec.id)
                    await incarnation.done.wait()
        self._record_exit(run, child, incarnation)

    async def _stop_all(self, run: _Run) -> None:
        for child in reversed(run.children):
            await self._stop(run, child)
        run.inbox_send.close()
        while True:
            try:
                item = run.inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if not isinstance(item, _Incarnation):
                item[1].fail(NoProc(f"supervisor {self.name!r} stopped before the request ran"))

    def _record_exit(self, run: _Run, child: _Child, incarnation: _Incarnation) -> ExitReason:
        reason = incarnation.reason
        child.current = None
        child.last_exit = reason
        self._report(EventKind.EXIT, child.spec.id, reason)
        if isinstance(reason, BaseException) and not isinstance(reason, Exception):
            run.fatal = run.fatal or reason
        return reason

    # -- the restart rules, carried out --------------------------------------------------------

    async def _on_exit(self, run: _Run, incarnation: _Incarnation) -> bool:
        """A child exited on its own. True when the supervisor should stop (auto shutdown)."""
        child = incarnation.child
        if child.current is not incarnation:
            return False  # it was stopped meanwhile, and that stop recorded its exit
        reason = self._record_exit(run, child, incarnation)
        if run.fatal is not None:
            raise run.fatal
        ended = Exit.CRASH if isinstance(reason, Exception) else Exit.NORMAL
        return await self._apply(run, child, ended, reason)

    async def _apply(self, run: _Run, child: _Child, ended: Exit, reason: ExitReason) -> bool:
        while True:
            decision = run.policy.on_exit(
                _States(run.children), run.children.index(child), ended, trio.current_time()
            )
            if decision.action is Action.SHUTDOWN:
                self._report(EventKind.ESCALATE, child.spec.id, reason)
                cause = reason if isinstance(reason, BaseException) else None
                raise SupervisorShutdown(self.name, child.spec.id, reason) from cause
            for child_id in decision.stop:
                await self._stop(run, run.by_id[child_id])
            for child_id in decision.delete:
                run.remove(child_id)
            if decision.action is Action.AUTO_SHUTDOWN:
                self._report(EventKind.AUTO_SHUTDOWN, child.spec.id, reason)
                return True
            try:
                for child_id in decision.start:
                    await self._start(run, run.by_id[child_id])
            except StartError as failure:
                # OTP's try_again: a restart that cannot start is a crash of that child.
                child, ended, reason = run.by_id[failure.child_id], Exit.CRASH, failure.cause
            else:
                return False

    # -- management ---------------------------------------------------------------------------

    async def _serve_request(
        self, run: _Run, operation: Callable[[_Run], Awaitable[Any]], slot: ReplySlot
    ) -> None:
        try:
            result = await operation(run)
        except Exception as exc:
            slot.fail(exc)
        except BaseException:
            slot.fail(NoProc(f"supervisor {self.name!r} stopped during the request"))
            raise
        else:
            slot.reply(result)

    async def _request(self, operation: Callable[[_Run], Awaitable[T]]) -> T:
        """Run ``operation`` in the supervisor's loop, between exits, and return its result.

        As in OTP, a caller that is cancelled stops waiting, but the operation still happens.
        """
        run = self._running()
        slot = ReplySlot(current_task())
        try:
            run.inbox_send.send_nowait((operation, slot))
        except trio.ClosedResourceError:
            raise NoProc(f"supervisor {self.name!r} is stopping") from None
        result: T = await slot._wait()
        return result

    def _find(self, run: _Run, child_id: Hashable) -> _Child:
        child = run.by_id.get(child_id)
        if child is None:
            raise ChildNotFound(self.name, child_id)
        return child

    async def _add_and_start(self, run: _Run, spec: ChildSpec) -> Any:
        run.policy.check(spec)
        existing = run.by_id.get(spec.id)
        if existing is not None:
            raise ChildExists(self.name, spec.id, existing.current is not None)
        child = run.add(spec)
        try:
            return await self._start(run, child)
        except BaseException:
            run.remove(spec.id)  # a child that never started is not kept (OTP)
            raise

    def _running(self) -> _Run:
        if self._run is None:
            raise NoProc(f"supervisor {self.name!r} is not running")
        return self._run

    async def terminate_child(self, child_id: Hashable) -> None:
        """Stop a child with its shutdown policy. Its spec stays (so ``restart_child`` can start
        it again), except for temporary children and those of a dynamic supervisor, which are
        forgotten. Raises :class:`ChildNotFound`."""

        async def operation(run: _Run) -> None:
            child = self._find(run, child_id)
            await self._stop(run, child)
            if self._dynamic or child.spec.restart is Restart.TEMPORARY:
                run.remove(child_id)

        await self._request(operation)

    def which_children(self) -> list[ChildInfo]:
        """Every child in start order. Raises :class:`NoProc` if the supervisor is not running."""
        return [
            ChildInfo(
                id=child.spec.id,
                running=child.current is not None,
                restarts=max(child.starts - 1, 0),
                last_exit=child.last_exit,
                value=child.current.value if child.current is not None else None,
                restart=child.spec.restart,
            )
            for child in self._running().children
        ]

    def count_children(self) -> ChildCounts:
        """How many child specs there are and how many run. :class:`NoProc` if not running."""
        children = self._running().children
        return ChildCounts(len(children), sum(child.current is not None for child in children))


class Supervisor(_Supervision):
    """A supervisor of a fixed, ordered list of children (more can be added while it runs).

    ``intensity`` restarts are allowed within any ``period`` seconds; one more and the
    supervisor stops every child and raises :class:`SupervisorShutdown`. ``auto_shutdown``
    (OTP 24) lets significant children end the supervisor when they exit for good; then ``run``
    returns normally. ``on_event`` receives every :class:`~supervisor.events.SupervisorEvent`.

    A child's start must not call back into its own supervisor's management API: the supervisor
    is busy starting that child, so the call would wait forever (as in OTP).
    """

    def __init__(
        self,
        children: Iterable[ChildSpec] = (),
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        intensity: int = 3,
        period: float = 5.0,
        name: str | None = None,
        auto_shutdown: AutoShutdown = AutoShutdown.NEVER,
        on_event: Callable[[SupervisorEvent], object] | None = None,
    ) -> None:
        super().__init__(intensity=intensity, period=period, name=name, on_event=on_event)
        self.strategy = strategy
        self.auto_shutdown = auto_shutdown
        self._specs = tuple(children)
        policy = self._policy()
        seen: set[Hashable] = set()
        for spec in self._specs:
            if spec.id in seen:
                raise ValueError(f"duplicate child id {spec.id!r}; ids must be unique")
            seen.add(spec.id)
            policy.check(spec)

    def _policy(self) -> RestartPolicy:
        return RestartPolicy(
            self.strategy, RestartIntensity(self.intensity, self.period), self.auto_shutdown
        )

    def _initial_specs(self) -> Iterable[ChildSpec]:
        return self._specs

    async def start_child(self, spec: ChildSpec) -> Any:
        """Add ``spec`` after the existing children and start it; returns its started value.

        Raises :class:`ChildExists` if the id is taken and :class:`StartError` if it fails to
        start (then it is not kept). Added children last until this run of the supervisor ends.
        """
        return await self._request(functools.partial(self._add_and_start, spec=spec))

    async def restart_child(self, child_id: Hashable) -> Any:
        """Start a stopped child again (its spec kept after ``terminate_child`` or a normal exit);
        returns its started value. Raises :class:`ChildNotFound`, :class:`ChildRunning`,
        :class:`StartError`."""

        async def operation(run: _Run) -> Any:
            child = self._find(run, child_id)
            if child.current is not None:
                raise ChildRunning(self.name, child_id)
            return await self._start(run, child)

        return await self._request(operation)

    async def delete_child(self, child_id: Hashable) -> None:
        """Forget a stopped child's spec. Raises :class:`ChildNotFound`, :class:`ChildRunning`."""

        async def operation(run: _Run) -> None:
            if self._find(run, child_id).current is not None:
                raise ChildRunning(self.name, child_id)
            run.remove(child_id)

        await self._request(operation)


class DynamicSupervisor(_Supervision):
    """A supervisor for many children of one template (OTP's ``simple_one_for_one``).

    ``start_child(*args)`` starts ``template.start(*args, task_status=...)`` under a fresh id
    (an int, returned); each child is restarted one_for_one by the template's restart type and
    forgotten when it stops for good. At most ``max_children`` run at once
    (:class:`TooManyChildren` beyond). Children are stopped right to left like any others.
    """

    _dynamic = True

    def __init__(
        self,
        template: ChildSpec,
        *,
        max_children: int | None = None,
        intensity: int = 3,
        period: float = 5.0,
        name: str | None = None,
        on_event: Callable[[SupervisorEvent], object] | None = None,
    ) -> None:
        super().__init__(intensity=intensity, period=period, name=name, on_event=on_event)
        if max_children is not None and max_children < 0:
            raise ValueError(f"max_children must be >= 0 or None, got {max_children!r}")
        self.template = template
        self.max_children = max_children
        self._ids = itertools.count(1)
        self._policy().check(template)

    def _policy(self) -> RestartPolicy:
        return RestartPolicy(
            Strategy.ONE_FOR_ONE, RestartIntensity(self.intensity, self.period), dynamic=True
        )

    async def start_child(self, *args: Any) -> int:
        """Start one more child with ``args``; returns its id (for ``terminate_child``).

        Its started value is in :meth:`which_children`. Raises :class:`TooManyChildren` and
        :class:`StartError`.
        """

        async def operation(run: _Run) -> int:
            if self.max_children is not None and len(run.children) >= self.max_children:
                raise TooManyChildren(
                    f"supervisor {self.name!r} already has max_children={self.max_children} "
                    "children; wait for one to stop or raise max_children"
                )
            child_id = next(self._ids)
            spec = dataclasses.replace(
                self.template, id=child_id, start=functools.partial(self.template.start, *args)
            )
            await self._add_and_start(run, spec)
            return child_id

        return await self._request(operation)
