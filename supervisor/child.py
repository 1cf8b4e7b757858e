"""What a supervisor knows about a child: how to start it, when to restart it, how to stop it.

A :class:`ChildSpec` is OTP's child specification. ``start`` is an async callable run as
``await nursery.start(start)``; it calls ``task_status.started(value)`` once it is ready to
serve, and everything it does before that is its *init*: an exception there is a start failure,
not a crash. ``value`` (an :class:`~supervisor.ActorRef`, a supervisor, anything) is what
``start_child`` returns and what :class:`ChildInfo` shows.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import ExitReason


class Restart(enum.Enum):
    """When a child that exited on its own is started again (OTP's restart types)."""

    #: Always: after a crash and after a normal return. Both count against the intensity.
    PERMANENT = "permanent"
    #: Only after a crash (an ``Exception``); a normal return leaves it stopped.
    TRANSIENT = "transient"
    #: Never. Its spec is forgotten when it exits, and its exit never affects a sibling.
    TEMPORARY = "temporary"


class Shutdown(enum.Enum):
    """Special shutdown policies; a plain number is a grace in seconds."""

    #: No cleanup window at all: cancelled, and any cleanup scope is already expired.
    BRUTAL_KILL = "brutal_kill"
    #: Wait as long as the child needs. Give this to child supervisors, so they can stop
    #: their own children with their own graces.
    INFINITY = "infinity"


@dataclass(frozen=True)
class ChildSpec:
    """How to start, restart and stop one child.

    ``shutdown`` is the grace in seconds between cancelling the child and giving up waiting
    for it (logged as overdue), or a :class:`Shutdown` policy. ``significant`` children of a
    supervisor with ``auto_shutdown`` make it stop when they exit for good (OTP 24's rule);
    only transient and temporary children may be significant.
    """

    id: Hashable
    start: Callable[..., Awaitable[Any]]
    restart: Restart = Restart.PERMANENT
    shutdown: float | Shutdown = 5.0
    significant: bool = False

    def __post_init__(self) -> None:
        if not callable(self.start):
            raise TypeError(f"child {self.id!r}: start must be async callable, got {self.start!r}")
        if not isinstance(self.restart, Restart):
            raise TypeError(f"child {self.id!r}: restart must be a Restart, got {self.restart!r}")
        if not isinstance(self.shutdown, Shutdown) and not (
            isinstance(self.shutdown, int | float) and self.shutdown >= 0
        ):
            raise ValueError(
                f"child {self.id!r}: shutdown must be seconds >= 0 or a Shutdown, "
                f"got {self.shutdown!r}"
            )
        if self.significant and self.restart is Restart.PERMANENT:
            raise ValueError(
                f"child {self.id!r}: a permanent child cannot be significant (it never exits "
                "for good); make it transient or temporary"
            )

    @property
    def grace(self) -> float:
        """The shutdown grace in seconds: 0 for brutal kill, infinity for ``INFINITY``."""
        if self.shutdown is Shutdown.BRUTAL_KILL:
            return 0.0
        if self.shutdown is Shutdown.INFINITY:
            return math.inf
        return float(self.shutdown)


@dataclass(frozen=True)
class ChildInfo:
    """One row of :meth:`Supervisor.which_children`, in start order.

    ``restarts`` counts starts after the first (automatic or by ``restart_child``).
    ``last_exit`` is None before any exit, else the last exit reason: ``"normal"``,
    ``"shutdown"`` or the exception. ``value`` is what the running incarnation passed to
    ``task_status.started`` (None when it is not running).
    """

    id: Hashable
    running: bool
    restarts: int
    last_exit: ExitReason | None
    value: Any
    restart: Restart


class ChildCounts(NamedTuple):
    """:meth:`Supervisor.count_children`: how many specs the supervisor holds, how many run."""

    specs: int
    active: int
