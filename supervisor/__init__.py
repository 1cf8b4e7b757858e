"""A generic Erlang/OTP supervision runtime on Trio: supervisors, restart strategies, actors.

It knows nothing about what it supervises. Start here:

* :class:`Supervisor`, :class:`DynamicSupervisor` and :class:`ChildSpec` build supervision trees
  with OTP's restart types, strategies and intensity (the rules are in :mod:`supervisor.restart`).
* :class:`Actor` is gen_server: a task with a mailbox, ``call`` and ``cast``, a name registry,
  deferred replies, timers, and inline answers (an idle actor may answer in the caller's task).
* :func:`cleanup_scope` gives any child the shielded cleanup window its shutdown grace allows.
* :func:`exit_actor` ends an actor as a crash would (OTP's ``exit/2``); :mod:`supervisor.testing`
  builds on it to crash actors on demand or on a schedule, for your tests.
"""

#: Which distribution this package is (``import workers`` checks it: supervisord's package
#: is also called ``supervisor``).
__distribution__ = "trio-sessions"

from .actor import Actor, ActorRef, TimerHandle, call, cast, exit_actor, send_request
from .child import ChildCounts, ChildInfo, ChildSpec, Restart, Shutdown
from .errors import (
    CallTimeout,
    ChildExists,
    ChildNotFound,
    ChildRunning,
    NameTaken,
    NoProc,
    ServerDown,
    StartError,
    SupervisorShutdown,
    TooManyChildren,
    unwrap,
)
from .events import EventKind, SupervisorEvent
from .grace import cleanup_scope
from .registry import whereis
from .reply import ReplySlot
from .restart import AutoShutdown, Strategy
from .supervisor import DynamicSupervisor, Supervisor

__all__ = [
    "Actor",
    "ActorRef",
    "AutoShutdown",
    "CallTimeout",
    "ChildCounts",
    "ChildExists",
    "ChildInfo",
    "ChildNotFound",
    "ChildRunning",
    "ChildSpec",
    "DynamicSupervisor",
    "EventKind",
    "NameTaken",
    "NoProc",
    "ReplySlot",
    "Restart",
    "ServerDown",
    "Shutdown",
    "StartError",
    "Strategy",
    "Supervisor",
    "SupervisorEvent",
    "SupervisorShutdown",
    "TimerHandle",
    "TooManyChildren",
    "call",
    "cast",
    "cleanup_scope",
    "exit_actor",
    "send_request",
    "unwrap",
    "whereis",
]
