"""The real daemon as a subprocess (``python -m workers serve``), for tests that talk to it.

A test starts one with :class:`DaemonProcess`, waits until it accepts connections (polling the
port or socket, never sleeping a fixed time), and stops it with a signal. Its stderr goes to a
file, shown by :meth:`DaemonProcess.log` when an assertion needs it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from workers import SessionExpired
from workers.client import SyncClient

from . import ROOT

#: How long a daemon gets to start or stop before the test fails.
PATIENCE = 30.0


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_verb(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m workers ARGS...`` (``sessiond ARGS...``) in ``cwd`` to completion,
    capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        cwd=cwd,
        env=env,
    )


def run_verbs(
    *argvs: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT
) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``python -m workers ARGS...`` at once (each is mostly interpreter start-up)
    and return their results in order."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "workers", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=env,
        )
        for argv in argvs
    ]
    results = []
    for argv, process in zip(argvs, processes, strict=True):
        out, err = process.communicate(timeout=PATIENCE)
        results.append(subprocess.CompletedProcess(argv, process.returncode, out, err))
    return results


class DaemonProcess:
    """One ``sessiond serve`` subprocess on a free loopback port and a Unix socket in
    ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        backend: str = "disk",
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.workdir = workdir
        self.preexec_fn = preexec_fn  # run in the child before it starts (resource limits)
        self.port = free_port()
        self.socket_path = workdir / "sessiond.sock"
        self.store_path = workdir / "store"
        self.args = [
            "--backend", backend,
            "--path", str(self.store_path),
            "--port", str(self.port),
            "--unix", str(self.socket_path),
            *args,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self._log_path = workdir / "sessiond.log"

    @property
    def tcp(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def unix(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, *, wait: bool = True) -> DaemonProcess:
        """Start the daemon; with ``wait``, return once both addresses accept connections."""
        with open(self._log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers", "serve", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                preexec_fn=self.preexec_fn,
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + PATIENCE
        while not (self._accepts(socket.AF_INET, ("127.0.0.1", self.port))
                   and self._accepts(socket.AF_UNIX, str(self.socket_path))):  # fmt: skip
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the daemon exited ({self.process.returncode}):\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not start:\n{self.log()}")
            time.sleep(0.02)

    @staticmethod
    def _accepts(family: int, address: object) -> bool:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(address)
            except OSError:
                return False
            return True

    def send_signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = PATIENCE) -> int:
        """Wait for the daemon to exit and return its status."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the daemon and return its exit status."""
        self.send_signal(signum)
        return self.wait()

    def wait_for_log(self, text: str) -> None:
        """Wait until the daemon has logged ``text``."""
        deadline = time.monotonic() + PATIENCE
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon never logged {text!r}:\n{self.log()}")
            time.sleep(0.02)

    def status_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of the daemon from ``/proc/PID/status``, in KiB (``VmRSS``: resident
        now; ``VmHWM``: the most it ever was)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} line")

    def log(self) -> str:
        return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""

    def close(self) -> None:
        """Kill the daemon if it still runs (test teardown)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextlib.contextmanager
def serving(workdir: Path, *args: str) -> Iterator[DaemonProcess]:
    """A daemon for a ``with`` block (a module's tests, say); it must then stop cleanly."""
    daemon = DaemonProcess(workdir, *args).start()
    try:
        yield daemon
    except BaseException:
        daemon.close()
        raise
    assert daemon.stop() == 0, daemon.log()


def expire(client: SyncClient, session_id: str) -> None:
    """Make a session of a real daemon expire: a 1 ms idle timeout, then poll until the
    daemon's own clock has passed it (its clock is real: no fixed sleep can be right)."""
    client.set_ttl(session_id, 0.001)
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            client.peek(session_id)
        except SessionExpired:
            return
        assert time.monotonic() < deadline, f"session {session_id} never expired"
