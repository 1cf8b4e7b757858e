"""The daemon's wire protocol: msgpack-RPC, sans-IO (bytes in, events out; no sockets here).

Rules
-----
1. A message is one msgpack array, back to back with the next on a byte stream, exactly as the
   msgpack-RPC specification has it: a request ``[0, msgid, method, params]``, a response
   ``[1, msgid, error, result]``, a notification ``[2, method, params]``. ``msgid`` is an
   unsigned 32-bit integer chosen by the client, ``method`` a string, ``params`` an array of
   positional arguments (a trailing optional argument is simply left out).
2. A response's ``error`` is ``None`` on success, else the pair ``[name, message]`` (see
   :func:`workers.record.errors.error_to_wire`); ``result`` is then ``None``. The client raises the
   class the name gives, so remote callers see the embedded service's error classes.
3. No message may be longer than ``max_message_size`` bytes. A longer one, bytes that are not
   msgpack, or a stream that ends inside a message are fatal: the stream can no longer be
   trusted, so the connection is closed (after an error notification, when it can be sent).
   A well-formed msgpack value that is not a valid message is not fatal: the stream is still in
   step, so it is reported as :class:`InvalidMessage` and the connection goes on.
4. The server answers requests in any order (pipelining); the client matches answers to its
   requests by ``msgid``. A msgid is in flight from its request until its response, and no two
   requests in flight on one connection share one.
5. A session travels as the map :meth:`workers.record.session.Session.to_dict` gives.

Why no length prefix
--------------------
msgpack is self-delimiting, and msgpack-RPC is defined as a plain stream of messages; adding a
frame header would buy resynchronisation after garbage, which a connection that sends garbage
does not deserve, and would lose every existing msgpack-RPC client. The size limit is enforced
on the stream itself: :class:`Connection` counts the bytes of the message being parsed and
gives up as soon as it passes the limit, whatever the chunking of the input, so memory stays
bounded by the limit plus one received chunk.

Theory of operation
-------------------
Modelled on h11. Each side of a connection owns one :class:`Connection` with its
:class:`Role`. Bytes read from the transport go to :meth:`Connection.receive_data` (``b""``
for end of file); :meth:`Connection.next_event` then gives parsed events one at a time
(:class:`Request`, :class:`Response`, :class:`Notification`, :class:`InvalidMessage`,
:class:`ConnectionClosed`) until it returns :data:`NEED_DATA`, and raises
:class:`RemoteProtocolError` once the stream is broken. To send, :meth:`Connection.send_request`,
:meth:`Connection.send_response` and :meth:`Connection.send_notification` give the bytes to
write; the I/O code decides when and how.

Which methods exist, their positional parameters and how their results travel is not this
module's business: that is the method table, :data:`workers.core.api.METHODS`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from ..record.codec import pack
from ..record.errors import (
    ERRORS,
    InternalError,
    ProtocolError,
    SessionError,
    error_to_wire,
)

REQUEST: Final = 0
RESPONSE: Final = 1
NOTIFICATION: Final = 2

#: Largest message accepted by default (a session's metadata is at most 64 KiB by default; a
#: restore batch carries many).
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024
#: msgids are unsigned 32-bit integers, as msgpack-RPC has them.
MAX_MSGID: Final = 2**32 - 1
#: The notification a side sends, with params ``[[name, message]]``, before closing on an error.
ERROR_NOTIFICATION: Final = "error"


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection cannot continue."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow (a bug in the caller)."""


#: Every error class that can travel in a response, by name.
WIRE_ERRORS: Final[dict[str, type[SessionError]]] = {
    **ERRORS,
    RemoteProtocolError.__name__: RemoteProtocolError,
}


def encode_error(exc: SessionError) -> list[str]:
    """The wire form of ``exc``: ``[class name, message]``."""
    return list(error_to_wire(exc))


def decode_error(error: object) -> SessionError:
    """The exception a response's ``error`` stands for (unknown names give SessionError)."""
    if (
        isinstance(error, list)
        and len(error) == 2
        and isinstance(error[0], str)
        and isinstance(error[1], str)
    ):
        return WIRE_ERRORS.get(error[0], SessionError)(error[1])
    return RemoteProtocolError(f"malformed error in a response: {error!r:.200}")


class Role(enum.Enum):
    """Which end of the connection a :class:`Connection` is."""

    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True, slots=True)
class Request:
    """A call: answer it with :meth:`Connection.send_response` and the same ``msgid``."""

    msgid: int
    method: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to request ``msgid``: ``error`` is None or ``[name, message]``."""

    msgid: int
    error: Any
    result: Any


@dataclass(frozen=True, slots=True)
class Notification:
    """A message that expects no answer."""

    method: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """A msgpack value that is not a valid message for this role; the stream is still usable.

    ``msgid`` is the request's id when one could be read (answer it with an error), else None.
    """

    msgid: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its end cleanly, between two messages."""


Event = Request | Response | Notification | InvalidMessage | ConnectionClosed


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`Connection.next_event` when it needs more bytes to give an event.
NEED_DATA: Final = _NeedData()


def _is_msgid(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_MSGID


class Connection:
    """The protocol state of one end of one connection.

    ``max_message_size`` bounds every received message; sent messages are not bounded here
    (the peer enforces its own limit).
    """

    def __init__(self, role: Role, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size < 16:
            raise ValueError("max_message_size must be at least 16 bytes")
        self.role = role
        self.max_message_size = max_message_size
        # The unpacker's own limits are a backstop: our accounting below is what enforces
        # max_message_size. Fed slices are at most max_message_size and a partial message is
        # at most that too, so the buffer never holds more than twice the limit.
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_buffer_size=2 * max_message_size,
        )
        self._received = 0  # bytes fed to the unpacker
        self._message_start = 0  # stream offset where the message being parsed starts
        self._events: deque[Event] = deque()
        self._error: RemoteProtocolError | None = None
        self._eof = False
        self._next_msgid = 0
        #: msgids in flight: sent and unanswered (client), received and unanswered (server).
        self.in_flight: set[int] = set()

    @property
    def broken(self) -> bool:
        """Whether the stream broke: :meth:`next_event` raises once earlier events are out."""
        return self._error is not None

    # -- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the transport; ``b""`` means the peer closed its end."""
        if self._eof:
            if data:
                raise LocalProtocolError("data received after end of file")
            return
        if self._error is not None:
            return  # the stream is already broken: nothing after the break is parsed
        if not data:
            self._eof = True
            if self._received > self._message_start:
                self._fail(f"the stream ended inside a message ({self._pending_bytes} bytes)")
            else:
                self._events.append(ConnectionClosed())
            return
        step = self.max_message_size
        # One slice for the usual read; more only when a read is longer than a message may be.
        chunks = (data,) if len(data) <= step else _slices(memoryview(data), step)
        for chunk in chunks:
            try:
                self._unpacker.feed(chunk)
            except msgpack.BufferFull:  # cannot happen given the accounting; a backstop
                self._fail(f"a message is longer than {self.max_message_size} bytes")
                return
            self._received += len(chunk)
            if not self._parse():
                return

    @property
    def _pending_bytes(self) -> int:
        return self._received - self._message_start

    def _parse(self) -> bool:
        """Turn every complete message fed so far into an event; False once broken."""
        while True:
            try:
                obj = self._unpacker.unpack()
            except msgpack.OutOfData:
                break
            except (ValueError, msgpack.UnpackException) as exc:
                # FormatError, StackError and limits violations are ValueError subclasses.
                self._fail(f"the stream is not msgpack ({str(exc) or type(exc).__name__})")
                return False
            end = self._unpacker.tell()
            size, self._message_start = end - self._message_start, end
            if size > self.max_message_size:
                self._fail(f"a message of {size} bytes is longer than {self.max_message_size}")
                return False
            self._events.append(self._to_event(obj))
        if self._pending_bytes > self.max_message_size:
            self._fail(f"a message is longer than {self.max_message_size} bytes")
            return False
        return True

    def _fail(self, reason: str) -> None:
        self._error = RemoteProtocolError(reason)

    def _to_event(self, obj: object) -> Event:
        if not isinstance(obj, list) or not obj or type(obj[0]) is not int:
            return InvalidMessage(
                None, f"a message is an array starting with its type: {obj!r:.80}"
            )
        kind = obj[0]
        if kind == REQUEST and len(obj) == 4:
            _, msgid, method, params = obj
            if not _is_msgid(msgid):
                return InvalidMessage(None, f"a msgid is an unsigned 32-bit integer: {msgid!r:.40}")
            if self.role is not Role.SERVER:
                return InvalidMessage(None, "a server sent a request")
            if msgid in self.in_flight:
                return InvalidMessage(None, f"request msgid {msgid} is already in flight")
            self.in_flight.add(msgid)  # answered either way, error or result
            if not isinstance(method, str) or not isinstance(params, list):
                return InvalidMessage(msgid, "a request is [0, msgid, method: str, params: array]")
            return Request(msgid, method, params)
        if kind == RESPONSE and len(obj) == 4:
            _, msgid, error, result = obj
            if self.role is not Role.CLIENT:
                return InvalidMessage(None, "a client sent a response")
            if msgid not in self.in_flight:
                return InvalidMessage(
                    None, f"a response to msgid {msgid!r:.40} that is not in flight"
                )
            self.in_flight.discard(msgid)
            return Response(msgid, error, result)
        if kind == NOTIFICATION and len(obj) == 3:
            _, method, params = obj
            if not isinstance(method, str) or not isinstance(params, list):
                return InvalidMessage(None, "a notification is [2, method: str, params: array]")
            return Notification(method, params)
        return InvalidMessage(None, f"not a request, response or notification: {obj!r:.80}")

    def next_event(self) -> Event | _NeedData:
        """The next event, or :data:`NEED_DATA`; raises :class:`RemoteProtocolError` once broken."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        return NEED_DATA

    # -- sending -------------------------------------------------------------------------

    def send_request(self, method: str, params: Sequence[Any]) -> tuple[int, bytes]:
        """Allocate a msgid and encode a request; returns ``(msgid, bytes)``. Client only."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only a client sends requests")
        if len(self.in_flight) > MAX_MSGID:
            raise LocalProtocolError("every msgid is in flight")
        msgid = self._next_msgid
        while msgid in self.in_flight:
            msgid = (msgid + 1) & MAX_MSGID
        data = self._encode([REQUEST, msgid, method, list(params)])
        self._next_msgid = (msgid + 1) & MAX_MSGID
        self.in_flight.add(msgid)
        return msgid, data

    def forget(self, msgid: int) -> None:
        """Stop waiting for the response to ``msgid`` (a client that gave up on a call).

        A response that arrives later is reported as :class:`InvalidMessage`, which a client
        that forgets requests should ignore.
        """
        self.in_flight.discard(msgid)

    def send_response(
        self, msgid: int, *, result: Any = None, error: SessionError | None = None
    ) -> bytes:
        """Encode the answer to request ``msgid``: its result, or the error it raised. Server only.

        A result that msgpack cannot encode becomes an :class:`InternalError` response, so that
        the request is answered whatever happens.
        """
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only a server sends responses")
        if msgid not in self.in_flight:
            raise LocalProtocolError(f"msgid {msgid} is not a request in flight")
        wire_error = None if error is None else encode_error(error)
        try:
            data = pack([RESPONSE, msgid, wire_error, result])
        except (TypeError, ValueError, OverflowError) as exc:
            failure = InternalError(f"the result cannot be encoded: {exc}")
            data = pack([RESPONSE, msgid, encode_error(failure), None])
        self.in_flight.discard(msgid)
        return data

    def send_notification(self, method: str, params: Sequence[Any]) -> bytes:
        """Encode a notification."""
        return self._encode([NOTIFICATION, method, list(params)])

    def send_error(self, exc: SessionError) -> bytes:
        """Encode the :data:`ERROR_NOTIFICATION` a side sends before it closes on ``exc``."""
        return self.send_notification(ERROR_NOTIFICATION, [encode_error(exc)])

    @staticmethod
    def _encode(message: list[Any]) -> bytes:
        try:
            return pack(message)
        except (TypeError, ValueError, OverflowError) as exc:
            raise LocalProtocolError(f"cannot encode {message[0:3]!r:.80}: {exc}") from None


def _slices(view: memoryview, step: int) -> Iterator[memoryview]:
    return (view[start : start + step] for start in range(0, len(view), step))
