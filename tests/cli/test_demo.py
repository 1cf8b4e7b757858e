"""``run.py demo`` plays the seed's 14 steps end to end (a real process, a real disk store)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import ROOT

#: Every test here starts processes (see the slow marker in pyproject.toml).
pytestmark = pytest.mark.slow


def test_the_demo_prints_the_seeds_expected_output() -> None:
    done = subprocess.run(
        [sys.executable, "run.py", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert [int(n) for n in re.findall(r"^Step (\d+):", out, re.M)] == list(range(1, 15))
    for line in (
        "✓ Total sessions: 2",
        "✓ Restored 2 sessions",
        "  User ID: user123",
        "  Theme: dark",
        "  Language: en",
        "✓ Cleaned up 0 expired sessions",
        "✓ Remaining sessions: 1",
        "=== Example Complete ===",
    ):
        assert line in out.splitlines(), line
    assert re.search(r"✓ Created session 1: [0-9a-f]{12}\.\.\.", out)
    assert "(1 swept)" in out
