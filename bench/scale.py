"""Scale: the session service with up to 1,000,000 sessions, against the issue's targets.

    python -m bench.scale [--sessions N] [--quick] [--backends disk,lmdb,memory] [--json]

Every figure comes from a fresh child process of its own (``python -m bench.scale --child``), so
that a memory figure is that process's alone and nothing is warm that should not be. Data lives
in a ``tempfile.mkdtemp()`` directory, deleted at the end. Sessions are the records of
:func:`record`: a 32-hex-digit id derived from the session's index (so a child can name any
session without holding a list of a million ids), a one-hour timeout and four metadata keys
(``user_id`` differs per session, the other three values repeat), canonicalised as the service
stores them.

1. **Open and serve (disk, lmdb).** A child fills a store with N sessions through the store's
   own ``commit``, 10,000 ``Put`` a transaction, in random id order as creates would arrive.
   Then a fresh child times ``open_session_service`` until it is ready ("open", limit 1 s), and
   serves a workload for a few seconds: 50 callers, each looping over a retrieve (90%), an
   update (5%) of a random session of the whole key space, or a create (5%). What is counted
   is the serving process's resident memory, every kind of it: ``VmHWM`` from
   ``/proc/self/status`` at the end, the kernel's high-water mark of ``VmRSS`` over the whole
   life of the process (opening and serving), judged against 150 MB. Next to it, the largest
   ``VmRSS`` sampled every 50 ms while serving and how it splits into ``RssAnon`` (the
   process's own heap: Python objects, SQLite's page cache, LMDB's write buffers) and
   ``RssFile`` (pages of files mapped into the process: shared libraries, about 11 MB, and
   LMDB's data file). LMDB reads everything through a shared mapping of its data file, so
   every page it reads is in ``RssFile`` until the store drops its mappings (see
   :mod:`workers.stores.lmdb`, "Memory"); those pages stay in the kernel's page cache, which no
   process's RSS counts, as with any file read through ``read(2)`` (SQLite's, for one). For
   lmdb the workload is served again with ``unmap_every=None`` (every page left mapped), to
   show what the bound costs in operations per second.
2. **Memory store vs a plain dict.** One child puts N records in a plain ``dict`` (id ->
   :class:`~workers.Session`, the very objects :func:`record` builds); another imports
   the same N records into a memory-store service (``import_sessions``, 10,000 a call). Each
   reports the growth of its ``RssAnon`` (after ``gc.collect()``) from just before the records
   are built: the records themselves count on both sides, so the ratio is (records + the
   store's structures) / (records + a dict). Target: at most 2.0.
3. **Sweep.** On the store that served (disk, lmdb) or a freshly filled one (memory), a child
   opens the service with an injected wall clock, creates 100 live sessions that never expire,
   moves the clock two hours on (so the N filled sessions, and everything made while serving,
   are expired) and runs ``cleanup_expired`` (what the cleanup actor runs) while 8 callers
   retrieve live sessions in a loop. Reported: the retrieve latency p99 (limit 10 ms) and p50
   while the sweep runs, and the sweep's rate next to that store's create rate, all with the
   service's defaults (``sweep_batch`` 100). Each fill batch shares one timestamp, so 10,000
   sessions expire at the same millisecond, as after a restore. The live sessions must all be
   there at the end, or the run fails.
4. **Cost curve.** For each backend, a child per store size (10k, 100k, N) measures retrieve
   (random sessions of the whole key space, after a warm-up) and create rates with 1 and 50
   callers, each for a few seconds (the deferred access-time writes come once a second); each
   is reported next to the same rate at 10k, so a ratio near 1 means the cost does not grow
   with the store.
5. **Reads of N sessions against the raw library (disk, lmdb).** On the same N-session store,
   once no service holds it, a child reads random sessions with the raw library for a few
   seconds (diskcache ``get``, or an LMDB read transaction's ``get``, and msgpack decoding),
   one at a time: the floor of the service's retrieve with 1 and 50 callers over the same
   key space (target >= 0.5). Nearly every such read misses the service's read cache, and
   most write an access time (the stored one is older than the deferral allows).

Linux only: memory is read from ``/proc/self/status``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import diskcache
import lmdb
import trio

from bench.records import Record, measurement, percentile, throughput
from workers import open_session_service
from workers.record.codec import canonical_metadata, decode_session
from workers.record.session import Session
from workers.stores import make_store
from workers.stores.base import Put, Store
from workers.stores.disk import _DEFAULT_SETTINGS, _PINNED_SETTINGS, SessionDisk

#: What a raw diskcache opened on a disk store passes: the store's own settings (diskcache
#: writes the settings it is given, and its defaults would drop the expiry index).
RAW_DISKCACHE_SETTINGS = {**_DEFAULT_SETTINGS, **_PINNED_SETTINGS}

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("disk", "lmdb", "memory")
#: Idle timeout of every filled session: one hour.
TTL_MS = 3_600_000
#: Sessions a fill commits per transaction.
FILL_BATCH = 10_000
#: Callers of the serving workload and of the x50 rates.
CALLERS = 50
#: Live sessions retrieved while a sweep runs, and the callers retrieving them.
LIVE = 100
SWEEP_READERS = 8
#: Limits and targets of the issue.
OPEN_LIMIT_S = 1.0
RSS_LIMIT_MB = 150.0
MEMORY_RATIO = 2.0
SWEEP_P99_LIMIT_MS = 10.0
#: Retrieve over N sessions against the raw library's get on the same store.
RAW_GET_TARGET = 0.5


# --- the records ---


def session_id(i: int) -> str:
    """The id of session number ``i``: 32 hex digits, as random as the service's own."""
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).hexdigest()


def record(i: int, now_ms: int) -> Session:
    """Session number ``i`` as the service would store it (canonical metadata)."""
    metadata = canonical_metadata(
        {"user_id": f"user{i}", "auth_method": "api_key", "theme": "dark", "language": "en"},
        1 << 16,
    )
    return Session(session_id(i), now_ms, now_ms, TTL_MS, metadata, 1)


def label(n: int) -> str:
    """10000 -> "10k", 1000000 -> "1M"."""
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def status() -> dict[str, float]:
    """Memory figures of this process from /proc/self/status, in MB."""
    figures = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                figures[key] = int(value.split()[0]) / 1024
    return figures


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _fill_store(store: Store, n: int) -> None:
    """Commit sessions 0..n-1 to an open store, FILL_BATCH a transaction."""
    for start in range(0, n, FILL_BATCH):
        now = _now_ms()
        await store.commit(
            [Put(record(i, now), None) for i in range(start, min(n, start + FILL_BATCH))]
        )


async def _open_filled(backend: str, path: str | None, n: int) -> dict[str, Any]:
    """Options for open_session_service over N sessions: the disk or lmdb store at ``path``, or a
    memory store filled here (it lives in this process only)."""
    if backend != "memory":
        assert path is not None
        return {"backend": backend, "path": path}
    from workers.stores.memory import MemoryStore

    store = MemoryStore()
    await store.open()
    await _fill_store(store, n)
    await store.close()  # the service opens it again: a memory store keeps its sessions
    return {"store": store}


# --- the children: each runs in a fresh process and returns a JSON-able dict ---


async def child_fill(backend: str, path: str, n: int) -> dict[str, Any]:
    store = make_store(backend, path=path)
    await store.open()
    t0 = time.perf_counter()
    try:
        await _fill_store(store, n)
    finally:
        await store.close()
    return {"seconds": time.perf_counter() - t0}


async def _loop_until(
    deadline: float, op: Callable[[random.Random], Awaitable[None]], seed: int
) -> int:
    rng = random.Random(seed)
    done = 0
    while time.perf_counter() < deadline:
        await op(rng)
        done += 1
    return done


async def child_serve(
    backend: str, path: str, n: int, seconds: float, **options: Any
) -> dict[str, Any]:
    """Open the service over the filled store, then serve the mixed workload; see the docstring."""
    before = status()
    t0 = time.perf_counter()
    async with open_session_service(backend=backend, path=path, **options) as sessions:
        opened = time.perf_counter() - t0
        after_open = status()

        async def op(rng: random.Random) -> None:
            r = rng.random()
            if r < 0.90:
                await sessions.retrieve(session_id(rng.randrange(n)))
            elif r < 0.95:
                await sessions.update(session_id(rng.randrange(n)), lambda m: {**m, "n": 1})
            else:
                await sessions.create({"user_id": "new", "auth_method": "api_key"})

        ops = 0
        peak: dict[str, float] = {}
        deadline = time.perf_counter() + seconds

        async def caller(seed: int) -> None:
            nonlocal ops
            done = await _loop_until(deadline, op, seed)  # not `ops += await`: that reads ops first
            ops += done

        async def sampler() -> None:
            nonlocal peak
            while time.perf_counter() < deadline:
                figures = status()
                if figures["VmRSS"] > peak.get("VmRSS", 0):
                    peak = figures
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            for c in range(CALLERS):
                nursery.start_soon(caller, c)
            nursery.start_soon(sampler)
        end = status()
    return {
        "open_s": opened,
        "ops_per_s": ops / seconds,
        "before": before,
        "after_open": after_open,
        "peak": peak,
        "hwm": end["VmHWM"],
    }


async def _rate(
    callers: int, seconds: float, op: Callable[[random.Random], Awaitable[Any]]
) -> float:
    """Operations per second of ``callers`` concurrent loops over ``op`` for ``seconds``.

    Timed, not counted: the deferred access-time writes of disk and lmdb come once a second,
    so a window of a fixed number of operations may or may not hold one.
    """
    deadline = time.perf_counter() + seconds
    done = 0

    async def caller(c: int) -> None:
        nonlocal done
        finished = await _loop_until(deadline, op, c)
        done += finished

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for c in range(callers):
            nursery.start_soon(caller, c)
    return done / (time.perf_counter() - t0)


async def child_rates(backend: str, path: str | None, n: int, seconds: float) -> dict[str, float]:
    """Retrieve and create rates, x1 and x50, on a store holding N sessions."""
    options = await _open_filled(backend, path, n)
    rates: dict[str, float] = {}
    async with open_session_service(**options) as sessions:

        async def retrieve(rng: random.Random) -> None:
            await sessions.retrieve(session_id(rng.randrange(n)))

        async def create(rng: random.Random) -> None:
            await sessions.create({"user_id": "new", "auth_method": "api_key"})

        # Warm-up: a long-running service has in its cache what it can cache.
        await _rate(CALLERS, seconds, retrieve)
        for callers in (1, CALLERS):
            rates[f"retrieve x{callers}"] = await _rate(callers, seconds, retrieve)
        for callers in (1, CALLERS):
            rates[f"create x{callers}"] = await _rate(callers, seconds, create)
    return rates


async def child_sweep(backend: str, path: str | None, n: int, **options: Any) -> dict[str, Any]:
    """Expire every stored session by moving the clock, then sweep while live ones are read."""
    offset = 0.0

    def clock() -> float:
        return time.time() + offset

    latencies: list[float] = []
    async with open_session_service(
        **await _open_filled(backend, path, n), **options, clock=clock, cleanup_interval=1e9
    ) as sessions:
        live = [await sessions.create({"user_id": "live"}, ttl=None) for _ in range(LIVE)]
        offset = 2 * TTL_MS / 1000
        swept = 0
        sweep_s = 0.0
        done = trio.Event()

        async def sweeper() -> None:
            nonlocal swept, sweep_s
            t0 = time.perf_counter()
            swept = await sessions.cleanup_expired()
            sweep_s = time.perf_counter() - t0
            done.set()

        async def reader(seed: int) -> None:
            rng = random.Random(seed)
            while not done.is_set():
                t0 = time.perf_counter()
                await sessions.retrieve(rng.choice(live))
                latencies.append(time.perf_counter() - t0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweeper)
            for r in range(SWEEP_READERS):
                nursery.start_soon(reader, r)
        left = await sessions.count()
    latencies.sort()
    return {
        "swept": swept,
        "seconds": sweep_s,
        "left": left,
        "retrieves": len(latencies),
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": latencies[-1] * 1000,
    }


async def child_memory(kind: str, n: int) -> dict[str, float]:
    """RssAnon growth of N records in a plain dict, or imported into a memory-store service."""
    if kind == "dict":
        gc.collect()
        base = status()["RssAnon"]
        plain: dict[str, Session] = {}
        for i in range(n):
            s = record(i, _now_ms())
            plain[s.id] = s
        gc.collect()
        return {"mb": status()["RssAnon"] - base, "held": len(plain)}
    async with open_session_service(backend="memory") as sessions:
        gc.collect()
        base = status()["RssAnon"]
        for start in range(0, n, FILL_BATCH):
            await sessions.import_sessions(
                [record(i, _now_ms()) for i in range(start, min(n, start + FILL_BATCH))]
            )
        gc.collect()
        grown = status()["RssAnon"] - base
        return {"mb": grown, "held": await sessions.count()}


async def child_raw_get(backend: str, path: str, n: int, seconds: float) -> dict[str, float]:
    """Reads per second of random sessions with the raw library on the store at ``path``."""
    rng = random.Random(7)
    if backend == "disk":
        cache = diskcache.Cache(path, disk=SessionDisk, **RAW_DISKCACHE_SETTINGS)

        def get(sid: str) -> object:
            return decode_session(cache.get(sid))

        close = cache.close
    else:
        env = lmdb.open(path, max_dbs=3, readahead=False)
        sessions = env.open_db(b"sessions", create=False)

        def get(sid: str) -> object:
            with env.begin(db=sessions) as txn:
                return decode_session(txn.get(sid.encode()))

        close = env.close
    try:
        for _ in range(2000):  # warm up, as the service's rates do
            get(session_id(rng.randrange(n)))
        done = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(100):
                get(session_id(rng.randrange(n)))
            done += 100
        return {"ops_per_s": done / (time.perf_counter() - start)}
    finally:
        close()


CHILDREN: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
    "fill": child_fill,
    "serve": child_serve,
    "rates": child_rates,
    "sweep": child_sweep,
    "memory": child_memory,
    "raw_get": child_raw_get,
}


def in_child(task: str, **kwargs: Any) -> dict[str, Any]:
    """Run one child task in a fresh interpreter and return its result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--child", json.dumps({"task": task, **kwargs})],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        check=True,
        text=True,
    )
    return json.loads(proc.stdout.splitlines()[-1])


def _child_main(spec: str) -> None:
    args = json.loads(spec)
    task = CHILDREN[args.pop("task")]
    print(json.dumps(trio.run(functools.partial(task, **args))))


# --- the run ---


def sizes(sessions: int) -> list[int]:
    """The store sizes of the cost curve: 10k, 100k ... up to ``sessions``."""
    out = [s for s in (10_000, 100_000) if s < sessions]
    return [*out, sessions]


def _progress(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def run(
    sessions: int = 1_000_000, quick: bool = False, backends: tuple[str, ...] = BACKENDS
) -> list[Record]:
    """Measure everything in the module docstring; one record per figure."""
    if quick:
        sessions = min(sessions, 100_000)
    n, big = sessions, label(sessions)
    rate_s = 1.5 if quick else 3.0
    serve_s = 3.0 if quick else 5.0
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    records: list[Record] = []
    try:
        for backend in backends:
            rates: dict[int, dict[str, float]] = {}
            for size in sizes(n):
                path = None
                if backend != "memory":
                    path = str(workdir / f"{backend}-{label(size)}")
                    filled = in_child("fill", backend=backend, path=path, n=size)
                    _progress(f"{backend}: filled {size:,} in {filled['seconds']:.1f} s")
                if size == n and path is not None:
                    served = in_child("serve", backend=backend, path=path, n=n, seconds=serve_s)
                    _progress(f"{backend}: served {served}")
                    records += _serve_records(backend, big, served)
                    if backend == "lmdb":
                        records += _mapped_records(big, path, n, serve_s, served)
                rates[size] = in_child("rates", backend=backend, path=path, n=size, seconds=rate_s)
                _progress(f"{backend} @{label(size)}: {rates[size]}")
                if size == n and path is not None:
                    raw = in_child("raw_get", backend=backend, path=path, n=n, seconds=rate_s)
                    _progress(f"{backend} raw get @{big}: {raw}")
                    records += _raw_get_records(backend, big, rates[n], raw["ops_per_s"])
                if size == n:
                    records += _sweeps(backend, big, path, n, rates[n])
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)
            records += _curve_records(backend, rates)
            if backend == "memory":
                store = in_child("memory", kind="store", n=n)
                plain = in_child("memory", kind="dict", n=n)
                _progress(f"memory: store {store}, dict {plain}")
                records.append(
                    measurement(
                        f"memory store {big}",
                        store["mb"],
                        "MB",
                        "plain dict",
                        plain["mb"],
                        target=MEMORY_RATIO,
                    )
                )
        return records
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _mapped_records(
    big: str, path: str, n: int, seconds: float, served: dict[str, Any]
) -> list[Record]:
    """What lmdb's bounded mapping costs: the same serving with every page left mapped."""
    mapped = in_child("serve", backend="lmdb", path=path, n=n, seconds=seconds, unmap_every=None)
    _progress(f"lmdb: served with unmap_every=None {mapped}")
    return [
        throughput(
            f"lmdb serve {big} ops/s",
            served["ops_per_s"],
            "same, unmap_every=None",
            mapped["ops_per_s"],
        ),
        measurement(
            f"lmdb serve {big} VmHWM unmap_every=None",
            mapped["hwm"],
            "MB",
            "limit",
            RSS_LIMIT_MB,
        ),
    ]


def _raw_get_records(backend: str, big: str, rates: dict[str, float], raw: float) -> list[Record]:
    library = "diskcache" if backend == "disk" else "lmdb"
    return [
        throughput(
            f"{backend} retrieve x{callers} @{big}",
            rates[f"retrieve x{callers}"],
            f"raw {library} get @{big}",
            raw,
            RAW_GET_TARGET,
        )
        for callers in (1, CALLERS)
    ]


def _sweeps(
    backend: str, big: str, path: str | None, n: int, rates: dict[str, float]
) -> list[Record]:
    """The sweep of every stored session, with the service's defaults."""
    swept = in_child("sweep", backend=backend, path=path, n=n)
    _progress(f"{backend}: swept {swept}")
    if swept["left"] != LIVE:
        raise RuntimeError(f"{backend}: {swept['left']} sessions left, not {LIVE}")
    return _sweep_records(backend, big, swept, rates)


def _serve_records(backend: str, big: str, served: dict[str, Any]) -> list[Record]:
    peak = served["peak"]
    return [
        measurement(
            f"{backend} open {big}", served["open_s"], "s", "limit", OPEN_LIMIT_S, target=1.0
        ),
        measurement(
            f"{backend} serve {big} VmHWM", served["hwm"], "MB", "limit", RSS_LIMIT_MB, target=1.0
        ),
        measurement(f"{backend} serve {big} VmRSS max", peak["VmRSS"], "MB", "limit", RSS_LIMIT_MB),
        measurement(
            f"{backend} serve {big} RssAnon", peak["RssAnon"], "MB", "VmRSS", peak["VmRSS"]
        ),
        measurement(
            f"{backend} serve {big} RssFile", peak["RssFile"], "MB", "VmRSS", peak["VmRSS"]
        ),
        measurement(
            f"{backend} VmRSS after open {big}",
            served["after_open"]["VmRSS"],
            "MB",
            "before open",
            served["before"]["VmRSS"],
        ),
    ]


def _sweep_records(
    backend: str, big: str, swept: dict[str, Any], rates: dict[str, float]
) -> list[Record]:
    return [
        measurement(
            f"{backend} sweep {big} retrieve p99",
            swept["p99_ms"],
            "ms",
            "limit",
            SWEEP_P99_LIMIT_MS,
            target=1.0,
        ),
        measurement(
            f"{backend} sweep {big} retrieve p50",
            swept["p50_ms"],
            "ms",
            "limit",
            SWEEP_P99_LIMIT_MS,
        ),
        throughput(
            f"{backend} sweep {big} sessions/s",
            swept["swept"] / swept["seconds"],
            f"{backend} create @{big} x{CALLERS}",
            rates[f"create x{CALLERS}"],
        ),
    ]


def _curve_records(backend: str, rates: dict[int, dict[str, float]]) -> list[Record]:
    smallest = min(rates)
    records = []
    for op in ("retrieve", "create"):
        for callers in (1, CALLERS):
            key = f"{op} x{callers}"
            for size in sorted(rates):
                if size != smallest:
                    records.append(
                        throughput(
                            f"{backend} {key} @{label(size)}",
                            rates[size][key],
                            f"{backend} {key} @{label(smallest)}",
                            rates[smallest][key],
                        )
                    )
    return records


def print_table(records: list[Record]) -> None:
    print(f"{'benchmark':<44}{'value':>14}  {'against':<26}{'value':>14}{'ratio':>7}  target")
    for r in records:
        if r["ops_per_s"] is None:
            value = f"{r['value']:,.2f} {r['unit']}"
            floor = f"{r['floor_value']:,.2f} {r['unit']}"
        else:
            value = f"{r['ops_per_s']:,.0f}/s"
            floor = f"{r['floor_ops_per_s']:,.0f}/s"
        target = ""
        if r["target"] is not None:
            sign = "<=" if r.get("better") == "lower" else ">="
            target = f"{sign} {r['target']:.2f} {'holds' if r['holds'] else 'FAILS'}"
        name, against = r["name"], r["floor_name"]
        print(f"{name:<44}{value:>14}  {against:<26}{floor:>14}{r['ratio']:>7.2f}  {target}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000, help="the largest store")
    parser.add_argument("--quick", action="store_true", help="at most 100,000 sessions, fewer ops")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    args = parser.parse_args()
    backends = tuple(args.backends.split(","))
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    records = run(args.sessions, args.quick, backends)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print_table(records)


if __name__ == "__main__":
    main()
