"""Every verb, against everything that goes wrong: one line naming the real cause, the right
exit status, a JSON error for scripts, no traceback, and nothing made on disk or in Redis.

Each verb is the real command line (``python -m workers``) against the real thing: a daemon
with a token, a store it holds locked, a redis-server that was stopped, a port nothing listens
on. The verbs of one case run at once (each is mostly interpreter start-up).
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers.daemon_process import DaemonProcess, run_verbs
from helpers.redis_server import RedisServer, delete_prefix, find_redis, unique_prefix

pytestmark = pytest.mark.slow

TOKEN = "failures-token"
SID = "0" * 32

#: Every verb that can run on a stopped store, with its own arguments.
LOCAL = {
    "list": ["list"],
    "inspect": ["inspect", SID],
    "stats": ["stats"],
    "cleanup": ["cleanup"],
    "delete": ["delete", SID],
    "delete-where": ["delete-where", "user=u1"],
    "backup": ["backup", "out.bak"],
    "restore": ["restore", "in.bak"],
    "check": ["check"],
}
#: Every verb that talks to a daemon: the local ones, and those that only talk to a daemon.
REMOTE = {
    **LOCAL,
    "ping": ["ping"],
    "health": ["health"],
    "top": ["top", "--once", "--interval", "0.1"],
}


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("failures"), "--token", TOKEN).start()
    yield d
    d.close()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """An empty working directory, with the backup file ``restore`` reads."""
    (tmp_path / "in.bak").write_bytes(b"")
    return tmp_path


def check_failures(
    results: list[subprocess.CompletedProcess[str]], status: int, *expected: str
) -> None:
    """Each verb failed with ``status``: one line on stderr naming the verb and containing
    every ``expected`` text, no traceback, and (with --json, status 1) a JSON error object."""
    for done in results:
        verb = done.args[0]
        lines = done.stderr.splitlines()
        assert done.returncode == status, (done.args, done.stderr)
        assert len(lines) == 1, (done.args, done.stderr)
        assert "Traceback" not in done.stderr
        for text in expected:
            assert text in lines[0], (done.args, lines[0])
        if status == 1:
            assert lines[0].startswith(f"{verb}: "), lines[0]
            error = json.loads(done.stdout)
            assert set(error) == {"error", "message"} and error["message"] in lines[0]


def test_a_missing_path(work: Path) -> None:
    missing = work / "no" / "store"
    argvs = [
        [*argv, "--path", str(missing), "--json"] for v, argv in LOCAL.items() if v != "restore"
    ]
    argvs.append(
        ["migrate", "--from", f"disk:{missing}", "--to", f"lmdb:{work / 'copy'}", "--json"]
    )
    check_failures(run_verbs(*argvs, cwd=work), 1, "StoreError: no disk store at", str(missing))
    assert listing(work) == ["in.bak"]


def test_a_file_as_path(work: Path) -> None:
    (work / "afile").write_text("not a store")
    argvs = [[*argv, "--path", "afile", "--json"] for argv in LOCAL.values()]
    argvs.append(["migrate", "--from", "disk:afile", "--to", "lmdb:copy", "--json"])
    check_failures(run_verbs(*argvs, cwd=work), 1, "afile is a file, not a directory")
    assert listing(work) == ["afile", "in.bak"]
    assert (work / "afile").read_text() == "not a store"


def test_a_store_another_process_holds(work: Path, daemon: DaemonProcess) -> None:
    before = listing(daemon.store_path)
    argvs = [[*argv, "--path", str(daemon.store_path), "--json"] for argv in LOCAL.values()]
    argvs.append(["check", "--path", str(daemon.store_path), "--repair", "--json"])
    pid = str(daemon.process.pid)
    check_failures(run_verbs(*argvs, cwd=work), 1, "locked by another owner", f"pid {pid}")
    assert listing(daemon.store_path) == before
    assert listing(work) == ["in.bak"]


def test_a_dead_address(work: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        argvs = [[*argv, "--address", address, "--json"] for argv in REMOTE.values()]
        results = run_verbs(*argvs, cwd=work)
    check_failures(results, 1, f"cannot reach the daemon at {address}: connection refused")
    socket_path = work / "nobody.sock"
    results = run_verbs(["ping", "--address", f"unix://{socket_path}", "--json"], cwd=work)
    check_failures(results, 1, "no such socket file")
    assert listing(work) == ["in.bak"]


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, "requires a token: give --token-file (or --token) or set SESSIOND_TOKEN"),
        ("wrong", "refused the token (wrong token)"),
    ],
)
def test_a_missing_or_wrong_token(
    work: Path, daemon: DaemonProcess, token: str | None, expected: str
) -> None:
    given = [] if token is None else ["--token", token]
    argvs = [[*argv, "--address", daemon.unix, *given, "--json"] for argv in REMOTE.values()]
    check_failures(run_verbs(*argvs, cwd=work), 1, "AuthenticationFailed: ", expected)
    assert listing(work) == ["in.bak"]


def test_a_malformed_address_is_bad_usage(work: Path) -> None:
    argvs = [[*argv, "--address", "tcp://no-port"] for argv in REMOTE.values()]
    argvs.append(["stats", "--address", "http://127.0.0.1:7878"])
    results = run_verbs(*argvs, cwd=work)
    check_failures(results, 2, "error: argument --address: ", "--help")
    assert all(done.stdout == "" for done in results)
    assert listing(work) == ["in.bak"]


def test_redis_down(work: Path) -> None:
    with RedisServer() as server:
        url = server.url
    argvs = [[*argv, "--backend", "redis", "--url", url, "--json"] for argv in LOCAL.values()]
    argvs.append(["migrate", "--from", f"redis:{url}", "--to", f"lmdb:{work / 'c'}", "--json"])
    check_failures(run_verbs(*argvs, cwd=work), 1, f"Redis at {url} is unreachable")
    assert listing(work) == ["in.bak"]


def test_a_redis_prefix_with_no_sessions(work: Path) -> None:
    url, prefix = find_redis(), unique_prefix()
    argvs = [
        [*argv, "--backend", "redis", "--url", url, "--prefix", prefix, "--json"]
        for verb, argv in LOCAL.items()
        if verb != "restore"  # restore makes a store by nature
    ]
    argvs.append(["migrate", "--from", f"redis:{url}?prefix={prefix}", "--to", "lmdb:c", "--json"])
    results = run_verbs(*argvs, cwd=work)
    check_failures(results, 1, f"no redis store at {url} under prefix {prefix!r}")
    assert trio.run(delete_prefix, url, prefix) == 0  # not one key was written
    assert listing(work) == ["in.bak"]
