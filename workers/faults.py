"""Fault injection for the session service: a store that fails on cue, and a clock that jumps.

:class:`FaultyStore` wraps any :class:`~workers.stores.base.Store` and, at the points you
choose, makes a call raise, hang, or slow down, before or after the real call runs. Pass it to
the service with ``store=``::

    import errno
    from workers import StoreError, open_session_service
    from workers.faults import FaultyStore
    from workers.stores import make_store

    async def test_full_disk(autojump_clock):
        store = FaultyStore(make_store("memory"), seed=1)
        async with open_session_service(store=store) as sessions:
            store.fail("commit", OSError(errno.ENOSPC, "No space left on device"))
            with pytest.raises(StoreError):          # as a real disk store reports it
                await sessions.create({})
            store.clear()                            # space is back
            await sessions.create({})

Where a fault strikes: ``methods`` names store methods (``"commit"``, ``("load", "scan")``;
default every method but ``open`` and ``close``; a shared store's ``load_touching`` is a
``"load"``); ``calls`` picks the n-th calls of those methods
(counted from 1 in :attr:`FaultyStore.calls`); ``probability`` strikes at random, from
``random.Random(seed)``, so a failing run can be replayed; ``times`` limits how often it strikes;
``after=True`` runs the real call first and fails on the way back (a crash after a commit: the
write happened, the caller cannot know).

What it does: :meth:`~FaultyStore.fail` raises a fresh copy of an exception. An ``OSError``
becomes a :class:`~workers.record.errors.StoreError` naming it, as the real stores report I/O errors
(ENOSPC, EIO); a ``StoreError`` goes to the callers of the batch; any other exception is a bug
as far as the manager knows, so it crashes the manager (use that to test supervision).
:meth:`~FaultyStore.hang` blocks the call until :meth:`~FaultyStore.clear` (or ``seconds``);
:meth:`~FaultyStore.slow` delays it. :meth:`~FaultyStore.clear` removes every fault and lets
hung calls go on; ``enabled = False`` pauses all faults and lets hung calls go on, ``True``
resumes them.

:class:`JumpingClock` is a wall clock (for ``open_session_service(clock=...)``) that follows a
base clock plus an offset you move with :meth:`~JumpingClock.jump`, to test clock steps.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .record.errors import StoreError
from .record.session import Session
from .stores.base import Store, Write

#: The methods of the Store protocol a fault can target.
STORE_METHODS = ("open", "close", "load", "commit", "load_mark", "scan", "expired", "count")
#: What a fault targets when no methods are named: everything a running manager calls.
DATA_METHODS = ("load", "commit", "scan", "expired", "count")


@dataclass(slots=True)
class Fault:
    """One injected fault; :meth:`FaultyStore.fail` and friends return it.

    Change ``remaining`` or call :meth:`FaultyStore.remove` to retire it. ``strikes`` counts how
    often it struck, and ``struck`` is set when it first does: ``await fault.struck.wait()``
    lets a test act while a hung call is under way (say, another writer's update between a
    manager's load and its commit).
    """

    methods: frozenset[str]
    error: BaseException | None = None
    hang: float = 0.0
    delay: float | tuple[float, float] = 0.0
    calls: frozenset[int] | None = None
    probability: float = 1.0
    remaining: float = math.inf
    after: bool = False
    strikes: int = 0
    struck: trio.Event = field(default_factory=trio.Event)


#: An ImmediateStore's synchronous forms: a faulty store's calls may hang, so it never is one
#: (the manager then sends every request through its batches, where the faults are).
_NOT_FORWARDED = frozenset(("load_now", "commit_now", "loads_now", "commits_now"))


class FaultyStore:
    """A :class:`~workers.stores.base.Store` that delegates to ``inner`` and injects faults.

    See the module docstring. Every method counts its calls in :attr:`calls`, before any fault.
    """

    def __init__(self, inner: Store, *, seed: int | None = None) -> None:
        self.inner = inner
        #: Calls made so far, by method name.
        self.calls: Counter[str] = Counter()
        self.faults: list[Fault] = []
        self._rng = random.Random(seed)
        self._enabled = True
        self._released = trio.Event()

    @property
    def backend(self) -> str:
        return self.inner.backend

    @property
    def shared(self) -> bool:
        return self.inner.shared

    def __getattr__(self, name: str) -> Any:
        if name in _NOT_FORWARDED:
            raise AttributeError(f"{type(self).__name__} has no {name}")
        extra = getattr(self.inner, name)  # a backend's extras (path, ...)
        if name == "load_touching":  # a shared store's load that refreshes: faults of "load"
            return functools.partial(self._run, "load", via=name)
        return extra

    # -- arming faults -------------------------------------------------------------------

    def fail(
        self,
        methods: str | Iterable[str] | None = None,
        error: BaseException | None = None,
        **when: Any,
    ) -> Fault:
        """Make calls raise a fresh copy of ``error`` (default: a ``StoreError``).

        ``when`` takes ``calls``, ``probability``, ``times`` and ``after`` (module docstring).
        """
        if error is None:
            error = StoreError("injected store failure")
        return self._arm(methods, when, error=error)

    def hang(
        self, methods: str | Iterable[str] | None = None, *, seconds: float = math.inf, **when: Any
    ) -> Fault:
        """Make calls block for ``seconds``, or until :meth:`clear` or ``enabled = False``."""
        return self._arm(methods, when, hang=seconds)

    def slow(
        self,
        methods: str | Iterable[str] | None = None,
        delay: float | tuple[float, float] = 0.1,
        **when: Any,
    ) -> Fault:
        """Delay calls by ``delay`` seconds, or by a seeded uniform draw from ``(low, high)``."""
        return self._arm(methods, when, delay=delay)

    def _arm(
        self,
        methods: str | Iterable[str] | None,
        when: dict[str, Any],
        **what: Any,
    ) -> Fault:
        names = (
            DATA_METHODS
            if methods is None
            else (methods,)
            if isinstance(methods, str)
            else tuple(methods)
        )
        unknown = set(names) - set(STORE_METHODS)
        if unknown:
            raise ValueError(f"not store methods: {sorted(unknown)}; choose from {STORE_METHODS}")
        calls = when.pop("calls", None)
        times = when.pop("times", None)
        fault = Fault(
            frozenset(names),
            calls=None if calls is None else frozenset(calls),
            remaining=math.inf if times is None else times,
            **when,
            **what,
        )
        if not 0.0 <= fault.probability <= 1.0:
            raise ValueError(f"probability is between 0 and 1, got {fault.probability!r}")
        self.faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        """Retire one fault (calls it is hanging go on)."""
        self.faults.remove(fault)
        self._release()

    def clear(self) -> None:
        """Remove every fault; calls hanging now go on."""
        self.faults.clear()
        self._release()

    @property
    def enabled(self) -> bool:
        """False pauses every fault (and lets hung calls go on); True resumes them."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        if not value:
            self._release()

    def _release(self) -> None:
        self._released.set()
        self._released = trio.Event()

    # -- striking ------------------------------------------------------------------------

    def _due(self, method: str, after: bool) -> list[Fault]:
        if not self._enabled:
            return []
        n = self.calls[method]
        due = []
        for fault in self.faults:
            if (
                fault.after == after
                and method in fault.methods
                and fault.remaining > 0
                and (fault.calls is None or n in fault.calls)
                and (fault.probability >= 1.0 or self._rng.random() < fault.probability)
            ):
                fault.remaining -= 1
                fault.strikes += 1
                fault.struck.set()
                due.append(fault)
        return due

    async def _strike(self, method: str, *, after: bool) -> None:
        for fault in self._due(method, after):
            if fault.delay:
                delay = fault.delay
                await trio.sleep(self._rng.uniform(*delay) if isinstance(delay, tuple) else delay)
            if fault.hang:
                with trio.move_on_after(fault.hang):
                    await self._released.wait()
            if fault.error is not None:
                raise self._exception(fault.error, method)

    def _exception(self, error: BaseException, method: str) -> BaseException:
        # A fresh copy per raise: one exception object raised in many places collects all
        # their tracebacks.
        if isinstance(error, OSError):
            failure = StoreError(f"{self.backend} store {method}: {error}")
            failure.__cause__ = copy.copy(error)
            return failure
        return copy.copy(error)

    async def _run(self, method: str, *args: Any, via: str | None = None) -> Any:
        self.calls[method] += 1
        await self._strike(method, after=False)
        result = await getattr(self.inner, via or method)(*args)
        await self._strike(method, after=True)
        return result

    # -- the Store protocol --------------------------------------------------------------

    async def open(self) -> None:
        await self._run("open")

    async def close(self) -> None:
        await self._run("close")

    async def load(self, ids: Sequence[str]) -> dict[str, Session]:
        return await self._run("load", ids)

    async def commit(self, writes: Sequence[Write]) -> list[bool]:
        return await self._run("commit", writes)

    async def load_mark(self) -> int:
        return await self._run("load_mark")

    async def scan(
        self, now_ms: int, cursor: str | None, limit: int
    ) -> tuple[list[Session], str | None]:
        return await self._run("scan", now_ms, cursor, limit)

    async def expired(self, now_ms: int, limit: int) -> list[str]:
        return await self._run("expired", now_ms, limit)

    async def count(self, now_ms: int) -> int:
        return await self._run("count", now_ms)


class JumpingClock:
    """A wall clock (seconds since the epoch) that is ``base()`` plus an offset you control.

    ``jump(-3600)`` steps it back an hour, as a bad NTP step or a VM resume might. In tests,
    give it a ``base`` driven by Trio's virtual clock:
    ``JumpingClock(lambda: EPOCH + trio.current_time())``.
    """

    def __init__(self, base: Callable[[], float] = time.time) -> None:
        self.base = base
        self.offset = 0.0

    def jump(self, seconds: float) -> None:
        """Move the clock by ``seconds`` (negative: backwards), from now on."""
        self.offset += seconds

    def __call__(self) -> float:
        return self.base() + self.offset


__all__ = ["DATA_METHODS", "STORE_METHODS", "Fault", "FaultyStore", "JumpingClock"]
