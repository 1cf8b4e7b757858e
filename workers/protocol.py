"""The daemon's wire protocol: msgpack-RPC, sans-IO (bytes in, events out; no sockets here).

Rules
-----
1. A message is one msgpack array, back to back with the next on a byte stream, exactly as the
   msgpack-RPC specification has it: a request ``[0, msgid, method, params]``, a response
   ``[1, msgid, error, result]``, a notification ``[2, method, params]``. ``msgid`` is an
   unsigned 32-bit integer chosen by the client, ``method`` a string, ``params`` an array of
   positional arguments (a trailing optional argument is simply left out).
2. A response's ``error`` is ``None`` on success, else the pair ``[name, message]`` (see
   :func:`workers.errors.error_to_wire`); ``result`` is then ``None``. The client raises the
   class the name gives, so remote callers see the embedded service's error classes.
3. No message may be longer than ``max_message_size`` bytes. A longer one, bytes that are not
   msgpack, or a stream that ends inside a message are fatal: the stream can no longer be
   trusted, so the connection is closed (after an error notification, when it can be sent).
   A well-formed msgpack value that is not a valid message is not fatal: the stream is still in
   step, so it is reported as :class:`InvalidMessage` and the connection goes on.
4. The server answers requests in any order (pipelining); the client matches answers to its
   requests by ``msgid``. A msgid is in flight from its request until its response, and no two
   requests in flight on one connection share one.
5. A session travels as the map :meth:`workers.session.Session.to_dict` gives.

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

The methods a daemon offers, their positional parameters and how their results travel, are
:data:`METHODS`; both the server and the clients are driven by that table.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import msgpack

from .codec import pack
from .errors import ERRORS, SessionError, error_to_wire
from .session import Session

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


class ProtocolError(SessionError):
    """Base class of protocol violations: someone sent what the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection cannot continue."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow (a bug in the caller)."""


class InvalidRequest(ProtocolError, ValueError):
    """A request named an unknown method or gave it arguments of the wrong number or shape."""


class AuthenticationFailed(SessionError):
    """The connection did not authenticate first, or gave a wrong token; nothing was done."""


class InternalError(SessionError):
    """The daemon failed in an unexpected way while answering; the error is in its log."""


#: Every error class that can travel in a response, by name.
WIRE_ERRORS: Final[dict[str, type[SessionError]]] = {
    **ERRORS,
    **{
        cls.__name__: cls
        for cls in (
            ProtocolError,
            RemoteProtocolError,
            InvalidRequest,
            AuthenticationFailed,
            InternalError,
        )
    },
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


# -- sessions and methods ----------------------------------------------------------------

_SESSION_FIELDS: Final = {
    "id": (str,),
    "created_at": (int,),
    "last_accessed": (int,),
    "timeout_ms": (int, type(None)),
    "metadata": (dict,),
    "version": (int,),
}


def session_to_wire(session: Session) -> dict[str, Any]:
    """The wire form of a session: its :meth:`~workers.session.Session.to_dict` map.

    Built field by field and sharing ``metadata``: it is encoded at once, and ``asdict``'s deep
    copy would cost more than the rest of a retrieve.
    """
    return {
        "id": session.id,
        "created_at": session.created_at,
        "last_accessed": session.last_accessed,
        "timeout_ms": session.timeout_ms,
        "metadata": session.metadata,
        "version": session.version,
    }


def session_from_wire(obj: object) -> Session:
    """Rebuild a session from :func:`session_to_wire`; RemoteProtocolError if it is not one."""
    if not isinstance(obj, dict) or obj.keys() != _SESSION_FIELDS.keys():
        raise RemoteProtocolError(f"not a session: {obj!r:.120}")
    for name, types in _SESSION_FIELDS.items():
        value = obj[name]
        if not isinstance(value, types) or isinstance(value, bool):
            raise RemoteProtocolError(f"session field {name} has the wrong type: {value!r:.80}")
    return Session(**obj)


class Result(enum.Enum):
    """How a method's result travels."""

    VALUE = "value"  #: as msgpack carries it
    SESSION = "session"  #: one session map
    PAGE = "page"  #: ``[[session map, ...], next cursor or None]``


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC method: positional parameter names (the first ``required`` are mandatory)."""

    name: str
    params: tuple[str, ...] = ()
    required: int = 0
    result: Result = Result.VALUE

    def check_params(self, params: list[Any]) -> None:
        """Raise :class:`InvalidRequest` unless ``params`` has an acceptable length."""
        if not self.required <= len(params) <= len(self.params):
            expected = (
                f"{self.required}"
                if self.required == len(self.params)
                else f"{self.required} to {len(self.params)}"
            )
            raise InvalidRequest(
                f"{self.name}({', '.join(self.params)}) takes {expected} parameters, "
                f"got {len(params)}"
            )

    def encode_result(self, result: Any) -> Any:
        """The wire form of what the service returned for this method."""
        if self.result is Result.SESSION:
            return session_to_wire(result)
        if self.result is Result.PAGE:
            sessions, cursor = result
            return [[session_to_wire(s) for s in sessions], cursor]
        return result

    def decode_result(self, result: Any) -> Any:
        """What a client returns for this method's wire result."""
        if self.result is Result.SESSION:
            return session_from_wire(result)
        if self.result is Result.PAGE:
            if not (isinstance(result, list) and len(result) == 2 and isinstance(result[0], list)):
                raise RemoteProtocolError(f"not a page of sessions: {result!r:.120}")
            return [session_from_wire(s) for s in result[0]], result[1]
        return result


#: Every method a daemon answers. ``update`` takes a patch (``set`` map, ``unset`` keys,
#: ``expected_version``): a function cannot travel. ``list_page`` pages with a cursor.
METHODS: Final[dict[str, Method]] = {
    m.name: m
    for m in (
        Method("auth", ("token",), 1),
        Method("ping"),
        Method("create", ("metadata", "ttl")),
        Method("retrieve", ("id",), 1, Result.SESSION),
        Method("peek", ("id",), 1, Result.SESSION),
        Method("update", ("id", "set", "unset", "expected_version"), 1, Result.SESSION),
        Method("touch", ("id",), 1),
        Method("set_ttl", ("id", "ttl"), 2),
        Method("delete", ("id",), 1),
        Method("rotate", ("id",), 1),
        Method("delete_where", ("key", "value"), 2),
        Method("list_page", ("cursor", "limit"), 0, Result.PAGE),
        Method("count"),
        Method("cleanup_expired"),
        Method("get_backend"),
        Method("stats"),
        Method("import_sessions", ("records",), 1),
        # Fault injection: answered only by a daemon started with --allow-fault-injection.
        Method("crash_actor", ("name",), 1),
    )
}


# -- addresses ---------------------------------------------------------------------------

DEFAULT_HOST: Final = "127.0.0.1"
#: The daemon's documented default TCP port.
DEFAULT_PORT: Final = 7878
DEFAULT_ADDRESS: Final = f"tcp://{DEFAULT_HOST}:{DEFAULT_PORT}"


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed daemon address: ``tcp://HOST:PORT`` or ``unix:///abs/path``."""

    scheme: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def is_local(self) -> bool:
        """Whether only this machine can reach the address (a Unix socket or loopback TCP)."""
        return self.scheme == "unix" or is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback interface (``localhost`` or a loopback IP)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str) -> Address:
    """Parse ``tcp://HOST:PORT`` or ``unix:///abs/path``; ValueError naming the problem."""
    parts = urlsplit(text)
    if parts.scheme == "unix":
        path = parts.path
        if parts.netloc or not path.startswith("/"):
            raise ValueError(f"a unix address is unix:///absolute/path, got {text!r}")
        return Address("unix", path=path)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ValueError(f"a tcp address is tcp://HOST:PORT, got {text!r}")
        return Address("tcp", host=parts.hostname, port=port)
    raise ValueError(f"an address is tcp://HOST:PORT or unix:///abs/path, got {text!r}")
