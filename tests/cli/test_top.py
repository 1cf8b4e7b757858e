"""``sessiond top``, driven in a real terminal: tmux runs it, the test types keys and reads the
screen. The daemon is real, its manager is crashed for real (``crash_actor``), and requests
flow from a client thread while the view is read."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.daemon_process import PATIENCE, DaemonProcess, run_verb
from helpers.redis_server import unavailable

from workers import ServiceUnavailable
from workers.client import SyncClient

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, "--allow-fault-injection").start()
    yield d
    d.close()


@pytest.fixture
def traffic(daemon: DaemonProcess) -> Iterator[None]:
    """Requests from a client thread for as long as the test runs, across listener restarts."""
    stop = threading.Event()

    def run() -> None:
        with SyncClient(daemon.tcp, reconnect_timeout=PATIENCE) as client:
            while not stop.is_set():
                try:
                    client.retrieve(client.create({"n": 1}))
                except ServiceUnavailable:
                    pass  # the listener restarted with the crashed manager; reconnect
                time.sleep(0.002)  # a steady trickle, not a flood, on a 2-core machine

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(PATIENCE)


class Tmux:
    """A private tmux server (its own socket) with one window running a command."""

    def __init__(self, command: str, cwd: Path) -> None:
        if shutil.which("tmux") is None:
            unavailable("no tmux to drive `sessiond top` in a terminal (.ci/ensure-tmux.sh)")
        self.socket = f"sessiond-top-{uuid.uuid4().hex[:8]}"
        # The shell reports how the command ended, then keeps the window open to be read.
        shell = f"{command}; echo TOP-EXITED=$?; sleep {PATIENCE}"
        self._tmux("new-session", "-d", "-s", "top", "-x", "150", "-y", "45", "-c", str(cwd), shell)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=PATIENCE
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "top")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "top", *keys)

    def wait_for(self, shows: Callable[[str], bool]) -> str:
        """Poll the screen until ``shows(screen)``; the screen then."""
        deadline = time.monotonic() + PATIENCE
        while not shows(screen := self.screen()):
            assert time.monotonic() < deadline, f"the terminal never showed it:\n{screen}"
            time.sleep(0.05)  # polling the terminal, not timing anything
        return screen

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def top(daemon: DaemonProcess) -> str:
    return f"{sys.executable} -m workers top --address {daemon.tcp} --interval 0.3"


def row(screen: str, first: str) -> list[str]:
    """The cells of the table row that starts with ``first`` (split on runs of spaces)."""
    for line in screen.splitlines():
        if line.split()[:1] == [first]:
            return re.split(r"\s{2,}", line.strip())
    return []


def crashed_and_busy(screen: str) -> bool:
    manager, create = row(screen, "manager"), row(screen, "create")
    return (
        len(manager) == 5
        and manager[1:3] == ["running", "1"]
        and manager[4].startswith("InjectedCrash")
        and len(create) == 6
        and create[1] not in ("-", "0.0")
    )


def test_top_shows_the_tree_restarts_and_rates_and_quits_on_q(
    daemon: DaemonProcess, traffic: None, tmp_path: Path
) -> None:
    terminal = Tmux(top(daemon), tmp_path)
    try:
        screen = terminal.wait_for(lambda s: "TREE sessions-" in s and row(s, "listener"))
        assert row(screen, "manager")[1:3] == ["running", "0"]
        with SyncClient(daemon.tcp) as client:
            try:
                client.crash_actor("manager")
            except ServiceUnavailable:
                pass  # the answer may be lost with the listener, restarted after the manager
        screen = terminal.wait_for(crashed_and_busy)
        assert row(screen, "listener")[1:3] == ["running", "1"]  # rest_for_one
        assert row(screen, "cleanup")[1:3] == ["running", "1"]
        assert re.search(r"requests [1-9][\d.]*/s", screen)
        assert re.search(r"MANAGER mailbox \d+ +batches [\d.]+/s", screen)
        quits(terminal, "q")
    finally:
        terminal.close()


def quits(terminal: Tmux, key: str) -> None:
    """``key`` ends the view: it exits 0, without a traceback."""
    terminal.keys(key)
    screen = terminal.wait_for(lambda s: "TOP-EXITED=" in s)
    assert "TOP-EXITED=0" in screen and "Traceback" not in screen


def test_top_quits_on_ctrl_c(daemon: DaemonProcess, tmp_path: Path) -> None:
    terminal = Tmux(top(daemon), tmp_path)
    try:
        terminal.wait_for(lambda s: "TREE sessions-" in s)
        quits(terminal, "C-c")
    finally:
        terminal.close()


def test_top_once_json_is_one_snapshot(daemon: DaemonProcess, traffic: None) -> None:
    done = run_verb("top", "--address", daemon.tcp, "--once", "--json", "--interval", "0.5")
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    view = json.loads(line)
    assert [c["id"] for c in view["tree"]["children"]] == ["manager", "cleanup", "listener"]
    assert view["interval_s"] > 0 and view["requests_per_s"] > 0
    create = view["methods"]["create"]
    assert create["per_s"] > 0 and create["p50_ms"] <= create["p99_ms"]
    assert view["manager"]["mailbox"] is not None and view["connections"]["open"] >= 1
