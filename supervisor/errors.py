"""The errors of the supervision runtime, and how an exception becomes an exit reason.

Each error says what happened and what to do about it. They subclass the builtin that fits
(``LookupError`` for "nothing under that id or name", ``TimeoutError`` for a call that gave up),
so callers that know nothing of this package still catch them sensibly.

An *exit reason* is how a child or actor ended: the string ``"normal"`` (it returned), the string
``"shutdown"`` (its supervisor stopped it), or the exception it crashed with. Trio wraps errors in
exception groups on their way out of nurseries; :func:`exit_reason` unwraps a group that holds a
single exception, so a reason is the error a person would name, not its envelope.
"""

from __future__ import annotations

from collections.abc import Hashable

import trio

#: An exit reason: ``"normal"``, ``"shutdown"`` or the exception the child or actor raised.
ExitReason = str | BaseException


class StartError(Exception):
    """A child failed to start (it raised before calling ``task_status.started``).

    When the initial start of a supervisor fails, the children started before it were stopped
    in reverse order before this was raised. ``cause`` is the child's own exception.
    """

    def __init__(self, child_id: Hashable, cause: BaseException) -> None:
        super().__init__(f"child {child_id!r} failed to start: {cause!r}")
        self.child_id = child_id
        self.cause = cause


class SupervisorShutdown(Exception):
    """A supervisor gave up: its children needed more restarts than its intensity allows.

    Every child was stopped, in reverse start order, before this was raised. ``cause`` is the
    exit reason that asked for the restart it refused. To a parent supervisor this is a crash
    of that child, so the parent decides (with its own budget) whether to start it again.
    """

    def __init__(self, supervisor: str, child_id: Hashable, cause: ExitReason) -> None:
        super().__init__(
            f"supervisor {supervisor!r} shut down: restart intensity reached when child "
            f"{child_id!r} exited with {cause!r}; fix the crash, or raise intensity/period"
        )
        self.supervisor = supervisor
        self.child_id = child_id
        self.cause = cause


class ChildNotFound(LookupError):
    """No child with this id is known to the supervisor (never added, deleted, or temporary)."""

    def __init__(self, supervisor: str, child_id: Hashable) -> None:
        super().__init__(f"supervisor {supervisor!r} has no child {child_id!r}")
        self.child_id = child_id


class ChildExists(ValueError):
    """A child spec with this id is already present; ids are unique within a supervisor."""

    def __init__(self, supervisor: str, child_id: Hashable, running: bool) -> None:
        state = "running" if running else "present (stopped)"
        super().__init__(
            f"supervisor {supervisor!r} already has child {child_id!r} ({state}); use another "
            "id, or restart_child/delete_child the existing one"
        )
        self.child_id = child_id
        self.running = running


class ChildRunning(RuntimeError):
    """The operation needs a stopped child, and this one is running (OTP's ``{error, running}``)."""

    def __init__(self, supervisor: str, child_id: Hashable) -> None:
        super().__init__(
            f"child {child_id!r} of supervisor {supervisor!r} is running; terminate_child it first"
        )
        self.child_id = child_id


class TooManyChildren(RuntimeError):
    """A dynamic supervisor already runs ``max_children`` children."""


class NoProc(LookupError):
    """Nothing runs under this name or ref (never started, exited, or the supervisor stopped)."""


class NameTaken(ValueError):
    """An actor tried to register a name that a running actor already holds."""

    def __init__(self, name: Hashable) -> None:
        super().__init__(
            f"the name {name!r} is registered to a running actor; stop that actor first, or "
            "start this one under another name"
        )
        self.name = name


class ServerDown(Exception):
    """The actor exited before answering; ``reason`` is its exit reason.

    Raised at once in every caller with a call queued or in progress when the actor dies, not at
    the caller's timeout. The request may or may not have been handled.
    """

    def __init__(self, actor: object, reason: ExitReason) -> None:
        super().__init__(f"{actor} exited before replying: {reason!r}")
        self.reason = reason


class CallTimeout(TimeoutError):
    """No reply came within the call's timeout. The actor is alive but busy or slow to answer;
    its reply, if it ever comes, is dropped. Pass a larger ``timeout=`` if the work is slow."""


def unwrap(exc: BaseException) -> BaseException:
    """The single exception inside (nested) one-exception groups, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def exit_reason(exc: BaseException) -> ExitReason:
    """The exit reason for an incarnation that ended by raising ``exc``.

    Cancellation (alone or in a group of cancellations) is ``"shutdown"``: nothing but a stop
    request cancels a supervised child. Anything else keeps its identity, unwrapped.
    """
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(trio.Cancelled)
        return "shutdown" if rest is None else unwrap(rest)
    return "shutdown" if isinstance(exc, trio.Cancelled) else exc
