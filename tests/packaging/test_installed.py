"""Every verb works from an installed copy: ``pip install .`` into a fresh venv, run elsewhere.

The install has no extras: the memory and disk stores and the daemon work, and naming the lmdb
or redis backend says, in one line, which extra to install. Slow (a venv and a non-editable
install, about 15 s, then real processes), so it is marked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT
from helpers.daemon_process import PATIENCE, DaemonProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with this checkout installed, not editable (no extras)."""
    where = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    subprocess.run(
        [str(where / "bin" / "python"), "-m", "pip", "install", "--quiet", str(ROOT)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    return where


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory outside the checkout."""
    assert not tmp_path.is_relative_to(ROOT)
    return tmp_path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SESSIOND_TOKEN")}


def run(venv: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    command = [str(venv / "bin" / argv[0]), *argv[1:]]
    return subprocess.run(
        command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=PATIENCE * 2
    )


class InstalledDaemon(DaemonProcess):
    """``sessiond serve`` of the installed copy."""

    def __init__(self, venv: Path, workdir: Path) -> None:
        super().__init__(workdir)
        self.venv = venv

    def start(self, *, wait: bool = True) -> InstalledDaemon:
        with open(self.workdir / "sessiond.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(self.venv / "bin" / "sessiond"), "serve", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                env=_env(),
            )
        if wait:
            self.wait_ready()
        return self


@pytest.fixture
def daemon(venv: Path, outside: Path) -> Iterator[InstalledDaemon]:
    d = InstalledDaemon(venv, outside).start()
    try:
        yield d
    finally:
        d.close()


def test_the_installed_package_is_not_the_checkout(venv: Path, outside: Path) -> None:
    found = run(venv, outside, "python", "-c", "import workers; print(workers.__file__)")
    assert found.returncode == 0, found.stderr
    assert not Path(found.stdout.strip()).is_relative_to(ROOT)


def test_help_lists_only_what_works(venv: Path, outside: Path) -> None:
    helped = run(venv, outside, "sessiond", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "serve" in helped.stdout and "chaos" in helped.stdout
    assert "bench" not in helped.stdout
    assert run(venv, outside, "python", "-m", "workers", "--help").stdout == helped.stdout


def test_serve_and_every_admin_verb(venv: Path, outside: Path, daemon: InstalledDaemon) -> None:
    address = ["--address", daemon.tcp]
    client = (
        "import sys\n"
        "from workers.client import SyncClient\n"
        "with SyncClient(sys.argv[1]) as c:\n"
        "    sid = c.create({'user': 'u1'})\n"
        "    print(sid, c.retrieve(sid).metadata['user'])\n"
    )
    created = run(venv, outside, "python", "-c", client, daemon.tcp)
    assert created.returncode == 0, created.stderr
    sid, user = created.stdout.split()
    assert user == "u1"
    assert run(venv, outside, "python", "-m", "workers", "ping", *address).returncode == 0
    backup = str(outside / "sessions.bak")
    for verb in (
        ["list"],
        ["inspect", sid],
        ["stats"],
        ["cleanup"],
        ["check"],
        ["backup", backup],
        ["delete", sid],
        ["restore", backup],
    ):
        done = run(venv, outside, "sessiond", *verb, *address)
        assert done.returncode == 0, (verb, done.stderr)
    assert daemon.stop(signal.SIGTERM) == 0
    moved = run(
        venv,
        outside,
        "sessiond",
        "migrate",
        "--from",
        f"disk:{daemon.store_path}",
        "--to",
        f"disk:{outside / 'copy'}",
        "--json",
    )
    assert moved.returncode == 0, moved.stderr
    assert '"copied": 1' in moved.stdout


def test_what_the_base_install_holds(venv: Path, outside: Path) -> None:
    embedded = (
        "import sys, trio, workers\n"
        "from workers import open_session_service\n"
        "async def main():\n"
        "    for backend, path in (('memory', None), ('disk', sys.argv[1])):\n"
        "        async with open_session_service(backend=backend, path=path) as s:\n"
        "            sid = await s.create({'u': backend})\n"
        "            print((await s.retrieve(sid)).metadata['u'])\n"
        "trio.run(main)\n"
        "print(workers.__version__)\n"
    )
    done = run(venv, outside, "python", "-c", embedded, str(outside / "store"))
    assert done.returncode == 0, done.stderr
    memory, disk, version = done.stdout.split()
    assert (memory, disk) == ("memory", "disk")
    assert run(venv, outside, "sessiond", "--version").stdout == f"sessiond {version}\n"
    typed = run(
        venv,
        outside,
        "python",
        "-c",
        "import workers, supervisor; print(workers.__file__, supervisor.__file__)",
    )
    for init in typed.stdout.split():
        assert (Path(init).parent / "py.typed").exists()


@pytest.mark.parametrize(("backend", "extra"), [("lmdb", "lmdb"), ("redis", "redis")])
def test_a_backend_without_its_extra_says_which_to_install(
    venv: Path, outside: Path, backend: str, extra: str
) -> None:
    hint = f"pip install 'trio-sessions[{extra}]'"
    for argv in (
        ["stats", "--backend", backend, "--path", str(outside)],
        ["migrate", "--from", f"disk:{outside}", "--to", f"{backend}:{outside / 'x'}"],
    ):
        done = run(venv, outside, "sessiond", *argv)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert hint in done.stderr and "Traceback" not in done.stderr
    served = run(venv, outside, "sessiond", "serve", "--backend", backend, "--port", "0")
    assert served.returncode == 1 and "Traceback" not in served.stderr
    (error,) = [line for line in served.stderr.splitlines() if " ERROR " in line]
    assert hint in error


def test_chaos_against_an_installed_daemon(venv: Path, outside: Path) -> None:
    done = run(
        venv, outside, "sessiond", "chaos", "--duration", "3", "--backend", "disk", "--daemon"
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_demo_from_the_installed_copy(venv: Path, outside: Path) -> None:
    done = run(venv, outside, "sessiond", "demo")
    assert done.returncode == 0, done.stderr
