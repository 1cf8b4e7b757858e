"""The real daemon in a subprocess: its limits, signals, errors and durability.

The clients' own behaviour (the whole API on both event loops, pipelining, reconnects,
timeouts) is in ``test_client.py``.

Time here is real (the daemon is another process), but nothing waits a fixed time: tests poll
for the port, for a log line, or for the process to exit.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from helpers.daemon_process import PATIENCE, ROOT, DaemonProcess, run_verb

from workers import AuthenticationFailed, InvalidRequest
from workers.client import SyncClient, connect
from workers.record.errors import ServiceUnavailable

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon (disk store, with a token) shared by the tests that do not stop it."""
    d = DaemonProcess(
        tmp_path_factory.mktemp("daemon"),
        "--token", TOKEN,
        "--max-message-size", "65536",
        "--max-connections", "40",
    )  # fmt: skip
    d.start()
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons of one test's own (killed at teardown if still running)."""
    started: list[DaemonProcess] = []

    def start(*args: str, wait: bool = True) -> DaemonProcess:
        d = DaemonProcess(tmp_path, *args).start(wait=wait)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


@pytest.mark.slow
def test_unix_socket_is_private(daemon: DaemonProcess) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o600


CLIENT_PROCESS = textwrap.dedent(
    """
    import sys
    from workers.client import SyncClient
    address, token, role, *ids = sys.argv[1:]
    with SyncClient(address, token=token) as c:
        if role == "create":
            print(" ".join(c.create({"owner": "A", "n": i}) for i in range(20)))
        else:
            for sid in ids:
                c.update(sid, set={"seen_by": "B"}, expected_version=1)
            print(c.count())
    """
)


@pytest.mark.slow
def test_two_client_processes_share_sessions(daemon: DaemonProcess) -> None:
    def client(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", CLIENT_PROCESS, *args],
            capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    ids = client(daemon.unix, TOKEN, "create").split()
    assert len(ids) == 20
    assert int(client(daemon.tcp, TOKEN, "update", *ids)) >= 20
    with SyncClient(daemon.tcp, token=TOKEN) as c:
        for sid in ids:
            s = c.peek(sid)
            assert s.metadata["owner"] == "A"
            assert s.metadata["seen_by"] == "B"
            assert s.version == 2
            c.delete(sid)


@pytest.mark.slow
def test_wrong_or_missing_token_gets_nothing(daemon: DaemonProcess) -> None:
    for token in (None, "wrong", TOKEN + "x", ""):
        with pytest.raises(AuthenticationFailed):
            SyncClient(daemon.tcp, token=token).__enter__()
    # A raw connection that skips auth: one refusal, then the connection is closed.
    with socket.create_connection(("127.0.0.1", daemon.port)) as s:
        s.sendall(msgpack.packb([0, 1, "count", []]) + msgpack.packb([0, 2, "list_page", []]))
        reply = read_all(s)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(reply)
    assert list(unpacker) == [
        [
            1,
            1,
            ["AuthenticationFailed", "authenticate first: the first request is auth(token)"],
            None,
        ]
    ]


def read_all(s: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection."""
    s.settimeout(20)
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def authenticated_socket(daemon: DaemonProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", daemon.port))
    s.sendall(msgpack.packb([0, 0, "auth", [TOKEN]]))
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(s.recv(1024))
    assert next(unpacker) == [1, 0, None, True]
    return s


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\xc1garbage", "RemoteProtocolError"),
        (msgpack.packb([0, 5, "create", [{"blob": "x" * 70_000}]]), "longer than 65536"),
        (b"\x94\x00\x05\xdb\xff\xff\xff\xff", "RemoteProtocolError"),  # a 4 GiB method name
        (msgpack.packb([0, 5, "count", []])[:-1], "ended inside a message"),  # truncated
    ],
)
@pytest.mark.slow
async def test_bad_frames_close_only_their_connection(
    daemon: DaemonProcess, payload: bytes, expected: str
) -> None:
    async with connect(daemon.tcp, token=TOKEN) as bystander:
        before = await bystander.count()
        with authenticated_socket(daemon) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            reply = read_all(s)
        message = msgpack.unpackb(reply, raw=False)
        assert message[:2] == [2, "error"]
        assert expected in " ".join(message[2][0])
        assert await bystander.count() == before  # the same connection still works


@pytest.mark.slow
def test_invalid_requests_get_an_error_and_the_connection_goes_on(daemon: DaemonProcess) -> None:
    with authenticated_socket(daemon) as s:
        s.sendall(
            msgpack.packb([0, 1, "no_such_method", []])
            + msgpack.packb([0, 2, 42, []])
            + msgpack.packb([0, 3, "set_ttl", ["only-one-argument"]])
            + msgpack.packb([0, 4, "list_page", [None, "ten"]])
            + msgpack.packb("not an array: ignored, it has no msgid")
            + msgpack.packb([0, 5, "ping", []])
        )
        s.shutdown(socket.SHUT_WR)
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(read_all(s))
        replies = {m[1]: m for m in unpacker}
    for msgid in (1, 2, 3, 4):
        assert replies[msgid][2][0] == "InvalidRequest", replies[msgid]
    assert replies[5] == [1, 5, None, "pong"]


async def until_answered(fn: Callable[[], Any]) -> Any:
    """``await fn()``, again while the daemon is unavailable (polling, at most PATIENCE s)."""
    with trio.fail_after(PATIENCE):
        while True:
            try:
                return await fn()
            except ServiceUnavailable:
                await trio.sleep(0.02)


@pytest.mark.slow
async def test_crash_actor_is_refused_without_the_flag(daemon: DaemonProcess) -> None:
    async with connect(daemon.tcp, token=TOKEN) as c:
        before = await c.stats()
        for name in ("manager", "cleanup", "nonsense"):
            with pytest.raises(InvalidRequest, match="unknown method"):
                await c.crash_actor(name)
        after = await c.stats()
    assert (after["pid"], after["restarts"]) == (before["pid"], before["restarts"])


@pytest.mark.slow
async def test_crash_actor_crashes_a_service_actor_with_the_flag(
    fresh: Callable[..., DaemonProcess],
) -> None:
    d = fresh("--allow-fault-injection")
    d.wait_for_log("fault injection is on")
    async with connect(d.tcp) as c:
        sid = await c.create({"kept": True})
        with pytest.raises(InvalidRequest, match="no actor"):
            await c.crash_actor("listener")
        restarts = 0
        for name in ("cleanup", "manager"):
            try:
                assert await c.crash_actor(name) is True
            except ServiceUnavailable:
                pass  # the listener restarted with the actor before the answer went out
            stats = await until_answered(c.stats)  # the connection drops with the listener
            assert stats["restarts"] > restarts
            restarts = stats["restarts"]
        assert (await c.peek(sid)).metadata == {"kept": True}
    assert "injected crash" in d.log()
    assert await trio.to_thread.run_sync(d.stop) == 0, d.log()


@pytest.mark.slow
def test_connection_limit(daemon: DaemonProcess) -> None:
    clients = [SyncClient(daemon.tcp, token=TOKEN, reconnect_timeout=0) for _ in range(45)]
    try:
        accepted = refused = 0
        for c in clients:
            try:
                c.__enter__()
                accepted += 1
            except ServiceUnavailable as exc:
                assert "too many connections" in str(exc)
                refused += 1
        assert 0 < accepted <= 40
        assert refused >= 5
    finally:
        for c in clients:
            c.close()
    with SyncClient(daemon.tcp, token=TOKEN, reconnect_timeout=10) as c:
        assert c.ping() == "pong"  # the slots came back


@pytest.mark.slow
def test_a_token_is_required_off_loopback(tmp_path: Path) -> None:
    done = run_verb("serve", "--host", "0.0.0.0", "--path", str(tmp_path / "s"))
    assert done.returncode == 2
    assert "requires a token" in done.stderr


@pytest.mark.slow
def test_a_locked_store_is_refused_with_one_clear_line(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    done = run_verb("serve", "--path", str(daemon.store_path), "--no-tcp",
                    "--unix", str(tmp_path / "other.sock"))  # fmt: skip
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "ERROR workers.cli.serve" in line]
    assert len(errors) == 1
    assert "locked by another owner" in errors[0]


async def burst(
    address: str, acknowledged: list[str], stop_after: int, stopped: trio.Event
) -> None:
    """Create sessions from 20 tasks until the daemon goes away; record each acknowledged id."""

    async def writer(c: Any) -> None:
        while True:
            try:
                acknowledged.append(await c.create({"n": len(acknowledged)}))
            except ServiceUnavailable:
                return
            if len(acknowledged) >= stop_after:
                stopped.set()

    async with connect(address, reconnect_timeout=0) as c:
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(writer, c)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
async def test_stopping_during_a_burst_loses_no_acknowledged_write(
    fresh: Callable[..., DaemonProcess], signum: int
) -> None:
    d = fresh()
    acknowledged: list[str] = []
    stopped = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(burst, d.tcp, acknowledged, 300, stopped)
        await stopped.wait()
        status = await trio.to_thread.run_sync(d.stop, signum)
    assert status == (0 if signum == signal.SIGTERM else -signal.SIGKILL), d.log()
    if signum == signal.SIGTERM:
        assert "store is closed" in d.log()
    d.start()
    with SyncClient(d.tcp) as c:
        stored = {s.id for s in c.list_sessions()}
    assert len(acknowledged) >= 300
    assert set(acknowledged) <= stored


@pytest.mark.slow
async def test_second_signal_exits_at_once(fresh: Callable[..., DaemonProcess]) -> None:
    d = fresh("--shutdown-grace", "60")
    with SyncClient(d.tcp) as c:
        big = {"blob": "x" * 30_000}
        for _ in range(50):
            c.create(big)
    # Ask for far more than the socket buffers hold and never read: the requests stay in
    # flight (unsent answers), so the graceful stop has to wait for them.
    s = socket.create_connection(("127.0.0.1", d.port))
    s.sendall(msgpack.packb([0, 0, "auth", [None]]))
    s.sendall(b"".join(msgpack.packb([0, i, "list_page", [None, 50]]) for i in range(1, 200)))
    received = b""
    while len(received) < 1000:  # answers are coming: the daemon has read the requests
        received += s.recv(1000)
    d.send_signal(signal.SIGTERM)
    d.wait_for_log("SIGTERM: stopping")
    assert await trio.to_thread.run_sync(d.stop, signal.SIGINT) == 128 + signal.SIGINT
    s.close()


async def test_restart_budget_exhausted_exits_non_zero_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from workers.cli import serve as daemon
    from workers.cli.config import load_settings
    from workers.wire import server

    async def crashing_run(
        self: server.Server, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started([])
        raise RuntimeError("listener bug")

    monkeypatch.setattr(server.Server, "run", crashing_run)
    settings = load_settings(env={}, overrides={"backend": "memory", "port": 0})
    assert await daemon.serve(settings) == 1
    lines = [r for r in caplog.records if r.name == "workers.cli.serve" and r.levelname == "ERROR"]
    assert len(lines) == 1
    assert "gave up after too many restarts" in lines[0].getMessage()
