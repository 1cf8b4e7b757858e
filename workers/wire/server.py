"""The daemon's listener: msgpack-RPC connections in front of one :class:`SessionService`.

Rules
-----
1. The first request on a connection is ``auth(token)``. When the daemon has a token, a wrong
   or missing one is answered with :class:`~workers.wire.protocol.AuthenticationFailed` and the
   connection is closed; nothing else was done. Tokens are compared in constant time. Until it
   has authenticated, a connection may send messages of at most :data:`AUTH_MESSAGE_SIZE` bytes
   (an auth request), and it must authenticate within ``auth_timeout`` seconds of connecting,
   else it gets an ``error`` notification and is closed. A daemon without a token (allowed on
   loopback and Unix sockets only) has no such state: every connection starts authenticated.
2. Connections that have not authenticated yet are bounded on their own, per kind of socket
   (TCP, Unix): past ``max_unauthenticated`` of one kind, a new connection closes the oldest
   unauthenticated one of that kind (an ``error`` notification says why), so idle or slow
   connections can delay others for at most the time it takes that many new ones to arrive,
   and a flood on TCP never touches the Unix socket. Authenticated connections are never
   closed to make room.
3. Wrong tokens are budgeted per peer (:class:`~workers.wire.guard.FailureBudget`): after
   ``max_auth_failures`` failures in a row from one address (IPv6: one /64), its ``auth``
   requests are refused without a look at the token, one more allowed each second. Unix-socket
   peers are not budgeted: the socket is 0600, so they are the daemon's own user. Failures
   are logged with the peer's address, at most one line per kind every 10 s.
4. Requests are answered as they complete, not in arrival order. At most ``max_in_flight``
   run per connection; past that the daemon stops reading it, so a client that pipelines
   harder only fills its socket buffer (backpressure, not errors). The same happens when a
   client does not read its responses.
5. A message that is well-formed msgpack but not a valid message gets an
   :class:`~workers.wire.protocol.InvalidRequest` answer when it carries a msgid, is ignored
   when it does not, and the connection goes on; so does a request for an unknown method or
   with wrong arguments. Notifications are ignored (the daemon defines none; msgpack-RPC lets
   a server ignore them), before authentication too. A broken stream (not msgpack, a message
   above ``max_message_size``, a message cut by end of file or not complete within
   ``message_timeout`` seconds of its first byte) gets an ``error`` notification and the
   connection is closed. Either way only that connection is affected.
6. Memory for messages in progress is bounded. Each connection holds at most one message's
   bytes (:data:`AUTH_MESSAGE_SIZE` before it authenticated), and each byte is held twice (as
   received, and by the framing scanner; see :mod:`~workers.wire.protocol`). Authenticated
   connections together hold at most ``max_buffered_bytes`` of memory for messages in
   progress, plus one message, plus :data:`FREE_HOLD` bytes each: a connection whose next
   read could take the total past ``max_buffered_bytes`` is read only up to :data:`FREE_HOLD`
   bytes of a message (so small requests always get through) and otherwise waits until other
   messages complete, except the connection that has held bytes longest, which is always
   read in full, so this never deadlocks.
7. Past ``max_connections`` a new connection closes the oldest unauthenticated one, or when
   every connection has authenticated it gets an ``error`` notification
   (:class:`~workers.record.errors.ServiceUnavailable`) and is closed. When the process is out
   of file descriptors (EMFILE), new connections are accepted on a reserved descriptor and
   refused the same way, with one log line every 10 s, instead of waiting in the backlog.
8. ``crash_actor(name)`` (fault injection, for chaos tests) exists only on a daemon started
   with ``allow_fault_injection``; any other daemon refuses it exactly as an unknown method.
   It crashes the service's ``manager`` or ``cleanup`` actor through
   ``SessionService.crash_actor``. The tree is rest_for_one and the listener is its last child,
   so the crash restarts the listener too and every connection drops, the caller's included:
   the answer may be lost (the client then raises ``ServiceUnavailable``).

Theory of operation
-------------------
:meth:`Server.run` is the listener child of the service's supervision tree: it binds the
addresses, reports them to ``task_status``, and accepts connections in a loop per listener. A
connection is read by the server's :class:`~workers.wire.reactor.Reactor` (bytes to
:class:`~workers.wire.protocol.Connection` to events, no task per read), its requests go to the
manager without a task each where they can, and its answers go out through an
:class:`~workers.wire.transport.Outbox`; a task per connection owns its lifetime (pauses,
deadlines, draining, closing). A connection leaves the server's books synchronously when its
task ends, cancelled or not, so a listener restart leaves none behind. :meth:`Server.drain`
is the graceful stop: it closes the listeners, stops every reader, waits (at most ``grace``
seconds) for the requests in flight to be answered and sent, then cancels what is left. The
daemon drains before it stops the tree, so the manager is still there to answer the last
requests.
"""

from __future__ import annotations

import errno
import hmac
import logging
import math
import os
import resource
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import trio

from supervisor import NoProc

from ..core.api import METHODS, Kind, Method
from ..core.metrics import UNKNOWN_METHOD
from ..core.service import SessionService
from ..record.codec import pack
from ..record.errors import (
    AuthenticationFailed,
    InternalError,
    InvalidRequest,
    ServiceUnavailable,
    SessionError,
    describe,
)
from .address import Address
from .guard import FailureBudget, LogLimiter, peer_key
from .protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_MSGID,
    NEED_DATA,
    REQUEST,
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

#: Largest message a connection may send before it has authenticated: an auth request with a
#: token of up to :data:`MAX_TOKEN_BYTES`.
AUTH_MESSAGE_SIZE: Final = 4096
#: Memory a byte of a message in progress takes: as received, and in the framing scanner.
HELD_COPIES: Final = 2
#: Bytes of a message in progress a connection may always hold, budget or not.
FREE_HOLD: Final = 4096
#: Longest token a daemon accepts, in UTF-8 bytes.
MAX_TOKEN_BYTES: Final = 4000
#: Queued response bytes past which a connection stops reading requests.
OUTBOX_HIGH_WATER = 1024 * 1024
#: Seconds a closing connection waits for its peer to close too (see ``_linger``).
LINGER = 1.0
#: Refused connections that may linger at once; more are closed at once.
MAX_LINGERING = 64
#: accept() errors that mean "no descriptor or memory for one more connection".
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Seconds the accept loop rests when it has no descriptor even to refuse a connection.
_SHED_PAUSE = 0.1
#: SO_PEERCRED's answer: pid, uid, gid.
_UCRED = struct.Struct("3i")


def auth_request_size(token: str | None) -> int:
    """Bytes of the largest auth request carrying ``token`` (the longest msgid)."""
    return len(pack([REQUEST, MAX_MSGID, "auth", [token]]))


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one daemon accepts. See the module docstring for what happens past each."""

    max_connections: int = 1024
    max_unauthenticated: int = 128
    max_in_flight: int = 64
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_buffered_bytes: int = 64 * 1024 * 1024
    auth_timeout: float = 5.0
    message_timeout: float = 30.0
    max_auth_failures: int = 10


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
                "set --token-file or SESSIOND_TOKEN"
            )
        if not addresses:
            raise ValueError("the server needs at least one address to listen on")
        self.service = service
        self.addresses = list(addresses)
        self.limits = limits
        self._token = token.encode() if token else None
        self._connections: set[_ConnectionHandler] = set()
        #: Connections that have not authenticated yet, per kind of socket, oldest first.
        self._unauthenticated: dict[str, dict[_ConnectionHandler, None]] = {
            "tcp": {},
            "unix": {},
        }
        #: Authenticated connections holding bytes of a message in progress, longest first.
        self._receiving: dict[_ConnectionHandler, None] = {}
        #: Memory those connections hold together for messages in progress, in bytes.
        self.buffered = 0
        self._budget_changed = trio.Event()
        self._budget_waiters = 0
        self._changed = trio.Event()
        self._accepting: trio.CancelScope | None = None
        self._draining = False
        self._lingering = 0
        self._reserve: int | None = None  # a descriptor kept free for refusing at EMFILE
        self.failures = FailureBudget(limits.max_auth_failures)
        self.logs = LogLimiter(log)
        #: What the guards did, for ``stats`` (the service's metrics read it: see ``figures``).
        self.counters = {
            "connections_accepted": 0,
            "connections_refused": 0,
            "connections_evicted": 0,
            "auth_failures": 0,
            "timeouts": 0,
            "invalid_messages": 0,
        }
        #: The service's figures: the server counts there what it refuses before the service
        #: sees it, and adds its own (:meth:`figures`).
        self.telemetry = service.telemetry
        self.telemetry.add_source(self.figures)
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
        listeners: list[tuple[trio.SocketListener, str]] = []
        try:
            for address in self.addresses:
                listeners += [(lst, address.scheme) for lst in await open_listeners(address)]
        except BaseException:
            for listener, _ in listeners:
                await trio.aclose_forcefully(listener)
            raise
        bound = [_describe_listener(listener) for listener, _ in listeners]
        self.reactor = Reactor()
        self._reserve = _reserve_descriptor()
        try:
            async with trio.open_nursery() as handlers:
                handlers.start_soon(self.reactor.run)
                async with trio.open_nursery() as acceptors:
                    self._accepting = acceptors.cancel_scope
                    self._draining = False
                    for listener, kind in listeners:
                        acceptors.start_soon(self._accept, listener, kind, handlers)
                    log.info("listening on %s", ", ".join(bound))
                    task_status.started(bound)
                # Only drain() gets here: accepting stopped, connections finish in `handlers`.
                await trio.sleep_forever()
        finally:
            self.reactor.close()
            if self._reserve is not None:
                os.close(self._reserve)
                self._reserve = None
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

    async def _accept(
        self, listener: trio.SocketListener, kind: str, handlers: trio.Nursery
    ) -> None:
        """Accept connections on ``listener`` until cancelled (trio.serve_listeners would log
        a traceback every 0.1 s at EMFILE and leave new clients hanging in the backlog)."""
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _OUT_OF_DESCRIPTORS:
                        raise
                    await self._shed(listener, exc)
                else:
                    handlers.start_soon(self._serve, stream, kind)

    async def _shed(self, listener: trio.SocketListener, exc: OSError) -> None:
        """Out of descriptors: accept one connection on the reserved descriptor and refuse it."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.counters["connections_refused"] += 1
        self.logs.warning(
            "descriptors",
            "out of file descriptors (%s) with %d connections: refusing new ones until some "
            "close; raise the limit (ulimit -n, now %d) or lower max_connections (%d)",
            errno.errorcode.get(exc.errno or 0, exc.errno),
            len(self._connections),
            soft,
            self.limits.max_connections,
        )
        if self._reserve is None:
            self._reserve = _reserve_descriptor()
            if self._reserve is None:  # not even one: let connections close first
                await trio.sleep(_SHED_PAUSE)
                return
        os.close(self._reserve)
        self._reserve = None
        try:
            with trio.move_on_after(LINGER):
                sock, _ = await listener.socket.accept()
                stream = raw_stream(sock)
                _send_now(stream, ServiceUnavailable("the daemon is out of file descriptors"))
                stream.close()
        except OSError:
            pass  # the client left, or another thread took the descriptor: nothing to refuse
        finally:
            self._reserve = _reserve_descriptor()

    async def _serve(self, stream: trio.SocketStream, kind: str) -> None:
        raw = raw_stream(stream.socket)
        peer, key = _peer(raw.socket, kind)
        refusal = self._admit(kind)
        if refusal is not None:
            await self._refuse(raw, peer, refusal)
            return
        handler = None
        try:
            handler = _ConnectionHandler(self, raw, kind, peer, key)
            self._connections.add(handler)
            self.counters["connections_accepted"] += 1
            if not handler.authenticated:
                self._unauthenticated[kind][handler] = None
            await handler.run()
        except Exception:  # one connection's bug must not take the listener down
            log.exception("connection handler failed")
        finally:
            # Synchronously: a cancelled handler (a listener restart) must leave no trace.
            if handler is not None:
                self._forget(handler)
            raw.close()

    def _admit(self, kind: str) -> str | None:
        """Make room for a new connection of ``kind``; the reason to refuse it, if any."""
        if self._draining:
            return "shutting down"
        waiting = self._unauthenticated[kind]
        if self.requires_token and len(waiting) >= self.limits.max_unauthenticated:
            self._evict(next(iter(waiting)), f"{len(waiting)} connections wait to authenticate")
        if len(self._connections) >= self.limits.max_connections:
            oldest = [next(iter(w)) for w in (waiting, *self._unauthenticated.values()) if w]
            if not oldest:
                return f"at max_connections={self.limits.max_connections} (too many connections)"
            self._evict(oldest[0], "at max_connections")
        return None

    def _evict(self, handler: _ConnectionHandler, why: str) -> None:
        self.counters["connections_evicted"] += 1
        self.logs.warning(
            "evict",
            "closing the oldest unauthenticated connection (%s) for a new one: %s",
            handler.peer,
            why,
        )
        self._forget(handler)
        handler.close_with(ServiceUnavailable(f"closed for a newer connection: {why}"))

    async def _refuse(self, stream: RawSocketStream, peer: str, reason: str) -> None:
        self.counters["connections_refused"] += 1
        self.logs.warning("refuse", "refusing a connection from %s: %s", peer, reason)
        _send_now(stream, ServiceUnavailable(f"the daemon is {reason}; retry later"))
        if self._lingering < MAX_LINGERING:
            self._lingering += 1
            try:
                await _linger(stream)
            finally:
                self._lingering -= 1
        stream.close()

    def _forget(self, handler: _ConnectionHandler) -> None:
        """Take ``handler`` off the books (idempotent, synchronous)."""
        self._connections.discard(handler)
        self._unauthenticated[handler.kind].pop(handler, None)
        self.account(handler, gone=True)
        self._changed.set()
        self._changed = trio.Event()

    def authenticated(self, handler: _ConnectionHandler) -> None:
        """``handler`` authenticated: it no longer counts as waiting."""
        self._unauthenticated[handler.kind].pop(handler, None)

    # -- the receive budget ----------------------------------------------------------------

    def may_receive(self, handler: _ConnectionHandler) -> bool:
        """Whether ``handler`` may be read now without taking the bytes of messages in
        progress past ``max_buffered_bytes`` (always, for the one that has held longest)."""
        if self.buffered + HELD_COPIES * RECEIVE_SIZE <= self.limits.max_buffered_bytes:
            return True
        return next(iter(self._receiving), handler) is handler

    def account(
        self, handler: _ConnectionHandler, *, completed: bool = False, gone: bool = False
    ) -> None:
        """Bring the budget up to date with what ``handler`` holds now. ``completed``: it gave
        out a message since the last call (it goes to the back of the line)."""
        held = 0 if gone or not handler.authenticated else HELD_COPIES * handler.protocol.buffered
        change, handler.held = held - handler.held, held
        self.buffered += change
        if completed or not held:
            self._receiving.pop(handler, None)
        if held:
            self._receiving.setdefault(handler)
        if (change < 0 or completed) and self._budget_waiters:
            self._budget_changed.set()
            self._budget_changed = trio.Event()

    async def budget_changed(self) -> None:
        """Wait until some connection gave up bytes or its place in line."""
        self._budget_waiters += 1
        try:
            await self._budget_changed.wait()
        finally:
            self._budget_waiters -= 1

    # -- methods ---------------------------------------------------------------------------

    @property
    def requires_token(self) -> bool:
        """Whether connections must authenticate with the token before anything else."""
        return self._token is not None

    def authenticates(self, token: object) -> bool:
        """Whether ``token`` opens a connection (always, when the daemon has no token)."""
        if self._token is None:
            return True
        if isinstance(token, str):
            token = token.encode()
        return isinstance(token, bytes) and hmac.compare_digest(token, self._token)

    def method(self, name: str) -> Method:
        """The RPC method ``name``; raises InvalidRequest when this daemon has none."""
        method = self.methods.get(name)
        if method is None:
            raise InvalidRequest(f"unknown method {describe(name)}")
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
            raise self._refused(name, exc) from None
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

    def _refused(self, name: str, exc: Exception) -> SessionError:
        """Count a request refused before it reached the service; what its caller is told."""
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
            on_reply(None, self._refused(name, exc))
        else:
            try:
                self.service.submit(op, settle)
            except (NoProc, trio.WouldBlock):
                return False  # call() runs it, and counts it
        return True

    async def _ping(self) -> str:
        return "pong"

    def figures(self) -> dict[str, Any]:
        """The daemon's own figures, in the service's ``stats()`` and ``metrics()``."""
        return {
            "connections": len(self._connections),
            "unauthenticated": sum(len(w) for w in self._unauthenticated.values()),
            "buffered_bytes": self.buffered,
            **self.counters,
        }


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


def _send_now(stream: RawSocketStream, error: SessionError) -> None:
    """Send the ``error`` notification without waiting (it fits an empty socket buffer)."""
    try:
        stream.send_nowait(Connection.send_error(error))
    except trio.BrokenResourceError:
        pass  # the peer is gone already: nobody to tell


def _reserve_descriptor() -> int | None:
    """A descriptor held in reserve, to be given up for refusing a connection at EMFILE."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def _peer(sock: socket.socket, kind: str) -> tuple[str, str | None]:
    """Who is at the other end of ``sock``, for logs; and the key of its failure budget (None
    for Unix-socket peers, which are not budgeted)."""
    try:
        if kind == "unix":
            if hasattr(socket, "SO_PEERCRED"):  # Linux: struct ucred
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
                pid, uid, _ = _UCRED.unpack(creds)
                return f"unix socket (pid {pid}, uid {uid})", None
            return "unix socket", None
        host, port = sock.getpeername()[:2]
    except OSError:  # the peer already went
        return "a peer that left", None if kind == "unix" else "?"
    return str(Address("tcp", host=host, port=port)), peer_key(host)


def _describe_listener(listener: trio.SocketListener) -> str:
    name = listener.socket.getsockname()
    if isinstance(name, str):
        return f"unix://{name}"
    host, port = name[:2]
    return str(Address("tcp", host=host, port=port))


class _ConnectionHandler:
    """One client connection: read by the server's reactor, answered by callbacks, and a task
    that owns its lifetime (pauses, deadlines, draining, closing)."""

    def __init__(
        self, server: Server, stream: RawSocketStream, kind: str, peer: str, key: str | None
    ) -> None:
        self.server = server
        self.stream = stream
        self.kind = kind
        self.peer = peer
        self.key = key  # of the peer's failure budget; None when it has none
        limits = server.limits
        self.authenticated = not server.requires_token
        self.protocol = Connection(
            Role.SERVER,
            max_message_size=limits.max_message_size
            if self.authenticated
            else min(AUTH_MESSAGE_SIZE, limits.max_message_size),
        )
        self.outbox = Outbox(stream)
        self.held = 0  # memory of a message in progress, on the server's budget
        self._in_flight = 0  # requests read and not answered yet
        self._reading = trio.CancelScope()
        self._everything = trio.CancelScope()
        self._stopping = False  # stop_reading() was called: not a timeout
        self._auth_deadline = (
            math.inf if self.authenticated else trio.current_time() + limits.auth_timeout
        )
        self._message_since: float | None = None  # when the message in progress began
        self._requests: trio.Nursery  # for methods that need a task of their own
        # Set by the reactor's callbacks for the lifetime task: reading ended, or paused.
        self._ended = False
        self._paused = False
        self._excused = False  # paused on our side: the message deadline does not run
        self._changed = trio.Event()
        self._done = False  # after run(): late answers are dropped with the connection

    def stop_reading(self) -> None:
        """Read no more requests; those in flight are still answered."""
        self._stopping = True
        self._reading.cancel()

    def abort(self) -> None:
        """Stop at once, answered or not."""
        self._everything.cancel()

    def close_with(self, error: SessionError) -> None:
        """Tell the peer why in an ``error`` notification (if the socket takes it now), and
        stop at once."""
        self.outbox.send(self.protocol.send_error(error))
        self.abort()

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
                        self._update_deadline()
                        await self._read()
                    if self._reading.cancelled_caught and not self._stopping:
                        self._timed_out()
                    while self._in_flight:
                        await self._wait_for_change()
                self.outbox.close()
            await _linger(self.stream)

    def _timed_out(self) -> None:
        limits = self.server.limits
        if not self.authenticated:
            error: SessionError = AuthenticationFailed(
                f"no auth request within auth_timeout={limits.auth_timeout} s"
            )
        else:
            error = RemoteProtocolError(
                f"a message did not arrive in full within message_timeout="
                f"{limits.message_timeout} s of its first byte"
            )
        self.server.counters["timeouts"] += 1
        self.server.logs.warning("timeout", "closing a connection from %s: %s", self.peer, error)
        self.outbox.send(self.protocol.send_error(error))

    def _update_deadline(self) -> None:
        """The reading deadline: authenticate in time, and finish a message begun in time."""
        if self.protocol.buffered and not (self._paused and self._excused):
            if self._message_since is None:
                self._message_since = trio.current_time()
        else:
            self._message_since = None
        deadline = self._auth_deadline
        if self._message_since is not None:
            deadline = min(deadline, self._message_since + self.server.limits.message_timeout)
        if deadline != self._reading.deadline:  # setting it costs, even to the same value
            self._reading.deadline = deadline

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
                # Paused: too many requests in flight, too many answers unsent, or the server's
                # budget for messages in progress is spent.
                while True:
                    if self._in_flight >= self.server.limits.max_in_flight:
                        await self._wait_for_change()
                    elif self.outbox.queued >= OUTBOX_HIGH_WATER:
                        await self.outbox.wait_below(OUTBOX_HIGH_WATER)
                    elif not self._read_size():
                        await self.server.budget_changed()
                    else:
                        break
                self._paused = False
                self._dispatch()  # what was received before the pause
                if not (self._ended or self._paused):
                    reactor.resume(sock)
        finally:
            self._ended = True  # also when stop_reading() cancelled us: answers must wake _run
            reactor.remove(sock)

    def _read_size(self) -> int:
        """Bytes to ask the socket for: 0 while the budget of messages in progress is spent
        and this connection holds all it may hold without it."""
        if not self.authenticated:
            return self.protocol.max_message_size
        if self.server.may_receive(self):
            return RECEIVE_SIZE
        return max(0, FREE_HOLD - self.protocol.buffered)

    def _on_readable(self) -> None:
        """The reactor's callback: take what the socket has and act on it."""
        if self._ended or self._paused:
            return
        size = self._read_size()
        if not size:
            self._pause(excused=True)  # the budget is spent: the bytes wait in the socket
            self._update_deadline()
            return
        try:
            data = self.stream.socket.recv(size)
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

    def _pause(self, *, excused: bool) -> None:
        """Stop reading for now. ``excused``: the wait is on our side (requests in flight,
        the budget), not the client's (answers it does not read), so a message in progress
        gets a new deadline when reading resumes."""
        self._paused, self._excused = True, excused
        self.server.reactor.pause(self.stream.socket)
        self._changed.set()

    def _dispatch(self) -> None:
        """Act on the events received so far, until none is left, reading must stop, or too
        much is in flight (the rest stay queued in the protocol until :meth:`_read` resumes)."""
        completed = False
        try:
            while not self._ended:
                full = self._in_flight >= self.server.limits.max_in_flight
                if full or self.outbox.queued >= OUTBOX_HIGH_WATER:
                    self._pause(excused=full)
                    return
                try:
                    event = self.protocol.next_event()
                except RemoteProtocolError as exc:
                    self.server.logs.warning(
                        "broken",
                        "closing a connection from %s that broke the protocol: %s",
                        self.peer,
                        exc,
                    )
                    self.outbox.send(self.protocol.send_error(exc))
                    self._end()
                    return
                if event is NEED_DATA:
                    return
                completed = True
                if not self._handle(event):
                    self._end()
                    return
        finally:
            self.server.account(self, completed=completed)
            if not self._ended:
                if completed:  # what is left is another message: its own deadline
                    self._message_since = None
                self._update_deadline()

    def _handle(self, event: object) -> bool:
        """Act on one event; False to close the connection."""
        if isinstance(event, Request):
            if event.method == "auth":
                return self._authenticate(event)
            if not self.authenticated:
                return self._refuse_unauthenticated(event.msgid)
            self._in_flight += 1
            reply = partial(self._settle, event.msgid)
            if not self.server.submit(event.method, event.params, reply):
                self._requests.start_soon(self._answer, event, reply)
        elif isinstance(event, InvalidMessage):
            self.server.counters["invalid_messages"] += 1
            self.server.logs.warning(
                "invalid", "an invalid message from %s: %s", self.peer, event.reason
            )
            if event.msgid is not None:
                if not self.authenticated:
                    return self._refuse_unauthenticated(event.msgid)
                self._reply(event.msgid, error=InvalidRequest(event.reason))
        elif isinstance(event, Notification):
            log.debug("ignoring a notification %s from %s", describe(event.method), self.peer)
        else:  # ConnectionClosed: answer what is in flight, then close
            return False
        return True

    def _authenticate(self, request: Request) -> bool:
        """Handle an ``auth`` request; False to close the connection."""
        server, failure = self.server, None
        if self.key is not None and not server.failures.allows(self.key):
            wait = math.ceil(server.failures.retry_after(self.key))
            failure = AuthenticationFailed(
                f"too many failed authentications from this address; retry in {wait} s"
            )
        elif request.params == [None] and server.requires_token:
            # Not a guess, so not held against the address: a client that was given no token.
            failure = AuthenticationFailed("this daemon requires a token and none was given")
            server.counters["auth_failures"] += 1
        elif len(request.params) != 1 or not server.authenticates(request.params[0]):
            failure = AuthenticationFailed("wrong token")
            server.counters["auth_failures"] += 1
            if self.key is not None:
                server.failures.fail(self.key)
        if failure is not None:
            return self._refuse(request.msgid, failure)
        if not self.authenticated:
            self.authenticated = True
            self.protocol.max_message_size = server.limits.max_message_size
            self._auth_deadline = math.inf
            server.authenticated(self)
        self._reply(request.msgid, result=True)
        return True

    def _refuse_unauthenticated(self, msgid: int) -> bool:
        failure = AuthenticationFailed("authenticate first: the first request is auth(token)")
        return self._refuse(msgid, failure)

    def _refuse(self, msgid: int, failure: AuthenticationFailed) -> bool:
        self.server.logs.warning("auth", "refusing a connection from %s: %s", self.peer, failure)
        self._reply(msgid, error=failure)
        return False

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
