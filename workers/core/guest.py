"""The embedded service under asyncio: the Trio tree as a guest on asyncio's own loop.

:func:`~workers.core.service.open_session_service` comes here when it is entered under asyncio
(``asyncio.run``, uvicorn, an MCP server on anyio's asyncio backend). The supervision tree is
Trio code, and it runs in Trio's guest mode (:func:`trio.lowlevel.start_guest_run`): Trio's
scheduler runs as callbacks of asyncio's loop, in the same thread, and only Trio's wait for I/O
is done by a helper thread that does nothing else. So the service behaves exactly as under
Trio (the same manager, the same restarts, the same store thread), with no second event loop.

Trio allows one run per thread, so one guest run per asyncio loop serves every service opened
on it (:class:`_GuestRun`) and ends when the last of them closes.

The service's methods are Trio coroutines, which asyncio cannot await. The object yielded here,
:class:`GuestService`, has the same methods as asyncio coroutines: a call becomes a Trio task in
the guest run, whose outcome (value or error, the same classes) settles an asyncio future.
Cancelling the caller cancels that task. If the tree gives up (``SupervisorShutdown``) while the
``async with`` body runs, the body is cancelled and the error is raised from the block, as a
Trio nursery would do.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import trio

from ..record.errors import ServiceUnavailable
from .service import SessionService, open_trio_service

T = TypeVar("T")

#: The guest run of each asyncio loop that has one.
_runs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _GuestRun] = weakref.WeakKeyDictionary()


def _settle(
    future: asyncio.Future[T], value: Any = None, error: BaseException | None = None
) -> None:
    """Set ``future``'s outcome unless it already has one (its waiter may have given up)."""
    if not future.done():
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


async def _wait_through_cancellation(future: asyncio.Future[Any]) -> None:
    """Wait for ``future`` even if the waiting task is cancelled meanwhile, then re-raise the
    cancellation: stopping the tree and closing the store must finish whatever happens."""
    cancelled = False
    with anyio.CancelScope(shield=True):  # keeps anyio's repeated cancellations away
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                cancelled = True
    if cancelled:
        raise asyncio.CancelledError


class _GuestRun:
    """One Trio guest run on one asyncio loop, shared by the services opened on that loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.users = 0
        self.stopping = False
        self.ready: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.nursery: trio.Nursery | None = None
        self._idle: trio.Event | None = None
        trio.lowlevel.start_guest_run(
            self._main,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=loop.call_soon,
            done_callback=self._finished,
            # asyncio owns the signal wakeup fd; the service handles no signals itself.
            host_uses_signal_set_wakeup_fd=True,
        )
        self.token = trio.lowlevel.current_trio_token()

    async def _main(self) -> None:
        self._idle = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            _settle(self.ready)
            await self._idle.wait()

    def _finished(self, result: Any) -> None:  # an outcome.Value or outcome.Error
        if _runs.get(self.loop) is self:
            del _runs[self.loop]
        error = getattr(result, "error", None)
        why = ServiceUnavailable(f"the service's Trio run ended ({error!r})")
        _settle(self.ready, error=why)  # only if it failed before it was ready
        _settle(self.done)

    def run_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Call ``fn(*args)`` in the guest run, from asyncio; ServiceUnavailable once it ended."""
        try:
            self.token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            raise ServiceUnavailable("the service's Trio run has ended") from None

    @classmethod
    async def acquire(cls) -> _GuestRun:
        """The running loop's guest run, started if it has none; :meth:`release` it after."""
        loop = asyncio.get_running_loop()
        while True:
            run = _runs.get(loop)
            if run is None:
                if trio.lowlevel.in_trio_run():
                    raise RuntimeError(
                        "this thread already runs Trio (another guest run?): open the session "
                        "service from Trio code there, or from a plain asyncio loop"
                    )
                run = _runs[loop] = cls(loop)
            elif run.stopping:
                await _wait_through_cancellation(run.done)  # Trio allows one run per thread
                continue
            run.users += 1
            try:
                await asyncio.shield(run.ready)
            except BaseException:
                await run.release()
                raise
            return run

    async def release(self) -> None:
        """One user fewer; the last one stops the run and waits for it to end."""
        self.users -= 1
        if self.users == 0:
            self.stopping = True
            if self._idle is not None:
                self.run_soon(self._idle.set)
            await _wait_through_cancellation(self.done)


class GuestService:
    """A :class:`~workers.core.service.SessionService` running in a guest Trio run, with the same
    methods as asyncio coroutines (the same arguments, results and errors)."""

    def __init__(self, run: _GuestRun) -> None:
        self._run = run
        self._loop = run.loop
        self._host = asyncio.current_task()
        self._started: asyncio.Future[None] = self._loop.create_future()
        self._stopped: asyncio.Future[None] = self._loop.create_future()
        self._scope = trio.CancelScope()
        self._service: SessionService | None = None
        self._calls: trio.Nursery | None = None
        self._scopes: dict[asyncio.Future[Any], trio.CancelScope] = {}
        self._in_body = False
        self._host_cancelled = False
        self.failure: BaseException | None = None

    @property
    def backend(self) -> str:
        """The canonical backend name."""
        assert self._service is not None
        return self._service.backend

    @property
    def actors(self) -> dict[str, str]:
        """The registered names of the service's actors (see ``SessionService.actors``)."""
        assert self._service is not None
        return self._service.actors

    @property
    def restarts(self) -> int:
        """Restarts of the service's children since it started."""
        assert self._service is not None
        return self._service.restarts

    # -- the Trio side ------------------------------------------------------------------------

    async def _serve(self, options: dict[str, Any]) -> None:
        failure: BaseException | None = None
        try:
            with self._scope:
                async with open_trio_service(**options) as service:
                    async with trio.open_nursery() as calls:
                        self._service, self._calls = service, calls
                        _settle(self._started)
                        await trio.sleep_forever()
        except trio.Cancelled:  # the whole guest run is ending
            failure = ServiceUnavailable("the service's Trio run stopped")
            raise
        except BaseException as exc:  # the tree gave up, or its store could not be opened
            failure = exc
        finally:
            self._calls = None
            if not self._started.done():
                _settle(self._started, error=failure or ServiceUnavailable("never started"))
            elif failure is not None:
                self._fail(failure)
            _settle(self._stopped)

    def _fail(self, failure: BaseException) -> None:
        self.failure = failure
        if self._in_body and self._host is not None and not self._host.done():
            self._host_cancelled = True
            self._host.cancel()

    def _start_call(self, future: asyncio.Future[Any], name: str, args: Any, kwargs: Any) -> None:
        calls = self._calls
        if calls is None:
            _settle(future, error=ServiceUnavailable("the session service has stopped"))
            return
        method = getattr(self._service, name)
        calls.start_soon(self._run_call, future, method, args, kwargs, name=name)

    async def _run_call(
        self, future: asyncio.Future[Any], method: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        if future.done():
            return  # its caller gave up before it started
        with trio.CancelScope() as scope:
            self._scopes[future] = scope
            try:
                value = await method(*args, **kwargs)
            except trio.Cancelled:
                _settle(future, error=ServiceUnavailable("the session service stopped"))
                raise
            except Exception as exc:
                _settle(future, error=exc)
            else:
                _settle(future, value)
            finally:
                del self._scopes[future]

    def _cancel_call(self, future: asyncio.Future[Any]) -> None:
        scope = self._scopes.get(future)
        if scope is not None:
            scope.cancel()

    # -- the asyncio side ---------------------------------------------------------------------

    async def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._stopped.done():
            raise ServiceUnavailable("the session service has stopped")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._run.run_soon(self._start_call, future, name, args, kwargs)
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled():
                self._run.run_soon(self._cancel_call, future)
            raise

    async def _start(self, options: dict[str, Any]) -> None:
        nursery = self._run.nursery
        assert nursery is not None
        self._run.run_soon(nursery.start_soon, self._serve, options)
        try:
            await asyncio.shield(self._started)
        except asyncio.CancelledError:
            await self._stop()
            raise
        self._in_body = True

    async def _stop(self) -> None:
        self._in_body = False
        if not self._stopped.done():
            self._run.run_soon(self._scope.cancel)
        await _wait_through_cancellation(self._stopped)

    async def _absorb_own_cancel(self, delivered: bool) -> bool:
        """Undo the cancellation :meth:`_fail` sent the body; True if there was one."""
        if not self._host_cancelled:
            return False
        self._host_cancelled = False
        if not delivered:  # the body ended first: take it here, not in the caller's next await
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                pass
        assert self._host is not None
        self._host.uncancel()
        return True


def _method(name: str) -> Callable[..., Any]:
    """The asyncio coroutine for the service's method ``name``."""

    @functools.wraps(getattr(SessionService, name))
    async def method(self: GuestService, *args: Any, **kwargs: Any) -> Any:
        return await self._call(name, args, kwargs)

    return method


#: The service's public coroutine methods, which GuestService offers to asyncio.
METHODS = [
    name
    for name, value in vars(SessionService).items()
    if not name.startswith("_") and inspect.iscoroutinefunction(value)
]
for _name in METHODS:
    setattr(GuestService, _name, _method(_name))


@asynccontextmanager
async def open_guest_service(**options: Any) -> AsyncIterator[GuestService]:
    """:func:`~workers.core.service.open_session_service` for asyncio code (see the module)."""
    run = await _GuestRun.acquire()
    try:
        guest = GuestService(run)
        await guest._start(options)
        try:
            yield guest
        except asyncio.CancelledError:
            await guest._stop()
            if await guest._absorb_own_cancel(delivered=True):
                assert guest.failure is not None
                raise guest.failure from None
            raise
        except BaseException:
            await guest._stop()
            raise
        await guest._stop()
        if await guest._absorb_own_cancel(delivered=False) or guest.failure is not None:
            assert guest.failure is not None
            raise guest.failure
    finally:
        await run.release()


__all__ = ["GuestService", "open_guest_service"]
