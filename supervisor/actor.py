"""Actors: OTP's gen_server on Trio.

An :class:`Actor` is a task that owns some state and serves messages from its mailbox one at a
time, so its state needs no locks. ``call`` sends a request and waits for the answer that
``handle_call`` returns; ``cast`` sends a message to ``handle_cast`` and does not wait.

Theory of operation
-------------------
Each start of an actor (an *incarnation*) is a :class:`_Process`: a fresh actor instance, a
bounded Trio memory channel as its mailbox, and a heap of the callers still waiting for an
answer (:class:`~supervisor.reply.Deadlines`). A call puts ``(request, slot)`` in the mailbox
and parks on the slot; the loop hands the request to ``handle_call`` and settles the slot with
what it returns, unless the actor took the slot with :meth:`Actor.defer_reply` to answer later.

When the incarnation ends, for any reason, it first *dies*: it frees its name, cancels its
timers and settles every waiting caller (queued, in progress or deferred) with
:class:`ServerDown`. Only then does ``terminate`` run, in a shielded window bounded by the
child's shutdown grace (:func:`~supervisor.cleanup_scope`). Callers that resolve the actor by
name meanwhile wait (``name_wait``) for the next incarnation to register.

Exceptions: an ``Exception`` from ``init`` is a start failure; from any handler, ``handle_drained``
or ``terminate`` it is a crash (the exit reason), and it propagates out of the actor's task for
its supervisor to see. Cancellation is a shutdown. Nothing is caught and forgotten.

Ending an actor from outside (:func:`exit_actor`, and :mod:`supervisor.testing` on top of it)
uses one hook, :meth:`_Process.inject_crash`: it cancels the serving loop wherever it is
waiting and raises the given exception in its place, so the incarnation dies exactly as if a
handler had raised it.

The mailbox is drained without a schedule point per message (``receive_nowait``), yielding
once every ``_BATCH`` messages, so a busy actor answers a burst of callers in one pass.

Inline answers
--------------
An actor that overrides :meth:`Actor.handle_call_inline` can answer a call in the caller's own
task, with no message, no park and no wake-up, when it is *idle*: alive, its mailbox empty and
its loop waiting for mail. Then every earlier message has been handled and no handler is part
way through, so a synchronous handler that runs now sees exactly the state the next
``handle_call`` would, and nothing can interleave with it. ``_Process.idle`` is set by the loop
just before it waits for mail and cleared by every send (a message handed straight to a
waiting receiver never shows in the mailbox's buffer, so the buffer alone cannot tell).

A handler that waits on I/O may also let inline answers in while it waits
(:meth:`Actor.answering`): the actor then counts as idle until the wait ends or a message
arrives, and it is up to ``handle_call_inline`` to decline what the waiting handler is busy
with. Callers answered at once keep the Trio thread busy, and a worker thread the handler
waits on needs the GIL too: an actor that does this bounds how much it answers meanwhile.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, ClassVar, TypeVar

import outcome
import trio
from trio.lowlevel import cancel_shielded_checkpoint, checkpoint_if_cancelled, current_task

from .child import ChildSpec
from .errors import CallTimeout, ExitReason, NoProc, ServerDown, exit_reason
from .grace import cleanup_scope
from .registry import lookup, register, unregister, wait_for
from .reply import CallbackSlot, Deadlines, ReplySlot

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
_BATCH = 64  # messages handled back to back before the loop lets other tasks run


class Actor:
    """Subclass this and override the handlers you need.

    Start it under a supervisor with ``MyActor.child_spec("id", *init_args, name="...")``, or
    directly with ``await nursery.start(MyActor.start, *init_args)``; both give an
    :class:`ActorRef`. Every start builds a fresh instance, so a restart begins from clean state.

    ``mailbox_size`` bounds the mailbox. When it is full, callers wait for room (within their
    timeout); nothing is ever dropped. The default, 1024, absorbs bursts from many callers while
    keeping memory bounded.
    """

    mailbox_size: ClassVar[int] = 1024

    __process: _Process

    async def init(self, *args: Any) -> None:
        """Set up state. Runs before the actor is considered started; raising fails the start."""

    async def handle_call(self, request: Any) -> Any:
        """Answer ``request``; the return value is the caller's result (see :meth:`defer_reply`)."""
        raise NotImplementedError(f"{type(self).__name__} has no handle_call (got {request!r})")

    def handle_call_inline(self, request: Any) -> outcome.Outcome[Any] | None:
        """Optionally answer ``request`` at once, in the caller's task (see "Inline answers").

        ``call`` and ``send_request`` try it first whenever the actor is idle; OTP has no such
        callback, the nearest thing is a public ETS table that clients read without a message.
        It is a plain function: it must not block, and it may read and change the state just
        as ``handle_call`` may. Return ``outcome.Value(answer)`` or ``outcome.Error(exc)`` (what
        ``slot.reply`` and ``slot.fail`` would give the caller), or None, having changed
        nothing, to let the request go through the mailbox as usual. An exception raised from
        it is a crash of the actor, as from ``handle_call``: the caller gets ServerDown.
        """
        return None

    async def handle_cast(self, message: Any) -> None:
        """Handle a cast, or a message from :meth:`send_after`."""
        raise NotImplementedError(f"{type(self).__name__} has no handle_cast (got {message!r})")

    async def handle_drained(self) -> None:
        """Called when one or more messages were handled and the mailbox is now empty.

        Override it to batch the work of many queued calls (group commit): defer their replies
        in ``handle_call``, then do the work once here and answer them all. Also called before
        a normal :meth:`stop` if messages were handled since the last call. An exception here
        crashes the actor. Messages that arrive while it runs are handled after it returns.
        """

    async def terminate(self, reason: ExitReason) -> None:
        """Release resources. Called once on every exit after a successful ``init``.

        ``reason`` is ``"normal"``, ``"shutdown"`` or the crash. It runs shielded, bounded by the
        child's shutdown grace, after every waiting caller has had :class:`ServerDown`.
        """

    @property
    def ref(self) -> ActorRef:
        """This incarnation's own :class:`ActorRef`."""
        return self.__process.ref

    @property
    def callers(self) -> int:
        """How many tasks are in :meth:`ActorRef.call` to this incarnation right now: sent and
        waiting for the answer, or answered inline and not yet resumed.

        In :meth:`handle_call_inline` it counts the caller being answered, so 1 means that
        caller is alone, and 0 means the request came from :meth:`ActorRef.send_request`
        (whose sender does not wait: a loop that may have more requests to send right away).
        An actor that batches work may answer inline only what gains nothing from company.
        """
        return self.__process.callers

    def defer_reply(self) -> ReplySlot:
        """Answer the current call later (OTP's ``{noreply, State}`` and ``gen_server:reply``).

        Call it inside ``handle_call``; what that ``handle_call`` returns is then ignored, and the
        caller waits (within its timeout) until the slot is settled with ``slot.reply(value)`` or
        ``slot.fail(exc)``. If the actor dies first, the caller gets :class:`ServerDown`.
        """
        process = self.__process
        slot = process.current
        if slot is None:
            raise RuntimeError(
                "defer_reply() is only valid inside handle_call, once per call; "
                "keep the slot it returned to answer that call"
            )
        process.current = None
        return slot

    def send_after(self, delay: float, message: Any) -> TimerHandle:
        """Deliver ``message`` to this actor's ``handle_cast`` after ``delay`` seconds.

        OTP's ``erlang:send_after`` to self. The timer belongs to this incarnation: it never
        fires into a restarted actor. Cancel it with the returned handle's ``cancel()``.
        """
        process = self.__process
        timer = TimerHandle()
        if process.alive:
            process.nursery.start_soon(process.deliver_after, timer, delay, message)
        else:
            timer.cancel()
        return timer

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run ``fn(*args)`` as a task of this incarnation, alongside its serving loop.

        Like a process linked to the actor in OTP: it is cancelled when the incarnation dies,
        and an exception from it crashes the actor, as from a handler (callers get
        :class:`ServerDown`, ``terminate`` runs, the supervisor sees the crash). It runs
        between the actor's handlers, never inside one, so what it changes of the actor's
        state must be consistent at every await of theirs. For work the actor must not wait
        for in its handlers: an I/O call whose answer it handles when it comes.
        """
        process = self.__process
        process.nursery.start_soon(process.linked, fn, args)

    async def answering(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` inside a handler, answering calls inline meanwhile.

        For a handler that waits on I/O and whose state stays consistent for
        :meth:`handle_call_inline` while it waits: the actor counts as idle for the wait, as
        long as its mailbox stays empty (a message that arrives ends that at once, as always,
        and it is handled after this handler). So a request that needs nothing the handler is
        busy with need not wait for it; ``handle_call_inline`` decides what that is.
        """
        process = self.__process
        if process.inline is None or process.queued():
            return await awaitable
        process.idle = True
        try:
            return await awaitable
        finally:
            process.idle = False

    def stop(self) -> None:
        """Exit normally (reason ``"normal"``) once the current message has been handled.

        Calls still queued get :class:`ServerDown`. A permanent child is restarted after a
        normal exit; a transient or temporary one is not.
        """
        self.__process.stopping = True

    @classmethod
    def child_spec(
        cls, id: Hashable, *args: Any, name: Hashable | None = None, **child_options: Any
    ) -> ChildSpec:
        """A :class:`ChildSpec` that starts ``cls`` with ``init(*args)``, registered as ``name``.

        ``child_options`` are ChildSpec's: ``restart``, ``shutdown``, ``significant``.
        """
        return ChildSpec(id, functools.partial(cls.start, *args, name=name), **child_options)

    @classmethod
    async def start(
        cls,
        *args: Any,
        name: Hashable | None = None,
        task_status: trio.TaskStatus[ActorRef] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one incarnation: for ``nursery.start``; it reports the :class:`ActorRef`.

        Raises :class:`~supervisor.errors.NameTaken` if ``name`` belongs to a running actor.
        """
        actor = cls()
        process = _Process(actor, name, cls.mailbox_size)
        actor.__process = process
        async with trio.open_nursery() as nursery:
            process.nursery = nursery
            nursery.start_soon(process.deadlines.expire_forever)
            await process.live(args, task_status)


class TimerHandle:
    """A pending :meth:`Actor.send_after`; ``cancel()`` stops it if it has not fired yet."""

    __slots__ = ("_scope",)

    def __init__(self) -> None:
        self._scope = trio.CancelScope()

    def cancel(self) -> None:
        self._scope.cancel()

    @property
    def cancelled(self) -> bool:
        return self._scope.cancel_called


class ActorRef:
    """The address of one actor incarnation (OTP's pid).

    It stays valid after the actor dies, but then every call raises :class:`NoProc`; a restarted
    actor has a new ref. To follow an actor across restarts, address it by name with the
    module-level :func:`call` and :func:`cast`.
    """

    __slots__ = ("_process",)

    def __init__(self, process: _Process) -> None:
        self._process = process

    @property
    def name(self) -> Hashable | None:
        return self._process.name

    @property
    def alive(self) -> bool:
        return self._process.alive

    @property
    def message_queue_len(self) -> int:
        """Messages waiting in the mailbox (Erlang's ``process_info(Pid, message_queue_len)``),
        for observers; 0 once the actor is dead."""
        process = self._process
        return process.queued() if process.alive else 0

    async def call(self, request: Any, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Send ``request`` to ``handle_call`` and return its answer.

        Raises :class:`NoProc` if the actor is not running, :class:`ServerDown` if it dies
        before answering, :class:`CallTimeout` after ``timeout`` seconds (``math.inf`` waits
        forever), or whatever the actor passed to ``slot.fail``.
        """
        process = self._process
        if not process.alive:
            raise NoProc(f"{self!r} is not running")
        process.callers += 1
        try:
            if process.idle and process.inline is not None:
                # Trio's pattern for an operation that may finish at once: a cancel point
                # before it, a schedule point after it, so a caller looping on calls still
                # lets others run.
                await checkpoint_if_cancelled()  # never yields, so the actor is still idle
                answer = process.answer_inline(request)
                if answer is not None:
                    await cancel_shielded_checkpoint()
                    return answer.unwrap()
            # The hot path: one slot, one deadline in the heap, one send, one park.
            task = current_task()
            if task is process.task:
                raise RuntimeError(f"{self!r} called itself; that would deadlock")
            slot = ReplySlot(task)
            deadline = process.now() + timeout
            process.deadlines.watch(slot, deadline)
            try:
                process.post_nowait((request, slot))
            except trio.WouldBlock:
                await process.send_when_room(request, slot, deadline)
                return await slot._wait()
            # Nothing ran since the send, so the slot is still unsettled.
            return await slot._park()
        finally:
            process.callers -= 1

    def send_request(
        self,
        request: Any,
        on_reply: Callable[[Any, Exception | None], object],
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Send ``request`` to ``handle_call`` without waiting; ``on_reply`` gets the answer.

        OTP's ``gen_server:send_request/2``, with the answer delivered to a function rather than
        to the mailbox: for a task that multiplexes many calls (a connection with pipelined
        requests) and should not park once per call. ``on_reply(value, error)`` is called
        exactly once: with what ``handle_call`` answered, or with the error (what the actor
        failed the call with, :class:`CallTimeout`, :class:`ServerDown`); see
        :class:`~supervisor.reply.CallbackSlot` for its contract.

        Raises :class:`NoProc` if the actor is not running and :class:`trio.WouldBlock` if its
        mailbox is full; either way nothing was sent and ``on_reply`` will not be called (use
        :meth:`call`, which waits for room, or try again later).

        An actor that answers inline (:meth:`Actor.handle_call_inline`) calls ``on_reply``
        before this returns, in the caller's task.
        """
        process = self._process
        if not process.alive:
            raise NoProc(f"{self!r} is not running")
        if process.idle and process.inline is not None:
            try:
                answer = process.answer_inline(request)
            except ServerDown as exc:
                on_reply(None, exc)
                return
            if answer is not None:
                if isinstance(answer, outcome.Value):
                    on_reply(answer.value, None)
                else:
                    on_reply(None, answer.error)
                return
        slot = CallbackSlot(on_reply)
        process.post_nowait((request, slot))
        process.deadlines.watch(slot, process.now() + timeout)

    async def cast(self, message: Any) -> None:
        """Send ``message`` to ``handle_cast``; waits only if the mailbox is full.

        Raises :class:`NoProc` if the actor is not running, :class:`ServerDown` if it died
        while this waited for room. A cast queued when the actor dies is dropped, as in OTP.
        """
        process = self._process
        if not process.alive:
            raise NoProc(f"{self!r} is not running")
        try:
            await process.post((message, None))
        except trio.BrokenResourceError:
            raise ServerDown(self, process.reason) from None

    def __repr__(self) -> str:
        process = self._process
        label = repr(process.name) if process.name is not None else type(process.actor).__name__
        return f"<ActorRef {label} {'alive' if process.alive else 'dead'}>"


class _Process:
    """One incarnation of an actor: mailbox, pending callers, timers, and how it ended."""

    __slots__ = (
        "_recv",
        "actor",
        "alive",
        "callers",
        "current",
        "deadlines",
        "died",
        "idle",
        "injected",
        "inline",
        "name",
        "now",
        "nursery",
        "reason",
        "ref",
        "send",
        "send_nowait",
        "serving",
        "stopping",
        "task",
    )

    def __init__(self, actor: Actor, name: Hashable | None, mailbox_size: int) -> None:
        self.actor = actor
        self.name = name
        self.ref = ActorRef(self)
        self.alive = False
        self.callers = 0  # tasks in ActorRef.call to this incarnation (Actor.callers)
        self.reason: ExitReason = "normal"  # meaningful once alive is False
        self.stopping = False
        self.current: ReplySlot | None = None  # the call handle_call is answering
        self.task: trio.lowlevel.Task | None = None
        self.serving = trio.CancelScope()  # around serve(); cancelled by inject_crash
        self.injected: Exception | None = None
        self.died = trio.Event()
        #: Waiting for mail with an empty mailbox: inline answers are allowed (see the module).
        self.idle = False
        overridden = type(actor).handle_call_inline is not Actor.handle_call_inline
        self.inline = actor.handle_call_inline if overridden else None
        self.nursery: trio.Nursery  # set by Actor.start before anything runs
        self.deadlines = Deadlines(self.ref.__repr__)
        mailbox, self._recv = trio.open_memory_channel[tuple[Any, ReplySlot | None]](mailbox_size)
        # Bound once, so the hot path skips the lookups.
        self.send_nowait = mailbox.send_nowait
        self.send = mailbox.send
        self.now = trio.lowlevel.current_clock().current_time

    def queued(self) -> int:
        """Messages waiting in the mailbox (all of them while a handler runs: nobody receives)."""
        return self._recv.statistics().current_buffer_used

    def post_nowait(self, message: tuple[Any, ReplySlot | None]) -> None:
        """Put ``message`` in the mailbox or raise trio.WouldBlock; it ends idleness at once
        (before any other task runs), so no inline answer can overtake it."""
        self.send_nowait(message)
        self.idle = False

    async def post(self, message: tuple[Any, ReplySlot | None]) -> None:
        """Put ``message`` in the mailbox, waiting for room (a full mailbox is never idle)."""
        await checkpoint_if_cancelled()
        try:
            self.post_nowait(message)
        except trio.WouldBlock:
            await self.send(message)
        else:
            await cancel_shielded_checkpoint()

    def answer_inline(self, request: Any) -> outcome.Outcome[Any] | None:
        """The actor's inline answer to ``request``, or None; only while ``idle``."""
        try:
            return self.inline(request)  # type: ignore[misc]
        except Exception as exc:
            self.inject_crash(exc)
            raise ServerDown(self.ref, exc) from None

    async def send_when_room(self, request: Any, slot: ReplySlot, deadline: float) -> None:
        try:
            with trio.move_on_at(deadline) as waited:
                await self.send((request, slot))  # the mailbox is full: not idle
        except trio.BrokenResourceError:
            return  # it died while we waited; dying settled the slot with ServerDown
        except BaseException:
            slot._give_up()
            raise
        if waited.cancelled_caught:
            slot.fail(CallTimeout(f"{self.ref!r}'s mailbox stayed full until the timeout"))

    async def linked(self, fn: Callable[..., Awaitable[object]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            self.inject_crash(exc)

    async def deliver_after(self, timer: TimerHandle, delay: float, message: Any) -> None:
        with timer._scope:
            await trio.sleep(delay)
            await self.post((message, None))

    async def live(self, args: tuple[Any, ...], task_status: trio.TaskStatus[ActorRef]) -> None:
        actor = self.actor
        self.task = current_task()
        if self.name is not None:
            register(self.name, self.ref)
        self.alive = True
        try:
            await actor.init(*args)
        except BaseException as exc:
            self.die(exit_reason(exc))
            raise
        task_status.started(self.ref)
        reason: ExitReason = "normal"
        try:
            with self.serving:
                await self.serve()
            if self.injected is not None:
                raise self.injected
        except BaseException as exc:
            reason = exit_reason(exc)
            raise
        finally:
            self.die(reason)
            with cleanup_scope():
                await actor.terminate(reason)

    async def serve(self) -> None:
        actor = self.actor
        receive_nowait = self._recv.receive_nowait
        handle_call = actor.handle_call
        handle_cast = actor.handle_cast
        drained = actor.handle_drained
        if type(actor).handle_drained is Actor.handle_drained:
            drained = None  # skip awaiting a no-op after every burst
        undrained = False
        budget = _BATCH
        while not self.stopping:
            try:
                request, slot = receive_nowait()
            except trio.WouldBlock:
                if undrained and drained is not None:
                    undrained = False
                    await drained()
                    continue
                budget = _BATCH
                self.idle = True
                try:
                    request, slot = await self._recv.receive()
                finally:
                    self.idle = False
            else:
                budget -= 1
                if not budget:
                    budget = _BATCH
                    await trio.lowlevel.checkpoint()
            undrained = True
            if slot is None:
                await handle_cast(request)
            else:
                self.current = slot
                result = await handle_call(request)
                if self.current is slot:
                    self.current = None
                    slot.reply(result)
        if undrained and drained is not None:
            await drained()

    def inject_crash(self, exc: Exception) -> None:
        """End this incarnation with ``exc`` as if a handler had raised it (:func:`exit_actor`).

        The serving loop is cancelled wherever it waits (in a handler, or for mail) and ``exc``
        is raised in its place: callers get ServerDown, ``terminate(exc)`` runs, the supervisor
        sees a crash. Before ``init`` has finished the crash happens as soon as it has.
        """
        if self.injected is None:
            self.injected = exc
            self.idle = False
            self.serving.cancel()

    def die(self, reason: ExitReason) -> None:
        """Free the name, stop the timers, settle every waiting caller with ServerDown."""
        self.alive = False
        self.reason = reason
        if self.name is not None:
            unregister(self.name, self.ref)
        # Cancel before closing: a timer blocked on a full mailbox must see Cancelled, not
        # BrokenResourceError (which would be reported next to the real exit reason).
        self.nursery.cancel_scope.cancel()
        self._recv.close()  # callers blocked on a full mailbox wake up and see their slot
        self.deadlines.fail_all(lambda: ServerDown(self.ref, reason))
        self.died.set()


async def exit_actor(
    target: ActorRef | Hashable, reason: Exception, *, name_wait: float = 0.0
) -> ExitReason:
    """End the actor ``target`` with ``reason``, as if one of its handlers had raised it.

    OTP's ``exit(Pid, Reason)``: the serving loop is interrupted wherever it waits, every
    waiting caller gets :class:`ServerDown`, ``terminate(reason)`` runs, and the supervisor sees
    a crash (restart, intensity, escalation: all as for a real one). Returns once the
    incarnation is dead (its ``terminate`` may still be running), with its exit reason:
    normally ``reason``, or whatever ended it first. A name is resolved now; while no actor
    holds it (its supervisor is restarting it), this waits up to ``name_wait`` seconds for one.
    Raises :class:`NoProc` if nothing runs under ``target``.
    """
    if isinstance(target, ActorRef):
        ref: ActorRef | None = target
    else:
        ref = await wait_for(target, trio.current_time() + name_wait)
    if ref is None or not ref.alive:
        raise NoProc(f"no actor is running as {target!r}")
    process = ref._process
    process.inject_crash(reason)
    await process.died.wait()
    return process.reason


async def _await_name(name: Hashable, until: float) -> ActorRef:
    ref = await wait_for(name, until)
    if ref is None:
        raise NoProc(f"no actor is registered under {name!r} (waited for one to appear)")
    return ref


def call(
    target: ActorRef | Hashable,
    request: Any,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    name_wait: float | None = None,
) -> Awaitable[Any]:
    """Call an actor by ref or by registered name (``await call(...)``); the name is resolved
    at every call.

    If no actor holds the name right now (say it is being restarted), wait up to ``name_wait``
    seconds (default: the whole ``timeout``) for one to register, then raise :class:`NoProc`.
    Time spent waiting counts against ``timeout``. Errors are those of :meth:`ActorRef.call`.
    """
    # Not a coroutine itself: a name that resolves costs no frame of its own on the hot path.
    ref = lookup(target)  # names first: they are what this function is for
    if ref is not None:
        return ref.call(request, timeout)
    if isinstance(target, ActorRef):
        return target.call(request, timeout)
    return _call_when_named(target, request, timeout, name_wait)


async def _call_when_named(
    name: Hashable, request: Any, timeout: float, name_wait: float | None
) -> Any:
    start = trio.current_time()
    wait = timeout if name_wait is None else min(timeout, name_wait)
    ref = await _await_name(name, start + wait)
    return await ref.call(request, timeout - (trio.current_time() - start))


def send_request(
    target: ActorRef | Hashable,
    request: Any,
    on_reply: Callable[[Any, Exception | None], object],
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """:meth:`ActorRef.send_request` by ref or by registered name, resolved now.

    It cannot wait, so a name that nobody holds right now raises :class:`NoProc` at once (a
    caller that should ride out a restart falls back to :func:`call`, which waits for it).
    """
    ref = lookup(target)
    if ref is None:
        if not isinstance(target, ActorRef):
            raise NoProc(f"no actor is registered under {target!r}")
        ref = target
    ref.send_request(request, on_reply, timeout)


async def cast(
    target: ActorRef | Hashable, message: Any, *, name_wait: float = DEFAULT_TIMEOUT
) -> None:
    """Cast to an actor by ref or by registered name, waiting up to ``name_wait`` seconds for
    the name to be registered (then :class:`NoProc`). Errors are those of :meth:`ActorRef.cast`.
    """
    if not isinstance(target, ActorRef):
        target = await _await_name(target, trio.current_time() + name_wait)
    await target.cast(message)
