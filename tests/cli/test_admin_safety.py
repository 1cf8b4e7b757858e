"""The admin verbs never surprise: nothing made, moved or left behind; no verb waits forever.

Each test runs the real verb (``python -m workers VERB``) against the real thing.
"""

from __future__ import annotations

import socket
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from helpers.daemon_process import DaemonProcess, run_verb

from workers.client import SyncClient

pytestmark = pytest.mark.slow


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("verb", ["stats", "list", "check", "cleanup", "backup"])
def test_a_missing_store_is_an_error_and_nothing_is_made(tmp_path: Path, verb: str) -> None:
    typo = tmp_path / "no" / "such" / "store"
    argv = [verb, *(["out.bak"] if verb == "backup" else []), "--path", str(typo)]
    done = run_verb(*argv, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert f"no disk store at {typo}" in done.stderr
    assert listing(tmp_path) == []


def test_another_applications_directory_is_left_as_it_is(tmp_path: Path) -> None:
    other = tmp_path / "app"
    other.mkdir()
    sqlite3.connect(other / "cache.db").execute("CREATE TABLE mine (x)").connection.close()
    (other / "notes.txt").write_text("keep me")
    before = listing(tmp_path)
    for verb in ("stats", "list", "check", "cleanup"):
        done = run_verb(verb, "--path", str(other), cwd=tmp_path)
        assert done.returncode == 1, (verb, done.stderr)
        assert "not a session store" in done.stderr
    done = run_verb("check", "--path", str(other), "--repair", cwd=tmp_path)
    assert done.returncode == 1
    assert listing(tmp_path) == before


def test_read_only_verbs_write_nothing_and_restore_makes_a_store(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path).start()
    with SyncClient(d.tcp) as c:
        sid = c.create({"user": "u1"})
    assert d.stop() == 0
    store = d.store_path

    def state() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in store.iterdir()}

    before = state()
    backup = tmp_path / "sessions.bak"
    for argv in (["stats"], ["list"], ["inspect", sid], ["check"], ["backup", str(backup)]):
        done = run_verb(*argv, "--path", str(store), "--json")
        assert done.returncode == 0, (argv, done.stderr)
    assert state() == before
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []

    fresh = tmp_path / "restored"
    done = run_verb("restore", str(backup), "--path", str(fresh))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    done = run_verb("inspect", sid, "--path", str(fresh), "--json")
    assert '"user": "u1"' in done.stdout


def test_backup_follows_no_link_and_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path).start()
    with SyncClient(d.tcp) as c:
        for i in range(3):
            c.create({"n": i})
    assert d.stop() == 0
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "out.bak"
    (tmp_path / "out.bak.partial").symlink_to(victim)  # the old temporary name, planted
    done = run_verb("backup", str(target), "--path", str(d.store_path))
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious"
    # A record that cannot be read fails the backup half way: no file is left for it.
    con = sqlite3.connect(d.store_path / "cache.db")
    con.execute("UPDATE Cache SET value = x'c1c1' WHERE rowid = (SELECT max(rowid) FROM Cache)")
    con.commit()
    con.close()
    before = listing(tmp_path)
    done = run_verb("backup", str(tmp_path / "second.bak"), "--path", str(d.store_path))
    assert done.returncode == 1
    assert listing(tmp_path) == before


def test_a_daemon_that_never_answers_fails_the_verb_in_time(tmp_path: Path) -> None:
    with socket.socket() as mute:  # accepts connections (the kernel does) and says nothing
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        address = f"tcp://127.0.0.1:{mute.getsockname()[1]}"
        for verb in ("ping", "stats", "list", "cleanup"):
            start = time.monotonic()
            done = run_verb(verb, "--address", address, "--timeout", "0.5")
            assert done.returncode == 1, (verb, done.stderr)
            assert "no answer within 0.5 s" in done.stderr
            assert time.monotonic() - start < 10


def test_a_dead_address_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        done = run_verb("ping", "--address", f"tcp://127.0.0.1:{port}")
    assert done.returncode == 1
    assert "cannot reach the daemon" in done.stderr
