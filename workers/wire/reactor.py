"""Read readiness of many sockets from one task: one Trio wake-up per burst, not per socket.

Why
---
The natural Trio server parks one task per connection in ``wait_readable``. With many
connections that each carry one small request at a time (the common case for a session store:
every web worker asks for one session), each request then costs a task switch and an
``epoll_ctl`` to re-arm its socket, which is more than the rest of the request. A
:class:`Reactor` keeps the sockets in a selector of its own (level-triggered epoll on Linux,
kqueue on the BSDs and macOS), waits in Trio for *that* selector to become readable, and then
calls the callback of every ready socket in one pass. A burst from fifty connections is one
wake-up, and the requests it carries reach the session manager as one batch.

Contract
--------
Callbacks are synchronous: they read what is there without blocking, act on it, and return.
An exception from a callback propagates out of :meth:`Reactor.run` (the callback's owner is
expected to catch its own errors). A callback may :meth:`~Reactor.pause`, :meth:`~Reactor.resume`
or :meth:`~Reactor.remove` any socket, its own included; a socket paused or removed by an
earlier callback of the same pass may still be called back once in that pass, so callbacks
check their own state. A socket is either in a reactor or waited on by Trio directly, never
both at once.
"""

from __future__ import annotations

import selectors
import socket
from collections.abc import Callable

import trio


class Reactor:
    """A set of sockets whose read callbacks :meth:`run` calls when they are readable."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        if not hasattr(self._selector, "fileno"):  # select() or poll(): nothing Trio can wait on
            self._selector.close()
            raise RuntimeError(
                f"{type(self._selector).__name__} cannot be waited on; a Reactor needs epoll "
                "or kqueue"
            )
        self._fd = self._selector.fileno()
        self._paused: dict[socket.socket, Callable[[], None]] = {}

    def add(self, sock: socket.socket, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable()`` whenever ``sock`` has data or its peer closed."""
        self._selector.register(sock, selectors.EVENT_READ, on_readable)

    def pause(self, sock: socket.socket) -> None:
        """Stop calling back for ``sock`` until :meth:`resume`; data waits in the socket."""
        if sock not in self._paused:
            self._paused[sock] = self._selector.unregister(sock).data

    def resume(self, sock: socket.socket) -> None:
        """Call back for ``sock`` again, at once if data arrived meanwhile."""
        on_readable = self._paused.pop(sock, None)
        if on_readable is not None:
            self._selector.register(sock, selectors.EVENT_READ, on_readable)

    def remove(self, sock: socket.socket) -> None:
        """Forget ``sock`` (paused or not); call it before closing the socket."""
        if self._paused.pop(sock, None) is None:
            self._selector.unregister(sock)

    async def run(self) -> None:
        """Call back for ready sockets until cancelled."""
        select = self._selector.select
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            for key, _ in select(0):
                key.data()

    def close(self) -> None:
        """Release the selector, once :meth:`run` and every socket's owner are done with it."""
        self._selector.close()
