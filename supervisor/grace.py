"""The shielded cleanup window a child gets when it stops, bounded by its shutdown grace.

Trio cannot kill a task; it can only cancel it, and a cancelled task's ``finally`` blocks are
cancelled too the moment they await anything. So a child that must release something on the way
out (close a store, release a file lock) needs a *shielded* scope, and a shield must carry its
own deadline, because nothing outside can break it. :func:`cleanup_scope` is that scope: shielded,
with the deadline its supervisor set when it asked the child to stop (now + grace), or now +
grace if the child is exiting on its own. ``Shutdown.BRUTAL_KILL`` makes the window already
expired; ``Shutdown.INFINITY`` makes it unbounded.

The deadline lives in a :class:`Lifetime` that the supervisor puts in a context variable of
the child's task, so every task the child spawns sees the same one.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

import trio

#: The grace for code that runs outside any supervisor (the ChildSpec default).
DEFAULT_GRACE = 5.0


class Lifetime:
    """The stop deadline of one child incarnation, shared by all of that child's tasks."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.deadline: float | None = None  # set when the supervisor asks it to stop
        self._windows: set[trio.CancelScope] = set()

    def stop_by(self, deadline: float) -> None:
        """The supervisor's stop request: cleanup must be over by ``deadline``."""
        self.deadline = deadline
        for window in self._windows:
            window.deadline = min(window.deadline, deadline)

    @contextmanager
    def window(self) -> Iterator[trio.CancelScope]:
        deadline = self.deadline
        if deadline is None:
            deadline = trio.current_time() + self.grace
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            self._windows.add(scope)
            try:
                yield scope
            finally:
                self._windows.discard(scope)


_current: contextvars.ContextVar[Lifetime | None] = contextvars.ContextVar(
    "supervisor_lifetime", default=None
)


def enter_lifetime(lifetime: Lifetime) -> None:
    """Make ``lifetime`` the current child's, for this task and every task it spawns."""
    _current.set(lifetime)


@contextmanager
def cleanup_scope() -> Iterator[trio.CancelScope]:
    """A shielded cancel scope for cleanup, ending at this child's shutdown deadline.

    Use it for the awaits of a ``finally`` or ``except trio.Cancelled`` block::

        try:
            await serve()
        finally:
            with cleanup_scope():
                await store.aclose()

    :class:`~supervisor.Actor` runs ``terminate`` in one. Outside a supervised child the window
    is ``DEFAULT_GRACE`` seconds.
    """
    lifetime = _current.get() or Lifetime(DEFAULT_GRACE)
    with lifetime.window() as scope:
        yield scope
