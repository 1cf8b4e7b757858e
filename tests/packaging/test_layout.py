"""The layers of the package, checked: imports flow one way, and the client stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

#: Sub-packages of workers/, lowest first: each may import only its own layer and those below.
LAYERS = {"record": 0, "stores": 1, "core": 2, "wire": 3, "cli": 4, "integrations": 4}
FORBIDDEN = ("bench", "tests", "helpers", "supervisor.testing")


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 2 and parts[0] == "workers" else None


def test_imports_flow_down_the_layers() -> None:
    wrong = []
    for path in sorted((ROOT / "workers").rglob("*.py")):
        here = layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for name in imports_of(path):
            if name.startswith(FORBIDDEN) or name == "supervisor.testing":
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
            there = layer(name)
            if here is not None and there is not None and there > here:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}, a higher layer")
    assert wrong == []


def test_the_runtime_knows_nothing_about_sessions() -> None:
    for path in sorted((ROOT / "supervisor").rglob("*.py")):
        assert not any(name.startswith("workers") for name in imports_of(path)), path


def test_importing_the_client_loads_no_manager_runtime_or_store() -> None:
    code = (
        "import sys, workers.client\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith(('workers', 'supervisor'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert "workers.wire.client" in loaded
    heavy = [
        m
        for m in loaded
        if m.startswith(("supervisor", "workers.stores", "workers.cli."))
        or m in ("workers.core.manager", "workers.core.service", "workers.core.operations")
    ]
    assert heavy == []


def test_the_embedded_api_is_still_importable_from_workers() -> None:
    import workers

    for name in workers.__all__:
        assert getattr(workers, name) is not None, name
    from workers.client import SyncClient, connect  # noqa: F401  (pinned location)
