"""Migration between stores: a round trip between every pair of backends, and the CLI verb.

The stores come from ``store_factories`` (the contract suite's), so every backend there takes
part. No clock fixture: some stores work on threads; times are explicit milliseconds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from helpers.redis_cluster import shared_cluster
from helpers.redis_server import find_redis, unique_prefix
from helpers.store_factories import STORE_FACTORIES, factory_params

from workers.cli.migrate import migrate, register
from workers.record.session import Session
from workers.stores import make_store
from workers.stores.base import Put, Store
from workers.stores.files import StoreFiles

T0 = 1_700_000_000_000
MINUTE = 60_000

LIVE = [
    Session(f"live-{i:02}", T0 - i, T0 - i, MINUTE * (i + 1), {"i": i, "raw": b"\x00"}, i + 1)
    for i in range(23)
] + [
    Session("forever", T0 - 10**9, T0 - 5, None, {"nested": {"l": [1, 2.5, None, "é"]}}, 7),
]
EXPIRED = [Session("old", T0 - 2 * MINUTE, T0 - 2 * MINUTE, MINUTE, {}, 1)]


async def opened(backend: str, path: Path) -> Store:
    store = STORE_FACTORIES[backend].make(path)
    await store.open()
    return store


@pytest.mark.parametrize("target_backend", factory_params())
@pytest.mark.parametrize("source_backend", factory_params())
async def test_a_round_trip_keeps_every_live_session_field_for_field(
    tmp_path: Path, source_backend: str, target_backend: str
) -> None:
    source = await opened(source_backend, tmp_path / "source")
    target = await opened(target_backend, tmp_path / "target")
    back = await opened(source_backend, tmp_path / "back")
    try:
        await source.commit([Put(s, None) for s in LIVE + EXPIRED])
        seen: list[tuple[int, int | None]] = []
        copied = await migrate(
            source, target, now_ms=T0, batch=5, progress=lambda *p: seen.append(p)
        )
        assert copied == len(LIVE)
        assert seen[0] == (0, len(LIVE)) and seen[-1] == (len(LIVE), len(LIVE))
        ids = [s.id for s in LIVE + EXPIRED]
        assert await target.load(ids) == {s.id: s for s in LIVE}
        assert await target.count(T0) == len(LIVE)
        assert await migrate(target, back, now_ms=T0) == len(LIVE)
        assert await back.load(ids) == {s.id: s for s in LIVE}
    finally:
        for store in (back, target, source):
            await store.close()


async def test_sessions_already_in_the_target_are_skipped_not_overwritten(
    tmp_path: Path,
) -> None:
    source = await opened("memory", tmp_path / "source")
    target = await opened("memory", tmp_path / "target")
    try:
        await source.commit([Put(s, None) for s in LIVE])
        newer = replace(LIVE[0], metadata={"changed": "in the target"}, version=99)
        await target.commit([Put(newer, None)])
        seen: list[tuple[int, int | None]] = []
        assert await migrate(source, target, now_ms=T0, progress=lambda *p: seen.append(p)) == (
            len(LIVE) - 1
        )
        assert seen[-1] == (len(LIVE), len(LIVE))  # handled: copied or skipped
        assert (await target.load([newer.id]))[newer.id] == newer
        assert await migrate(source, target, now_ms=T0) == 0  # running it again is harmless
    finally:
        await source.close()
        await target.close()


async def test_an_empty_source_copies_nothing(tmp_path: Path) -> None:
    source = await opened("memory", tmp_path / "source")
    target = await opened("memory", tmp_path / "target")
    assert await migrate(source, target, now_ms=T0) == 0
    with pytest.raises(ValueError):
        await migrate(source, target, now_ms=T0, batch=0)


# --- the command line ---


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="run.py")
    register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["migrate", *argv])
    return args.func(args)


def now_live(sessions: list[Session]) -> list[Session]:
    """``sessions`` moved to the real clock's present: the CLI migrates what is live now."""
    shift = int(time.time() * 1000) - T0
    return [
        replace(s, created_at=s.created_at + shift, last_accessed=s.last_accessed + shift)
        for s in sessions
    ]


def fill_disk_store(path: Path, sessions: list[Session]) -> None:
    async def fill() -> None:
        store = make_store("disk", path=str(path))
        await store.open()
        try:
            await store.commit([Put(s, None) for s in sessions])
        finally:
            await store.close()

    trio.run(fill)


def load_all(backend: str, path: Path) -> dict[str, Session]:
    async def load() -> dict[str, Session]:
        store = make_store(backend, path=str(path))
        await store.open()
        try:
            return await store.load([s.id for s in LIVE + EXPIRED])
        finally:
            await store.close()

    return trio.run(load)


def test_cli_copies_and_says_how_many(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    live = now_live(LIVE)
    fill_disk_store(tmp_path / "disk", live + now_live(EXPIRED))
    assert cli("--from", f"dets:{tmp_path / 'disk'}", "--to", f"lmdb:{tmp_path / 'lmdb'}") == 0
    out, err = capsys.readouterr()
    assert out == f"Copied {len(live)} sessions\n"
    assert err == ""  # no progress bar: stderr is not a terminal
    assert load_all("lmdb", tmp_path / "lmdb") == {s.id: s for s in live}

    assert cli("--from", f"disk:{tmp_path / 'disk'}", "--to", f"lmdb:{tmp_path / 'lmdb'}") == 0
    assert capsys.readouterr().out.startswith(f"Copied 0 sessions ({len(LIVE)} already")


def test_cli_json_and_a_redis_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    live = now_live(LIVE)
    fill_disk_store(tmp_path / "disk", live)
    url = f"{find_redis()}?prefix={unique_prefix()}"
    assert cli("--from", f"disk:{tmp_path / 'disk'}", "--to", f"redis:{url}", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"copied": len(live), "skipped": 0}
    assert cli("--from", f"redis:{url}", "--to", f"lmdb:{tmp_path / 'lmdb'}", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"copied": len(live), "skipped": 0}
    assert load_all("lmdb", tmp_path / "lmdb") == {s.id: s for s in live}


@pytest.mark.slow
def test_cli_migrates_to_and_from_a_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = now_live(LIVE)
    fill_disk_store(tmp_path / "disk", live)
    cluster = f"{shared_cluster().url}?prefix={unique_prefix()}"
    server = f"{find_redis()}?prefix={unique_prefix()}"
    for source, target in [
        (f"disk:{tmp_path / 'disk'}", f"redis:{cluster}"),
        (f"redis:{cluster}", f"redis:{server}"),
        (f"redis:{server}", f"lmdb:{tmp_path / 'lmdb'}"),
    ]:
        assert cli("--from", source, "--to", target, "--json") == 0
        assert json.loads(capsys.readouterr().out) == {"copied": len(live), "skipped": 0}
    assert load_all("lmdb", tmp_path / "lmdb") == {s.id: s for s in live}


def test_cli_fails_with_a_message_when_a_store_cannot_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_disk_store(tmp_path / "disk", LIVE)
    lock = StoreFiles(tmp_path / "lmdb", "lmdb", ())  # a running service owns the target
    lock.open(create=True, read_only=False)
    try:
        assert cli("--from", f"disk:{tmp_path / 'disk'}", "--to", f"lmdb:{tmp_path / 'lmdb'}") == 1
    finally:
        lock.release()
    assert "locked by another owner" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["nosuch:/x", "disk", "lmdb:", "disk:/a --batch 0"])
def test_cli_refuses_bad_arguments(where: str) -> None:
    first, *rest = where.split()
    with pytest.raises(SystemExit) as exited:
        cli("--from", first, "--to", "memory:", *rest)
    assert exited.value.code == 2


def test_cli_refuses_the_same_store_twice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = f"disk:{tmp_path / 'disk'}"
    assert cli("--from", path, "--to", path) == 1
    assert "same store" in capsys.readouterr().err


def test_a_source_that_is_not_there_is_an_error_and_nothing_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo"
    assert cli("--from", f"disk:{typo}", "--to", f"lmdb:{tmp_path / 'copy'}") == 1
    assert f"no disk store at {typo}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
