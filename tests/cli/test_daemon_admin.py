"""The admin verbs of ``run.py``, against a running daemon and on a stopped store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.daemon_process import DaemonProcess, run_verb

from workers.cli.admin import Failed, read_backup
from workers.client import SyncClient

#: Every test here starts processes (see the slow marker in pyproject.toml).
pytestmark = pytest.mark.slow

TOKEN = "admin-token"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("admin"), "--token", TOKEN).start()
    yield d
    d.close()


def verb(d: DaemonProcess, *args: str) -> dict | list:
    """Run an admin verb against ``d`` with --json; its parsed output (a list for JSON lines)."""
    done = run_verb(*args, "--address", d.unix, "--token", TOKEN, "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return lines[0] if len(lines) == 1 and args[0] != "list" else lines


def test_verbs_against_a_running_daemon(daemon: DaemonProcess, tmp_path: Path) -> None:
    with SyncClient(daemon.tcp, token=TOKEN) as c:
        ids = [c.create({"user": f"u{i}"}) for i in range(5)]
    assert verb(daemon, "ping")["reply"] == "pong"
    listed = verb(daemon, "list")
    assert {s["id"] for s in listed} == set(ids)
    assert verb(daemon, "inspect", ids[0])["metadata"] == {"user": "u0"}
    assert verb(daemon, "stats")["sessions"] == 5
    assert verb(daemon, "cleanup") == {"removed": 0}
    assert verb(daemon, "check")["ok"] is True
    assert verb(daemon, "delete", ids[0]) == {"id": ids[0], "deleted": True}
    backup = tmp_path / "sessions.backup"
    assert verb(daemon, "backup", str(backup))["sessions"] == 4
    for sid in ids[1:3]:
        verb(daemon, "delete", sid)
    restored = verb(daemon, "restore", str(backup))
    assert (restored["restored"], restored["skipped"]) == (2, 2)
    assert verb(daemon, "stats")["sessions"] == 4


def test_human_output_and_failures(daemon: DaemonProcess) -> None:
    base = ("--address", daemon.tcp, "--token", TOKEN)
    done = run_verb("list", *base)
    assert done.returncode == 0
    assert done.stdout.splitlines()[0].split()[:2] == ["ID", "CREATED"]
    done = run_verb("stats", *base)
    assert "backend" in done.stdout and "disk" in done.stdout
    missing = run_verb("inspect", "0" * 32, *base)
    assert missing.returncode == 1
    assert "SessionNotFound" in missing.stderr
    assert run_verb("delete", "0" * 32, *base).returncode == 1
    assert run_verb("ping", "--address", daemon.tcp, "--token", "wrong").returncode == 1
    unreachable = run_verb("ping", "--address", "tcp://127.0.0.1:1", "--timeout", "0")
    assert unreachable.returncode == 1
    assert "ServiceUnavailable" in unreachable.stderr


def test_verbs_on_a_stopped_store(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path).start()
    with SyncClient(d.tcp) as c:
        ids = [c.create({"n": i}) for i in range(30)]
    assert d.stop() == 0
    store = ("--path", str(d.store_path))

    def local(*args: str) -> dict | list:
        done = run_verb(*args, *store, "--json")
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        return lines if args[0] == "list" else lines[0]

    assert {s["id"] for s in local("list")} == set(ids)
    assert local("inspect", ids[3])["metadata"] == {"n": 3}
    assert local("stats")["sessions"] == 30
    check = local("check")
    assert (check["ok"], check["sessions"], check["expired"]) == (True, 30, 0)
    backup = tmp_path / "b.backup"
    assert local("backup", str(backup))["sessions"] == 30
    other = tmp_path / "other-store"
    done = run_verb("restore", str(backup), "--path", str(other), "--json")
    assert json.loads(done.stdout)["restored"] == 30
    with open(backup, "rb") as f:
        header, sessions = read_backup(f)
        assert header["count"] == 30
        assert sorted(s.id for s in sessions) == sorted(ids)


def test_damaged_backups_and_stores_fail_clearly(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path).start()
    with SyncClient(d.tcp) as c:
        for i in range(3):
            c.create({"n": i})
    backup = tmp_path / "b.backup"
    assert run_verb("backup", str(backup), "--address", d.tcp).returncode == 0
    assert d.stop() == 0
    data = backup.read_bytes()
    backup.write_bytes(data[:-10])
    with open(backup, "rb") as f, pytest.raises(Failed, match="truncated"):
        list(read_backup(f)[1])
    done = run_verb("restore", str(backup), "--path", str(tmp_path / "r"))
    assert done.returncode == 1
    assert "truncated" in done.stderr
    # A damaged store of ours: check refuses and moves nothing; check --repair moves its files.
    broken = d.store_path
    (broken / "cache.db").write_bytes(b"this is not sqlite" * 100)
    done = run_verb("check", "--path", str(broken))
    assert done.returncode == 1
    assert "StoreError" in done.stderr and "left as it is" in done.stderr
    assert not list(tmp_path.glob("*.corrupt-*"))
    done = run_verb("check", "--path", str(broken), "--repair", "--json")
    assert done.returncode == 0, done.stderr
    (moved,) = tmp_path.glob(f"{broken.name}.corrupt-*")
    assert [p.name for p in moved.iterdir()] == ["cache.db"]
    # Another application's database is never moved, --repair or not.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "cache.db").write_bytes(b"not ours" * 100)
    done = run_verb("check", "--path", str(foreign), "--repair")
    assert done.returncode == 1 and "nothing was moved" in done.stderr
    assert [p.name for p in foreign.iterdir()] == ["cache.db"]
