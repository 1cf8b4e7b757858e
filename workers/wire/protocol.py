"""The daemon's wire protocol: msgpack-RPC, sans-IO (bytes in, events out; no sockets here).

Rules
-----
1. A message is one msgpack array, back to back with the next on a byte stream, exactly as the
   msgpack-RPC specification has it: a request ``[0, msgid, method, params]``, a response
   ``[1, msgid, error, result]``, a notification ``[2, method, params]``. ``msgid`` is an
   unsigned 32-bit integer chosen by the client, ``method`` a string, ``params`` an array of
   positional arguments (a trailing optional argument is simply left out). A method name is
   read as UTF-8 whether it comes as msgpack str (which is also the raw type of clients older
   than msgpack's str/bin split) or as bin (clients that pack names as bytes).
2. A response's ``error`` is ``None`` on success, else the pair ``[name, message]`` (see
   :func:`workers.record.errors.error_to_wire`); ``result`` is then ``None``. The client raises the
   class the name gives, so remote callers see the embedded service's error classes.
3. No message may be longer than ``max_message_size`` bytes. A longer one, bytes that are not
   msgpack (or nest deeper than msgpack's 1,024 levels), or a stream that ends inside a message
   are fatal: the stream can no longer be trusted, so the connection is closed (after an error
   notification, when it can be sent). A well-formed msgpack value that is not a valid message
   is not fatal: the stream is still in step, so it is reported as :class:`InvalidMessage` (with
   the request's msgid when one can be read, so that it can be answered) and the connection
   goes on. That includes a message that holds more values than :attr:`Connection.value_limit`
   and, on the server's side, one that cannot be decoded (a string that is not UTF-8, a map key
   that is not a string).
4. The server answers requests in any order (pipelining); the client matches answers to its
   requests by ``msgid``. A msgid is in flight from its request until its response, and no two
   requests in flight on one connection share one.
5. A session travels as the map :meth:`workers.record.session.Session.to_dict` gives.

Why no length prefix
--------------------
msgpack is self-delimiting, and msgpack-RPC is defined as a plain stream of messages; adding a
frame header would buy resynchronisation after garbage, which a connection that sends garbage
does not deserve, and would lose every existing msgpack-RPC client.

What a message may cost
-----------------------
Bytes are framed before anything is decoded: msgpack's ``Unpacker.skip`` finds where each
message ends without building a single object, and keeps no object across partial reads, so a
message in progress costs its raw bytes and nothing more (twice: as received, and in the
scanner's buffer). Only a complete message is decoded, once, and what decoding may build is
bounded: a message holds at most :attr:`Connection.value_limit` values (one per 8 bytes of
``max_message_size``, and never fewer than 65,536), counted from the headers before anything is
built, so a flood of empty maps (1 byte each on the wire, some 70 in Python) is refused at no
more cost than reading its headers, and the largest message that is decoded builds at most
``value_limit`` objects (about 40 MB at the default 4 MiB limit, for an instant). Messages
shorter than that many bytes cannot hold more values and are not counted: the common small
request pays nothing for the check. ``max_message_size`` may be changed between
events (a server lowers it until the peer has authenticated); the size of a message is checked
against the limit in force when it is framed.

.. note:: Error messages describe what arrived with :func:`describe`, never with its ``repr``:
   the repr of a 4 MiB message of small values takes a second to build.

Theory of operation
-------------------
Modelled on h11. Each side of a connection owns one :class:`Connection` with its
:class:`Role`. Bytes read from the transport go to :meth:`Connection.receive_data` (``b""``
for end of file), which only keeps them; :meth:`Connection.next_event` then frames and decodes
one message at a time, as the caller asks, and gives events
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
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from ..record.codec import pack
from ..record.errors import (
    ERRORS,
    InternalError,
    ProtocolError,
    SessionError,
    describe,
    error_to_wire,
)

REQUEST: Final = 0
RESPONSE: Final = 1
NOTIFICATION: Final = 2

#: Largest message accepted by default (a session's metadata is at most 64 KiB by default; a
#: restore batch carries many).
DEFAULT_MAX_MESSAGE_SIZE: Final = 4 * 1024 * 1024
#: Smallest ``max_message_size`` a connection accepts.
MIN_MESSAGE_SIZE: Final = 16
#: A message holds at most one value per this many bytes of ``max_message_size``...
BYTES_PER_VALUE: Final = 8
#: ...and is always allowed this many (a message of fewer bytes cannot hold more).
MIN_VALUE_LIMIT: Final = 65536
#: msgids are unsigned 32-bit integers, as msgpack-RPC has them.
MAX_MSGID: Final = 2**32 - 1
#: The notification a side sends, with params ``[[name, message]]``, before closing on an error.
ERROR_NOTIFICATION: Final = "error"

#: The framing scanner's first buffer (what a small request needs); it grows as reads need.
_SCAN_FIRST: Final = 4096
#: A scanner whose message in progress grew past this is replaced once its message is out, so
#: that a big message's buffer does not stay with the connection.
_SCAN_KEEP: Final = 64 * 1024


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
    return RemoteProtocolError(f"malformed error in a response: {describe(error)}")


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


def _method_name(method: object) -> str | None:
    """A method name as a str (bin is read as UTF-8), or None if it is not one."""
    if isinstance(method, str):
        return method
    if isinstance(method, bytes):
        try:
            return method.decode()
        except UnicodeDecodeError:
            return None
    return None


def _sizes() -> list[int]:
    """Bytes of every msgpack value whose type byte alone tells its size (else 0)."""
    sizes = [0] * 256
    for b in (*range(0x00, 0x80), *range(0xE0, 0x100), 0xC0, 0xC2, 0xC3):  # ints, nil, bools
        sizes[b] = 1
    for b in range(0xA0, 0xC0):  # fixstr
        sizes[b] = 1 + (b & 0x1F)
    fixed = {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5}
    fixed |= {0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}  # int64, fixext
    for b, size in fixed.items():
        sizes[b] = size
    return sizes


_SIZES: Final = _sizes()
_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
#: Type bytes of str/bin/ext with a length field: (bytes of the field, bytes past the data).
_LENGTHS: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
_EXT_LENGTHS: Final = {0xC7: 1, 0xC8: 2, 0xC9: 4}  # and one byte of ext type


def _holds_at_most(message: bytes | bytearray, limit: int) -> bool:
    """Whether the well-formed msgpack value ``message`` holds at most ``limit`` values (array
    items, map keys and map values), found by reading the headers only, without decoding.

    A value's header says how many values it holds, so the count is known before any of them
    is built; strings and binaries are stepped over by their length. It costs a few tenths of
    a microsecond a value, so it runs only on messages that could hold more than ``limit``.
    """
    pos, pending, seen, sizes = 0, 1, 0, _SIZES
    while pending:
        pending -= 1
        b = message[pos]
        size = sizes[b]
        if size:
            pos += size
            continue
        if b < 0xA0:  # fixmap 0x8X, fixarray 0x9X
            n = (b & 0x0F) * (2 if b < 0x90 else 1)
            pos += 1
        elif b >= 0xDC:  # array16, array32, map16, map32
            wide = b in (0xDD, 0xDF)
            n = (_U32 if wide else _U16)(message, pos + 1)[0] * (2 if b >= 0xDE else 1)
            pos += 5 if wide else 3
        else:  # str, bin or ext with a length field
            field = _LENGTHS.get(b) or _EXT_LENGTHS[b]
            length = (
                message[pos + 1]
                if field == 1
                else (_U16 if field == 2 else _U32)(message, pos + 1)[0]
            )
            pos += 1 + field + length + (b in _EXT_LENGTHS)
            continue
        pending += n
        seen += n
        if seen > limit:
            return False
    return True


#: Unpacker limits that let nothing but scalars (numbers, nil, booleans) through.
_SCALARS_ONLY: Final = dict.fromkeys(
    ("max_str_len", "max_bin_len", "max_array_len", "max_map_len", "max_ext_len"), 0
)


def _peek_msgid(message: bytes | bytearray) -> int | None:
    """The msgid of ``message`` if it starts as a request does, whatever follows; else None.

    Reads the first few bytes only, and builds no container or string.
    """
    scanner = msgpack.Unpacker(max_buffer_size=32, **_SCALARS_ONLY)
    scanner.feed(message[:32])
    try:
        if scanner.read_array_header() != 4:
            return None
        kind = scanner.unpack()
        msgid = scanner.unpack()
    except (ValueError, msgpack.UnpackException):  # OutOfData is one too
        return None
    return msgid if type(kind) is int and kind == REQUEST and _is_msgid(msgid) else None


class Connection:
    """The protocol state of one end of one connection.

    ``max_message_size`` bounds every received message (it may be changed between events);
    sent messages are not bounded here (the peer enforces its own limit).
    """

    def __init__(self, role: Role, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.role = role
        self.max_message_size = max_message_size
        # Received bytes; those from _offset on are not given out as events yet, and start at
        # a message boundary. Bytes as read while they are one read (the usual case: no copy).
        self._buffer: bytes | bytearray = b""
        self._offset = 0
        # Frames the same bytes (skip() builds nothing); _start is its offset of _buffer[_offset].
        self._scanner = self._new_scanner()
        self._start = 0
        self._scanner_grew = False
        self._error: RemoteProtocolError | None = None
        self._eof = False
        self._closed_reported = False
        self._next_msgid = 0
        #: msgids in flight: sent and unanswered (client), received and unanswered (server).
        self.in_flight: set[int] = set()

    @staticmethod
    def _new_scanner() -> msgpack.Unpacker:
        return msgpack.Unpacker(read_size=_SCAN_FIRST)

    @property
    def max_message_size(self) -> int:
        """The largest message accepted from now on, in bytes."""
        return self._max_message_size

    @max_message_size.setter
    def max_message_size(self, size: int) -> None:
        if size < MIN_MESSAGE_SIZE:
            raise ValueError(f"max_message_size must be at least {MIN_MESSAGE_SIZE} bytes")
        self._max_message_size = size
        self.value_limit = max(MIN_VALUE_LIMIT, size // BYTES_PER_VALUE)

    #: The most values (array items, map keys and map values) a message may hold; derived
    #: from ``max_message_size``.
    value_limit: int

    @property
    def broken(self) -> bool:
        """Whether :meth:`next_event` found the stream broken (it raises from then on)."""
        return self._error is not None

    @property
    def buffered(self) -> int:
        """Bytes received and not given out as events yet: a message in progress (once
        :meth:`next_event` has returned :data:`NEED_DATA`), or messages not asked for yet."""
        return len(self._buffer) - self._offset

    # -- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the transport; ``b""`` means the peer closed its end.

        Nothing is decoded here; :meth:`next_event` frames and decodes what it gives out.
        """
        if self._eof:
            if data:
                raise LocalProtocolError("data received after end of file")
            return
        if self._error is not None:
            return  # the stream is already broken: nothing after the break is kept
        if not data:
            self._eof = True
            return
        if self._offset == len(self._buffer):
            self._buffer, self._offset = data, 0
        else:  # a message in progress: keep its bytes and these
            if self._offset or type(self._buffer) is bytes:
                self._buffer, self._offset = bytearray(self._buffer[self._offset :]), 0
            self._buffer += data
        self._scanner.feed(data)
        self._scanner_grew |= len(self._buffer) - self._offset > _SCAN_KEEP

    def next_event(self) -> Event | _NeedData:
        """The next event, or :data:`NEED_DATA`; raises :class:`RemoteProtocolError` once broken."""
        if self._error is not None:
            raise self._error
        if self._offset == len(self._buffer):
            return self._need_data()  # nothing to frame: spares skip() its OutOfData
        try:
            self._scanner.skip()
        except msgpack.OutOfData:
            return self._need_data()
        except msgpack.StackError:
            raise self._fail("a message nests deeper than msgpack's 1024 levels") from None
        except (ValueError, msgpack.UnpackException) as exc:  # FormatError and the like
            raise self._fail(f"the stream is not msgpack ({exc or type(exc).__name__})") from None
        end = self._scanner.tell()
        size, self._start = end - self._start, end
        if size > self.max_message_size:
            raise self._fail(f"a message of {size} bytes is longer than {self.max_message_size}")
        start, self._offset = self._offset, self._offset + size
        if start == 0 and self._offset == len(self._buffer):  # the usual case: a whole read
            message = self._buffer
        else:
            message = self._buffer[start : self._offset]
        if self._offset == len(self._buffer):
            self._buffer, self._offset = b"", 0
            if self._scanner_grew:  # let go of the buffer a big message grew
                self._scanner, self._start = self._new_scanner(), 0
                self._scanner_grew = False
        return self._to_event(message)

    def _need_data(self) -> Event | _NeedData:
        pending = self.buffered
        if pending > self.max_message_size:
            raise self._fail(f"a message is longer than {self.max_message_size} bytes")
        if self._eof:
            if pending:
                raise self._fail(f"the stream ended inside a message ({pending} bytes)")
            if not self._closed_reported:
                self._closed_reported = True
                return ConnectionClosed()
        return NEED_DATA

    def _fail(self, reason: str) -> RemoteProtocolError:
        self._error = RemoteProtocolError(reason)
        self._buffer, self._offset = b"", 0
        self._scanner = self._new_scanner()  # let go of what the broken stream held
        return self._error

    def _to_event(self, message: bytes | bytearray) -> Event:
        # A message shorter than value_limit bytes cannot hold more values: no need to count.
        if len(message) > self.value_limit and not _holds_at_most(message, self.value_limit):
            return self._undecodable(
                message,
                f"a message of {len(message)} bytes holds more than {self.value_limit} values",
            )
        try:
            obj = msgpack.unpackb(message, raw=False, strict_map_key=True, use_list=True)
        except ValueError as exc:  # not UTF-8, a key that is not a string
            return self._undecodable(
                message, f"a message of {len(message)} bytes cannot be decoded ({exc})"
            )
        if not isinstance(obj, list) or not obj or type(obj[0]) is not int:
            return InvalidMessage(
                None, f"a message is an array starting with its type, not {describe(obj)}"
            )
        kind = obj[0]
        if kind == REQUEST and len(obj) == 4:
            _, msgid, method, params = obj
            if not _is_msgid(msgid):
                return InvalidMessage(
                    None, f"a msgid is an unsigned 32-bit integer, not {describe(msgid)}"
                )
            if self.role is not Role.SERVER:
                return InvalidMessage(None, "a server sent a request")
            if msgid in self.in_flight:
                return InvalidMessage(None, f"request msgid {msgid} is already in flight")
            self.in_flight.add(msgid)  # answered either way, error or result
            name = _method_name(method)
            if name is None or not isinstance(params, list):
                return InvalidMessage(
                    msgid, "a request is [0, msgid, method: str (UTF-8), params: array]"
                )
            return Request(msgid, name, params)
        if kind == RESPONSE and len(obj) == 4:
            _, msgid, error, result = obj
            if self.role is not Role.CLIENT:
                return InvalidMessage(None, "a client sent a response")
            if msgid not in self.in_flight:
                return InvalidMessage(
                    None, f"a response to msgid {describe(msgid)} that is not in flight"
                )
            self.in_flight.discard(msgid)
            return Response(msgid, error, result)
        if kind == NOTIFICATION and len(obj) == 3:
            _, method, params = obj
            name = _method_name(method)
            if name is None or not isinstance(params, list):
                return InvalidMessage(
                    None, "a notification is [2, method: str (UTF-8), params: array]"
                )
            return Notification(name, params)
        return InvalidMessage(
            None, f"not a request, response or notification: {describe(obj)} of type {kind}"
        )

    def _undecodable(self, message: bytes | bytearray, reason: str) -> InvalidMessage:
        """A complete message that cannot be decoded: a server answers it if it starts as a
        request does; a client cannot tell which call it answers, and gives up the stream."""
        if self.role is not Role.SERVER:
            raise self._fail(reason)
        msgid = _peek_msgid(message)
        if msgid in self.in_flight:
            return InvalidMessage(None, f"request msgid {msgid} is already in flight")
        if msgid is not None:
            self.in_flight.add(msgid)
        return InvalidMessage(msgid, reason)

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

    @staticmethod
    def send_notification(method: str, params: Sequence[Any]) -> bytes:
        """Encode a notification."""
        return Connection._encode([NOTIFICATION, method, list(params)])

    @staticmethod
    def send_error(exc: SessionError) -> bytes:
        """Encode the :data:`ERROR_NOTIFICATION` a side sends before it closes on ``exc``."""
        return Connection.send_notification(ERROR_NOTIFICATION, [encode_error(exc)])

    @staticmethod
    def _encode(message: list[Any]) -> bytes:
        try:
            return pack(message)
        except (TypeError, ValueError, OverflowError) as exc:
            target = message[1 if message[0] == NOTIFICATION else 2]
            raise LocalProtocolError(
                f"cannot encode a message to {describe(target)}: {exc}"
            ) from None
