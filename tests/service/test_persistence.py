"""Durability: close and reopen, SIGKILL of the owning process, one owner per store, corruption."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import ROOT, store_options

from workers import StoreError, open_session_service

DURABLE = ["disk", "lmdb"]


@pytest.fixture(params=DURABLE)
def durable(request: pytest.FixtureRequest, tmp_path: Path, wall: Any) -> dict[str, Any]:
    return {"backend": request.param, "clock": wall, **store_options(request.param, tmp_path)}


async def test_sessions_survive_close_and_reopen_field_for_field(durable: dict[str, Any]) -> None:
    async with open_session_service(**durable) as sessions:
        a = await sessions.create({"user_id": "user123", "prefs": {"theme": "dark"}}, ttl=3600)
        b = await sessions.create({"user_id": "user456", "bytes": b"\x00\xff"}, ttl=None)
        await sessions.update(a, lambda m: {**m, "n": 1})
        before = {s.id: s for s in await sessions.list_sessions()}
    async with open_session_service(**durable) as sessions:
        after = {s.id: s for s in await sessions.list_sessions()}
        assert after == before and set(after) == {a, b}


async def test_a_second_owner_is_refused_naming_the_holder(durable: dict[str, Any]) -> None:
    async with open_session_service(**durable) as sessions:
        sid = await sessions.create({"user_id": "u"})
        with pytest.raises(StoreError, match=rf"pid {os.getpid()}"):
            async with open_session_service(**durable):
                pass  # pragma: no cover - must not be reached
        assert (await sessions.peek(sid)).id == sid


@pytest.mark.slow
def test_a_second_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import sys, trio
        from workers import open_session_service, StoreError
        async def main():
            async with open_session_service(backend="disk", path={str(path)!r}):
                print("ready", flush=True)
                sys.stdin.readline()
        trio.run(main)
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"

        async def second() -> None:
            async with open_session_service(backend="disk", path=str(path)):
                pass  # pragma: no cover

        with pytest.raises(StoreError, match=rf"pid {holder.pid}"):
            trio.run(second)
    finally:
        holder.kill()
        holder.wait()


WRITER = """
import json, sys, trio
from workers import open_session_service

async def main(backend, path):
    async with open_session_service(backend=backend, path=path) as sessions:
        i = 0
        while True:
            sid = await sessions.create({"user_id": f"user{i}", "i": i}, ttl=3600)
            if i % 3 == 0:
                await sessions.update(sid, lambda m: {**m, "updated": True})
            s = await sessions.peek(sid)
            print(json.dumps(s.to_dict()), flush=True)  # acknowledged
            i += 1

trio.run(main, sys.argv[1], sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", DURABLE)
def test_every_acknowledged_write_survives_sigkill(tmp_path: Path, backend: str) -> None:
    path = str(tmp_path / "store")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, backend, path], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    acknowledged: list[dict[str, Any]] = []
    assert writer.stdout is not None
    for line in writer.stdout:
        acknowledged.append(json.loads(line))
        if len(acknowledged) == 200:
            writer.send_signal(signal.SIGKILL)
            break
    writer.wait()
    # What the writer printed after the 200th line was also acknowledged: keep it.
    acknowledged += [json.loads(line) for line in writer.stdout if line.endswith("\n")]

    async def check() -> None:
        async with open_session_service(backend=backend, path=path) as sessions:
            for record in acknowledged:
                assert (await sessions.peek(record["id"])).to_dict() == record

    trio.run(check)


async def _a_corrupt_store(tmp_path: Path, backend: str) -> Path:
    """A store directory that held a session, its data files overwritten with garbage."""
    path = tmp_path / "store"
    async with open_session_service(backend=backend, path=str(path)) as sessions:
        await sessions.create({"user_id": "u"})
    for f in path.iterdir():
        if f.is_file() and f.name not in ("LOCK", "SESSIONS"):
            f.write_bytes(b"this is not a database" * 100)
    return path


@pytest.mark.parametrize("backend", DURABLE)
async def test_a_corrupt_store_is_quarantined_and_the_service_starts_empty(
    tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = await _a_corrupt_store(tmp_path, backend)
    with caplog.at_level(logging.ERROR):
        async with open_session_service(backend=backend, path=str(path)) as sessions:
            assert await sessions.count() == 0
            await sessions.create({"user_id": "fresh"})
    quarantined = [p for p in tmp_path.rglob("*") if ".corrupt-" in p.name]
    assert quarantined, list(tmp_path.rglob("*"))
    assert any(str(quarantined[0]) in r.getMessage() for r in caplog.records)
    # Only the store's own files moved: its marker and lock stay, with the fresh store.
    moved = {f.name for f in quarantined[0].iterdir()}
    assert moved and not moved & {"LOCK", "SESSIONS"}
    assert {"LOCK", "SESSIONS"} <= {f.name for f in path.iterdir()}


@pytest.mark.parametrize("backend", DURABLE)
async def test_on_corrupt_fail_refuses_to_start(tmp_path: Path, backend: str) -> None:
    path = await _a_corrupt_store(tmp_path, backend)
    with pytest.raises(StoreError):
        async with open_session_service(backend=backend, path=str(path), on_corrupt="fail"):
            pass  # pragma: no cover
    assert not [p for p in tmp_path.rglob("*") if ".corrupt-" in p.name]
