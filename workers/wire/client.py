"""Clients of the daemon: :func:`connect` for async code (Trio or asyncio), :class:`SyncClient`
for the rest.

::

    async with connect("tcp://127.0.0.1:7878", token=token) as sessions:
        sid = await sessions.create({"user_id": "user123"}, ttl=3600)
        s = await sessions.update(sid, set={"theme": "dark"}, expected_version=1)

    with SyncClient("unix:///run/sessiond.sock") as sessions:
        sessions.touch(sid)

Both have the methods of :class:`~workers.core.service.SessionService` and raise the same error
classes. What differs is what the wire forces:

* ``update(id, set=None, unset=(), *, expected_version=None)`` takes a patch, not a function (a
  function cannot travel): keys in ``set`` are set, keys in ``unset`` removed, atomically in the
  daemon; with ``expected_version`` the update is refused with ``VersionConflict`` unless the
  session is at that version, which gives read-modify-write without a lost update.
  ``patch`` is the same method under the service's name for it.
* A call that was in flight when the connection broke raises ``ServiceUnavailable``; it may or
  may not have been applied. The next call reconnects (and authenticates again), retrying with
  exponential backoff for up to ``reconnect_timeout`` seconds before it raises
  ``ServiceUnavailable`` in turn. Calls are never retried behind the caller's back.
* Nothing waits forever: ``timeout`` (30 s by default) bounds every call and every attempt to
  connect. A daemon that does not answer in time (stopped, wedged, or behind a dead network)
  costs the call a ``ServiceUnavailable``, and the connection is dropped.
* Arguments msgpack cannot carry raise ``InvalidMetadata`` before anything is sent, and a
  request above ``max_message_size`` raises ``InvalidRequest``.

The async client is written on anyio, so it runs under Trio and under asyncio (FastAPI,
Starlette, the MCP SDK) alike. It is pipelined: any number of tasks may call it at once over its
one connection, and each gets its own answer as soon as the daemon has it. ``SyncClient`` sends
one request at a time (a lock makes it safe to share between threads).
"""

from __future__ import annotations

import inspect
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import anyio
import anyio.abc
from anyio.abc import TaskGroup, TaskStatus

from ..core.api import METHODS, PAGE_SIZE, REQUIRED, Method
from ..record.errors import InvalidMetadata, InvalidRequest, ServiceUnavailable, SessionError
from ..record.session import Session
from .address import Address, parse_address
from .protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ERROR_NOTIFICATION,
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Event,
    LocalProtocolError,
    Notification,
    RemoteProtocolError,
    Response,
    Role,
    decode_error,
)
from .transport import RECEIVE_SIZE

#: Reconnection backoff: first delay, and the cap the doubling stops at (seconds).
BACKOFF_FIRST = 0.02
BACKOFF_MAX = 1.0
#: Seconds a call (or an attempt to connect) may take before ServiceUnavailable.
DEFAULT_TIMEOUT = 30.0

#: A request a client method plans: the method and its wire parameters.
Plan = Generator[tuple[Method, list[Any]], Any, Any]


def _rpc(method: Method) -> Callable[..., Any]:
    """A client method for table entry ``method``: checks and encodes its arguments as the
    table says, then hands them to the client's ``_call`` (a coroutine or a blocking call)."""
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for p in method.params:
        kind = (
            inspect.Parameter.KEYWORD_ONLY
            if p.keyword_only
            else inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        default = inspect.Parameter.empty if p.default is REQUIRED else p.default
        parameters.append(inspect.Parameter(p.name, kind, default=default, annotation=p.annotation))
    signature = inspect.Signature(parameters, return_annotation=method.returns)
    names = [p.name for p in method.params]

    def rpc(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) != len(names):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
        else:  # every parameter given positionally: the common case, without bind's cost
            arguments = dict(zip(names, args, strict=True))
        return self._call(method, method.encode_params(arguments))

    rpc.__name__ = rpc.__qualname__ = method.name
    rpc.__doc__ = method.doc
    rpc.__signature__ = signature  # type: ignore[attr-defined]
    return rpc


def _all_pages(list_page: Method) -> Plan:
    """``list_sessions`` as a plan of ``list_page`` requests (see :class:`_TableMethods`)."""
    sessions: list[Session] = []
    cursor = None
    while True:
        page, cursor = yield (
            list_page,
            list_page.encode_params({"cursor": cursor, "limit": PAGE_SIZE}),
        )
        sessions += page
        if cursor is None:
            return sessions


class _TableMethods:
    """The methods both clients share, generated from the method table :attr:`methods`.

    Every entry of the table that clients get becomes a method (and one per alias) with the
    table's signature and checks, which calls ``self._call(method, params)``: a coroutine in
    the async client, a blocking call in :class:`SyncClient`. A subclass that sets another
    ``methods`` table gets the methods of that table. Methods made of several requests
    (``list_sessions``) are plans, generators of requests that ``_drive`` runs.
    """

    #: The method table the client is generated from (:data:`workers.core.api.METHODS`).
    methods: ClassVar[dict[str, Method]] = METHODS

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for method in cls.methods.values():
            if method.in_clients:
                for name in (method.name, *method.aliases):
                    if name not in cls.__dict__:
                        setattr(cls, name, _rpc(method))

    def _call(self, method: Method, params: list[Any]) -> Any:
        raise NotImplementedError

    def _drive(self, plan: Plan) -> Any:
        raise NotImplementedError

    def list_sessions(self) -> Any:
        """Every live session (pages through them; prefer ``list_page`` for many)."""
        return self._drive(_all_pages(self.methods["list_page"]))


def _encode_request(
    protocol: Connection, method: Method, params: Sequence[Any]
) -> tuple[int, bytes]:
    """Encode a request, refusing locally what the daemon would refuse by closing the link."""
    try:
        msgid, data = protocol.send_request(method.name, params)
    except LocalProtocolError as exc:
        raise InvalidMetadata(f"{method.name}: {exc}") from None
    if len(data) > protocol.max_message_size:
        protocol.forget(msgid)
        raise InvalidRequest(
            f"{method.name}: a request of {len(data)} bytes is above max_message_size="
            f"{protocol.max_message_size}"
        )
    return msgid, data


def _lost(reason: str) -> ServiceUnavailable:
    return ServiceUnavailable(f"{reason}; a call in flight may or may not have been applied")


def _notified_reason(event: Notification) -> str | None:
    """The reason an ``error`` notification gives for closing the connection, else None."""
    if event.method != ERROR_NOTIFICATION or not event.params:
        return None
    error = decode_error(event.params[0])
    return f"the daemon closed the connection ({type(error).__name__}: {error})"


class _Reply:
    """Where the answer to one request lands."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: Any = None
        self.error: SessionError | None = None


async def _open_stream(address: Address, timeout: float) -> anyio.abc.ByteStream:
    """Connect to the daemon at ``address``; OSError (TimeoutError after ``timeout`` seconds)
    when nothing answers there."""
    with anyio.fail_after(timeout):
        if address.scheme == "unix":
            return await anyio.connect_unix(address.path)
        return await anyio.connect_tcp(address.host, address.port)  # sets TCP_NODELAY


class _Link:
    """One connection of an async client: a reader task, a writer task, replies by msgid.

    Requests from any number of tasks are queued and sent by the one writer task, so a burst of
    pipelined calls costs one ``send``; a caller that gives up never interrupts a write half way.
    """

    def __init__(self, stream: anyio.abc.ByteStream, max_message_size: int) -> None:
        self.stream = stream
        self.protocol = Connection(Role.CLIENT, max_message_size=max_message_size)
        self.pending: dict[int, _Reply] = {}
        self.open = True
        self.reason = "the connection to the daemon closed"
        self._scope = anyio.CancelScope()
        self._queued = bytearray()
        self._queued_event = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            try:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(self._write)
                    task_status.started()
                    await self._read()
                    tasks.cancel_scope.cancel()
            finally:
                self.open = False
                for reply in self.pending.values():
                    reply.error = _lost(self.reason)
                    reply.done.set()
                self.pending.clear()
                await anyio.aclose_forcefully(self.stream)

    def close(self, reason: str | None = None) -> None:
        if reason is not None and self.open:
            self.reason = reason
        self.open = False
        self._scope.cancel()

    async def _write(self) -> None:
        while True:
            await self._queued_event.wait()
            self._queued_event = anyio.Event()
            data, self._queued = bytes(self._queued), bytearray()
            try:
                await self.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.close(f"the connection to the daemon broke ({exc})")
                return

    async def _read(self) -> None:
        while True:
            try:
                data = await self.stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                data = b""
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.reason = f"the connection to the daemon broke ({exc})"
                return
            self.protocol.receive_data(data)
            while True:
                try:
                    event = self.protocol.next_event()
                except RemoteProtocolError as exc:
                    self.reason = f"the daemon broke the protocol ({exc})"
                    return
                if event is NEED_DATA:
                    break
                if isinstance(event, Response):
                    reply = self.pending.pop(event.msgid)
                    if event.error is None:
                        reply.result = event.result
                    else:
                        reply.error = decode_error(event.error)
                    reply.done.set()
                elif isinstance(event, Notification):
                    self.reason = _notified_reason(event) or self.reason
                elif isinstance(event, ConnectionClosed):
                    return
                # InvalidMessage: the late answer to a call its caller gave up on.

    async def call(self, method: Method, params: Sequence[Any], timeout: float) -> Any:
        """Send one request and wait for its answer, at most ``timeout`` seconds.

        When the daemon does not answer in time the connection is dropped (a daemon that is
        stopped or wedged would hold every later call too) and ServiceUnavailable is raised.
        """
        if not self.open:
            raise _lost(self.reason)
        msgid, data = _encode_request(self.protocol, method, params)
        reply = self.pending[msgid] = _Reply()
        self._queued += data
        self._queued_event.set()
        try:
            with anyio.move_on_after(timeout):
                await reply.done.wait()
        finally:
            if self.pending.pop(msgid, None) is not None:  # cancelled, or out of time
                self.protocol.forget(msgid)
        if not reply.done.is_set():
            self.close(f"the daemon did not answer {method.name} within {timeout} s")
            raise _lost(f"{self.reason}; the connection was dropped")
        if reply.error is not None:
            raise reply.error
        return method.decode_result(reply.result)


class Client(_TableMethods):
    """An async, pipelined client of the daemon; get one from :func:`connect`.

    Its methods are those of the method table (see :class:`_TableMethods`), each a coroutine.
    """

    def __init__(
        self,
        address: Address,
        task_group: TaskGroup,
        *,
        token: str | None,
        timeout: float,
        reconnect_timeout: float,
        max_message_size: int,
    ) -> None:
        self.address = address
        self._task_group = task_group
        self._token = token
        self._timeout = _positive("timeout", timeout)
        self._reconnect_timeout = reconnect_timeout
        self._max_message_size = max_message_size
        self._link: _Link | None = None
        self._connecting = anyio.Lock()
        self._closed = False

    async def _call(self, method: Method, params: list[Any]) -> Any:
        link = self._link
        if link is None or not link.open:
            link = await self._reconnect()
        return await link.call(method, params, self._timeout)

    async def _drive(self, plan: Plan) -> Any:
        try:
            request = next(plan)
            while True:
                request = plan.send(await self._call(*request))
        except StopIteration as done:
            return done.value

    async def _reconnect(self) -> _Link:
        async with self._connecting:
            if self._link is not None and self._link.open:
                return self._link  # another task reconnected meanwhile
            if self._closed:
                raise ServiceUnavailable("the client is closed")
            deadline = anyio.current_time() + self._reconnect_timeout
            delay = BACKOFF_FIRST
            while True:
                try:
                    self._link = await self._open_link()
                    return self._link
                except (OSError, ServiceUnavailable) as exc:
                    if anyio.current_time() + delay > deadline:
                        raise ServiceUnavailable(
                            f"cannot reach the daemon at {self.address}: {exc}"
                        ) from None
                await anyio.sleep(delay)
                delay = min(2 * delay, BACKOFF_MAX)

    async def _open_link(self) -> _Link:
        link = _Link(await _open_stream(self.address, self._timeout), self._max_message_size)
        await self._task_group.start(link.run)
        try:
            await link.call(METHODS["auth"], [self._token], self._timeout)
        except BaseException:
            link.close()
            raise
        return link

    async def aclose(self) -> None:
        """Close the connection; calls in flight raise ServiceUnavailable."""
        self._closed = True
        if self._link is not None:
            self._link.close()


@asynccontextmanager
async def connect(
    address: str,
    *,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    reconnect_timeout: float = 5.0,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    lazy: bool = False,
    client_class: type[Client] = Client,
) -> AsyncIterator[Client]:
    """Connect to the daemon at ``address`` (``tcp://HOST:PORT`` or ``unix:///path``).

    Works under Trio and asyncio (it is written on anyio). ``timeout`` bounds each call, and
    each attempt to connect: a daemon that does not answer within it costs the call a
    ``ServiceUnavailable`` and drops the connection (the next call opens a new one). Raises
    ``ServiceUnavailable`` when the daemon cannot be reached within ``reconnect_timeout``
    seconds, ``AuthenticationFailed`` for a wrong or missing token. With ``lazy=True`` nothing
    is connected until the first call, so a daemon that is down when the block is entered
    makes calls fail (and retry on the next one) instead of the ``async with``: what a server
    that starts before its daemon needs. ``client_class`` may be a subclass of :class:`Client`
    with a ``methods`` table of its own, for a daemon that answers more methods than this
    release's table.
    """
    try:
        async with anyio.create_task_group() as task_group:
            client = client_class(
                parse_address(address),
                task_group,
                token=token,
                timeout=timeout,
                reconnect_timeout=reconnect_timeout,
                max_message_size=max_message_size,
            )
            try:
                if not lazy:
                    await client._reconnect()
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:  # the caller's own error, not wrapped by our tasks
        raise _unwrap(group) from None


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} is a positive number of seconds, got {value!r}")
    return value


class SyncClient(_TableMethods):
    """A blocking client of the daemon, for code that is not async; use it as ``with``.

    It has the methods of :class:`Client` (see the module docstring), as plain functions.
    ``timeout`` bounds each call (from sending the request to the last byte of its answer) and
    each attempt to connect; a call that times out raises ``ServiceUnavailable`` and drops the
    connection.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        reconnect_timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.address = parse_address(address)
        self._token = token
        self._timeout = _positive("timeout", timeout)
        self._reconnect_timeout = reconnect_timeout
        self._max_message_size = max_message_size
        self._sock: socket.socket | None = None
        self._protocol = Connection(Role.CLIENT)
        self._lock = threading.Lock()

    def __enter__(self) -> SyncClient:
        with self._lock:
            self._connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next call would open a new one)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _call(self, method: Method, params: list[Any]) -> Any:
        with self._lock:
            if self._sock is None:
                self._connect()
            return self._exchange(method, params)

    def _connect(self) -> None:
        deadline = time.monotonic() + self._reconnect_timeout
        delay = BACKOFF_FIRST
        while True:
            try:
                self._sock = self._open_socket()
                self._protocol = Connection(Role.CLIENT, max_message_size=self._max_message_size)
                self._exchange(METHODS["auth"], [self._token])
                return
            except (OSError, ServiceUnavailable) as exc:
                self._drop()
                if time.monotonic() + delay > deadline:
                    raise ServiceUnavailable(
                        f"cannot reach the daemon at {self.address}: {exc}"
                    ) from None
            except BaseException:
                self._drop()
                raise
            time.sleep(delay)
            delay = min(2 * delay, BACKOFF_MAX)

    def _open_socket(self) -> socket.socket:
        address = self.address
        if address.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._timeout)
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((address.host, address.port), self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _exchange(self, method: Method, params: Sequence[Any]) -> Any:
        """Send one request and wait for its answer, at most ``timeout`` seconds in all;
        ServiceUnavailable (and the connection dropped) if the link fails or time runs out."""
        sock = self._sock
        assert sock is not None
        msgid, data = _encode_request(self._protocol, method, params)
        deadline = time.monotonic() + self._timeout
        reason = "the connection to the daemon closed"
        try:
            sock.settimeout(self._timeout)
            sock.sendall(data)
            while True:
                event: Event | object = self._protocol.next_event()
                if event is NEED_DATA:
                    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                    self._protocol.receive_data(sock.recv(RECEIVE_SIZE))
                elif isinstance(event, Response) and event.msgid == msgid:
                    break
                elif isinstance(event, Notification):
                    reason = _notified_reason(event) or reason
                elif isinstance(event, ConnectionClosed):
                    raise ConnectionError(reason)
        except TimeoutError:
            self._drop()
            why = f"the daemon did not answer {method.name} within {self._timeout} s"
            raise _lost(f"{why}; the connection was dropped") from None
        except (OSError, RemoteProtocolError) as exc:
            self._drop()
            raise _lost(f"{reason} ({exc})" if str(exc) != reason else reason) from None
        if event.error is not None:
            raise decode_error(event.error)
        return method.decode_result(event.result)

    def _drive(self, plan: Plan) -> Any:
        try:
            request = next(plan)
            while True:
                request = plan.send(self._call(*request))
        except StopIteration as done:
            return done.value


def _unwrap(exc: BaseException) -> BaseException:
    """The single exception inside (nested) one-exception groups, or ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


__all__ = ["Client", "SyncClient", "connect"]
