"""What the redis store adds to the Store contract (``test_store_contract.py`` runs that too).

Against a real Redis: the shared one for most tests, each under its own key prefix, and a
private ``redis-server`` for the tests that stop, restart or freeze it. No clock fixture: the
virtual clock would jump while Trio waits on Redis's socket, so every time here is explicit.
"""

from __future__ import annotations

import binascii
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import coredis
import pytest
import trio
from helpers.redis_server import RedisServer, free_port

from workers.record.codec import encode_session
from workers.record.errors import ServiceUnavailable, StoreError
from workers.record.session import Session, new_id
from workers.stores.base import Delete, Put
from workers.stores.redis import RedisStore, bucket_tags, redact_url
from workers.stores.redis_sentinel import PAUSE_LIMIT, FailoverWatch, master_of
from workers.stores.redis_urls import parse_url

T0 = 1_700_000_000_000
MINUTE = 60_000
#: Upper bound for "promptly": far above the timeouts set below, far below a hang.
PROMPT = 5.0


def session(sid: str, *, timeout_ms: int | None = MINUTE, version: int = 1) -> Session:
    return Session(sid, T0, T0, timeout_ms, {"user_id": sid, "raw": b"\x00\xff"}, version)


def bumped(s: Session, **changes: object) -> Session:
    return replace(s, version=s.version + 1, **changes)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[coredis.Redis[bytes]]:
    """A plain coredis client, to look at what the store wrote."""
    async with coredis.Redis.from_url(redis_url) as client:
        yield client


@pytest.fixture
async def store(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url, prefix=redis_prefix)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def keys_under(raw: coredis.Redis[bytes], prefix: str) -> set[bytes]:
    return {key async for key in raw.scan_iter(match=prefix + "*")}


# --- opening ---


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError):
        RedisStore(prefix="")
    with pytest.raises(ValueError):
        RedisStore(command_timeout=0)


async def test_open_names_the_url_when_redis_is_unreachable() -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    store = RedisStore(url, connect_timeout=0.5)
    with trio.fail_after(PROMPT):
        with pytest.raises(StoreError, match="cannot open the redis store") as caught:
            await store.open()
    assert redact_url(url) in str(caught.value)
    assert "secret" not in str(caught.value)
    await store.close()


def test_urls_are_redacted() -> None:
    assert redact_url("redis://u:pw@h:1/2") == "redis://u:***@h:1/2"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"
    assert redact_url("unix://:pw@/tmp/r.sock?db=1") == "unix://:***@/tmp/r.sock?db=1"
    assert redact_url("redis://h:1/0?password=pw&db=1") == "redis://h:1/0?password=***&db=1"
    assert redact_url("redis://h/0?pass%77ord=pw") == "redis://h/0?pass%77ord=***"
    assert (
        redact_url("redis+cluster://:pw@a:1,b:2?password=x")
        == "redis+cluster://:***@a:1,b:2?password=***"
    )
    assert (
        redact_url("redis+sentinel://a:1,b:2/s?sentinel_password=x")
        == "redis+sentinel://a:1,b:2/s?sentinel_password=***"
    )


def test_the_three_url_forms_parse() -> None:
    server = parse_url("redis://:pw@h:1/2?password=other&wait_replicas=1&client_name=x")
    assert server.kind == "server"
    assert server.settings == {"wait_replicas": 1}
    assert "wait_replicas" not in server.url and "client_name=x" in server.url
    cluster = parse_url("redis+cluster://u:p%40ss@a:7000,[::1]:7001,b?buckets=16")
    assert (cluster.kind, cluster.username, cluster.password) == ("cluster", "u", "p@ss")
    assert cluster.nodes == (("a", 7000), ("::1", 7001), ("b", 6379))
    assert cluster.settings == {"buckets": 16}
    sentinel = parse_url("redis+sentinel://a,b:26380/mymaster/3?password=pw")
    assert (sentinel.kind, sentinel.service, sentinel.db) == ("sentinel", "mymaster", 3)
    assert sentinel.nodes == (("a", 26379), ("b", 26380))
    assert sentinel.password == "pw"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h:1", "unknown Redis URL scheme"),
        ("redis+cluster://a:1/0", "no databases"),
        ("redis+cluster://a:x", "not HOST:PORT"),
        ("redis+cluster://a:1?db=2", "unknown parameters"),
        ("redis+sentinel://a:1", "name the primary"),
        ("redis+sentinel://a:1/s?buckets=2", "buckets is for redis.cluster"),
        ("redis://h?buckets=2", "buckets is for redis.cluster"),
        ("redis+cluster://:secret@a:1?buckets=many", "not a number"),
    ],
)
def test_bad_urls_are_refused_without_their_secrets(url: str, says: str) -> None:
    with pytest.raises(StoreError, match=says) as caught:
        RedisStore(url)
    assert "secret" not in str(caught.value)
    with pytest.raises(ValueError, match=says):
        parse_url(url)


def test_a_cluster_prefix_may_not_hold_a_hash_tag() -> None:
    with pytest.raises(StoreError, match="hash tag"):
        RedisStore("redis+cluster://a:1", prefix="{sessions}:")
    with pytest.raises(StoreError, match="buckets is 16 here and 8 in the URL"):
        RedisStore("redis+cluster://a:1?buckets=8", buckets=16)
    with pytest.raises(StoreError, match="buckets is between"):
        RedisStore("redis+cluster://a:1?buckets=0")


def test_cluster_buckets_cover_the_slots_evenly() -> None:
    for n in (1, 3, 64, 1000):
        tags = bucket_tags(n)
        slots = [binascii.crc_hqx(tag.encode(), 0) % 16384 for tag in tags]
        assert [slot * n // 16384 for slot in slots] == list(range(n))
    store = RedisStore("redis+cluster://a:1")
    ids = [new_id() for _ in range(6400)]
    counts = Counter(store.bucket_of(sid) for sid in ids)
    assert len(counts) == 64 and max(counts.values()) < 2 * 6400 / 64


# --- layout ---


async def test_keys_stay_under_the_prefix_and_records_are_msgpack(
    store: RedisStore, raw: coredis.Redis[bytes], redis_prefix: str
) -> None:
    a, forever = session("a"), session("forever", timeout_ms=None)
    assert await store.commit([Put(a, None), Put(forever, None)]) == [True, True]
    p = redis_prefix.encode()
    assert await keys_under(raw, redis_prefix) == {
        p + b"s:a",
        p + b"s:forever",
        p + b"ids",
        p + b"expiry",
    }
    assert await raw.get(p + b"s:a") == encode_session(a)
    assert await raw.zrange(p + b"expiry", 0, -1) == (b"a",)  # never-expiring: not indexed
    assert await store.commit([Delete("a"), Delete("forever")]) == [True, True]
    assert await keys_under(raw, redis_prefix) == set()


async def test_redis_ttl_backs_up_the_idle_timeout(
    redis_url: str, redis_prefix: str, raw: coredis.Redis[bytes]
) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix, expiry_grace=1.0)
    await store.open()
    try:
        a = session("a")
        key = f"{redis_prefix}s:a"
        await store.commit([Put(a, None)])
        assert MINUTE < await raw.pttl(key) <= MINUTE + 1000
        assert await store.commit([Put(bumped(a, timeout_ms=None), 1)]) == [True]
        assert await raw.pttl(key) == -1  # set_ttl(None): Redis must not expire it either
        longer = replace(a, version=3, timeout_ms=10 * MINUTE)
        assert await store.commit([Put(longer, 2)]) == [True]
        assert 10 * MINUTE < await raw.pttl(key) <= 10 * MINUTE + 1000
    finally:
        await store.close()


async def test_a_key_redis_expired_is_swept_from_the_indexes(
    store: RedisStore, raw: coredis.Redis[bytes], redis_prefix: str
) -> None:
    await store.commit([Put(session("a"), None), Put(session("b"), None)])
    await raw.delete([f"{redis_prefix}s:a"])  # as Redis does once the key's TTL runs out
    later = T0 + 2 * MINUTE
    assert await store.load(["a", "b"]) == {"b": session("b")}
    assert set(await store.expired(later, 10)) == {"a", "b"}
    # The sweep's delete reports False for "a" (Redis removed it) but clears its entries.
    assert await store.commit([Delete("a", later), Delete("b", later)]) == [False, True]
    assert await store.expired(later, 10) == []
    assert await store.count(T0) == 0
    assert await keys_under(raw, redis_prefix) == set()


async def test_an_unreadable_record_fails_the_batch_and_changes_nothing(
    store: RedisStore, raw: coredis.Redis[bytes], redis_prefix: str
) -> None:
    await raw.set(f"{redis_prefix}s:bad", b"\x93not a session")
    with pytest.raises(StoreError):
        await store.load(["bad"])
    with pytest.raises(StoreError, match="unknown format"):
        await store.commit([Put(session("a"), None), Put(session("bad", version=2), 1)])
    assert await store.load(["a"]) == {}  # the script checks everything before writing


# --- sharing ---


@asynccontextmanager
async def two_stores(url: str, prefix: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two open stores on the same keys, as two processes sharing one Redis would have."""
    one, two = RedisStore(url, prefix=prefix), RedisStore(url, prefix=prefix)
    await one.open()
    await two.open()
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


async def test_two_stores_share_sessions(redis_url: str, redis_prefix: str) -> None:
    async with two_stores(redis_url, redis_prefix) as (one, two):
        a = session("a")
        assert await one.commit([Put(a, None)]) == [True]
        assert await two.load(["a"]) == {"a": a}
        assert await two.commit([Put(bumped(a), 1)]) == [True]
        assert await one.load(["a"]) == {"a": bumped(a)}
        assert await one.scan(T0, None, 10) == ([bumped(a)], None)
        assert await two.commit([Delete("a")]) == [True]
        assert await one.load(["a"]) == {}
        assert await one.count(T0) == 0


async def test_a_stale_version_loses_the_race(redis_url: str, redis_prefix: str) -> None:
    async with two_stores(redis_url, redis_prefix) as (one, two):
        await one.commit([Put(session("a"), None)])
        seen_by_one, seen_by_two = (await one.load(["a"]))["a"], (await two.load(["a"]))["a"]
        assert await one.commit([Put(bumped(seen_by_one, metadata={"by": 1}), 1)]) == [True]
        assert await two.commit([Put(bumped(seen_by_two, metadata={"by": 2}), 1)]) == [False]
        assert (await two.load(["a"]))["a"].metadata == {"by": 1}
        assert await two.commit([Put(session("a"), None)]) == [False]  # no double create


async def test_concurrent_increments_from_two_stores_lose_nothing(
    redis_url: str, redis_prefix: str
) -> None:
    stores = [RedisStore(redis_url, prefix=redis_prefix) for _ in range(2)]
    for s in stores:
        await s.open()
    await stores[0].commit([Put(Session("n", T0, T0, None, {"n": 0}, 1), None)])

    async def increment(store: RedisStore, times: int) -> None:
        for _ in range(times):
            while True:  # what a manager does when its Put loses a race: reload and retry
                current = (await store.load(["n"]))["n"]
                new = bumped(current, metadata={"n": current.metadata["n"] + 1})
                if await store.commit([Put(new, current.version)]) == [True]:
                    break

    try:
        async with trio.open_nursery() as nursery:
            for s in stores:
                for _ in range(3):
                    nursery.start_soon(increment, s, 15)
        final = (await stores[1].load(["n"]))["n"]
        assert final.metadata == {"n": 90}
        assert final.version == 91
    finally:
        for s in stores:
            await s.close()


# --- Redis down, frozen, back ---


@pytest.mark.slow
async def test_calls_fail_promptly_while_redis_is_down_and_recover(
    private_redis: RedisServer,
) -> None:
    store = RedisStore(private_redis.url, connect_timeout=0.5, command_timeout=0.5)
    await store.open()
    try:
        assert await store.commit([Put(session("a"), None)]) == [True]
        private_redis.stop()
        with trio.fail_after(PROMPT):
            for call in (
                store.load(["a"]),
                store.commit([Put(session("b"), None)]),
                store.scan(T0, None, 10),
                store.expired(T0, 10),
                store.count(T0),
            ):
                with pytest.raises(ServiceUnavailable):
                    await call
        private_redis.start()  # same port, empty (no persistence), no scripts loaded
        assert await store.commit([Put(session("b"), None)]) == [True]
        assert await store.load(["a", "b"]) == {"b": session("b")}
        assert await store.count(T0) == 1
    finally:
        await store.close()


@pytest.mark.slow
async def test_a_frozen_redis_times_out_instead_of_hanging(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url, connect_timeout=0.5, command_timeout=0.3)
    await store.open()
    try:
        await store.commit([Put(session("a"), None)])
        private_redis.pause()
        try:
            with trio.fail_after(PROMPT), pytest.raises(ServiceUnavailable):
                await store.load(["a"])
            with trio.fail_after(PROMPT), pytest.raises(ServiceUnavailable):
                await store.commit([Put(session("b"), None)])
        finally:
            private_redis.resume()
        # The commit may or may not have been applied (its reply was lost): either way the
        # store answers again, and answers right.
        assert set(await store.load(["a", "b"])) in ({"a"}, {"a", "b"})
        assert await store.commit([Put(session("c"), None)]) == [True]
    finally:
        await store.close()


# --- following a Sentinel failover (sans-IO) ---


def test_sentinel_events_name_their_primary() -> None:
    assert master_of("+switch-master", "sessions 10.0.0.1 6379 10.0.0.2 6379") == "sessions"
    promoting = "slave 10.0.0.2:6379 10.0.0.2 6379 @ sessions 10.0.0.1 6379"
    assert master_of("+failover-state-send-slaveof-noone", promoting) == "sessions"
    assert master_of("-failover-abort-no-good-slave", "master other 10.0.0.9 6379") == "other"
    assert master_of("+switch-master", "") is None


async def test_writes_wait_from_a_promotion_to_the_switch(autojump_clock: object) -> None:
    disconnected: list[bool] = []
    watch = FailoverWatch("sessions", lambda: disconnected.append(True))
    watch.check_writable("here")
    watch.event("+failover-state-send-slaveof-noone", "slave a:1 a 1 @ other b 2")
    watch.check_writable("here")  # another primary's failover
    watch.event("+failover-state-send-slaveof-noone", "slave a:1 a 1 @ sessions b 2")
    with pytest.raises(ServiceUnavailable, match="failing over"):
        watch.check_writable("here")
    watch.event("+switch-master", "sessions b 2 a 1")
    assert disconnected == [True]
    watch.check_writable("here")
    # An aborted failover, and one whose end is never heard, stop refusing writes too.
    watch.event("+failover-state-send-slaveof-noone", "slave a:1 a 1 @ sessions b 2")
    watch.event("-failover-abort-slave-timeout", "master sessions b 2")
    watch.check_writable("here")
    watch.event("+failover-state-send-slaveof-noone", "slave a:1 a 1 @ sessions b 2")
    await trio.sleep(PAUSE_LIMIT)
    watch.check_writable("here")
    assert disconnected == [True]


@pytest.mark.slow
async def test_a_password_in_the_query_is_used_and_never_shown(private_redis: RedisServer) -> None:
    async with coredis.Redis.from_url(private_redis.url) as admin:
        await admin.config_set({"requirepass": "s3cret"})
    right = f"{private_redis.url}?password=s3cret"
    store = RedisStore(right)
    await store.open()
    try:
        assert await store.commit([Put(session("a"), None)]) == [True]
        assert "s3cret" not in repr(store)
    finally:
        await store.close()
    for wrong in (
        f"{private_redis.url}?password=wr0ng",
        f"redis://:wr0ng@127.0.0.1:{private_redis.port}/0",
    ):
        with trio.fail_after(PROMPT), pytest.raises(StoreError) as caught:
            await RedisStore(wrong, connect_timeout=0.5).open()
        assert "wr0ng" not in str(caught.value) and "***" in str(caught.value)
