"""The daemon's reactor: one task calls back for every readable socket, with pause and resume."""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio
import trio.testing

from workers.wire.reactor import Reactor


def reader(reactor: Reactor, sock: socket.socket, seen: list[bytes]) -> Callable[[], None]:
    def on_readable() -> None:
        data = sock.recv(1024)
        seen.append(data)
        if not data:  # end of file stays readable: a callback must stop listening
            reactor.remove(sock)

    return on_readable


async def test_every_ready_socket_is_called_back_until_paused_or_removed() -> None:
    reactor = Reactor()
    pairs = [socket.socketpair() for _ in range(3)]
    seen: list[list[bytes]] = [[] for _ in pairs]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            for (ours, _), got in zip(pairs, seen, strict=True):
                ours.setblocking(False)
                reactor.add(ours, reader(reactor, ours, got))
            for i, (_, theirs) in enumerate(pairs):
                theirs.send(b"hello %d" % i)
            await trio.testing.wait_all_tasks_blocked()
            assert seen == [[b"hello 0"], [b"hello 1"], [b"hello 2"]]

            reactor.pause(pairs[0][0])
            reactor.remove(pairs[1][0])
            for _, theirs in pairs:
                theirs.send(b"more")
            await trio.testing.wait_all_tasks_blocked()
            assert seen == [[b"hello 0"], [b"hello 1"], [b"hello 2", b"more"]]

            reactor.resume(pairs[0][0])  # what arrived while paused is read now
            await trio.testing.wait_all_tasks_blocked()
            assert seen[0] == [b"hello 0", b"more"]
            reactor.remove(pairs[0][0])  # paused or not, remove forgets it
            pairs[2][1].close()  # end of file is readable too
            await trio.testing.wait_all_tasks_blocked()
            assert seen[2] == [b"hello 2", b"more", b""]
            nursery.cancel_scope.cancel()
    finally:
        reactor.close()
        for a, b in pairs:
            a.close()
            b.close()
