"""Helpers the tests share: a real daemon process, a real Redis, the stores under contract.

Importable as ``helpers`` because the pytest settings put ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .redis_server import find_redis, unique_prefix

#: The checkout: the directory of ``run.py`` and ``pyproject.toml``.
ROOT = Path(__file__).resolve().parents[2]

#: The virtual wall clock starts here (late 2025), so timestamps look like real ones.
EPOCH = 1_764_000_000.0

BACKENDS = ["memory", "disk", "lmdb", "redis"]


def store_options(backend: str, tmp_path: Path) -> dict[str, Any]:
    """What ``open_session_service`` needs, besides ``backend``, to open a fresh store."""
    if backend == "memory":
        return {}
    if backend == "redis":
        return {"url": find_redis(), "prefix": unique_prefix(tmp_path)}
    return {"path": str(tmp_path / f"{backend}-store")}
