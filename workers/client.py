"""Clients of the daemon: :func:`connect` for Trio code, :class:`SyncClient` for the rest.

::

    async with connect("tcp://127.0.0.1:7878", token=token) as sessions:
        sid = await sessions.create({"user_id": "user123"}, ttl=3600)
        s = await sessions.update(sid, set={"theme": "dark"}, expected_version=1)

    with SyncClient("unix:///run/sessiond.sock") as sessions:
        sessions.touch(sid)

Both have the methods of :class:`~workers.service.SessionService` and raise the same error
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
* Arguments msgpack cannot carry raise ``InvalidMetadata`` before anything is sent, and a
  request above ``max_message_size`` raises ``InvalidRequest``.

The async client is pipelined: any number of tasks may call it at once over its one
connection, and each gets its own answer as soon as the daemon has it. ``SyncClient`` sends
one request at a time (a lock makes it safe to share between threads).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from supervisor import unwrap

from .codec import canonical_metadata
from .errors import InvalidMetadata, ServiceUnavailable, SessionError
from .protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ERROR_NOTIFICATION,
    METHODS,
    NEED_DATA,
    Address,
    Connection,
    ConnectionClosed,
    Event,
    InvalidRequest,
    LocalProtocolError,
    Method,
    Notification,
    RemoteProtocolError,
    Response,
    Role,
    decode_error,
    parse_address,
    session_to_wire,
)
from .service import DEFAULT
from .session import Session
from .transport import RECEIVE_SIZE, Outbox, open_stream

#: Reconnection backoff: first delay, and the cap the doubling stops at (seconds).
BACKOFF_FIRST = 0.02
BACKOFF_MAX = 1.0
#: How many sessions ``list_sessions`` asks for per page.
PAGE_SIZE = 500


def _metadata(metadata: Any) -> dict[str, Any]:
    # The embedded service's check, so that the same mistakes raise the same InvalidMetadata
    # (the daemon would otherwise close the connection on a map with non-string keys). Size
    # is the daemon's business: it knows its max_metadata_bytes.
    return canonical_metadata(metadata, sys.maxsize)


def _create_params(metadata: dict[str, Any] | None, ttl: Any) -> list[Any]:
    metadata = _metadata(metadata)
    return [metadata] if ttl is DEFAULT else [metadata, ttl]


def _update_params(
    session_id: str,
    set: Any,
    unset: Iterable[str],
    expected_version: int | None,
) -> list[Any]:
    if callable(set):
        raise TypeError("over the wire, update takes a patch (set=..., unset=...), not a function")
    return [session_id, _metadata(set), list(unset), expected_version]


def _records(sessions: Iterable[Session]) -> list[dict[str, Any]]:
    return [session_to_wire(s) for s in sessions]


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
        self.done = trio.Event()
        self.result: Any = None
        self.error: SessionError | None = None


class _Link:
    """One connection of an async client: a reader task, a writer task, replies by msgid."""

    def __init__(self, stream: trio.SocketStream, max_message_size: int) -> None:
        self.stream = stream
        self.protocol = Connection(Role.CLIENT, max_message_size=max_message_size)
        self.outbox = Outbox(stream)
        self.pending: dict[int, _Reply] = {}
        self.open = True
        self.reason = "the connection to the daemon closed"
        self._scope = trio.CancelScope()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.outbox.run)
                    task_status.started()
                    await self._read()
                    nursery.cancel_scope.cancel()
            finally:
                self.open = False
                for reply in self.pending.values():
                    reply.error = _lost(self.reason)
                    reply.done.set()
                self.pending.clear()
                await trio.aclose_forcefully(self.stream)

    def close(self) -> None:
        self.open = False
        self._scope.cancel()

    async def _read(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
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

    async def call(self, method: Method, params: Sequence[Any]) -> Any:
        if not self.open:
            raise _lost(self.reason)
        msgid, data = _encode_request(self.protocol, method, params)
        reply = self.pending[msgid] = _Reply()
        self.outbox.send(data)
        try:
            await reply.done.wait()
        except BaseException:
            if self.pending.pop(msgid, None) is not None:
                self.protocol.forget(msgid)
            raise
        if reply.error is not None:
            raise reply.error
        return method.decode_result(reply.result)


class Client:
    """An async, pipelined client of the daemon; get one from :func:`connect`."""

    def __init__(
        self,
        address: Address,
        nursery: trio.Nursery,
        *,
        token: str | None,
        reconnect_timeout: float,
        max_message_size: int,
    ) -> None:
        self.address = address
        self._nursery = nursery
        self._token = token
        self._reconnect_timeout = reconnect_timeout
        self._max_message_size = max_message_size
        self._link: _Link | None = None
        self._connecting = trio.Lock()
        self._closed = False

    async def _call(self, name: str, *params: Any) -> Any:
        link = self._link
        if link is None or not link.open:
            link = await self._reconnect()
        return await link.call(METHODS[name], params)

    async def _reconnect(self) -> _Link:
        async with self._connecting:
            if self._link is not None and self._link.open:
                return self._link  # another task reconnected meanwhile
            if self._closed:
                raise ServiceUnavailable("the client is closed")
            deadline = trio.current_time() + self._reconnect_timeout
            delay = BACKOFF_FIRST
            while True:
                try:
                    self._link = await self._open_link()
                    return self._link
                except (OSError, ServiceUnavailable) as exc:
                    if trio.current_time() + delay > deadline:
                        raise ServiceUnavailable(
                            f"cannot reach the daemon at {self.address}: {exc}"
                        ) from None
                await trio.sleep(delay)
                delay = min(2 * delay, BACKOFF_MAX)

    async def _open_link(self) -> _Link:
        link = _Link(await open_stream(self.address), self._max_message_size)
        await self._nursery.start(link.run)
        try:
            await link.call(METHODS["auth"], [self._token])
        except BaseException:
            link.close()
            raise
        return link

    async def aclose(self) -> None:
        """Close the connection; calls in flight raise ServiceUnavailable."""
        self._closed = True
        if self._link is not None:
            self._link.close()

    # -- the SessionService methods ------------------------------------------------------

    async def ping(self) -> str:
        """Ask the daemon for ``"pong"``."""
        return await self._call("ping")

    async def create(self, metadata: dict[str, Any] | None = None, ttl: Any = DEFAULT) -> str:
        """Store a new session and return its id; ``ttl`` in seconds, None for never."""
        return await self._call("create", *_create_params(metadata, ttl))

    async def retrieve(self, session_id: str) -> Session:
        """The live session; refreshes its access time."""
        return await self._call("retrieve", session_id)

    async def peek(self, session_id: str) -> Session:
        """The live session, leaving its access time alone."""
        return await self._call("peek", session_id)

    async def update(
        self,
        session_id: str,
        set: dict[str, Any] | None = None,
        unset: Iterable[str] = (),
        *,
        expected_version: int | None = None,
    ) -> Session:
        """Set keys from ``set`` and remove keys in ``unset``, atomically (see module doc)."""
        params = _update_params(session_id, set, unset, expected_version)
        return await self._call("update", *params)

    patch = update

    async def touch(self, session_id: str) -> None:
        """Refresh the access time of a live session."""
        await self._call("touch", session_id)

    async def set_ttl(self, session_id: str, ttl: float | None) -> None:
        """Change a live session's idle timeout (seconds, None for never)."""
        await self._call("set_ttl", session_id, ttl)

    async def delete(self, session_id: str) -> bool:
        """Remove a session; True if a live one was removed."""
        return await self._call("delete", session_id)

    async def rotate(self, session_id: str) -> str:
        """Move a live session to a fresh id and retire the old one; returns the new id."""
        return await self._call("rotate", session_id)

    async def delete_where(self, key: str, value: Any) -> int:
        """Delete every session whose ``metadata[key] == value``; returns how many."""
        return await self._call("delete_where", key, value)

    async def list_page(
        self, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Session], str | None]:
        """One page of live sessions and the next page's cursor (None after the last)."""
        return await self._call("list_page", cursor, limit)

    async def list_sessions(self) -> list[Session]:
        """Every live session (pages through them; prefer ``list_page`` for many)."""
        sessions: list[Session] = []
        cursor = None
        while True:
            page, cursor = await self.list_page(cursor, PAGE_SIZE)
            sessions += page
            if cursor is None:
                return sessions

    async def count(self) -> int:
        """The number of live sessions."""
        return await self._call("count")

    async def cleanup_expired(self) -> int:
        """Remove expired sessions now; returns how many went."""
        return await self._call("cleanup_expired")

    async def get_backend(self) -> str:
        """The daemon's canonical backend name."""
        return await self._call("get_backend")

    async def stats(self) -> dict[str, Any]:
        """The service's figures plus the daemon's (connections, requests, pid)."""
        return await self._call("stats")

    async def import_sessions(self, sessions: Iterable[Session]) -> int:
        """Store sessions from a backup as they are; ids in use are skipped. Returns how many."""
        return await self._call("import_sessions", _records(sessions))

    async def crash_actor(self, name: str) -> bool:
        """Fault injection: crash the daemon's ``"manager"`` or ``"cleanup"`` actor.

        Only a daemon started with ``--allow-fault-injection`` answers; any other raises
        :class:`~workers.protocol.InvalidRequest`. The crash restarts the daemon's listener
        with the actor (rest_for_one), so every connection drops, this one included: the
        answer (True) may be lost, and this raises ``ServiceUnavailable`` instead. Compare
        ``stats()["restarts"]`` before and after to know for sure.
        """
        return await self._call("crash_actor", name)


@asynccontextmanager
async def connect(
    address: str,
    *,
    token: str | None = None,
    reconnect_timeout: float = 5.0,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> AsyncIterator[Client]:
    """Connect to the daemon at ``address`` (``tcp://HOST:PORT`` or ``unix:///path``).

    Raises ``ServiceUnavailable`` when the daemon cannot be reached within
    ``reconnect_timeout`` seconds, ``AuthenticationFailed`` for a wrong or missing token.
    """
    try:
        async with trio.open_nursery() as nursery:
            client = Client(
                parse_address(address),
                nursery,
                token=token,
                reconnect_timeout=reconnect_timeout,
                max_message_size=max_message_size,
            )
            try:
                await client._reconnect()
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:  # the caller's own error, not wrapped by our nursery
        raise unwrap(group) from None


class SyncClient:
    """A blocking client of the daemon, for code that is not async; use it as ``with``.

    It has the methods of :class:`Client` (see the module docstring), as plain functions.
    ``timeout`` bounds each call; a call that times out raises ``ServiceUnavailable`` and
    drops the connection.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        reconnect_timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.address = parse_address(address)
        self._token = token
        self._timeout = timeout
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

    def _call(self, name: str, *params: Any) -> Any:
        method = METHODS[name]
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
        """Send one request and wait for its answer; ServiceUnavailable if the link fails."""
        assert self._sock is not None
        msgid, data = _encode_request(self._protocol, method, params)
        reason = "the connection to the daemon closed"
        try:
            self._sock.sendall(data)
            while True:
                event: Event | object = self._protocol.next_event()
                if event is NEED_DATA:
                    self._protocol.receive_data(self._sock.recv(RECEIVE_SIZE))
                elif isinstance(event, Response) and event.msgid == msgid:
                    break
                elif isinstance(event, Notification):
                    reason = _notified_reason(event) or reason
                elif isinstance(event, ConnectionClosed):
                    raise ConnectionError(reason)
        except (OSError, RemoteProtocolError) as exc:
            self._drop()
            raise _lost(f"{reason} ({exc})" if str(exc) != reason else reason) from None
        if event.error is not None:
            raise decode_error(event.error)
        return method.decode_result(event.result)

    # -- the SessionService methods, as in Client ------------------------------------------

    def ping(self) -> str:
        return self._call("ping")

    def create(self, metadata: dict[str, Any] | None = None, ttl: Any = DEFAULT) -> str:
        return self._call("create", *_create_params(metadata, ttl))

    def retrieve(self, session_id: str) -> Session:
        return self._call("retrieve", session_id)

    def peek(self, session_id: str) -> Session:
        return self._call("peek", session_id)

    def update(
        self,
        session_id: str,
        set: dict[str, Any] | None = None,
        unset: Iterable[str] = (),
        *,
        expected_version: int | None = None,
    ) -> Session:
        return self._call("update", *_update_params(session_id, set, unset, expected_version))

    patch = update

    def touch(self, session_id: str) -> None:
        self._call("touch", session_id)

    def set_ttl(self, session_id: str, ttl: float | None) -> None:
        self._call("set_ttl", session_id, ttl)

    def delete(self, session_id: str) -> bool:
        return self._call("delete", session_id)

    def rotate(self, session_id: str) -> str:
        return self._call("rotate", session_id)

    def delete_where(self, key: str, value: Any) -> int:
        return self._call("delete_where", key, value)

    def list_page(
        self, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[Session], str | None]:
        return self._call("list_page", cursor, limit)

    def list_sessions(self) -> list[Session]:
        sessions: list[Session] = []
        cursor = None
        while True:
            page, cursor = self.list_page(cursor, PAGE_SIZE)
            sessions += page
            if cursor is None:
                return sessions

    def count(self) -> int:
        return self._call("count")

    def cleanup_expired(self) -> int:
        return self._call("cleanup_expired")

    def get_backend(self) -> str:
        return self._call("get_backend")

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def import_sessions(self, sessions: Iterable[Session]) -> int:
        return self._call("import_sessions", _records(sessions))

    def crash_actor(self, name: str) -> bool:
        return self._call("crash_actor", name)


__all__ = ["Client", "SyncClient", "connect"]
