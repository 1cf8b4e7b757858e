"""The I/O the daemon's server and async client share: streams for addresses, and an outbox.

:mod:`workers.wire.protocol` turns messages into bytes; this module moves the bytes. An
:class:`Outbox` lets many tasks queue messages for one stream without waiting for each other:
one writer task sends whatever has accumulated in one ``send_all``, so a burst of pipelined
requests or responses costs one system call, not one each.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

import trio

from .address import Address

#: Bytes asked of the transport per read.
RECEIVE_SIZE = 64 * 1024


async def open_stream(address: Address) -> trio.SocketStream:
    """Connect to a daemon's ``address``; OSError when nothing answers there."""
    if address.scheme == "unix":
        return await trio.open_unix_socket(address.path)
    stream = await trio.open_tcp_stream(address.host, address.port)
    stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, True)
    return stream


async def open_listeners(address: Address) -> list[trio.SocketListener]:
    """Listen on ``address``: a TCP host and port, or a Unix socket created with mode 0600.

    A Unix socket file left behind by a daemon that died is replaced; one that a live daemon
    still answers on is not (OSError EADDRINUSE).
    """
    if address.scheme == "tcp":
        return await trio.open_tcp_listeners(address.port, host=address.host)
    path = address.path
    await _remove_stale_socket(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        # The umask makes the socket 0600 from its first instant (chmod after bind would
        # leave a window). A stricter umask for a moment cannot hurt other threads' files.
        old_umask = os.umask(0o177)
        try:
            await sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(trio.socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


async def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    try:
        stream = await trio.open_unix_socket(path)
    except OSError:
        os.unlink(path)  # nobody answers: a leftover of a daemon that died
        return
    await stream.aclose()
    raise OSError(errno.EADDRINUSE, f"a daemon already listens on {path}")


def remove_socket_file(address: Address) -> None:
    """Remove the file of a Unix socket address this process listened on, if it is there."""
    if address.scheme == "unix":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)


class RawSocketStream(trio.abc.HalfCloseableStream):
    """A connected socket driven with Trio's lowest-level waits: the daemon's hot path.

    :class:`trio.SocketStream` checkpoints and guards every call, which is most of what a small
    request costs. Here a read is one ``wait_readable`` and one ``recv``, and
    :meth:`send_nowait` writes at once, without a task switch, whatever the socket buffer
    takes. Only one task may receive and one send at a time (the server's handler keeps to
    that); errors are Trio's: BrokenResourceError when the peer resets, ClosedResourceError
    after :meth:`aclose`.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        sock = self.socket
        if sock.fileno() < 0:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.wait_readable(sock)  # the checkpoint; the socket then has data
        try:
            return sock.recv(max_bytes or RECEIVE_SIZE)
        except BlockingIOError:
            return await self.receive_some(max_bytes)  # woken without data: wait again
        except OSError as exc:
            raise trio.BrokenResourceError(f"the connection broke: {exc}") from exc

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Write what the socket takes now; the number of bytes written (0 when it is full)."""
        try:
            return self.socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"the connection broke: {exc}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        await trio.lowlevel.checkpoint_if_cancelled()
        while view:
            if self.socket.fileno() < 0:
                raise trio.ClosedResourceError("the stream is closed")
            sent = self.send_nowait(view)
            view = view[sent:]
            if view:
                await trio.lowlevel.wait_writable(self.socket)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(f"the connection broke: {exc}") from exc

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close at once, without a checkpoint (so that a cancelled task can close it too)."""
        if self.socket.fileno() >= 0:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()


def raw_stream(sock: trio.socket.SocketType) -> RawSocketStream:
    """Take over the connected Trio socket ``sock`` (which must not be used afterwards)."""
    family, kind, proto = sock.family, sock.type, sock.proto
    return RawSocketStream(socket.socket(family, kind, proto, fileno=sock.detach()))


class Outbox:
    """Bytes queued by many tasks for one stream, sent in order by one writer task.

    Run :meth:`run` in a task; :meth:`send` never blocks. :meth:`close` lets the writer finish
    what is queued and return. If the stream breaks, queued and later bytes are dropped
    (:attr:`broken` says so): the reader of the same stream sees the break and reports it.

    On a :class:`RawSocketStream`, :meth:`send` writes at once when nothing is queued or being
    sent, so an answer costs no wake-up of the writer unless the socket is full.
    """

    def __init__(self, stream: trio.abc.SendStream) -> None:
        self._stream = stream
        self._send_nowait = stream.send_nowait if isinstance(stream, RawSocketStream) else None
        self._buffer = bytearray()
        self._wakeup = trio.Event()
        self._flushed = trio.Event()
        self._sending = False  # the writer holds bytes it has not finished sending
        self._closing = False
        self.broken = False

    @property
    def queued(self) -> int:
        """Bytes waiting to be sent."""
        return len(self._buffer)

    def send(self, data: bytes) -> None:
        """Queue ``data``; it is sent after everything queued before it."""
        if self.broken:
            return
        if self._send_nowait is not None and not self._buffer and not self._sending:
            try:
                sent = self._send_nowait(data)
            except trio.BrokenResourceError:
                self.broken = True  # the reader sees the break too, and reports it
                return
            if sent == len(data):
                return
            data = data[sent:]
        self._buffer += data
        self._wakeup.set()

    def close(self) -> None:
        """Let :meth:`run` return once everything queued so far is sent."""
        self._closing = True
        self._wakeup.set()

    async def wait_below(self, limit: int) -> None:
        """Wait until fewer than ``limit`` bytes are queued (backpressure for producers)."""
        while len(self._buffer) >= limit and not self.broken:
            await self._flushed.wait()

    async def run(self) -> None:
        """Send queued bytes until :meth:`close` (and the queue is empty) or the stream breaks."""
        try:
            while True:
                if self._buffer:
                    data = bytes(self._buffer)
                    self._buffer.clear()
                    self._sending = True
                    await self._stream.send_all(data)
                    self._sending = False
                    self._flushed.set()
                    self._flushed = trio.Event()
                elif self._closing:
                    return
                else:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
            self._buffer.clear()
            self._flushed.set()
