"""The redis store on a real Redis Cluster (3 masters, 3 replicas) and behind a real Sentinel.

The contract suite runs on both too (``store_factories``); this is what a cluster adds: sessions
spread over every master, one round trip per retrieve, URL forms that do not match what answers
refused with the form to use, and a master that refuses writes failing only the operations of
its own buckets. The setups are the run's shared ones (``helpers.redis_cluster``); every test
keeps to a key prefix of its own. No clock fixture: the services wait on Redis's sockets.
"""

from __future__ import annotations

import binascii
import itertools
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import trio
from helpers.redis_cluster import LocalCluster, LocalSentinel, command, data_commands
from helpers.redis_server import unique_prefix

from workers import SessionService, StoreError, open_session_service
from workers.record.session import Session, new_id
from workers.stores.base import Put
from workers.stores.redis import RedisStore, bucket_tags

pytestmark = pytest.mark.slow
pytest_plugins = ["helpers.redis_cluster"]

#: Real seconds: far above what a prompt answer takes, far below a hang.
PROMPT = 30.0


@pytest.fixture
async def service(redis_cluster: LocalCluster) -> AsyncIterator[SessionService]:
    async with open_session_service(
        backend="redis", url=redis_cluster.url, prefix=unique_prefix(), cleanup_interval=1e9
    ) as service:
        yield service


def slot_of(store: RedisStore, session_id: str) -> int:
    """The hash slot of a session's keys on the cluster."""
    return (
        binascii.crc_hqx(bucket_tags(store.buckets)[store.bucket_of(session_id)].encode(), 0)
        % 16384
    )


async def create_many(service: SessionService, n: int, callers: int = 50) -> list[str | Exception]:
    """``n`` creates from ``callers`` concurrent tasks: each one's id, or the error it raised."""
    results: list[str | Exception] = [""] * n

    async def caller(c: int) -> None:
        for i in range(c, n, callers):
            try:
                results[i] = await service.create({"user_id": f"user-{i}", "pad": "x" * 100})
            except Exception as exc:
                results[i] = exc

    async with trio.open_nursery() as nursery:
        for c in range(callers):
            nursery.start_soon(caller, c)
    return results


async def test_sessions_spread_over_every_master(redis_cluster: LocalCluster) -> None:
    prefix = unique_prefix()
    url = redis_cluster.url
    async with open_session_service(backend="redis", url=url, prefix=prefix) as service:
        with trio.fail_after(PROMPT):
            ids = await create_many(service, 10_000)
        assert all(isinstance(sid, str) for sid in ids)
        assert await service.count() == 10_000
    store = RedisStore(url, prefix=prefix)
    held: Counter[int] = Counter()
    for b, tag in enumerate(bucket_tags(store.buckets)):
        master = redis_cluster.master_of_slot(binascii.crc_hqx(tag.encode(), 0) % 16384)
        held[master] += command(master, "ZCARD", f"{prefix}{{{tag}}}ids")
        assert b == 0 or command(master, "EXISTS", f"{prefix}{{{tag}}}mark") == 0
    shares = {port: n / 10_000 for port, n in held.items()}
    print(f"\nshares of 10,000 sessions by master: {sorted(shares.values())}")  # -s shows it
    assert len(shares) == 3 and sum(held.values()) == 10_000
    assert all(0.25 <= share <= 0.42 for share in shares.values()), shares


async def test_a_retrieve_is_one_round_trip(redis_cluster: LocalCluster) -> None:
    ticks = itertools.count()
    base = time.time()

    def clock() -> float:  # a millisecond further at each reading: no clock mark is due
        return base + next(ticks) / 1000

    async with open_session_service(
        backend="redis", url=redis_cluster.url, prefix=unique_prefix(), clock=clock
    ) as service:
        ids = [await service.create({"n": i}) for i in range(20)]
        for sid in ids:  # every master has the scripts loaded (no NOSCRIPT retry below)
            await service.retrieve(sid)
        for port in redis_cluster.ports:
            command(port, "CONFIG", "RESETSTAT")
        for sid in ids:
            before = await service.peek(sid)
            assert (await service.retrieve(sid)).last_accessed > before.last_accessed
        calls = sum((data_commands(port) for port in redis_cluster.masters()), Counter())
    # 20 peeks (an MGET each) and 20 retrieves (one EVALSHA each, refresh included). Redis
    # counts the commands a script runs too: the script's GET, SET and ZADD of each session.
    assert calls == Counter({"mget": 20, "evalsha": 20, "get": 20, "set": 20, "zadd": 20})


async def test_rotate_keeps_a_session_in_its_bucket(service: SessionService) -> None:
    store = RedisStore("redis+cluster://h:1")
    for _ in range(20):
        sid = await service.create({"user_id": "u"})
        new = await service.rotate(sid)
        assert store.bucket_of(new) == store.bucket_of(sid) and new != sid
        assert (await service.peek(new)).metadata == {"user_id": "u"}


async def test_a_master_that_refuses_writes_fails_only_its_own_buckets(
    redis_cluster: LocalCluster, service: SessionService
) -> None:
    layout = RedisStore("redis+cluster://h:1")
    before = [sid for sid in await create_many(service, 200) if isinstance(sid, str)]
    assert len(before) == 200
    full = redis_cluster.masters()[0]

    def on_full(sid: str) -> bool:
        return redis_cluster.master_of_slot(slot_of(layout, sid)) == full

    command(full, "CONFIG", "SET", "maxmemory", "1")  # every write there: OOM
    try:
        with trio.fail_after(PROMPT):
            # 60 creates at once make batches over every master; only the full one's fail.
            results = await create_many(service, 60, callers=60)
            created = [sid for sid in results if isinstance(sid, str)]
            failed = [exc for exc in results if not isinstance(exc, str)]
            assert created and failed
            assert all(isinstance(exc, StoreError) and "full" in str(exc) for exc in failed)
            assert not any(on_full(sid) for sid in created)
            for sid in created:  # reported written: written
                assert (await service.peek(sid)).metadata["pad"] == "x" * 100

            # Reads of the full master's sessions are still served, and counted.
            stuck = [sid for sid in before if on_full(sid)][:5]
            for sid in stuck:
                assert (await service.retrieve(sid)).id == sid
                await service.touch(sid)
                await service.peek(sid)
            assert (await service.stats())["store_warnings"] == 2 * len(stuck)
            with pytest.raises(StoreError, match="full"):
                await service.update(stuck[0], lambda m: {**m, "n": 1})
    finally:
        command(full, "CONFIG", "SET", "maxmemory", "0")
    assert (await service.update(stuck[0], lambda m: {**m, "n": 1})).metadata["n"] == 1


async def test_a_bucket_count_other_than_the_data_s_is_refused(redis_cluster: LocalCluster) -> None:
    prefix = unique_prefix()
    layout_key = f"{prefix}layout"
    on = redis_cluster.master_of_slot(binascii.crc_hqx(layout_key.encode(), 0) % 16384)
    first = RedisStore(redis_cluster.url, prefix=prefix, buckets=16)
    await first.open()
    assert command(on, "EXISTS", layout_key) == 0  # opening writes nothing
    await first.commit([Put(Session(new_id(), 1, 1, None, {}, 1), None)])
    await first.close()
    assert command(on, "GET", layout_key) == "buckets=16"
    other = RedisStore(redis_cluster.url, prefix=prefix)
    with pytest.raises(StoreError, match="buckets=16, not buckets=64"):
        await other.open()
    again = RedisStore(redis_cluster.url, prefix=prefix, buckets=16)
    await again.open()
    await again.close()


# --- URLs of the wrong form ---


def _node(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


@pytest.mark.parametrize("db", [0, 2])
async def test_a_server_url_naming_a_cluster_node_says_to_use_a_cluster_url(
    redis_cluster: LocalCluster, db: int
) -> None:
    store = RedisStore(f"redis://127.0.0.1:{redis_cluster.ports[0]}/{db}")
    with trio.fail_after(PROMPT), pytest.raises(StoreError) as caught:
        await store.open()
    message = str(caught.value)
    assert "redis+cluster://" in message
    assert not re.fullmatch(r"\d+ [\d.]+:\d+", message)  # never a bare MOVED reply


async def test_a_cluster_url_naming_a_server_says_to_use_a_server_url(redis_url: str) -> None:
    store = RedisStore(f"redis+cluster://{_node(redis_url)}", connect_timeout=1)
    with trio.fail_after(PROMPT), pytest.raises(StoreError, match=r"not a cluster node.*redis://"):
        await store.open()


async def test_a_sentinel_url_naming_a_server_or_an_unknown_name_is_refused(
    redis_url: str, redis_sentinel: LocalSentinel
) -> None:
    with trio.fail_after(PROMPT):
        with pytest.raises(StoreError, match="not a Sentinel"):
            await RedisStore(f"redis+sentinel://{_node(redis_url)}/sessions").open()
        unknown = f"redis+sentinel://127.0.0.1:{redis_sentinel.sentinel.port}/nobody"
        with pytest.raises(StoreError, match="nobody"):
            await RedisStore(unknown, connect_timeout=1).open()


async def test_an_unreachable_cluster_fails_to_open_promptly() -> None:
    store = RedisStore("redis+cluster://127.0.0.1:1", connect_timeout=0.5)
    with trio.fail_after(PROMPT), pytest.raises(StoreError, match="cannot open"):
        await store.open()
