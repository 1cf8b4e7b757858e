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

Targets at 50 callers: disk create and retrieve >= 1.0 of raw diskcache's sequential set and
get, lmdb create >= 1.0 of raw lmdb's sequential put. ``run.py bench`` also passes the channel
floor that :mod:`bench.actor_calls` measured in the same run; memory is then compared with that
bare request/reply instead of diskcache (it is a dict behind an actor, so that is what it rides
on), with a target of >= 0.45 at 50 callers; and the Erlang DETS floor of :mod:`bench.dets`,
for disk create at 50 callers (>= 2.0).

One caller: for disk and lmdb, each x1 row also says how many microseconds an operation takes
beyond the raw call (``added``: one over the rate, minus the floor's), with a target of at most
30 us for create, update, and a retrieve that misses the manager's read cache (``retrieve-miss
x1``: the sessions of the x1 run, read once each by a freshly started service). These stores
run small calls on the Trio thread (:mod:`workers.stores.thread`); every such call of the run
is timed, and their p99 is reported against the limit the design allows them (tens of
microseconds: 100 us). The bare hop to a store thread and back (a job doing nothing) is
reported as a floor of its own: what each call would cost if it hopped.

    python bench/sessions.py [--ops N] [--backends memory,disk,lmdb,redis] [--callers 1,50]
                             [--redis-url URL]

The redis column needs a Redis at ``--redis-url``; its keys live under a prefix of their own,
deleted at the end. Left out, with a note, when that Redis does not answer and ``--backends``
was not given.
"""

from __future__ import annotations

import argparse
import random
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

from bench import actor_calls, dets
from bench.records import Record, measurement, percentile, throughput
from bench.report import print_table
from workers import open_session_service
from workers.record.codec import decode_session, encode_session
from workers.record.session import Session, new_id
from workers.stores import Store, make_store
from workers.stores.redis import redact_url
from workers.stores.thread import StoreThread

CONCURRENCY = (1, 50)
OPERATIONS = ("create", "retrieve", "update")
METADATA = {"user_id": "user123", "auth_method": "api_key", "theme": "dark", "language": "en"}
BACKENDS = ("memory", "disk", "lmdb", "redis")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: The issue's targets against the raw floor, by (backend, operation), at TARGET_CALLERS.
TARGETS = {("disk", "create"): 1.0, ("disk", "retrieve"): 1.0, ("lmdb", "create"): 1.0}
#: Memory's target against the channel floor, for every operation, at TARGET_CALLERS.
CHANNEL_TARGET = 0.45
#: Disk create's target against Erlang DETS (bench.dets), at TARGET_CALLERS.
DETS_TARGET = 2.0
TARGET_CALLERS = 50
#: The stores whose one-caller latency is judged, what they may add to a raw call (us), the
#: operations judged, and the limit for their calls on the Trio thread (p99, us).
LATENCY_BACKENDS = ("disk", "lmdb")
ADDED_LIMIT_US = 30.0
ADDED_OPERATIONS = ("create", "update", "retrieve-miss")
NOW_CALL_LIMIT_US = 100.0
#: Round trips timed for the hop floor.
HOPS = 5000
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


async def _service_rates(
    sessions: Any, callers: int, ops: int
) -> tuple[dict[str, float], list[str]]:
    ids: list[str] = [""] * ops

    async def create(i: int) -> None:
        ids[i] = await sessions.create(METADATA)

    async def retrieve(i: int) -> None:
        await sessions.retrieve(ids[i])

    async def update(i: int) -> None:
        await sessions.update(ids[i], lambda m: {**m, "n": 1})

    rates = {
        "create": await callers_rate(callers, ops, create),
        "retrieve": await callers_rate(callers, ops, retrieve),
        "update": await callers_rate(callers, ops, update),
    }
    return rates, ids


def store_options(backend: str, setup: Setup, callers: int) -> dict[str, Any]:
    """A fresh, empty store for one concurrency level."""
    if backend == "redis":
        return {"url": setup.redis_url, "prefix": f"{setup.prefix}service-{callers}:"}
    return {"path": str(setup.workdir / f"{backend}-{callers}")}


@dataclass
class ServiceRun:
    """What :func:`service_rates` measured on one backend."""

    #: Operations per second by (operation, callers); ``retrieve-miss`` at one caller only.
    rates: dict[tuple[str, int], float]
    #: Seconds taken by each call the store ran on the Trio thread (disk, lmdb).
    now_calls: list[float]


async def service_rates(backend: str, setup: Setup, concurrency: Sequence[int]) -> ServiceRun:
    """Rates of the embedded service on ``backend``, a fresh store per concurrency level."""
    run = ServiceRun({}, [])
    for callers in concurrency:
        store = make_store(backend, **store_options(backend, setup, callers))
        guard = getattr(store, "stall_guard", None)
        if guard is not None:
            guard.record = run.now_calls.append
        async with open_session_service(store=store) as sessions:
            rates, ids = await _service_rates(sessions, callers, setup.ops)
        for op, rate in rates.items():
            run.rates[op, callers] = rate
        if callers == 1 and backend in LATENCY_BACKENDS:
            # A freshly started service has nothing cached: each first read is a miss.
            run.rates["retrieve-miss", 1] = await _miss_rate(store, ids)
        if guard is not None:
            guard.record = None
    return run


async def _miss_rate(store: Store, ids: list[str]) -> float:
    """Retrieves per second, by one caller, of every id once, from a freshly started service
    over ``store``: nothing is in its cache, so each read loads its session."""
    order = random.sample(ids, len(ids))
    async with open_session_service(store=store) as sessions:
        return await callers_rate(1, len(order), lambda i: sessions.retrieve(order[i]))


def hop_latency_us(hops: int = HOPS) -> float:
    """Microseconds of a round trip to a store's thread and back, for a job doing nothing."""

    async def measure() -> float:
        thread = StoreThread("bench hop")
        try:
            for _ in range(hops // 10):  # warm up
                await thread.run(_nothing)
            start = time.perf_counter()
            for _ in range(hops):
                await thread.run(_nothing)
            return (time.perf_counter() - start) / hops * 1e6
        finally:
            thread.stop()

    return trio.run(measure)


def _nothing() -> None:
    pass


def latency_records(backend: str, run: ServiceRun, records: Sequence[Record]) -> list[Record]:
    """The one-caller judgements of ``backend``: added microseconds, and the p99 of its calls
    on the Trio thread (from the rows of ``records``)."""
    out = []
    by_name = {r["name"]: r for r in records}
    for op in ADDED_OPERATIONS:
        row = by_name.get(f"{backend} {op} x1")
        if row is not None:
            out.append(
                measurement(
                    f"{backend} {op} x1 added latency",
                    row["added_us"],
                    "us",
                    "limit",
                    ADDED_LIMIT_US,
                    target=1.0,
                )
            )
    if run.now_calls:
        p99 = percentile(sorted(run.now_calls), 0.99) * 1e6
        out.append(
            measurement(
                f"{backend} calls on the Trio thread p99",
                p99,
                "us",
                "limit",
                NOW_CALL_LIMIT_US,
                target=1.0,
            )
        )
    return out


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
    dets_floor: float | None = None,
) -> list[Record]:
    """Measure and return one record per (backend, operation, callers), and the judgements.

    ``channel_floor``, the bare channel request/reply rate by number of callers (it must have
    every level in ``concurrency``), makes memory's floor that instead of raw diskcache;
    ``dets_floor`` (Erlang DETS inserts per second) adds disk create x50 against it.
    """
    setup = Setup(
        workdir=Path(tempfile.mkdtemp(prefix="bench-sessions-")),
        ops=ops,
        redis_url=redis_url,
        prefix=f"bench-sessions:{uuid.uuid4().hex[:12]}:",
    )
    floors: dict[str, dict[str, float]] = {}  # by floor name: each is measured once
    try:
        hop = hop_latency_us()
        records = [measurement("store thread hop (a job doing nothing)", hop, "us", "-", hop)]
        for backend in backends:
            on_channel = backend == "memory" and channel_floor is not None
            floor_name, measure_floor = FLOORS[backend]
            if not on_channel and floor_name not in floors:
                floors[floor_name] = measure_floor(setup)
            measured = trio.run(service_rates, backend, setup, concurrency)
            mine = []
            for (op, callers), rate in measured.rates.items():
                at_target = callers == TARGET_CALLERS
                if on_channel:
                    floor = (actor_calls.floor_name(callers), channel_floor[callers])
                    target = CHANNEL_TARGET if at_target else None
                else:
                    raw_op = "retrieve" if op == "retrieve-miss" else op
                    floor = (f"{floor_name} {raw_op}", floors[floor_name][raw_op])
                    target = TARGETS.get((backend, op)) if at_target else None
                name = f"{backend} {op} x{callers}"
                mine.append(throughput(name, rate, *floor, target, added_us=callers == 1))
                if (backend, op, at_target) == ("disk", "create", True) and dets_floor:
                    mine.append(throughput(name, rate, dets.FLOOR, dets_floor, DETS_TARGET))
            records += mine
            if backend in LATENCY_BACKENDS:
                records += latency_records(backend, measured, mine)
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
