"""The daemon's floor in Python: a bare msgpack-RPC loop on the daemon's own reactor.

It accepts connections on a loopback port, reads every socket through one
:class:`~workers.wire.reactor.Reactor` as the daemon does, unpacks each request and sends back a
fixed session map, with none of the daemon's checks, dispatch or service behind it.
:mod:`bench.daemon` drives it like the daemon, so what separates the two is the work of a
request and not Trio, the sockets or the load generator.

    python -m bench.bare_server PORT
"""

from __future__ import annotations

import socket
import sys

import msgpack
import trio

from bench.sessions import METADATA
from workers.wire.reactor import Reactor

#: What every request gets back: a session map of the benchmark's shape.
ANSWER = {
    "id": "0" * 32,
    "created_at": 0,
    "last_accessed": 0,
    "timeout_ms": 3_600_000,
    "metadata": METADATA,
    "version": 1,
}


async def serve(port: int) -> None:
    reactor = Reactor()
    listener = socket.create_server(("127.0.0.1", port))
    listener.setblocking(False)

    def connection(sock: socket.socket) -> None:
        unpacker = msgpack.Unpacker(raw=False)

        def on_readable() -> None:
            data = sock.recv(65536)
            if not data:
                reactor.remove(sock)
                sock.close()
                return
            unpacker.feed(data)
            for _, msgid, _method, _params in unpacker:
                sock.send(msgpack.packb([1, msgid, None, ANSWER]))

        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reactor.add(sock, on_readable)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run)
        while True:
            await trio.lowlevel.wait_readable(listener)
            connection(listener.accept()[0])


if __name__ == "__main__":
    trio.run(serve, int(sys.argv[1]))
