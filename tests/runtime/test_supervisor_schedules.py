"""Random crash schedules (Hypothesis), checked against a plain model of OTP's rules.

Each example builds a supervisor with random strategy, intensity, period and restart types,
then crashes or ends random children at random virtual times. After every step the children's
starts and stops must match the model exactly; over the whole run it checks the properties of
issue 2: restarts inside any window never exceed the intensity, the supervisor gives up exactly
when one more restart would exceed it, stops always go right to left and starts left to right,
and no child task is left running when ``run`` is over.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_supervisor_support import Probe, run_driven, settle

from supervisor import EventKind, Restart, Strategy, Supervisor, SupervisorEvent, SupervisorShutdown


@dataclass
class Scenario:
    restarts: list[Restart]
    strategy: Strategy
    intensity: int
    period: float
    steps: list[tuple[float, int, str]]  # (delay, child, "crash" | "return")


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(1, 4))
    return Scenario(
        restarts=draw(st.lists(st.sampled_from(Restart), min_size=n, max_size=n)),
        strategy=draw(st.sampled_from(Strategy)),
        intensity=draw(st.integers(0, 3)),
        period=draw(st.sampled_from([1.0, 2.5, 5.0])),
        # Multiples of 0.5 s, so restarts land exactly `period` apart now and then.
        steps=draw(
            st.lists(
                st.tuples(
                    st.sampled_from([0.0, 0.5, 1.0, 2.5]),
                    st.integers(0, n - 1),
                    st.sampled_from(["crash", "return"]),
                ),
                max_size=15,
            )
        ),
    )


@dataclass
class Model:
    """OTP's rules, written as plainly as possible, producing the log a Probe should show."""

    scenario: Scenario
    order: list[int] = field(default_factory=list)  # child ids still known, in start order
    running: set[int] = field(default_factory=set)
    restart_times: list[float] = field(default_factory=list)
    log: list[tuple[str, int]] = field(default_factory=list)
    gave_up: bool = False

    def start_all(self) -> None:
        for child in range(len(self.scenario.restarts)):
            self.order.append(child)
            self.running.add(child)
            self.log.append(("start", child))

    def stop(self, children: list[int]) -> None:
        for child in reversed(children):
            if child in self.running:
                self.running.discard(child)
                self.log.append(("stop", child))

    def exit(self, child: int, how: str, now: float) -> None:
        self.log.append((how, child))
        self.running.discard(child)
        kind = self.scenario.restarts[child]
        if kind is Restart.TEMPORARY or (kind is Restart.TRANSIENT and how == "return"):
            if kind is Restart.TEMPORARY:
                self.order.remove(child)
            return
        self.restart_times.append(now)
        recent = [t for t in self.restart_times if now - t <= self.scenario.period]
        if len(recent) > self.scenario.intensity:
            self.stop(self.order)
            self.gave_up = True
            return
        index = self.order.index(child)
        group = {
            Strategy.ONE_FOR_ONE: [child],
            Strategy.ONE_FOR_ALL: list(self.order),
            Strategy.REST_FOR_ONE: self.order[index:],
        }[self.scenario.strategy]
        self.stop(group)
        for other in group:
            if self.scenario.restarts[other] is Restart.TEMPORARY:
                self.order.remove(other)
            else:
                self.running.add(other)
                self.log.append(("start", other))


def check_properties(scenario: Scenario, events: list[SupervisorEvent], log: list[Any]) -> None:
    # A child's own exit (not "shutdown") leads to restarts, to escalation, or to nothing,
    # before the next such exit.
    own = [i for i, e in enumerate(events) if e.kind is EventKind.EXIT and e.reason != "shutdown"]
    decisions: list[float] = []  # times of the restarts that counted against the intensity
    for i, j in itertools.pairwise([*own, len(events)]):
        exit, following = events[i], {e.kind for e in events[i + 1 : j]}
        kind = scenario.restarts[exit.child_id]
        wants_restart = kind is Restart.PERMANENT or (
            kind is Restart.TRANSIENT and exit.reason != "normal"
        )
        in_window = sum(1 for t in decisions if exit.time - t <= scenario.period)
        # Escalation exactly when one more restart would exceed the intensity.
        escalates = wants_restart and in_window >= scenario.intensity
        assert (EventKind.ESCALATE in following) == escalates
        assert (EventKind.RESTART in following) == (wants_restart and not escalates)
        if EventKind.RESTART in following:
            decisions.append(exit.time)
    # Restarts inside any window of `period` seconds never exceed the intensity.
    for t in decisions:
        assert sum(1 for u in decisions if t - scenario.period <= u <= t) <= scenario.intensity
    # Stops go right to left and starts left to right (ids are positions in start order).
    runs: list[tuple[str, list[int]]] = []
    for what, child in log:
        if runs and runs[-1][0] == what:
            runs[-1][1].append(child)
        else:
            runs.append((what, [child]))
    for what, children in runs:
        if what == "stop":
            assert children == sorted(children, reverse=True) and len(set(children)) == len(
                children
            )
        if what == "start":
            assert children == sorted(children) and len(set(children)) == len(children)


async def play(scenario: Scenario) -> None:
    probe = Probe()
    events: list[SupervisorEvent] = []
    sup = Supervisor(
        [probe.spec(i, restart=r) for i, r in enumerate(scenario.restarts)],
        strategy=scenario.strategy,
        intensity=scenario.intensity,
        period=scenario.period,
        on_event=events.append,
    )
    model = Model(scenario)

    async def driver() -> None:
        await settle()
        model.start_all()
        for delay, child, how in scenario.steps:
            await trio.sleep(delay)
            if child not in probe.alive:
                continue
            model.exit(child, how, trio.current_time())
            probe.crash(child) if how == "crash" else probe.finish(child)
            await settle()
            assert probe.log == model.log
            assert probe.alive == model.running
            assert [row.id for row in sup.which_children()] == model.order
        scope.cancel()

    with trio.CancelScope() as scope:
        error = await run_driven(sup, driver)
    if not model.gave_up:
        model.stop(model.order)  # the final shutdown, right to left
    assert probe.log == model.log
    assert (type(error) is SupervisorShutdown) == model.gave_up
    assert probe.running == 0  # no task left running
    check_properties(scenario, events, probe.log)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_crash_schedules_follow_the_rules(scenario: Scenario) -> None:
    trio.run(play, scenario, clock=trio.testing.MockClock(autojump_threshold=0))
