"""The restart rules of Erlang/OTP's supervisor.erl, as a pure decision table: no Trio, no I/O.

Theory of operation
-------------------
The runtime (:mod:`supervisor.supervisor`) tells this module one thing: "child *i* exited,
normally or by crashing, at time *now*; here are all the children in start order and whether
each is running". It gets back a :class:`Decision`: leave it stopped, restart (which siblings to
stop, right to left, then which children to start, left to right), or shut the supervisor down.
The runtime carries the decision out. If one of the starts fails, it asks again as if that child
had crashed (OTP's ``try_again``), so a child that cannot start burns through the intensity
instead of looping hot. Keeping the rules here, away from tasks and cancel scopes, lets each be
read against supervisor.erl line by line and tested without a clock.

The rules, by their OTP names (supervisor.erl)
----------------------------------------------
R1 restart types (``do_restart/3``): ``permanent`` is restarted after every exit, normal or not;
   ``transient`` only after an abnormal one (a crash); ``temporary`` never, and its spec is
   deleted (``del_child/2``) whatever the exit.
R2 intensity (``add_restart/1``): each restart records its time; times older than ``period``
   are forgotten, one exactly ``period`` old still counts; when more than ``intensity`` remain,
   the supervisor shuts down instead of restarting.
R3 strategies (``restart/3``): ``one_for_one`` restarts the exited child; ``one_for_all``
   every child; ``rest_for_one`` the exited child and every child after it.
R4 order (``terminate_children/2``, ``start_children/2``): the affected children that run are
   stopped right to left (reverse start order), then the affected children are started left to
   right, stopped ones included.
R5 temporary siblings caught in a group restart are stopped and deleted, not restarted
   (``terminate_children/2``).
R6 auto shutdown (``do_auto_shutdown/2``): a significant child that exits and is not restarted
   shuts the supervisor down under ``any_significant``, and under ``all_significant`` when no
   other significant child runs. ``never`` refuses significant children (``validSignificant``).
R7 dynamic supervisors (``simple_one_for_one``): one_for_one, and a child that is not restarted
   is deleted whatever its restart type (``del_child/2`` via ``dyn_erase``).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .child import ChildSpec, Restart


class Strategy(enum.Enum):
    """Which children restart together (R3)."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class AutoShutdown(enum.Enum):
    """Whether significant children take their supervisor with them (R6, OTP 24)."""

    NEVER = "never"
    ANY_SIGNIFICANT = "any_significant"
    ALL_SIGNIFICANT = "all_significant"


class Exit(enum.Enum):
    """How a child ended, as the restart rules see it."""

    NORMAL = "normal"  # it returned
    CRASH = "crash"  # it raised an Exception (its start failing included)


class Action(enum.Enum):
    IGNORE = "ignore"  # leave it stopped (and maybe delete its spec)
    RESTART = "restart"
    SHUTDOWN = "shutdown"  # intensity reached: stop everything, raise SupervisorShutdown
    AUTO_SHUTDOWN = "auto_shutdown"  # a significant child is gone: stop everything, return


class ChildState(NamedTuple):
    """What the rules need to know of one child."""

    id: Hashable
    restart: Restart
    significant: bool
    running: bool


@dataclass(frozen=True)
class Decision:
    action: Action
    stop: tuple[Hashable, ...] = ()  # right to left (R4)
    start: tuple[Hashable, ...] = ()  # left to right (R4)
    delete: tuple[Hashable, ...] = ()  # specs to forget, once stopped (R1, R5, R7)


# R1: is a child of this restart type started again after this kind of exit?
RESTARTS: Mapping[tuple[Restart, Exit], bool] = {
    (Restart.PERMANENT, Exit.NORMAL): True,
    (Restart.PERMANENT, Exit.CRASH): True,
    (Restart.TRANSIENT, Exit.NORMAL): False,
    (Restart.TRANSIENT, Exit.CRASH): True,
    (Restart.TEMPORARY, Exit.NORMAL): False,
    (Restart.TEMPORARY, Exit.CRASH): False,
}

# R3: the children a restart touches, as a slice of the start-ordered list around index i.
AFFECTED: Mapping[Strategy, Callable[[int], slice]] = {
    Strategy.ONE_FOR_ONE: lambda i: slice(i, i + 1),
    Strategy.ONE_FOR_ALL: lambda i: slice(None),
    Strategy.REST_FOR_ONE: lambda i: slice(i, None),
}


class RestartIntensity:
    """R2: at most ``intensity`` restarts within any ``period`` seconds (a sliding window)."""

    def __init__(self, intensity: int, period: float) -> None:
        if not isinstance(intensity, int) or intensity < 0:
            raise ValueError(f"intensity must be an int >= 0, got {intensity!r}")
        if not period > 0:
            raise ValueError(f"period must be > 0 seconds, got {period!r}")
        self.intensity = intensity
        self.period = period
        self._times: deque[float] = deque()

    def admit(self, now: float) -> bool:
        """Record a restart at ``now``; False if that is one too many for the window."""
        times = self._times
        times.append(now)
        while now - times[0] > self.period:
            times.popleft()
        return len(times) <= self.intensity


class RestartPolicy:
    """R1-R7 for one run of one supervisor. Stateful only in its intensity window."""

    def __init__(
        self,
        strategy: Strategy,
        intensity: RestartIntensity,
        auto_shutdown: AutoShutdown = AutoShutdown.NEVER,
        *,
        dynamic: bool = False,
    ) -> None:
        self.strategy = strategy
        self.intensity = intensity
        self.auto_shutdown = auto_shutdown
        self.dynamic = dynamic

    def check(self, spec: ChildSpec) -> None:
        """R6: refuse a significant child where nothing would act on it."""
        if spec.significant and self.auto_shutdown is AutoShutdown.NEVER:
            raise ValueError(
                f"child {spec.id!r} is significant but the supervisor's auto_shutdown is NEVER; "
                "pass auto_shutdown=AutoShutdown.ANY_SIGNIFICANT (or ALL_SIGNIFICANT)"
            )

    def on_exit(
        self, children: Sequence[ChildState], index: int, ended: Exit, now: float
    ) -> Decision:
        """Decide what follows ``children[index]`` exiting (it must be marked not running)."""
        child = children[index]
        if not RESTARTS[child.restart, ended]:
            delete = (child.id,) if self.dynamic or child.restart is Restart.TEMPORARY else ()
            if child.significant and self._last_significant(children, index):
                return Decision(Action.AUTO_SHUTDOWN, delete=delete)
            return Decision(Action.IGNORE, delete=delete)
        if not self.intensity.admit(now):
            return Decision(Action.SHUTDOWN)
        affected = children[AFFECTED[self.strategy](index)]
        return Decision(
            Action.RESTART,
            stop=tuple(c.id for c in reversed(affected) if c.running),
            start=tuple(c.id for c in affected if c.restart is not Restart.TEMPORARY),
            delete=tuple(c.id for c in affected if c.restart is Restart.TEMPORARY),
        )

    def _last_significant(self, children: Sequence[ChildState], index: int) -> bool:
        if self.auto_shutdown is AutoShutdown.ANY_SIGNIFICANT:
            return True
        if self.auto_shutdown is AutoShutdown.ALL_SIGNIFICANT:
            return not any(
                c.significant and c.running for i, c in enumerate(children) if i != index
            )
        return False
