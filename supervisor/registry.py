"""Actor names: one registry per Trio run, so tests and separate ``trio.run`` calls never share.

A name maps to the :class:`~supervisor.ActorRef` of the one running actor that holds it. An
actor registers before its ``init`` runs (callers that arrive during ``init`` queue up in its
mailbox, as in OTP) and unregisters the moment it dies, before its ``terminate`` runs, so that
callers resolving the name wait for the next incarnation instead of reaching a dying one. A
restarted actor registers the same name again; :func:`wait_for` lets a caller wait, within a
bound, for that to happen.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

import trio

from .errors import NameTaken, NoProc

if TYPE_CHECKING:
    from .actor import ActorRef

T = TypeVar("T")


# name -> ref of the running actor holding it, and name -> callers waiting for it (wait_for).
_NAMES: trio.lowlevel.RunVar[dict[Hashable, ActorRef]] = trio.lowlevel.RunVar("supervisor.names")
_WAITERS: trio.lowlevel.RunVar[dict[Hashable, trio.lowlevel.ParkingLot]] = trio.lowlevel.RunVar(
    "supervisor.name_waiters"
)
_NO_NAMES: Mapping[Hashable, ActorRef] = MappingProxyType({})


def _run_dict(var: trio.lowlevel.RunVar[dict[Hashable, T]]) -> dict[Hashable, T]:
    try:
        return var.get()
    except LookupError:
        value: dict[Hashable, T] = {}
        var.set(value)
        return value


def register(name: Hashable, ref: ActorRef) -> None:
    names = _run_dict(_NAMES)
    if name in names:
        raise NameTaken(name)
    names[name] = ref
    waiters = _run_dict(_WAITERS).pop(name, None)
    if waiters is not None:
        waiters.unpark_all()


def unregister(name: Hashable, ref: ActorRef) -> None:
    names = _run_dict(_NAMES)
    if names.get(name) is ref:
        del names[name]


def lookup(name: Hashable) -> ActorRef | None:
    return _NAMES.get(_NO_NAMES).get(name)  # on every call by name: kept to one dict lookup


async def wait_for(name: Hashable, deadline: float) -> ActorRef | None:
    """The ref registered under ``name``, waiting until ``deadline`` for one; None if none."""
    names, waiters = _run_dict(_NAMES), _run_dict(_WAITERS)
    with trio.move_on_at(deadline):
        while (ref := names.get(name)) is None:
            lot = waiters.setdefault(name, trio.lowlevel.ParkingLot())
            try:
                await lot.park()
            finally:
                if not lot.statistics().tasks_waiting and waiters.get(name) is lot:
                    del waiters[name]
        return ref
    return None


def whereis(name: Hashable) -> ActorRef:
    """The :class:`~supervisor.ActorRef` registered under ``name``; :class:`NoProc` if free."""
    ref = lookup(name)
    if ref is None:
        raise NoProc(f"no actor is registered under {name!r}")
    return ref
