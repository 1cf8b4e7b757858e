"""Session service throughput next to its floor, measured in the same run.

For each backend and each of create / retrieve / update, the service is driven by 1 and by 50
concurrent callers, and the rate is printed next to the floor: raw diskcache doing the same work
with the same msgpack records, in a plain loop, with no actor, no validation and no Trio. The
ratio (service / floor) is what to read; the absolute figures depend on the machine.

    python bench/sessions.py [--ops N] [--backends memory,disk]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import diskcache
import trio

from workers import open_session_service
from workers.codec import decode_session, encode_session
from workers.session import Session, new_id

CONCURRENCY = (1, 50)
OPERATIONS = ("create", "retrieve", "update")
METADATA = {"user_id": "user123", "auth_method": "api_key", "theme": "dark", "language": "en"}


def raw_diskcache_floor(workdir: Path, ops: int) -> dict[str, float]:
    """Sequential set / get / read-modify-write of msgpack records on a bare diskcache."""
    cache = diskcache.Cache(str(workdir / "raw"), eviction_policy="none", size_limit=2**62)
    now = int(time.time() * 1000)
    ids = [new_id() for _ in range(ops)]
    rates = {}
    t0 = time.perf_counter()
    for sid in ids:
        cache.set(sid, encode_session(Session(sid, now, now, 3_600_000, METADATA, 1)))
    rates["create"] = ops / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for sid in ids:
        decode_session(cache.get(sid))
    rates["retrieve"] = ops / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for sid in ids:
        s = decode_session(cache.get(sid))
        changed = replace(s, last_accessed=now, metadata={**s.metadata, "n": 1}, version=2)
        cache.set(sid, encode_session(changed))
    rates["update"] = ops / (time.perf_counter() - t0)
    cache.close()
    return rates


async def _rate(callers: int, ops: int, op: Callable[[int], Awaitable[Any]]) -> float:
    per_caller = ops // callers

    async def caller(c: int) -> None:
        for i in range(per_caller):
            await op(c * per_caller + i)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for c in range(callers):
            nursery.start_soon(caller, c)
    return per_caller * callers / (time.perf_counter() - t0)


async def _service_rates(sessions: Any, callers: int, ops: int) -> dict[str, float]:
    ids: list[str] = [""] * ops

    async def create(i: int) -> None:
        ids[i] = await sessions.create(METADATA)

    async def retrieve(i: int) -> None:
        await sessions.retrieve(ids[i])

    async def update(i: int) -> None:
        await sessions.update(ids[i], lambda m: {**m, "n": 1})

    return {
        "create": await _rate(callers, ops, create),
        "retrieve": await _rate(callers, ops, retrieve),
        "update": await _rate(callers, ops, update),
    }


async def service_rates(backend: str, workdir: Path, ops: int) -> dict[tuple[str, int], float]:
    """Rates of the embedded service on ``backend``, a fresh store per concurrency level."""
    rates = {}
    for callers in CONCURRENCY:
        path = workdir / f"{backend}-{callers}"
        async with open_session_service(backend=backend, path=str(path)) as sessions:
            for op, rate in (await _service_rates(sessions, callers, ops)).items():
                rates[op, callers] = rate
    return rates


def run(ops: int = 5000, backends: tuple[str, ...] = ("memory", "disk")) -> list[dict[str, Any]]:
    """Measure and return one record per (backend, operation, callers)."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    try:
        floor = raw_diskcache_floor(workdir, ops)
        records = []
        for backend in backends:
            rates = trio.run(service_rates, backend, workdir, ops)
            for (op, callers), rate in rates.items():
                records.append(
                    {
                        "name": f"{backend} {op} x{callers}",
                        "ops_per_s": rate,
                        "floor_name": f"raw diskcache {op}",
                        "floor_ops_per_s": floor[op],
                        "ratio": rate / floor[op],
                        "target": None,
                        "holds": None,
                    }
                )
        return records
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(records: list[dict[str, Any]]) -> None:
    print(f"{'benchmark':<28}{'ops/s':>12}  {'floor':<24}{'ops/s':>12}{'ratio':>8}")
    for r in records:
        print(
            f"{r['name']:<28}{r['ops_per_s']:>12,.0f}  {r['floor_name']:<24}"
            f"{r['floor_ops_per_s']:>12,.0f}{r['ratio']:>8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=5000, help="operations per measurement")
    parser.add_argument("--backends", default="memory,disk", help="comma-separated backends")
    args = parser.parse_args()
    print_table(run(args.ops, tuple(args.backends.split(","))))


if __name__ == "__main__":
    main()
