"""What a supervisor reports: every start, exit, restart, escalation and overdue shutdown.

Each event goes to stdlib :mod:`logging` (logger ``supervisor.events``; crashes at ERROR with
their traceback; the record's ``supervisor_event`` attribute is the :class:`EventKind` value,
for log filters) and, when the supervisor was given ``on_event=``, to that callable as a
:class:`SupervisorEvent`, so a service can count restarts or export metrics without parsing
logs. The hook runs synchronously inside the supervisor: keep it cheap. An exception from it is
logged and otherwise ignored, because a broken metrics hook must not take the tree down.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import trio

from .errors import ExitReason

logger = logging.getLogger(__name__)


class EventKind(enum.StrEnum):
    """What happened. A ``str``, so ``event.kind == "restart"`` works without importing this."""

    START = "start"  # first start of a child
    RESTART = "restart"  # any later start (by the restart rules or restart_child)
    START_FAILED = "start_failed"  # its start raised; reason is the error
    EXIT = "exit"  # reason: "normal", "shutdown" or the exception
    ESCALATE = "escalate"  # intensity reached; the supervisor is shutting down
    AUTO_SHUTDOWN = "auto_shutdown"  # a significant child is gone; the supervisor stops
    OVERDUE = "overdue"  # a child outlived its shutdown grace; still waiting for it


@dataclass(frozen=True)
class SupervisorEvent:
    kind: EventKind
    supervisor: str
    child_id: Hashable
    reason: ExitReason | None
    time: float  # trio.current_time()


# kind -> (level, message, log the reason's traceback). A reason that is an exception raises
# the level to ERROR: a crash is never an INFO line.
_LOG: dict[EventKind, tuple[int, str, bool]] = {
    EventKind.START: (logging.INFO, "started child %(child)r", False),
    EventKind.RESTART: (logging.INFO, "restarted child %(child)r", False),
    EventKind.START_FAILED: (logging.ERROR, "child %(child)r failed to start: %(reason)r", True),
    EventKind.EXIT: (logging.INFO, "child %(child)r exited: %(reason)r", True),
    EventKind.ESCALATE: (
        logging.ERROR,
        "restart intensity reached after child %(child)r exited with %(reason)r; "
        "stopping every child and shutting down",
        False,
    ),
    EventKind.AUTO_SHUTDOWN: (
        logging.INFO,
        "significant child %(child)r exited (%(reason)r); stopping every child",
        False,
    ),
    EventKind.OVERDUE: (
        logging.WARNING,
        "child %(child)r is still running after its shutdown grace; it ignores cancellation, "
        "and the supervisor keeps waiting for it",
        False,
    ),
}


class Reporter:
    """Logs and forwards the events of one supervisor."""

    def __init__(self, supervisor: str, hook: Callable[[SupervisorEvent], object] | None) -> None:
        self.supervisor = supervisor
        self.hook = hook

    def __call__(
        self, kind: EventKind, child_id: Hashable, reason: ExitReason | None = None
    ) -> None:
        level, message, traceback = _LOG[kind]
        crashed = isinstance(reason, BaseException)
        logger.log(
            logging.ERROR if crashed else level,
            "supervisor %(supervisor)r: " + message,
            {"supervisor": self.supervisor, "child": child_id, "reason": reason},
            exc_info=reason if crashed and traceback else None,
            extra={"supervisor_event": kind.value},
        )
        if self.hook is not None:
            event = SupervisorEvent(kind, self.supervisor, child_id, reason, trio.current_time())
            try:
                self.hook(event)
            except Exception:
                logger.exception("supervisor %r: on_event hook raised; ignored", self.supervisor)
