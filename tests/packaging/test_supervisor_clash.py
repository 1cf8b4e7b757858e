"""supervisord installs a top-level package called ``supervisor`` too. When that is the one
Python finds, ``import workers`` fails at once with one line that says so and what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow


def test_a_foreign_supervisor_package_is_named(tmp_path: Path) -> None:
    foreign = tmp_path / "supervisor"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("# this is a package (supervisord's)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [sys.executable, "-c", "import workers"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert last.startswith("ImportError: trio-sessions needs its own 'supervisor' package")
    assert str(foreign / "__init__.py") in last and "supervisord" in last
    assert "virtual environment" in last
    ours = subprocess.run(
        [sys.executable, "-c", "import workers.client"], capture_output=True, text=True, cwd=ROOT
    )
    assert ours.returncode == 0, ours.stderr
