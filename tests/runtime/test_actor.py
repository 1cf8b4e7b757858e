"""Conformance of Actor to issue 2 rule 6 and to the API the session service builds on
(deferred replies, handle_drained, send_after, terminate, the registry), on Trio's virtual clock.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import outcome
import pytest
import trio
import trio.testing
from test_supervisor_support import Boom, settle, supervised

from supervisor import (
    Actor,
    ActorRef,
    CallTimeout,
    NoProc,
    ReplySlot,
    Restart,
    ServerDown,
    StartError,
    Supervisor,
    call,
    cast,
    send_request,
    whereis,
)
from supervisor.errors import NameTaken


class Counter(Actor):
    """A counter that can also sleep, crash and stop on request."""

    async def init(self, start: int = 0, init_delay: float = 0.0) -> None:
        await trio.sleep(init_delay)
        self.n = start

    async def handle_call(self, request: Any) -> Any:
        match request:
            case "get":
                return self.n
            case "incr":
                self.n += 1
                return self.n
            case "boom":
                raise Boom("boom")
            case ("sleep", seconds):
                await trio.sleep(seconds)
                return "slept"
            case ("sleep_then_boom", seconds):
                await trio.sleep(seconds)
                raise Boom("late boom")
            case "stop":
                self.stop()
                return "stopping"
        raise AssertionError(request)

    async def handle_cast(self, message: Any) -> None:
        if message == "boom":
            raise Boom("cast boom")
        self.n += message


async def test_call_and_cast_by_ref_and_by_name(autojump_clock: Any) -> None:
    async with supervised(Supervisor([Counter.child_spec("c", 10, name="counter")])) as _:
        ref = whereis("counter")
        assert isinstance(ref, ActorRef) and ref.alive and ref.name == "counter"
        assert await ref.call("incr") == 11
        await ref.cast(5)
        await cast("counter", 1)
        assert await call("counter", "get") == 17
        assert await call(ref, "incr") == 18


async def test_every_start_gets_a_fresh_instance(autojump_clock: Any) -> None:
    async with supervised(Supervisor([Counter.child_spec("c", 10, name="counter")])):
        assert await call("counter", "incr") == 11
        with pytest.raises(ServerDown):
            await call("counter", "boom")
        assert await call("counter", "get") == 10


async def test_noproc_for_a_dead_ref_and_a_free_name(autojump_clock: Any) -> None:
    with pytest.raises(NoProc):
        whereis("nobody")
    start = trio.current_time()
    with pytest.raises(NoProc):
        await call("nobody", "get", name_wait=0.5)
    assert trio.current_time() - start == 0.5
    with pytest.raises(NoProc):
        await cast("nobody", 1, name_wait=0)
    sup = Supervisor([Counter.child_spec("c", name="counter", restart=Restart.TEMPORARY)])
    async with supervised(sup):
        ref = whereis("counter")
        with pytest.raises(ServerDown):
            await ref.call("boom")
        assert not ref.alive
        with pytest.raises(NoProc):
            await ref.call("get")
        with pytest.raises(NoProc):
            await ref.cast(1)
        with pytest.raises(NoProc):
            whereis("counter")


async def test_pending_and_queued_callers_get_server_down_at_once(autojump_clock: Any) -> None:
    failures: list[tuple[float, Any]] = []

    async def caller(request: Any) -> None:
        with pytest.raises(ServerDown) as down:
            await call("counter", request, timeout=30)
        failures.append((trio.current_time(), down.value.reason))

    async with supervised(Supervisor([Counter.child_spec("c", name="counter")])):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, ("sleep_then_boom", 5))  # in progress when it dies
            await settle()
            nursery.start_soon(caller, "get")  # queued
            nursery.start_soon(caller, "incr")  # queued
    assert [t for t, _ in failures] == [5, 5, 5]  # at the crash, not at the 30 s timeout
    assert all(isinstance(reason, Boom) for _, reason in failures)


async def test_a_call_times_out_and_its_late_reply_is_dropped_harmlessly(
    autojump_clock: Any,
) -> None:
    async with supervised(Supervisor([Counter.child_spec("c", name="counter")])):
        with pytest.raises(CallTimeout):
            await call("counter", ("sleep", 10), timeout=1)
        assert trio.current_time() == 1
        assert await call("counter", "incr", timeout=20) == 1  # served after the slow call
        assert trio.current_time() == 10
        assert whereis("counter").alive


async def test_each_call_times_out_at_its_own_deadline(autojump_clock: Any) -> None:
    timed_out: dict[str, float] = {}

    async def caller(label: str, timeout: float) -> None:
        with pytest.raises(CallTimeout):
            await call("counter", "get", timeout=timeout)
        timed_out[label] = trio.current_time()

    async with supervised(Supervisor([Counter.child_spec("c", name="counter")])):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "counter", ("sleep", 100), 200)  # keeps the actor busy
            await settle()
            for label, timeout in [("long", 50), ("short", 2), ("middle", 7)]:
                nursery.start_soon(caller, label, timeout)  # deadlines out of order
                await settle()
    assert timed_out == {"short": 2, "middle": 7, "long": 50}


async def test_an_exception_in_handle_call_crashes_the_actor(autojump_clock: Any) -> None:
    sup = Supervisor([Counter.child_spec("c", name="counter")])
    async with supervised(sup):
        first = whereis("counter")
        with pytest.raises(ServerDown) as down:
            await call("counter", "boom")
        assert isinstance(down.value.reason, Boom)
        await settle()
        [row] = sup.which_children()
        assert row.restarts == 1 and isinstance(row.last_exit, Boom)
        assert whereis("counter") is not first  # the name was taken back by the new incarnation
        assert row.value is whereis("counter")


async def test_callers_wait_a_bounded_time_for_a_name_to_come_back(autojump_clock: Any) -> None:
    Tracked.log = []
    # The name is free from the crash until the restart: terminate takes 2 s in between.
    async with supervised(Supervisor([Tracked.child_spec("t", 2.0, name="tracked")])):
        with pytest.raises(ServerDown):
            await call("tracked", "boom")
        start = trio.current_time()
        with pytest.raises(NoProc):
            await call("tracked", "hello", name_wait=0.5)
        assert trio.current_time() - start == 0.5
        assert await call("tracked", "hello") == "hello"  # waits for the restart
        assert trio.current_time() - start == 2.0


async def test_calls_during_init_queue_until_the_actor_is_ready(autojump_clock: Any) -> None:
    # A restarted actor takes its name back before init, so callers queue instead of failing.
    async with supervised(Supervisor([Counter.child_spec("c", 7, 2.0, name="counter")])):
        await cast("counter", "boom")
        await settle()
        assert await call("counter", "get") == 7
        assert trio.current_time() == 4.0  # 2 s first init + 2 s init after the restart


async def test_a_name_held_by_a_running_actor_fails_the_start(autojump_clock: Any) -> None:
    sup = Supervisor(
        [Counter.child_spec("one", name="counter"), Counter.child_spec("two", name="counter")]
    )
    with pytest.raises(StartError) as failed:
        await sup.run()
    assert failed.value.child_id == "two"
    assert isinstance(failed.value.cause, NameTaken)
    assert "registered to a running actor" in str(failed.value.cause)


def test_the_registry_belongs_to_one_trio_run() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(Counter.start, 0, name="same")  # NameTaken if shared
            nursery.cancel_scope.cancel()

    trio.run(main)
    trio.run(main)


async def test_an_actor_calling_itself_gets_an_error_not_a_deadlock(autojump_clock: Any) -> None:
    class Narcissus(Actor):
        async def handle_call(self, request: Any) -> Any:
            try:
                await self.ref.call("again")
            except RuntimeError as exc:
                return str(exc)

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Narcissus.start)
        assert "called itself" in await ref.call("hi")
        nursery.cancel_scope.cancel()


# -- deferred replies ---------------------------------------------------------------------------


class Deferring(Actor):
    """Defers every call; casts answer or fail the oldest one."""

    async def init(self) -> None:
        self.slots: list[ReplySlot] = []

    async def handle_call(self, request: Any) -> Any:
        self.slots.append(self.defer_reply())
        return "ignored"

    async def handle_cast(self, message: Any) -> None:
        match message:
            case ("reply", value):
                self.slots[0].reply(value)
            case ("fail", error):
                self.slots[0].fail(error)
            case "pop":
                self.slots.pop(0)
            case "boom":
                raise Boom("deferring actor crashed")
            case "defer_outside_a_call":
                self.defer_reply()


async def test_defer_reply_answers_later_and_fail_raises_in_the_caller(
    autojump_clock: Any,
) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Deferring.start)

        async def answer_later() -> None:
            await trio.sleep(3)
            await ref.cast(("reply", "done"))
            await ref.cast(("reply", "twice"))  # a second answer does nothing

        nursery.start_soon(answer_later)
        assert await ref.call("work") == "done"
        assert trio.current_time() == 3
        await ref.cast("pop")
        nursery.start_soon(ref.cast, ("fail", KeyError("missing")))
        with pytest.raises(KeyError, match="missing"):
            await ref.call("work")
        assert ref.alive  # failing a caller is not a crash
        nursery.cancel_scope.cancel()


async def test_answering_a_caller_that_timed_out_is_a_no_op(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Deferring.start)
        with pytest.raises(CallTimeout):
            await ref.call("work", timeout=1)
        await ref.cast(("reply", "too late"))
        await ref.cast("pop")
        nursery.start_soon(ref.cast, ("reply", "fresh"))
        assert await ref.call("work") == "fresh"
        nursery.cancel_scope.cancel()


async def test_deferred_callers_get_server_down_when_the_actor_dies(autojump_clock: Any) -> None:
    results: list[tuple[float, type]] = []

    async def caller() -> None:
        with pytest.raises(ServerDown) as down:
            await call("deferring", "work", timeout=math.inf)
        results.append((trio.current_time(), type(down.value.reason)))

    async with supervised(Supervisor([Deferring.child_spec("d", name="deferring")])):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(caller)
            await trio.sleep(2)
            await cast("deferring", "boom")
    assert results == [(2, Boom)] * 3


async def test_defer_reply_is_only_valid_inside_handle_call(autojump_clock: Any) -> None:
    sup = Supervisor([Deferring.child_spec("d", name="deferring")])
    async with supervised(sup):
        await cast("deferring", "defer_outside_a_call")
        await settle()
        reason = sup.which_children()[0].last_exit
        assert isinstance(reason, RuntimeError)
        assert "only valid inside handle_call" in str(reason)


# -- handle_drained: group commit -------------------------------------------------------------


class Batcher(Actor):
    """Defers each call, then answers the whole batch in handle_drained with its size."""

    async def init(self, drain_time: float = 0.0, fail: bool = False) -> None:
        self.batch: list[ReplySlot] = []
        self.batches: list[int] = []
        self.drain_time = drain_time
        self.fail = fail

    async def handle_call(self, request: Any) -> Any:
        if request == "batches":
            return self.batches
        self.batch.append(self.defer_reply())
        return None

    async def handle_drained(self) -> None:
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        await trio.sleep(self.drain_time)  # the "commit"
        self.batches.append(len(batch))
        if self.fail:
            raise Boom("commit failed")
        for slot in batch:
            slot.reply(len(batch))


async def test_handle_drained_runs_once_the_mailbox_is_empty(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Batcher.start, 1.0)
        answers: list[int] = []

        async def caller() -> None:
            answers.append(await ref.call("write"))

        async with trio.open_nursery() as callers:
            for _ in range(10):
                callers.start_soon(caller)  # all queued before the actor runs
            await trio.sleep(0.5)  # during the first commit:
            for _ in range(3):
                callers.start_soon(caller)  # handled after handle_drained returns
        assert answers == [10] * 10 + [3] * 3
        assert await ref.call("batches") == [10, 3]
        nursery.cancel_scope.cancel()


async def test_an_exception_in_handle_drained_crashes_the_actor(autojump_clock: Any) -> None:
    sup = Supervisor([Batcher.child_spec("b", 0.0, True, name="batcher")])
    async with supervised(sup):
        with pytest.raises(ServerDown) as down:
            await call("batcher", "write")
        assert isinstance(down.value.reason, Boom)
        await settle()
        assert isinstance(sup.which_children()[0].last_exit, Boom)


# -- send_after ---------------------------------------------------------------------------------


class Ticker(Actor):
    async def init(self) -> None:
        self.got: list[tuple[float, Any]] = []
        self.timers: dict[str, Any] = {}

    async def handle_call(self, request: Any) -> Any:
        match request:
            case ("after", delay, message):
                self.timers[message] = self.send_after(delay, message)
            case ("cancel", message):
                self.timers[message].cancel()
            case "got":
                return self.got
            case "boom":
                raise Boom("ticker crashed")
        return None

    async def handle_cast(self, message: Any) -> None:
        self.got.append((trio.current_time(), message))


async def test_send_after_delivers_to_handle_cast_and_can_be_cancelled(
    autojump_clock: Any,
) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Ticker.start)
        await ref.call(("after", 2.0, "tick"))
        await ref.call(("after", 3.0, "cancelled"))
        await ref.call(("after", 0.0, "now"))
        await ref.call(("cancel", "cancelled"))
        await trio.sleep(10)
        assert await ref.call("got") == [(0.0, "now"), (2.0, "tick")]
        nursery.cancel_scope.cancel()


async def test_timers_die_with_their_incarnation(autojump_clock: Any) -> None:
    async with supervised(Supervisor([Ticker.child_spec("t", name="ticker")])):
        await call("ticker", ("after", 5.0, "from the old incarnation"))
        with pytest.raises(ServerDown):
            await call("ticker", "boom")
        await trio.sleep(10)
        assert await call("ticker", "got") == []


# -- terminate ---------------------------------------------------------------------------------


class Tracked(Actor):
    """Records terminate(reason) calls in a class-level list, optionally slowly."""

    log: ClassVar[list[tuple[str, Any]]] = []

    async def init(self, cleanup_time: float = 0.0, fail_init: bool = False) -> None:
        if fail_init:
            raise Boom("init failed")
        self.cleanup_time = cleanup_time

    async def handle_call(self, request: Any) -> Any:
        if request == "boom":
            raise Boom("tracked crashed")
        if request == "stop":
            self.stop()
        return request

    async def terminate(self, reason: Any) -> None:
        start = trio.current_time()
        try:
            await trio.sleep(self.cleanup_time)
        finally:  # even when the cleanup window cuts it short
            Tracked.log.append(
                (
                    reason if isinstance(reason, str) else type(reason).__name__,
                    trio.current_time() - start,
                )
            )


async def test_terminate_runs_on_every_exit_after_init_with_its_reason(
    autojump_clock: Any,
) -> None:
    Tracked.log = []
    sup = Supervisor([Tracked.child_spec("t", name="tracked")])
    async with supervised(sup):
        with pytest.raises(ServerDown):
            await call("tracked", "boom")  # crash
        assert await call("tracked", "stop") == "stop"  # answered, then a normal exit
        await settle()
    assert [reason for reason, _ in Tracked.log] == ["Boom", "normal", "shutdown"]
    Tracked.log = []
    with pytest.raises(StartError):
        await Supervisor([Tracked.child_spec("t", 0.0, True)]).run()
    assert Tracked.log == []  # init failed: nothing to terminate


async def test_terminate_is_shielded_and_bounded_by_the_grace_and_runs_after_server_down(
    autojump_clock: Any,
) -> None:
    Tracked.log = []
    sup = Supervisor([Tracked.child_spec("t", 10.0, name="tracked", shutdown=2.0)])
    async with supervised(sup):
        start = trio.current_time()
        with pytest.raises(ServerDown):
            await call("tracked", "boom")
        assert trio.current_time() == start  # callers are told before terminate runs
        assert await call("tracked", "hello") == "hello"  # the restarted incarnation...
        assert trio.current_time() == start + 2.0  # ...came after a 2 s cleanup window
        await sup.terminate_child("t")  # stopped by its supervisor: again 2 s
    assert Tracked.log == [("Boom", 2.0), ("shutdown", 2.0)]


# -- the mailbox and stop() ----------------------------------------------------------------------


class Slow(Actor):
    mailbox_size = 2

    async def init(self) -> None:
        self.seen: list[Any] = []

    async def handle_call(self, request: Any) -> Any:
        if request == "seen":
            return self.seen
        await trio.sleep(1)
        if request == "boom":
            raise Boom("slow crash")
        return request

    async def handle_cast(self, message: Any) -> None:
        await trio.sleep(1)
        self.seen.append(message)


async def test_a_full_mailbox_makes_senders_wait_and_never_drops(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Slow.start)
        sent: list[int] = []

        async def sender(i: int) -> None:
            await ref.cast(i)
            sent.append(i)

        for i in range(6):
            nursery.start_soon(sender, i)
            await settle()
        assert sent == [0, 1, 2]  # one being handled, two queued, three waiting for room
        with pytest.raises(CallTimeout):
            await ref.call("x", timeout=0.5)  # its time waiting for room counts
        await trio.sleep(10)
        assert sent == [0, 1, 2, 3, 4, 5]
        assert await ref.call("seen") == [0, 1, 2, 3, 4, 5]
        nursery.cancel_scope.cancel()


async def test_senders_waiting_for_room_get_server_down_at_once(autojump_clock: Any) -> None:
    outcomes: dict[str, tuple[float, type]] = {}

    async def send(what: str, op: Callable[[], Awaitable[Any]]) -> None:
        try:
            await op()
        except ServerDown as down:
            outcomes[what] = (trio.current_time(), type(down.reason))

    async with supervised(
        Supervisor([Slow.child_spec("s", name="slow", restart=Restart.TEMPORARY)])
    ):
        ref = whereis("slow")
        async with trio.open_nursery() as senders:
            senders.start_soon(send, "crashing call", lambda: ref.call("boom"))
            await settle()
            for i in range(2):
                senders.start_soon(ref.cast, i)  # fills the mailbox
            await settle()
            senders.start_soon(send, "waiting call", lambda: ref.call("x", timeout=30))
            senders.start_soon(send, "waiting cast", lambda: ref.cast(9))
    assert outcomes == {
        "crashing call": (1.0, Boom),
        "waiting call": (1.0, Boom),
        "waiting cast": (1.0, Boom),
    }


async def test_stop_is_a_normal_exit(autojump_clock: Any) -> None:
    sup = Supervisor([Counter.child_spec("c", name="counter", restart=Restart.TRANSIENT)])
    async with supervised(sup):
        answers: dict[Any, Any] = {}

        async def caller(request: Any) -> None:
            try:
                answers[request] = await call("counter", request)
            except ServerDown as down:
                answers[request] = down.reason

        async with trio.open_nursery() as nursery:
            for request in [("sleep", 1), "stop", "get"]:  # queued in this order
                nursery.start_soon(caller, request)
                await settle()
        assert answers == {("sleep", 1): "slept", "stop": "stopping", "get": "normal"}
        await settle()
        [row] = sup.which_children()
        assert (row.running, row.last_exit) == (False, "normal")  # transient: not restarted


# -- send_request: calls whose answer goes to a function -------------------------------------


async def test_send_request_delivers_each_answer_once_to_its_function(
    autojump_clock: Any,
) -> None:
    answers: list[tuple[Any, Any]] = []

    def on_reply(value: Any, error: Exception | None) -> None:
        answers.append((value, type(error)))

    async with supervised(Supervisor([Counter.child_spec("c", name="counter")])):
        ref = whereis("counter")
        assert ref is not None
        ref.send_request("incr", on_reply)
        send_request("counter", "incr", on_reply)  # by name too
        send_request("counter", "boom", on_reply)  # a crash: the caller gets ServerDown
        send_request("counter", "get", on_reply)  # queued behind the crash: ServerDown too
        assert answers == []  # nothing is answered before the actor runs
        await settle()
        assert answers == [(1, type(None)), (2, type(None)), (None, ServerDown), (None, ServerDown)]


async def test_send_request_times_out_and_fails_with_the_actor(autojump_clock: Any) -> None:
    answers: list[tuple[float, Any, Any]] = []

    def on_reply(value: Any, error: Exception | None) -> None:
        answers.append((trio.current_time(), value, type(error)))

    async with supervised(Supervisor([Deferring.child_spec("d", name="deferring")])):
        ref = whereis("deferring")
        assert ref is not None
        ref.send_request("work", on_reply, timeout=2)
        await trio.sleep(5)
        await ref.cast(("reply", "too late"))  # the slot is settled: nothing more happens
        await ref.cast("pop")
        ref.send_request("work", on_reply)
        await ref.cast(("reply", "done"))
        await ref.cast("pop")
        ref.send_request("work", on_reply)
        await ref.cast(("fail", KeyError("missing")))
        await ref.cast("pop")
        ref.send_request("work", on_reply)
        await ref.cast("boom")
        await settle()
        assert answers == [
            (2, None, CallTimeout),
            (5, "done", type(None)),
            (5, None, KeyError),
            (5, None, ServerDown),
        ]


async def test_send_request_refuses_at_once_when_it_cannot_send(autojump_clock: Any) -> None:
    def on_reply(value: Any, error: Exception | None) -> None:
        raise AssertionError("a request that was not sent is never answered")

    with pytest.raises(NoProc):
        send_request("nobody", "x", on_reply)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Slow.start)
        for i in range(3):
            nursery.start_soon(ref.cast, i)  # one being handled, two queued: full
            await settle()
        with pytest.raises(trio.WouldBlock):
            ref.send_request("x", on_reply)
        nursery.cancel_scope.cancel()
    with pytest.raises(NoProc):
        ref.send_request("x", on_reply)


# -- inline answers: an idle actor answers in the caller's task ---------------------------


class Ledger(Actor):
    """Answers "get" and "add" inline while idle, records which way each request went, and
    can be held busy in a handler (until ``release`` is set)."""

    async def init(self) -> None:
        self.total = 0
        self.ways: list[tuple[str, Any]] = []
        self.release = trio.Event()

    def handle_call_inline(self, request: Any) -> outcome.Outcome[Any] | None:
        match request:
            case "get":
                self.ways.append(("inline", request))
                return outcome.Value(self.total)
            case "callers":
                return outcome.Value(self.callers)
            case ("add", n):
                if n < 0:
                    return outcome.Error(ValueError("only positive amounts"))
                self.ways.append(("inline", request))
                self.total += n
                return outcome.Value(self.total)
            case "bug":
                raise Boom("bug in the inline handler")
        return None  # everything else goes through the mailbox

    async def handle_call(self, request: Any) -> Any:
        self.ways.append(("mailbox", request))
        match request:
            case "get":
                return self.total
            case ("add", n):
                self.total += n
                return self.total
            case "hold":
                await self.release.wait()
                self.release = trio.Event()
                return "released"
            case "hold answering":  # waits, answering inline meanwhile
                await self.answering(self.release.wait())
                self.release = trio.Event()
                return "released"
            case "spawn":
                self.spawn(self.later)
                return "spawned"
            case "task":
                return trio.lowlevel.current_task()
        raise AssertionError(request)

    async def handle_cast(self, message: Any) -> None:
        self.total += message

    async def later(self) -> None:
        await self.release.wait()
        self.total += 100
        if self.total > 1000:
            raise Boom("a linked task failed")


@pytest.fixture
async def ledger(autojump_clock: Any) -> AsyncIterator[tuple[ActorRef, Ledger]]:
    async with supervised(Supervisor([Ledger.child_spec("l", name="ledger")])):
        ref = whereis("ledger")
        yield ref, ref._process.actor  # type: ignore[misc]


async def test_an_idle_actor_answers_in_the_callers_task(
    ledger: tuple[ActorRef, Ledger],
) -> None:
    ref, actor = ledger
    assert await ref.call(("add", 2)) == 2
    assert await call("ledger", "get") == 2
    with pytest.raises(ValueError, match="positive"):  # outcome.Error: the caller's error
        await ref.call(("add", -1))
    assert await ref.call("task") is not trio.lowlevel.current_task()  # declined: mailbox
    assert actor.ways == [("inline", ("add", 2)), ("inline", "get"), ("mailbox", "task")]

    answers: list[tuple[Any, Any]] = []
    ref.send_request(("add", 3), lambda v, e: answers.append((v, e)))
    assert answers == [(5, None)]  # answered before send_request returned


async def test_an_inline_answer_never_overtakes_a_message_sent_before_it(
    ledger: tuple[ActorRef, Ledger],
) -> None:
    ref, _ = ledger
    # The cast is handed straight to the waiting actor, so the mailbox looks empty; the call
    # right after it must still see its effect.
    await ref.cast(10)
    assert await ref.call("get") == 10
    answers: list[Any] = []
    ref.send_request(("add", 1), lambda v, e: answers.append(v))
    assert await ref.call("get") == 11 and answers == [11]


async def test_a_busy_actor_is_called_through_its_mailbox(
    ledger: tuple[ActorRef, Ledger],
) -> None:
    ref, actor = ledger
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ref.call, "hold")
        await settle()
        nursery.start_soon(ref.call, ("add", 1))
        await settle()
        assert ("mailbox", ("add", 1)) not in actor.ways  # queued behind "hold"
        actor.release.set()
    assert actor.ways == [("mailbox", "hold"), ("mailbox", ("add", 1))]


async def test_an_exception_in_the_inline_handler_crashes_the_actor(
    ledger: tuple[ActorRef, Ledger],
) -> None:
    ref, _ = ledger
    with pytest.raises(ServerDown):
        await ref.call("bug")
    await settle()
    assert not ref.alive
    restarted = whereis("ledger")
    assert restarted is not ref and await restarted.call("get") == 0
    answers: list[Any] = []
    restarted.send_request("bug", lambda v, e: answers.append(type(e)))
    assert answers == [ServerDown]


async def test_an_inline_call_is_a_checkpoint(ledger: tuple[ActorRef, Ledger]) -> None:
    ref, actor = ledger
    with trio.CancelScope() as scope:
        scope.cancel()
        await ref.call(("add", 1))  # cancelled before the handler runs
    assert actor.ways == []
    ran = False

    async def other() -> None:
        nonlocal ran
        ran = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(3):  # each call is a schedule point: the other task gets to run
            await ref.call("get")
        assert ran


async def test_callers_counts_the_tasks_in_a_call(ledger: tuple[ActorRef, Ledger]) -> None:
    ref, actor = ledger
    assert await ref.call("callers") == 1  # the caller itself: alone
    answers: list[Any] = []
    ref.send_request("callers", lambda v, e: answers.append(v))
    assert answers == [0]  # from send_request: no task waits in a call
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ref.call, "hold")  # one waits in the mailbox...
        await settle()
        assert actor.callers == 1
        actor.release.set()
    counts: list[int] = []

    async def ask() -> None:
        counts.append(await ref.call("callers"))

    async with trio.open_nursery() as nursery:
        for _ in range(3):  # ...three start together: each is answered with company
            nursery.start_soon(ask)
    assert sorted(counts) == [1, 2, 3] and actor.callers == 0


async def test_a_handler_answering_meanwhile_lets_calls_in_while_it_waits(
    ledger: tuple[ActorRef, Ledger],
) -> None:
    ref, actor = ledger
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ref.call, "hold answering")
        await settle()
        assert await ref.call(("add", 2)) == 2  # inline, while the handler waits
        nursery.start_soon(ref.call, "task")  # declined inline: to the mailbox...
        await settle()
        nursery.start_soon(ref.call, "get")  # ...so this one cannot overtake it
        await settle()
        assert ("inline", "get") not in actor.ways
        actor.release.set()
    assert actor.ways == [
        ("mailbox", "hold answering"),
        ("inline", ("add", 2)),
        ("mailbox", "task"),
        ("mailbox", "get"),
    ]


async def test_a_spawned_task_lives_with_the_actor_and_its_crash_is_the_actors(
    ledger: tuple[ActorRef, Ledger],
) -> None:
    ref, actor = ledger
    assert await ref.call("spawn") == "spawned"
    assert await ref.call("get") == 0  # the actor goes on while its task waits
    actor.release.set()
    await settle()
    assert await ref.call("get") == 100
    actor.total = 1000
    actor.release = trio.Event()
    assert await ref.call("spawn") == "spawned"
    actor.release.set()
    await settle()
    assert not ref.alive  # the task raised: a crash of the actor, which restarts
    assert await whereis("ledger").call("get") == 0
