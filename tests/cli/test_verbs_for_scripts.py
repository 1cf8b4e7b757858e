"""The verbs people reach for, as scripts and terminals see them: list filters, delete-where,
pipes that close early, progress bars only on a terminal, versions, tracebacks on demand."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.daemon_process import DaemonProcess, run_verb

import workers
from workers.client import SyncClient

pytestmark = pytest.mark.slow

#: Enough sessions that ``list --json`` writes more than a pipe holds (64 KiB).
MANY = 1500


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("scripts")).start()
    with SyncClient(d.tcp) as c:
        for i in range(MANY):
            c.create({"user": f"u{i % 3}", "n": i, "admin": i % 500 == 0})
    yield d
    d.close()


def verb(*args: str) -> subprocess.CompletedProcess[str]:
    done = run_verb(*args)
    assert done.returncode == 0, (args, done.stderr)
    return done


def test_list_limit_where_and_count_only(daemon: DaemonProcess) -> None:
    at = ("--address", daemon.tcp)
    limited = verb("list", "--limit", "7", "--json", *at).stdout.splitlines()
    assert len(limited) == 7
    where = verb("list", "--where", "user=u1", "--where", "admin:=false", "--json", *at)
    rows = [json.loads(line) for line in where.stdout.splitlines()]
    assert len(rows) == MANY // 3 - 1  # u1 holds one of the three admins (i = 1000)
    assert all(r["metadata"]["user"] == "u1" and not r["metadata"]["admin"] for r in rows)
    assert verb("list", "--count-only", *at).stdout == f"{MANY}\n"
    assert verb("list", "--count-only", "--limit", "5", *at).stdout == "5\n"
    counted = verb("list", "--count-only", "--where", "admin:=true", "--json", *at)
    assert json.loads(counted.stdout) == {"count": MANY // 500}
    human = verb("list", "--where", "n:=3", *at).stdout.splitlines()
    assert human[0].split()[:2] == ["ID", "CREATED"] and human[-1] == "1 live sessions"
    bad = run_verb("list", "--where", "no-equals-sign", *at)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr and bad.stderr.count("\n") == 1


def test_delete_where_dry_run_then_for_real(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path).start()
    with SyncClient(d.tcp) as c:
        for i in range(10):
            c.create({"user": "u1" if i < 4 else "u2"})
    at = ("--address", d.tcp)
    try:
        dry = json.loads(verb("delete-where", "user=u1", "--dry-run", "--json", *at).stdout)
        assert dry == {"key": "user", "value": "u1", "deleted": 4, "dry_run": True}
        assert verb("list", "--count-only", *at).stdout == "10\n"
        assert (
            verb("delete-where", "user=u1", *at).stdout == 'deleted 4 sessions where user = "u1"\n'
        )
    finally:
        assert d.stop() == 0
    # On the stopped store too; the dry run opens it read-only.
    store = ("--path", str(d.store_path))
    assert verb("delete-where", "user=u2", "--dry-run", *store).stdout.startswith("would delete 6")
    assert verb("delete-where", "user=u2", *store).stdout.startswith("deleted 6 sessions")
    assert verb("list", "--count-only", *store).stdout == "0\n"


def test_a_pipe_that_closes_early_ends_the_verb_quietly(daemon: DaemonProcess) -> None:
    command = f"{sys.executable} -m workers list --json --address {daemon.tcp} | head -1"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert len(done.stdout.splitlines()) == 1 and json.loads(done.stdout)["id"]


def run_on_a_terminal(*args: str, cwd: Path) -> tuple[int, str, str]:
    """Run a verb with stderr on a pseudo-terminal; (status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "workers", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        cwd=cwd,
    )
    os.close(slave)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the verb ended and closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    out = process.stdout.read().decode() if process.stdout else ""
    os.close(master)
    return process.wait(timeout=60), out, screen.decode()


def test_progress_bars_on_a_terminal_and_never_on_a_pipe(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    at = ("--address", daemon.tcp)
    status, _, screen = run_on_a_terminal("backup", str(tmp_path / "a.bak"), *at, cwd=tmp_path)
    assert status == 0 and f"backup [{'#' * 30}] {MANY}/{MANY}" in screen
    piped = verb("backup", str(tmp_path / "b.bak"), *at)
    assert piped.stderr == ""
    store = tmp_path / "restored"
    backup = str(tmp_path / "a.bak")
    status, _, screen = run_on_a_terminal("restore", backup, "--path", str(store), cwd=tmp_path)
    assert status == 0 and f"] {MANY}/{MANY}" in screen and screen.startswith("\rrestore [")
    source, copy = f"disk:{store}", f"lmdb:{tmp_path / 'copy'}"
    status, _, screen = run_on_a_terminal("migrate", "--from", source, "--to", copy, cwd=tmp_path)
    assert status == 0 and f"migrate [{'#' * 30}] {MANY}/{MANY}" in screen
    piped = verb("migrate", "--from", f"disk:{store}", "--to", f"lmdb:{tmp_path / 'copy2'}")
    assert piped.stderr == ""


def test_versions_and_tracebacks_on_demand(tmp_path: Path) -> None:
    installed = importlib.metadata.version("trio-sessions")
    assert workers.__version__ == installed
    assert verb("--version").stdout == f"sessiond {installed}\n"
    missing = str(tmp_path / "missing")
    plain = run_verb("stats", "--path", missing)
    assert plain.returncode == 1 and plain.stderr.count("\n") == 1
    debug = run_verb("stats", "--path", missing, "--debug")
    env = {**os.environ, "SESSIOND_DEBUG": "1"}
    from_env = run_verb("stats", "--path", missing, env=env)
    for done in (debug, from_env):
        assert done.returncode == 1
        assert "Traceback" in done.stderr and done.stderr.endswith(plain.stderr)
