"""The daemon's listener: msgpack-RPC connections in front of one :class:`SessionService`.

Rules
-----
1. The first request on a connection is ``auth(token)``. When the daemon has a token, a wrong
   or missing one is answered with :class:`~workers.wire.protocol.AuthenticationFailed` and the
   connection is closed; nothing else was done. Tokens are compared in constant time. A
   connection that does not authenticate within ``auth_timeout`` is closed. A daemon without a
   token (allowed on loopback and Unix sockets only) accepts any first request.
2. Requests are answered as they complete, not in arrival order: each runs in its own task.
   At most ``max_in_flight`` run per connection; past that the handler stops reading, so a
   client that pipelines harder only fills its socket buffer (backpressure, not errors). The
   same happens when a client does not read its responses.
3. A request that is well framed but wrong (unknown method, wrong arguments) gets an
   :class:`~workers.wire.protocol.InvalidRequest` answer and the connection goes on. A broken stream
   (not msgpack, a message above ``max_message_size``, a message cut by end of file) gets an
   ``error`` notification and the connection is closed. Either way only that connection is
   affected.
4. Past ``max_connections`` a new connection gets an ``error`` notification
   (:class:`~workers.record.errors.ServiceUnavailable`) and is closed.
5. ``crash_actor(name)`` (fault injection, for chaos tests) exists only on a daemon started
   with ``allow_fault_injection``; any other daemon refuses it exactly as an unknown method.
   It crashes the service's ``manager`` or ``cleanup`` actor through
   ``SessionService.crash_actor``. The tree is rest_for_one and the listener is its last child,
   so the crash restarts the listener too and every connection drops, the caller's included:
   the answer may be lost (the client then raises ``ServiceUnavailable``).

Theory of operation
-------------------
:meth:`Server.run` is the listener child of the service's supervision tree: it binds the
addresses, reports them to ``task_status``, and runs one handler task per connection in its
own nursery. A handler has a reader (bytes to :class:`~workers.wire.protocol.Connection` to
events), one task per request, and an :class:`~workers.wire.transport.Outbox` writer that coalesces
the responses. :meth:`Server.drain` is the graceful stop: it closes the listeners, stops every
reader, waits (at most ``grace`` seconds) for the requests in flight to be answered and sent,
then cancels what is left. The daemon drains before it stops the tree, so the manager is still
there to answer the last requests.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from supervisor import NoProc

from ..core.api import METHODS, Kind, Method
from ..core.metrics import UNKNOWN_METHOD
from ..core.service import SessionService
from ..record.errors import (
    AuthenticationFailed,
    InternalError,
    InvalidRequest,
    ServiceUnavailable,
    SessionError,
)
from .address import Address
from .protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    NEED_DATA,
    Connection,
    InvalidMessage,
    Notification,
    RemoteProtocolError,
    Request,
    Role,
)
from .reactor import Reactor
from .transport import (
    RECEIVE_SIZE,
    Outbox,
    RawSocketStream,
    open_listeners,
    raw_stream,
    remove_socket_file,
)

log = logging.getLogger(__name__)

#: Queued response bytes past which a connection stops reading requests.
OUTBOX_HIGH_WATER = 1024 * 1024
#: Seconds a closing connection waits for its peer to close too (see ``_linger``).
LINGER = 1.0


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one daemon accepts. See the module docstring for what happens past each."""

    max_connections: int = 1024
    max_in_flight: int = 64
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    auth_timeout: float = 10.0


class Server:
    """msgpack-RPC on ``addresses`` for ``service``. Run :meth:`run`; stop with :meth:`drain`.

    Raises ValueError at once when an address is reachable from other machines and there is
    no ``token``.
    """

    def __init__(
        self,
        service: SessionService,
        addresses: Sequence[Address],
        *,
        token: str | None = None,
        limits: ServerLimits = ServerLimits(),
        allow_fault_injection: bool = False,
        methods: dict[str, Method] | None = None,
    ) -> None:
        exposed = [str(a) for a in addresses if not a.is_local]
        if exposed and not token:
            raise ValueError(
                f"listening on {', '.join(exposed)} (not loopback) requires a token: "
                "set --token or SESSIOND_TOKEN"
            )
        if not addresses:
            raise ValueError("the server needs at least one address to listen on")
        self.service = service
        self.addresses = list(addresses)
        self.limits = limits
        self._token = token.encode() if token else None
        self._connections: set[_ConnectionHandler] = set()
        self._changed = trio.Event()
        self._accepting: trio.CancelScope | None = None
        self._draining = False
        #: The service's figures; the server adds its requests' refusals and its connections.
        self.telemetry = service.telemetry
        #: The methods this daemon answers: the table, less fault injection unless allowed.
        self.methods = {
            name: m
            for name, m in (METHODS if methods is None else methods).items()
            if allow_fault_injection or not m.fault_injection
        }

    # -- listening -------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; ``task_status`` gets the bound addresses as text."""
        listeners: list[trio.SocketListener] = []
        try:
            for address in self.addresses:
                listeners += await open_listeners(address)
        except BaseException:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            raise
        bound = [_describe(listener) for listener in listeners]
        self.reactor = Reactor()
        try:
            async with trio.open_nursery() as handlers:
                handlers.start_soon(self.reactor.run)
                async with trio.open_nursery() as acceptors:
                    self._accepting = acceptors.cancel_scope
                    self._draining = False
                    serve = partial(
                        trio.serve_listeners, self._serve, listeners, handler_nursery=handlers
                    )
                    await acceptors.start(serve)
                    log.info("listening on %s", ", ".join(bound))
                    task_status.started(bound)
                # Only drain() gets here: accepting stopped, connections finish in `handlers`.
                await trio.sleep_forever()
        finally:
            self.reactor.close()
            for address in self.addresses:
                remove_socket_file(address)

    async def drain(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish within ``grace`` seconds, then close."""
        self._draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        for handler in list(self._connections):
            handler.stop_reading()
        with trio.move_on_after(grace) as waited:
            while self._connections:
                await self._changed.wait()
        if waited.cancelled_caught:
            log.warning(
                "%d connections still busy after %s s of grace; closing them",
                len(self._connections),
                grace,
            )
        for handler in list(self._connections):
            handler.abort()

    async def _serve(self, stream: trio.SocketStream) -> None:
        if self._draining or len(self._connections) >= self.limits.max_connections:
            reason = "shutting down" if self._draining else "too many connections"
            log.warning("refusing a connection: %s", reason)
            self.telemetry.connections_refused += 1
            refusal = ServiceUnavailable(f"the daemon is {reason}; retry later")
            with trio.move_on_after(LINGER):
                await stream.send_all(Connection(Role.SERVER).send_error(refusal))
            await _linger(stream)
            return
        handler = _ConnectionHandler(self, raw_stream(stream))
        self._connections.add(handler)
        self.telemetry.connections += 1
        self.telemetry.connections_total += 1
        try:
            await handler.run()
        except Exception:  # one connection's bug must not take the listener down
            log.exception("connection handler failed")
        finally:
            await handler.stream.aclose()
            self._connections.discard(handler)
            self.telemetry.connections -= 1
            self._changed.set()
            self._changed = trio.Event()

    # -- methods ---------------------------------------------------------------------------

    @property
    def requires_token(self) -> bool:
        """Whether connections must authenticate with the token before anything else."""
        return self._token is not None

    def authenticates(self, token: object) -> bool:
        """Whether ``token`` opens a connection (always, when the daemon has no token)."""
        if self._token is None:
            return True
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self._token)

    def method(self, name: str) -> Method:
        """The RPC method ``name``; raises InvalidRequest when this daemon has none."""
        method = self.methods.get(name)
        if method is None:
            raise InvalidRequest(f"unknown method {name!r:.80}")
        return method

    async def call(self, name: str, params: list[Any]) -> Any:
        """Run RPC method ``name`` and return its wire result; raises SessionError subclasses.

        The service counts and times what it runs; what is refused before it gets there
        (unknown method, bad arguments) is counted here, as are the daemon's own methods.
        """
        try:
            method = self.method(name)
            args = method.decode_params(params)
            op = self.service.operation(method, *args) if method.kind is Kind.OPERATION else None
        except Exception as exc:
            raise self._refuse(name, exc) from None
        try:
            if op is not None:
                result = await self.service.run(op)
            elif method.kind is Kind.SERVICE:
                result = await getattr(self.service, name)(*args)
            else:
                with self.telemetry.measure(name):
                    result = await getattr(self, f"_{name}")(*args)
            return method.encode_result(result)
        except Exception as exc:
            raise _wire_error(name, exc) from None

    def _refuse(self, name: str, exc: Exception) -> SessionError:
        error = _wire_error(name, exc)
        self.telemetry.refused(name if name in self.methods else UNKNOWN_METHOD, error)
        return error

    def submit(
        self, name: str, params: list[Any], on_reply: Callable[[Any, SessionError | None], None]
    ) -> bool:
        """Start RPC method ``name`` without a task, if it is one manager operation.

        ``on_reply(result, error)`` gets the wire result or the error, once, possibly before
        this returns (bad arguments, or an answer the manager gave inline). False when the
        method needs :meth:`call` instead: it is not a single operation, or the manager cannot
        take it right now (restarting, or its mailbox is full), which :meth:`call` waits out.
        """
        method = self.methods.get(name)
        if method is None or method.kind is not Kind.OPERATION:
            return False

        def settle(value: Any, error: Exception | None) -> None:
            if error is None:
                try:
                    value = method.encode_result(value)
                except Exception as exc:
                    error = exc
            on_reply(value, None if error is None else _wire_error(name, error))

        try:
            op = self.service.operation(method, *method.decode_params(params))
        except Exception as exc:  # arguments the method refused
            on_reply(None, self._refuse(name, exc))
        else:
            try:
                self.service.submit(op, settle)
            except (NoProc, trio.WouldBlock):
                return False  # call() runs it, and counts it
        return True

    async def _ping(self) -> str:
        return "pong"


def _wire_error(name: str, exc: Exception) -> SessionError:
    """What a client is told about ``exc``, raised by method ``name``."""
    if isinstance(exc, SessionError):
        return exc
    if isinstance(exc, (TypeError, ValueError)):  # arguments the service refused
        return InvalidRequest(f"{name}: {exc}")
    log.error("%s failed", name, exc_info=exc)
    return InternalError(f"{name} failed: {type(exc).__name__}")


async def _linger(stream: trio.abc.HalfCloseableStream) -> None:
    """Close our side, then discard what the peer still sends until it closes (at most
    ``LINGER`` seconds): closing with unread input would reset the connection and could
    destroy the error message we just sent."""
    with trio.move_on_after(LINGER):
        try:
            await stream.send_eof()
            while await stream.receive_some(RECEIVE_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _describe(listener: trio.SocketListener) -> str:
    name = listener.socket.getsockname()
    if isinstance(name, str):
        return f"unix://{name}"
    host, port = name[:2]
    return str(Address("tcp", host=host, port=port))


class _ConnectionHandler:
    """One client connection: read by the server's reactor, answered by callbacks, and a task
    that owns its lifetime (pauses, the auth deadline, draining, closing)."""

    def __init__(self, server: Server, stream: RawSocketStream) -> None:
        self.server = server
        self.stream = stream
        self.protocol = Connection(Role.SERVER, max_message_size=server.limits.max_message_size)
        self.outbox = Outbox(stream)
        self.authenticated = False
        self._in_flight = 0  # requests read and not answered yet
        self._reading = trio.CancelScope()
        self._everything = trio.CancelScope()
        self._requests: trio.Nursery  # for methods that need a task of their own
        # Set by the reactor's callbacks for the lifetime task: reading ended, or paused.
        self._ended = False
        self._paused = False
        self._changed = trio.Event()
        self._done = False  # after run(): late answers are dropped with the connection

    def stop_reading(self) -> None:
        """Read no more requests; those in flight are still answered."""
        self._reading.cancel()

    def abort(self) -> None:
        """Stop at once, answered or not."""
        self._everything.cancel()

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._done = True

    async def _run(self) -> None:
        with self._everything:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.outbox.run)
                async with trio.open_nursery() as self._requests:
                    with self._reading:
                        if self.server.requires_token:
                            self._reading.deadline = (
                                trio.current_time() + self.server.limits.auth_timeout
                            )
                        await self._read()
                    while self._in_flight:
                        await self._wait_for_change()
                self.outbox.close()
            await _linger(self.stream)

    async def _wait_for_change(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()

    async def _read(self) -> None:
        """Have the reactor read until the connection ends; take over while it is paused."""
        reactor, sock = self.server.reactor, self.stream.socket
        reactor.add(sock, self._on_readable)
        try:
            while not self._ended:
                if not self._paused:
                    await self._wait_for_change()
                    continue
                # Paused: too many requests in flight, or too many answers unsent.
                while self._blocked():
                    if self._in_flight >= self.server.limits.max_in_flight:
                        await self._wait_for_change()
                    else:
                        await self.outbox.wait_below(OUTBOX_HIGH_WATER)
                self._paused = False
                self._dispatch()  # what was received before the pause
                if not (self._ended or self._paused):
                    reactor.resume(sock)
        finally:
            self._ended = True  # also when stop_reading() cancelled us: answers must wake _run
            reactor.remove(sock)

    def _blocked(self) -> bool:
        return (
            self._in_flight >= self.server.limits.max_in_flight
            or self.outbox.queued >= OUTBOX_HIGH_WATER
        )

    def _on_readable(self) -> None:
        """The reactor's callback: take what the socket has and act on it."""
        if self._ended or self._paused:
            return
        try:
            data = self.stream.socket.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # reset by the peer: as good as closed
        try:
            self.protocol.receive_data(data)
            self._dispatch()
        except Exception:  # one connection's bug must not take the others down
            log.exception("connection handler failed")
            self._end()

    def _end(self) -> None:
        self._ended = True
        self._changed.set()

    def _pause(self) -> None:
        self._paused = True
        self.server.reactor.pause(self.stream.socket)
        self._changed.set()

    def _dispatch(self) -> None:
        """Act on the events received so far, until none is left, reading must stop, or too
        much is in flight (the rest stay queued in the protocol until :meth:`_read` resumes)."""
        while not self._ended:
            if self._blocked():
                self._pause()
                return
            try:
                event = self.protocol.next_event()
            except RemoteProtocolError as exc:
                log.warning("closing a connection that broke the protocol: %s", exc)
                self.outbox.send(self.protocol.send_error(exc))
                self._end()
                return
            if event is NEED_DATA:
                return
            if isinstance(event, Request):
                if event.method == "auth" or not self.authenticated:
                    if not self._authenticate(event):
                        self._end()
                        return
                    if event.method == "auth":
                        continue
                self._in_flight += 1
                reply = partial(self._settle, event.msgid)
                if not self.server.submit(event.method, event.params, reply):
                    self._requests.start_soon(self._answer, event, reply)
            elif isinstance(event, InvalidMessage):
                if event.msgid is None or not self.authenticated:
                    log.warning(
                        "closing a connection that sent an invalid message: %s", event.reason
                    )
                    self.outbox.send(self.protocol.send_error(RemoteProtocolError(event.reason)))
                    self._end()
                    return
                self._reply(event.msgid, error=InvalidRequest(event.reason))
            elif isinstance(event, Notification):
                if not self.authenticated:
                    self._end()
                    return
            else:  # ConnectionClosed: answer what is in flight, then close
                self._end()
                return

    def _authenticate(self, request: Request) -> bool:
        """Handle an ``auth`` request, or the first request of a connection; False to close."""
        failure = None
        if request.method == "auth":
            if request.params == [None] and self.server.requires_token:
                failure = AuthenticationFailed("this daemon requires a token and none was given")
            elif len(request.params) != 1 or not self.server.authenticates(request.params[0]):
                failure = AuthenticationFailed("wrong token")
        elif self.server.requires_token:
            failure = AuthenticationFailed("authenticate first: the first request is auth(token)")
        if failure is not None:
            log.warning("refusing a connection: %s", failure)
            self.server.telemetry.auth_failures += 1
            self._reply(request.msgid, error=failure)
            return False
        self.authenticated = True
        self._reading.deadline = math.inf
        if request.method == "auth":
            self._reply(request.msgid, result=True)
        return True

    async def _answer(self, request: Request, reply: Callable[[Any, Any], None]) -> None:
        try:
            result = await self.server.call(request.method, request.params)
        except SessionError as exc:
            reply(None, exc)
        else:
            reply(result, None)

    def _settle(self, msgid: int, result: Any, error: SessionError | None) -> None:
        """Answer request ``msgid`` and free its in-flight place."""
        if self._done:
            return
        self._in_flight -= 1
        if self._paused or self._ended:
            self._changed.set()
        self._reply(msgid, result=result, error=error)

    def _reply(self, msgid: int, *, result: Any = None, error: SessionError | None = None) -> None:
        self.outbox.send(self.protocol.send_response(msgid, result=result, error=error))
