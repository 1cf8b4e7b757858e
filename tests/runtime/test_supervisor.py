"""Conformance of Supervisor to issue 2, rule by rule, on Trio's virtual clock (no real sleeps).

Rule 6 (actors) is in test_actor.py; the pure restart table is in test_supervisor_restart.py;
random crash schedules are in test_supervisor_schedules.py.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import trio
import trio.testing
from test_supervisor_support import Boom, Probe, run_driven, settle, supervised

from supervisor import (
    AutoShutdown,
    ChildExists,
    ChildNotFound,
    ChildRunning,
    ChildSpec,
    DynamicSupervisor,
    EventKind,
    NoProc,
    Restart,
    Shutdown,
    StartError,
    Strategy,
    Supervisor,
    SupervisorEvent,
    SupervisorShutdown,
    TooManyChildren,
    cleanup_scope,
)


def ids(sup: Supervisor | DynamicSupervisor) -> list[Any]:
    return [info.id for info in sup.which_children()]


def info(sup: Supervisor, child_id: str) -> Any:
    return next(i for i in sup.which_children() if i.id == child_id)


# -- Rule 1: strategies, restart types, stop right to left and start left to right ----------


async def test_one_for_one_restarts_only_the_child_that_exited(autojump_clock: Any) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec(c) for c in "abc"], strategy=Strategy.ONE_FOR_ONE)
    async with supervised(sup):
        probe.crash("b")
        await settle()
        assert probe.log[3:] == [("crash", "b"), ("start", "b")]
    assert probe.log[5:] == [("stop", "c"), ("stop", "b"), ("stop", "a")]


async def test_one_for_all_stops_right_to_left_then_starts_left_to_right(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec(c) for c in "abcd"], strategy=Strategy.ONE_FOR_ALL)
    async with supervised(sup):
        probe.crash("b")
        await settle()
        assert probe.log[4:] == [
            ("crash", "b"),
            ("stop", "d"),
            ("stop", "c"),
            ("stop", "a"),
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]
        assert [i.restarts for i in sup.which_children()] == [1, 1, 1, 1]


async def test_rest_for_one_restarts_the_child_and_every_child_after_it(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec(c) for c in "abcd"], strategy=Strategy.REST_FOR_ONE)
    async with supervised(sup):
        probe.crash("b")
        await settle()
        assert probe.log[4:] == [
            ("crash", "b"),
            ("stop", "d"),
            ("stop", "c"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]
        assert info(sup, "a").restarts == 0


async def test_permanent_child_restarts_after_a_crash_and_a_normal_return_both_counted(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec("a")], intensity=1, period=10)

    async def driver() -> None:
        await settle()
        probe.finish("a")  # a normal return: restarted, and it counts
        await settle()
        assert probe.events("start") == ["a", "a"]
        probe.crash("a")  # the second restart within 10 s: one too many

    error = await run_driven(sup, driver)
    assert type(error) is SupervisorShutdown
    assert probe.events("start") == ["a", "a"]


async def test_transient_child_restarts_only_after_a_crash(autojump_clock: Any) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec("t", restart=Restart.TRANSIENT)])
    async with supervised(sup):
        probe.crash("t")
        await settle()
        assert probe.events("start") == ["t", "t"]
        probe.finish("t")
        await settle()
        assert probe.events("start") == ["t", "t"]
        assert info(sup, "t").running is False
        assert info(sup, "t").last_exit == "normal"  # the spec is kept


async def test_temporary_child_never_restarts_is_forgotten_and_never_affects_others(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    # intensity=0 and one_for_all: any restart would escalate or take the siblings down.
    sup = Supervisor(
        [probe.spec("a"), probe.spec("t", restart=Restart.TEMPORARY), probe.spec("b")],
        strategy=Strategy.ONE_FOR_ALL,
        intensity=0,
    )
    async with supervised(sup):
        probe.crash("t")
        await settle()
        assert probe.log[3:] == [("crash", "t")]
        assert ids(sup) == ["a", "b"]


async def test_a_temporary_sibling_caught_in_a_group_restart_is_stopped_and_forgotten(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    sup = Supervisor(
        [probe.spec("a"), probe.spec("t", restart=Restart.TEMPORARY), probe.spec("b")],
        strategy=Strategy.ONE_FOR_ALL,
    )
    async with supervised(sup):
        probe.crash("b")
        await settle()
        assert probe.log[3:] == [
            ("crash", "b"),
            ("stop", "t"),
            ("stop", "a"),
            ("start", "a"),
            ("start", "b"),
        ]
        assert ids(sup) == ["a", "b"]


# -- Rule 2: one restart budget, a sliding window on trio.current_time() ---------------------


async def test_intensity_is_a_sliding_window_on_trio_time(autojump_clock: Any) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec("a")], intensity=2, period=10)
    crash_times = [0, 6, 12, 17, 20]  # windows: {0,6} {6,12} {12,17} then {12,17,20}: too many

    async def driver() -> None:
        for t in crash_times:
            await trio.sleep_until(t)
            await settle()
            probe.crash("a")

    error = await run_driven(sup, driver)
    assert type(error) is SupervisorShutdown
    assert trio.current_time() == 20
    assert probe.events("crash") == ["a"] * 5
    assert probe.events("start") == ["a"] * 5  # 1 start + 4 restarts, none at t=20


@pytest.mark.parametrize(("gap", "escalates"), [(5.0, True), (5.5, False)])
async def test_a_restart_exactly_period_ago_still_counts(
    autojump_clock: Any, gap: float, escalates: bool
) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec("a")], intensity=1, period=5)

    async def driver() -> None:
        await settle()
        probe.crash("a")
        await trio.sleep(gap)
        probe.crash("a")
        await trio.sleep(1)
        scope.cancel()  # reached only if the supervisor is still up

    with trio.CancelScope() as scope:
        error = await run_driven(sup, driver)
    assert (type(error) is SupervisorShutdown) is escalates


async def test_a_restart_that_cannot_start_is_retried_as_another_crash(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec("a"), probe.spec("b")], strategy=Strategy.ONE_FOR_ALL)
    async with supervised(sup):
        probe.fail_start["b"] = 1  # the first restart of b fails: the group restarts again
        probe.crash("a")
        await settle()
        assert probe.log[2:] == [
            ("crash", "a"),
            ("stop", "b"),
            ("start", "a"),
            ("start_failed", "b"),
            ("stop", "a"),
            ("start", "a"),
            ("start", "b"),
        ]


async def test_a_child_that_cannot_restart_uses_up_the_intensity(autojump_clock: Any) -> None:
    probe = Probe()
    events: list[SupervisorEvent] = []
    sup = Supervisor([probe.spec("a")], intensity=2, on_event=events.append)

    async def driver() -> None:
        await settle()
        probe.fail_start["a"] = math.inf
        probe.crash("a")

    error = await run_driven(sup, driver)
    assert type(error) is SupervisorShutdown
    assert isinstance(error.cause, Boom) and "cannot start" in str(error.cause)
    assert probe.log[1:] == [("crash", "a"), ("start_failed", "a"), ("start_failed", "a")]
    assert [e.kind for e in events][-3:] == [
        EventKind.START_FAILED,
        EventKind.START_FAILED,
        EventKind.ESCALATE,
    ]
    assert trio.current_time() == 0  # no hot loop, and no waiting either: it gave up at once


async def test_giving_up_stops_every_child_in_reverse_order_then_raises_the_cause(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec(c) for c in "abc"], intensity=0)

    async def driver() -> None:
        await settle()
        probe.crash("b")

    error = await run_driven(sup, driver)
    assert type(error) is SupervisorShutdown
    assert error.child_id == "b"
    assert isinstance(error.cause, Boom)
    assert probe.log[3:] == [("crash", "b"), ("stop", "c"), ("stop", "a")]
    assert probe.running == 0


async def test_a_nested_supervisor_giving_up_is_a_crash_of_that_child_in_its_parent(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    inner = Supervisor([probe.spec("x")], intensity=0, name="inner")
    outer = Supervisor(
        [probe.spec("a"), ChildSpec("inner", inner.run, shutdown=Shutdown.INFINITY)],
        intensity=1,
        name="outer",
    )

    async def driver() -> None:
        await settle()
        probe.crash("x")  # inner gives up; outer restarts it (its first restart)
        await settle()
        assert probe.log[2:] == [("crash", "x"), ("start", "x")]
        row = info(outer, "inner")
        assert row.running and row.restarts == 1 and row.value is inner
        assert isinstance(row.last_exit, SupervisorShutdown)
        probe.crash("x")  # inner gives up again: outer's second restart is one too many

    error = await run_driven(outer, driver)
    assert type(error) is SupervisorShutdown
    assert error.supervisor == "outer"
    assert isinstance(error.cause, SupervisorShutdown) and error.cause.supervisor == "inner"
    assert probe.log[-2:] == [("crash", "x"), ("stop", "a")]
    assert probe.running == 0


# -- Rule 3: ordered, synchronous start; rollback on failure ---------------------------------


async def test_start_returns_only_when_every_child_started_in_order(autojump_clock: Any) -> None:
    probe = Probe()
    probe.init_delay = {"a": 1.0, "b": 2.0}
    sup = Supervisor([probe.spec(c) for c in "abc"])
    async with trio.open_nursery() as nursery:
        assert await nursery.start(sup.run) is sup
        assert trio.current_time() == 3.0
        assert probe.log == [("start", "a"), ("start", "b"), ("start", "c")]
        assert [i.value for i in sup.which_children()] == ["value-a", "value-b", "value-c"]
        nursery.cancel_scope.cancel()


async def test_a_failed_start_rolls_back_in_reverse_and_raises_start_error_bare(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    probe.fail_start = {"c": math.inf}
    sup = Supervisor([probe.spec(c) for c in "abcd"])
    async with trio.open_nursery() as nursery:
        with pytest.raises(StartError) as raised:
            await nursery.start(sup.run)
    assert raised.value.child_id == "c"
    assert isinstance(raised.value.cause, Boom)
    assert probe.log == [
        ("start", "a"),
        ("start", "b"),
        ("start_failed", "c"),
        ("stop", "b"),
        ("stop", "a"),
    ]
    assert probe.running == 0


async def test_cancelled_during_start_stays_cancelled(autojump_clock: Any) -> None:
    probe = Probe()
    probe.init_delay = {"b": 10.0}
    sup = Supervisor([probe.spec(c) for c in "abc"])
    raised: BaseException | None = None
    with trio.move_on_after(5) as scope:
        try:
            await sup.run()
        except BaseException as exc:
            raised = exc
            raise
    assert scope.cancelled_caught
    assert type(raised) is trio.Cancelled
    assert probe.log == [("start", "a"), ("stop", "a")]


# -- Rule 4: per-child shutdown ---------------------------------------------------------------


async def test_a_grace_is_a_shielded_cleanup_window_bounded_by_the_grace(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    probe.cleanup_time = {"quick": 1.0, "slow": 10.0}
    sup = Supervisor([probe.spec("quick", shutdown=2.0), probe.spec("slow", shutdown=2.0)])
    async with supervised(sup):
        start = trio.current_time()
        await sup.terminate_child("quick")
        assert trio.current_time() - start == 1.0
        start = trio.current_time()
        await sup.terminate_child("slow")
        assert trio.current_time() - start == 2.0  # cut at the grace
    assert probe.events("cleaned") == ["quick"]


async def test_brutal_kill_leaves_no_cleanup_time(autojump_clock: Any) -> None:
    probe = Probe()
    probe.cleanup_time = {"a": 1.0}
    sup = Supervisor([probe.spec("a", shutdown=Shutdown.BRUTAL_KILL)])
    async with supervised(sup):
        start = trio.current_time()
        await sup.terminate_child("a")
        assert trio.current_time() == start
    assert probe.events("stop") == ["a"]
    assert probe.events("cleaned") == []


async def test_infinity_waits_as_long_as_the_child_needs(autojump_clock: Any) -> None:
    probe = Probe()
    probe.cleanup_time = {"a": 1000.0}
    sup = Supervisor([probe.spec("a", shutdown=Shutdown.INFINITY)])
    async with supervised(sup):
        start = trio.current_time()
        await sup.terminate_child("a")
        assert trio.current_time() - start == 1000.0
    assert probe.events("cleaned") == ["a"]


async def test_a_child_alive_after_its_deadline_is_reported_by_id_and_still_awaited(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def stubborn(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):  # ignores its grace
                await trio.sleep(30)

    events: list[SupervisorEvent] = []
    sup = Supervisor([ChildSpec("stubborn", stubborn, shutdown=1.0)], on_event=events.append)
    async with supervised(sup):
        start = trio.current_time()
        await sup.terminate_child("stubborn")
        assert trio.current_time() - start == 30  # waited: no task outlives its supervisor
    overdue = [e for e in events if e.kind is EventKind.OVERDUE]
    assert [e.child_id for e in overdue] == ["stubborn"]
    assert overdue[0].time - start == pytest.approx(1.1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'stubborn'" in r.getMessage() for r in warnings)


# -- Rule 5: management API, typed errors, dynamic supervisor --------------------------------


async def test_management_calls_and_their_typed_errors(autojump_clock: Any) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec("a")])
    with pytest.raises(NoProc):
        sup.which_children()
    async with supervised(sup):
        assert await sup.start_child(probe.spec("b")) == "value-b"
        with pytest.raises(ChildExists):
            await sup.start_child(probe.spec("b"))
        await sup.terminate_child("b")
        assert info(sup, "b").running is False
        assert info(sup, "b").last_exit == "shutdown"
        assert sup.count_children() == (2, 1)
        with pytest.raises(ChildRunning):
            await sup.restart_child("a")
        with pytest.raises(ChildRunning):
            await sup.delete_child("a")
        assert await sup.restart_child("b") == "value-b"
        assert info(sup, "b").restarts == 1
        await sup.terminate_child("b")
        await sup.delete_child("b")
        assert ids(sup) == ["a"]
        for operation in (sup.terminate_child, sup.restart_child, sup.delete_child):
            with pytest.raises(ChildNotFound) as missing:
                await operation("nope")
            assert isinstance(missing.value, LookupError)
        probe.fail_start["c"] = math.inf
        with pytest.raises(StartError):
            await sup.start_child(probe.spec("c"))
        assert ids(sup) == ["a"]  # a child that failed to start is not kept
        await sup.terminate_child("a")
        assert sup.count_children() == (1, 0)
    with pytest.raises(NoProc):
        await sup.start_child(probe.spec("d"))


async def test_which_children_shows_running_restarts_and_last_exit(autojump_clock: Any) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec("a"), probe.spec("t", restart=Restart.TRANSIENT)])
    async with supervised(sup):
        assert [(i.id, i.running, i.restarts, i.last_exit) for i in sup.which_children()] == [
            ("a", True, 0, None),
            ("t", True, 0, None),
        ]
        probe.crash("a")
        probe.finish("t")
        await settle()
        a, t = sup.which_children()
        assert (a.running, a.restarts, type(a.last_exit)) == (True, 1, Boom)
        assert (t.running, t.restarts, t.last_exit) == (False, 0, "normal")


async def test_run_can_start_again_with_a_fresh_restart_history(autojump_clock: Any) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec("a")], intensity=1, period=100)
    for _ in range(2):
        async with supervised(sup):
            await sup.start_child(probe.spec("extra"))
            probe.crash("a")  # one restart per run: never too many
            await settle()
            assert ids(sup) == ["a", "extra"]
    async with supervised(sup):
        assert ids(sup) == ["a"]  # children added by start_child lived only in their run


async def test_dynamic_supervisor_runs_many_children_of_one_template(autojump_clock: Any) -> None:
    probe = Probe()
    dyn = DynamicSupervisor(
        ChildSpec("conn", probe.child, restart=Restart.TRANSIENT), max_children=2
    )
    async with supervised(dyn):  # type: ignore[arg-type]
        first = await dyn.start_child("x")
        second = await dyn.start_child("y")
        assert (first, second) == (1, 2)
        with pytest.raises(TooManyChildren):
            await dyn.start_child("z")
        assert [i.value for i in dyn.which_children()] == ["value-x", "value-y"]
        probe.crash("x")  # transient: restarted with the same arguments, same id
        await settle()
        assert probe.events("start") == ["x", "y", "x"]
        assert ids(dyn) == [1, 2]
        probe.finish("y")  # not restarted: forgotten
        await settle()
        assert ids(dyn) == [1]
        await dyn.terminate_child(1)  # forgotten too
        assert dyn.count_children() == (0, 0)
        assert await dyn.start_child("w") == 3


# -- auto shutdown (significant children, OTP 24) ---------------------------------------------


async def test_auto_shutdown_stops_the_supervisor_when_significant_children_are_gone(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    sup = Supervisor(
        [
            probe.spec("a"),
            probe.spec("s1", restart=Restart.TRANSIENT, significant=True),
            probe.spec("s2", restart=Restart.TEMPORARY, significant=True),
        ],
        auto_shutdown=AutoShutdown.ALL_SIGNIFICANT,
    )

    async def driver() -> None:
        await settle()
        probe.finish("s1")
        await settle()
        assert probe.events("stop") == []  # s2 still runs
        probe.crash("s2")  # temporary: not restarted, the last significant child is gone

    assert await run_driven(sup, driver) is None  # run returns normally
    assert probe.events("stop") == ["a"]
    with pytest.raises(ValueError, match="auto_shutdown"):
        Supervisor([probe.spec("s", restart=Restart.TRANSIENT, significant=True)])
    with pytest.raises(ValueError, match="permanent"):
        probe.spec("s", significant=True)


# -- Rule 7: only Exception is a crash ---------------------------------------------------------


async def test_cancellation_stops_the_tree_in_order_and_propagates_unchanged(
    autojump_clock: Any,
) -> None:
    probe = Probe()
    sup = Supervisor([probe.spec(c) for c in "abc"])
    raised: BaseException | None = None
    with trio.move_on_after(1) as scope:
        try:
            await sup.run()
        except BaseException as exc:
            raised = exc
            raise
    assert scope.cancelled_caught
    assert type(raised) is trio.Cancelled
    assert probe.log[3:] == [("stop", "c"), ("stop", "b"), ("stop", "a")]
    assert probe.running == 0


@pytest.mark.parametrize("fatal", [KeyboardInterrupt, SystemExit])
async def test_keyboard_interrupt_and_system_exit_stop_the_tree_and_propagate_bare(
    autojump_clock: Any, fatal: type[BaseException]
) -> None:
    probe = Probe()

    async def rude(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep(1)
        raise fatal

    sup = Supervisor([probe.spec("a"), ChildSpec("rude", rude), probe.spec("c")])
    with pytest.raises(fatal):
        await sup.run()
    assert probe.log == [("start", "a"), ("start", "c"), ("stop", "c"), ("stop", "a")]


async def test_a_single_exception_group_is_unwrapped_for_the_exit_reason(
    autojump_clock: Any,
) -> None:
    async def grouped(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep(1)
        async with trio.open_nursery():
            raise KeyError("inside a nursery")

    events: list[SupervisorEvent] = []
    sup = Supervisor([ChildSpec("g", grouped, restart=Restart.TRANSIENT)], on_event=events.append)
    async with supervised(sup):
        await trio.sleep(2)
        assert type(info(sup, "g").last_exit) is KeyError
    exits = [e.reason for e in events if e.kind is EventKind.EXIT]
    assert type(exits[0]) is KeyError


async def test_an_error_while_stopping_is_recorded_not_masked_by_cancellation(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def leaky(*, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with cleanup_scope():
                await trio.sleep(0.5)
                raise RuntimeError("flush failed")

    sup = Supervisor([ChildSpec("leaky", leaky)])
    async with supervised(sup):
        await sup.terminate_child("leaky")
        reason = info(sup, "leaky").last_exit
        assert isinstance(reason, RuntimeError)
        assert str(reason) == "flush failed"
    assert any(
        r.levelno == logging.ERROR and "flush failed" in r.getMessage() for r in caplog.records
    )


async def test_no_task_outlives_its_supervisor(autojump_clock: Any) -> None:
    alive = 0

    async def worker() -> None:
        nonlocal alive
        alive += 1
        try:
            await trio.sleep_forever()
        finally:
            alive -= 1

    async def spawner(*, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(worker)
            task_status.started()

    inner = Supervisor([ChildSpec("s", spawner)])
    sup = Supervisor(
        [ChildSpec("s", spawner), ChildSpec("inner", inner.run, shutdown=Shutdown.INFINITY)]
    )
    async with supervised(sup):
        await settle()
        assert alive == 6
    assert alive == 0


# -- Rule 8: logging and the event hook ------------------------------------------------------


async def test_starts_exits_restarts_and_escalation_are_logged_and_sent_to_on_event(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="supervisor")
    probe = Probe()
    events: list[SupervisorEvent] = []
    sup = Supervisor([probe.spec("a")], intensity=1, name="tree", on_event=events.append)

    async def driver() -> None:
        await settle()
        probe.crash("a")
        await settle()
        probe.crash("a")

    assert type(await run_driven(sup, driver)) is SupervisorShutdown
    assert [(e.kind, e.child_id, type(e.reason)) for e in events] == [
        (EventKind.START, "a", type(None)),
        (EventKind.EXIT, "a", Boom),
        (EventKind.RESTART, "a", type(None)),
        (EventKind.EXIT, "a", Boom),
        (EventKind.ESCALATE, "a", Boom),
    ]
    assert sum(e.kind == "restart" for e in events) == 1  # how a service counts restarts
    assert all(e.supervisor == "tree" for e in events)
    lines = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert all(name.startswith("supervisor") for name, _, _ in lines)
    assert [level for _, level, _ in lines] == [
        logging.INFO,
        logging.ERROR,
        logging.INFO,
        logging.ERROR,
        logging.ERROR,
    ]
    assert "started child 'a'" in lines[0][2]
    assert "restarted child 'a'" in lines[2][2]
    assert "restart intensity reached" in lines[4][2]
    assert caplog.records[1].exc_info is not None  # a crash is logged with its traceback


async def test_a_broken_event_hook_is_logged_and_ignored(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: SupervisorEvent) -> None:
        raise ZeroDivisionError

    probe = Probe()
    async with supervised(Supervisor([probe.spec("a")], on_event=broken)):
        probe.crash("a")
        await settle()
        assert probe.events("start") == ["a", "a"]
    assert any("on_event hook raised" in r.getMessage() for r in caplog.records)
