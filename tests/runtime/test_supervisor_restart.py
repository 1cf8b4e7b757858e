"""The pure restart rules (supervisor.restart), checked rule by rule with no Trio and no clock.

Each test names the rule of restart.py's docstring, and the supervisor.erl function, it checks.
"""

from __future__ import annotations

import pytest

from supervisor.child import Restart
from supervisor.restart import (
    RESTARTS,
    Action,
    AutoShutdown,
    ChildState,
    Decision,
    Exit,
    RestartIntensity,
    RestartPolicy,
    Strategy,
)

P, T, X = Restart.PERMANENT, Restart.TRANSIENT, Restart.TEMPORARY


def children(*specs: tuple[str, Restart], stopped: str = "") -> list[ChildState]:
    return [ChildState(i, r, False, i not in stopped) for i, r in specs]


def policy(strategy: Strategy = Strategy.ONE_FOR_ONE, intensity: int = 10) -> RestartPolicy:
    return RestartPolicy(strategy, RestartIntensity(intensity, 5.0))


ABCD = [("a", P), ("b", P), ("c", P), ("d", P)]


def test_r1_restart_types_do_restart() -> None:
    assert RESTARTS == {
        (P, Exit.NORMAL): True,
        (P, Exit.CRASH): True,
        (T, Exit.NORMAL): False,
        (T, Exit.CRASH): True,
        (X, Exit.NORMAL): False,
        (X, Exit.CRASH): False,
    }
    kids = children(("p", P), ("t", T), ("x", X), stopped="ptx")
    assert policy().on_exit(kids, 0, Exit.NORMAL, 0).action is Action.RESTART
    assert policy().on_exit(kids, 1, Exit.NORMAL, 0) == Decision(Action.IGNORE)
    assert policy().on_exit(kids, 1, Exit.CRASH, 0).action is Action.RESTART
    assert policy().on_exit(kids, 2, Exit.CRASH, 0) == Decision(Action.IGNORE, delete=("x",))


def test_r2_intensity_is_a_sliding_window_inclusive_at_period() -> None:
    window = RestartIntensity(2, 5.0)
    assert [window.admit(t) for t in (0.0, 1.0)] == [True, True]
    assert window.admit(5.0) is False  # 0, 1 and 5 are all within [0, 5]
    window = RestartIntensity(2, 5.0)
    assert [window.admit(t) for t in (0.0, 1.0, 5.5, 6.5)] == [True, True, True, True]
    assert window.admit(6.5) is False  # 5.5 and 6.5 are still in the window
    assert RestartIntensity(0, 1.0).admit(0.0) is False
    with pytest.raises(ValueError):
        RestartIntensity(-1, 1.0)
    with pytest.raises(ValueError):
        RestartIntensity(1, 0.0)


def test_r2_no_restart_past_the_intensity() -> None:
    kids = children(*ABCD, stopped="a")
    rules = policy(intensity=1)
    assert rules.on_exit(kids, 0, Exit.CRASH, 0.0).action is Action.RESTART
    assert rules.on_exit(kids, 0, Exit.CRASH, 1.0) == Decision(Action.SHUTDOWN)


@pytest.mark.parametrize(
    ("strategy", "stop", "start"),
    [
        (Strategy.ONE_FOR_ONE, (), ("b",)),
        (Strategy.ONE_FOR_ALL, ("d", "c", "a"), ("a", "b", "c", "d")),
        (Strategy.REST_FOR_ONE, ("d", "c"), ("b", "c", "d")),
    ],
)
def test_r3_r4_strategies_stop_right_to_left_and_start_left_to_right(
    strategy: Strategy, stop: tuple[str, ...], start: tuple[str, ...]
) -> None:
    decision = policy(strategy).on_exit(children(*ABCD, stopped="b"), 1, Exit.CRASH, 0)
    assert decision == Decision(Action.RESTART, stop=stop, start=start)


def test_r4_stopped_children_in_a_group_are_started_not_stopped() -> None:
    decision = policy(Strategy.ONE_FOR_ALL).on_exit(children(*ABCD, stopped="bc"), 1, Exit.CRASH, 0)
    assert decision == Decision(Action.RESTART, stop=("d", "a"), start=("a", "b", "c", "d"))


def test_r5_temporary_siblings_in_a_group_restart_are_stopped_and_deleted() -> None:
    kids = children(("a", X), ("b", P), ("c", X), stopped="b")
    decision = policy(Strategy.ONE_FOR_ALL).on_exit(kids, 1, Exit.CRASH, 0)
    assert decision == Decision(Action.RESTART, stop=("c", "a"), start=("b",), delete=("a", "c"))


def test_r6_auto_shutdown_when_significant_children_are_gone() -> None:
    kids = [ChildState("s1", T, True, False), ChildState("s2", X, True, True)]
    any_ = RestartPolicy(Strategy.ONE_FOR_ONE, RestartIntensity(1, 1), AutoShutdown.ANY_SIGNIFICANT)
    all_ = RestartPolicy(Strategy.ONE_FOR_ONE, RestartIntensity(1, 1), AutoShutdown.ALL_SIGNIFICANT)
    assert any_.on_exit(kids, 0, Exit.NORMAL, 0).action is Action.AUTO_SHUTDOWN
    assert all_.on_exit(kids, 0, Exit.NORMAL, 0).action is Action.IGNORE  # s2 still runs
    kids[1] = kids[1]._replace(running=False)
    assert all_.on_exit(kids, 1, Exit.CRASH, 0) == Decision(Action.AUTO_SHUTDOWN, delete=("s2",))
    assert any_.on_exit(kids, 0, Exit.CRASH, 0).action is Action.RESTART  # a crash restarts


def test_r7_dynamic_children_not_restarted_are_deleted() -> None:
    rules = RestartPolicy(Strategy.ONE_FOR_ONE, RestartIntensity(1, 1), dynamic=True)
    kids = children(("1", T), ("2", P), stopped="12")
    assert rules.on_exit(kids, 0, Exit.NORMAL, 0) == Decision(Action.IGNORE, delete=("1",))
    assert rules.on_exit(kids, 1, Exit.NORMAL, 0).start == ("2",)
