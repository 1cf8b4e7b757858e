"""Hostile bytes against the real daemon (issue 6): random, truncated, deeply nested,
huge-length and wrongly typed frames get an error or a closed connection; the daemon keeps
serving its other connections, and its memory stays bounded.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from helpers.daemon_process import DaemonProcess
from helpers.wire_values import msgpack_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.client import SyncClient

MAX_MESSAGE = 65536
TOKEN = "fuzz-token-0123456789"

values = msgpack_values(text_size=20, key_size=5, max_leaves=20)
methods = st.sampled_from(
    ["create", "retrieve", "peek", "update", "touch", "set_ttl", "delete", "list_page", "count",
     "ping", "auth", "import_sessions", "no_such_method"]
) | values  # fmt: skip
#: Requests with the right shape and wrongly typed parts, or the wrong shape altogether.
requests = st.builds(
    lambda *parts: msgpack.packb(list(parts)),
    st.sampled_from([0, 0, 0, 1, 2, 3]) | values,
    st.integers(-1, 2**32) | values,
    methods,
    st.lists(values, max_size=4) | values,
) | values.map(msgpack.packb)
truncated = requests.filter(lambda b: len(b) > 1).flatmap(
    lambda b: st.integers(1, len(b) - 1).map(lambda n: b[:n])
)
nested = st.integers(64, MAX_MESSAGE - 8).map(lambda depth: b"\x91" * depth + b"\xc0")
#: Headers of arrays, maps, strings and binaries that claim up to 4 GiB.
huge = st.builds(
    lambda header, size: b"\x94\x00\x01" + header + size.to_bytes(4, "big"),
    st.sampled_from([b"\xdd", b"\xdf", b"\xdb", b"\xc6"]),
    st.integers(MAX_MESSAGE, 2**32 - 1),
)
frames = st.lists(
    st.one_of(requests, truncated, nested, huge, st.binary(min_size=1, max_size=512)),
    min_size=1,
    max_size=4,
).map(b"".join)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(
        tmp_path_factory.mktemp("fuzz"),
        "--max-message-size", str(MAX_MESSAGE),
        "--token", TOKEN,
        backend="memory",
    )  # fmt: skip
    d.start()
    yield d
    assert d.stop() == 0, d.log()


def exchange(daemon: DaemonProcess, payload: bytes, authenticate: bool) -> list[Any]:
    """Send ``payload`` (after auth, maybe), close our side, and read all that comes back
    until the daemon closes the connection (a daemon that never does fails the test)."""
    with socket.create_connection(("127.0.0.1", daemon.port)) as s:
        s.settimeout(20)
        if authenticate:
            s.sendall(msgpack.packb([0, 0, "auth", [TOKEN]]))
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon already closed on us: a fine answer to garbage
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(b"".join(chunks))
    return list(unpacker)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@pytest.mark.slow
@given(payload=frames, authenticate=st.booleans())
def test_hostile_frames_get_an_error_or_a_closed_connection(
    daemon: DaemonProcess, bystander: SyncClient, payload: bytes, authenticate: bool
) -> None:
    for message in exchange(daemon, payload, authenticate):
        # Only well-formed responses and notifications ever come back.
        assert isinstance(message, list) and message[0] in (1, 2), message
        if message[0] == 2:
            assert message[1] == "error"
    assert bystander.ping() == "pong"  # every other connection is untouched


@pytest.fixture(scope="module")
def bystander(daemon: DaemonProcess) -> Iterator[SyncClient]:
    with SyncClient(daemon.tcp, token=TOKEN) as c:
        yield c


@pytest.mark.slow
def test_memory_stays_bounded(daemon: DaemonProcess, bystander: SyncClient) -> None:
    nested = b"\x91" * (MAX_MESSAGE - 8) + b"\xc0"
    claims = b"\x94\x00\x01\xdb\xff\xff\xff\xff"  # a 4 GiB method name
    exchange(daemon, nested + claims, True)  # warm up
    before = daemon.status_kib()
    for _ in range(200):
        exchange(daemon, nested, True)
        exchange(daemon, claims, True)
        exchange(daemon, b"\xdd\xff\xff\xff\xff", False)
    after = daemon.status_kib()
    assert after - before < 20_000, (before, after)  # KiB
    assert bystander.ping() == "pong"
