"""Session service throughput next to its floor, measured in the same run.

For each backend and each of create / retrieve / update, the service is driven by 1 and by 50
concurrent callers (or the counts given), and the rate is printed next to that backend's floor:
its bare library doing the same work with the same msgpack records, one operation at a time,
with no actor and no validation. The ratio (service / floor) is what to read; the absolute
figures depend on the machine.

=========  =========================================================================
backend    floor
=========  =========================================================================
memory     raw diskcache: set / get / get+set (the seed compares ets against it too)
disk       raw diskcache, as above
lmdb       raw lmdb: one put per write transaction, get in a read transaction, get+put
           in one write transaction; ``sync=False`` like the store's default durability
redis      raw coredis under Trio: SET / GET / GET+SET, one command at a time
=========  =========================================================================

Targets (the issue's, at 50 callers): disk create and retrieve >= 1.0 of raw diskcache's
sequential set and get. ``run.py bench`` also passes the channel floor that
:mod:`bench.actor_calls` measured in the same run; memory is then compared with that bare
request/reply instead of diskcache (it is a dict behind an actor, so that is what it rides on),
with a target of >= 0.6 at 50 callers.

    python bench/sessions.py [--ops N] [--backends memory,disk,lmdb,redis] [--callers 1,50]
                             [--redis-url URL]

The redis column needs a Redis at ``--redis-url``; its keys live under a prefix of their own,
deleted at the end. Left out, with a note, when that Redis does not answer and ``--backends``
was not given.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import coredis
import diskcache
import lmdb
import trio

if __package__ in (None, ""):  # run as ``python bench/sessions.py``: import from this repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import actor_calls
from bench.records import Record, throughput
from bench.report import print_table
from workers import open_session_service
from workers.record.codec import decode_session, encode_session
from workers.record.session import Session, new_id
from workers.stores.redis import redact_url

CONCURRENCY = (1, 50)
OPERATIONS = ("create", "retrieve", "update")
METADATA = {"user_id": "user123", "auth_method": "api_key", "theme": "dark", "language": "en"}
BACKENDS = ("memory", "disk", "lmdb", "redis")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: The issue's targets against the raw floor, by (backend, operation), at TARGET_CALLERS.
TARGETS = {("disk", "create"): 1.0, ("disk", "retrieve"): 1.0}
#: Memory's target against the channel floor, for every operation, at TARGET_CALLERS.
CHANNEL_TARGET = 0.6
TARGET_CALLERS = 50
#: The access time every record gets (read once: a floor should not time the clock).
NOW_MS = int(time.time() * 1000)


@dataclass(frozen=True)
class Setup:
    """Where one run keeps its data: a scratch directory and a Redis key prefix of its own."""

    workdir: Path
    ops: int
    redis_url: str
    prefix: str


# --- records, as the stores write them ---


def new_record(sid: str) -> bytes:
    return encode_session(Session(sid, NOW_MS, NOW_MS, 3_600_000, METADATA, 1))


def updated_record(data: bytes) -> bytes:
    """What an update writes: the record read, with new metadata, access time and version."""
    s = decode_session(data)
    changed = replace(s, last_accessed=NOW_MS, metadata={**s.metadata, "n": 1}, version=2)
    return encode_session(changed)


def timed(ids: list[str], step: Callable[[str], object]) -> float:
    t0 = time.perf_counter()
    for sid in ids:
        step(sid)
    return len(ids) / (time.perf_counter() - t0)


async def timed_async(ids: list[str], step: Callable[[str], Awaitable[object]]) -> float:
    t0 = time.perf_counter()
    for sid in ids:
        await step(sid)
    return len(ids) / (time.perf_counter() - t0)


# --- floors: each returns {"create": ops/s, "retrieve": ops/s, "update": ops/s} ---


def raw_diskcache_floor(setup: Setup) -> dict[str, float]:
    """Sequential set / get / read-modify-write of msgpack records on a bare diskcache."""
    cache = diskcache.Cache(
        str(setup.workdir / "raw-diskcache"), eviction_policy="none", size_limit=2**62
    )
    ids = [new_id() for _ in range(setup.ops)]
    try:
        return {
            "create": timed(ids, lambda sid: cache.set(sid, new_record(sid))),
            "retrieve": timed(ids, lambda sid: decode_session(cache.get(sid))),
            "update": timed(ids, lambda sid: cache.set(sid, updated_record(cache.get(sid)))),
        }
    finally:
        cache.close()


def raw_lmdb_floor(setup: Setup) -> dict[str, float]:
    """The same on a bare LMDB environment, synced as the store's default ("process")."""
    env = lmdb.open(
        str(setup.workdir / "raw-lmdb"),
        map_size=1 << 30,
        sync=False,
        metasync=False,
        writemap=False,
        readahead=False,
    )
    ids = [new_id() for _ in range(setup.ops)]

    def create(sid: str) -> None:
        with env.begin(write=True) as txn:
            txn.put(sid.encode(), new_record(sid))

    def retrieve(sid: str) -> None:
        with env.begin() as txn:
            decode_session(txn.get(sid.encode()))

    def update(sid: str) -> None:
        with env.begin(write=True) as txn:
            txn.put(sid.encode(), updated_record(txn.get(sid.encode())))

    try:
        return {
            "create": timed(ids, create),
            "retrieve": timed(ids, retrieve),
            "update": timed(ids, update),
        }
    finally:
        env.close()


def raw_coredis_floor(setup: Setup) -> dict[str, float]:
    """SET / GET / GET+SET of the same records with a bare coredis client under Trio."""

    keys = [f"{setup.prefix}raw:{new_id()}" for _ in range(setup.ops)]

    async def measure() -> dict[str, float]:
        async with coredis.Redis.from_url(setup.redis_url) as client:

            async def create(key: str) -> None:
                await client.set(key, new_record(key))

            async def retrieve(key: str) -> None:
                decode_session(await client.get(key))

            async def update(key: str) -> None:
                await client.set(key, updated_record(await client.get(key)))

            return {
                "create": await timed_async(keys, create),
                "retrieve": await timed_async(keys, retrieve),
                "update": await timed_async(keys, update),
            }

    return trio.run(measure)


#: The floor each backend is compared with: (its name in the table, the function measuring it).
FLOORS: dict[str, tuple[str, Callable[[Setup], dict[str, float]]]] = {
    "memory": ("raw diskcache", raw_diskcache_floor),
    "disk": ("raw diskcache", raw_diskcache_floor),
    "lmdb": ("raw lmdb", raw_lmdb_floor),
    "redis": ("raw coredis", raw_coredis_floor),
}


# --- the service ---


async def callers_rate(callers: int, ops: int, op: Callable[[int], Awaitable[Any]]) -> float:
    """Operations per second of ``op(i)`` for ``ops`` values of i, from ``callers`` tasks."""
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
        "create": await callers_rate(callers, ops, create),
        "retrieve": await callers_rate(callers, ops, retrieve),
        "update": await callers_rate(callers, ops, update),
    }


def store_options(backend: str, setup: Setup, callers: int) -> dict[str, Any]:
    """A fresh, empty store for one concurrency level."""
    if backend == "redis":
        return {"url": setup.redis_url, "prefix": f"{setup.prefix}service-{callers}:"}
    return {"path": str(setup.workdir / f"{backend}-{callers}")}


async def service_rates(
    backend: str, setup: Setup, concurrency: Sequence[int]
) -> dict[tuple[str, int], float]:
    """Rates of the embedded service on ``backend``, a fresh store per concurrency level."""
    rates = {}
    for callers in concurrency:
        options = store_options(backend, setup, callers)
        async with open_session_service(backend=backend, **options) as sessions:
            for op, rate in (await _service_rates(sessions, callers, setup.ops)).items():
                rates[op, callers] = rate
    return rates


# --- the run ---


async def delete_prefix(url: str, prefix: str) -> None:
    async with coredis.Redis.from_url(url) as client:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        for i in range(0, len(keys), 1000):
            await client.delete(keys[i : i + 1000])


def redis_answers(url: str) -> bool:
    """Whether a Redis answers a PING at ``url`` within 3 seconds."""

    async def ping() -> None:
        with trio.fail_after(3):
            async with coredis.Redis.from_url(url) as client:
                await client.ping()

    try:
        trio.run(ping)
    except Exception:
        return False
    return True


def available_backends(redis_url: str) -> tuple[str, ...]:
    """Every backend, less redis (with a note on stderr) when no Redis answers at ``redis_url``."""
    if redis_answers(redis_url):
        return BACKENDS
    print(f"note: no Redis answers at {redact_url(redis_url)}; leaving out redis", file=sys.stderr)
    return tuple(b for b in BACKENDS if b != "redis")


def run(
    ops: int = 5000,
    backends: Sequence[str] = BACKENDS,
    redis_url: str = DEFAULT_REDIS_URL,
    concurrency: Sequence[int] = CONCURRENCY,
    channel_floor: Mapping[int, float] | None = None,
) -> list[Record]:
    """Measure and return one record per (backend, operation, callers).

    ``channel_floor``, the bare channel request/reply rate by number of callers (it must have
    every level in ``concurrency``), makes memory's floor that instead of raw diskcache.
    """
    setup = Setup(
        workdir=Path(tempfile.mkdtemp(prefix="bench-sessions-")),
        ops=ops,
        redis_url=redis_url,
        prefix=f"bench-sessions:{uuid.uuid4().hex[:12]}:",
    )
    floors: dict[str, dict[str, float]] = {}  # by floor name: each is measured once
    try:
        records = []
        for backend in backends:
            on_channel = backend == "memory" and channel_floor is not None
            floor_name, measure_floor = FLOORS[backend]
            if not on_channel and floor_name not in floors:
                floors[floor_name] = measure_floor(setup)
            rates = trio.run(service_rates, backend, setup, concurrency)
            for (op, callers), rate in rates.items():
                at_target = callers == TARGET_CALLERS
                if on_channel:
                    floor = (actor_calls.floor_name(callers), channel_floor[callers])
                    target = CHANNEL_TARGET if at_target else None
                else:
                    floor = (f"{floor_name} {op}", floors[floor_name][op])
                    target = TARGETS.get((backend, op)) if at_target else None
                records.append(throughput(f"{backend} {op} x{callers}", rate, *floor, target))
        return records
    finally:
        shutil.rmtree(setup.workdir, ignore_errors=True)
        if "redis" in backends:
            trio.run(delete_prefix, setup.redis_url, setup.prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=5000, help="operations per measurement")
    parser.add_argument(
        "--backends", help=f"comma-separated backends (default: {','.join(BACKENDS)})"
    )
    parser.add_argument(
        "--callers", default="1,50", help="comma-separated concurrent caller counts (default 1,50)"
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="Redis for the redis column")
    args = parser.parse_args()
    if args.backends:
        backends = tuple(args.backends.split(","))
        unknown = sorted(set(backends) - set(FLOORS))
        if unknown:
            parser.error(
                f"unknown backends {', '.join(unknown)}; choose from {', '.join(BACKENDS)}"
            )
    else:
        backends = available_backends(args.redis_url)
    callers = tuple(int(n) for n in args.callers.split(","))
    print_table(run(args.ops, backends, args.redis_url, callers))


if __name__ == "__main__":
    main()
