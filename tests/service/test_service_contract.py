"""The backend contract: the seed's lifecycle as DESIGN pins it, the same on every store."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import trio
from helpers import EPOCH
from trio.testing import MockClock

from workers import (
    CapacityExceeded,
    InvalidMetadata,
    InvalidSessionId,
    InvalidTTL,
    SessionError,
    SessionExpired,
    SessionNotFound,
    SessionTooLarge,
    UpdateFailed,
    VersionConflict,
    open_session_service,
)

USER = {"user_id": "user123", "auth_method": "api_key"}


def now_ms() -> int:
    return int((EPOCH + trio.current_time()) * 1000)


async def test_create_then_retrieve_gives_the_seed_record(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(**options) as sessions:
        t0 = now_ms()
        sid = await sessions.create(USER, ttl=3600)
        assert re.fullmatch(r"[0-9a-f]{32}", sid)
        s = await sessions.retrieve(sid)
        assert (s.id, s.created_at, s.last_accessed) == (sid, t0, t0)
        assert (s.timeout_ms, s.metadata, s.version) == (3_600_000, USER, 1)
        assert s.to_dict() == {
            "id": sid,
            "created_at": t0,
            "last_accessed": t0,
            "timeout_ms": 3_600_000,
            "metadata": USER,
            "version": 1,
        }


async def test_default_ttl_and_no_ttl(options: dict[str, Any], vclock: MockClock) -> None:
    async with open_session_service(default_ttl=60, **options) as sessions:
        assert (await sessions.peek(await sessions.create())).timeout_ms == 60_000
        forever = await sessions.create({}, ttl=None)
        await trio.sleep(10 * 365 * 24 * 3600)
        assert (await sessions.retrieve(forever)).timeout_ms is None


async def test_retrieve_refreshes_access_time_and_peek_does_not(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(**options) as sessions:
        sid = await sessions.create(USER, ttl=100)
        created = now_ms()
        await trio.sleep(30)
        assert (await sessions.peek(sid)).last_accessed == created
        assert (await sessions.retrieve(sid)).last_accessed == created + 30_000
        assert (await sessions.peek(sid)).last_accessed == created + 30_000


async def test_idle_expiry_hides_a_session_before_any_sweep(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(**options) as sessions:
        sid = await sessions.create(USER, ttl=10)
        keep = await sessions.create(USER, ttl=100)
        await trio.sleep(10)  # now == last_accessed + timeout: still live
        assert (await sessions.peek(sid)).id == sid
        await trio.sleep(0.001)
        for op in (
            sessions.retrieve(sid),
            sessions.peek(sid),
            sessions.update(sid, lambda m: m),
            sessions.touch(sid),
            sessions.set_ttl(sid, 100),
        ):
            with pytest.raises(SessionExpired):
                await op
        assert [s.id for s in await sessions.list_sessions()] == [keep]
        assert await sessions.count() == 1
        assert await sessions.cleanup_expired() == 1
        with pytest.raises(SessionNotFound) as info:
            await sessions.peek(sid)
        assert type(info.value) is SessionNotFound


async def test_touch_and_update_keep_a_session_alive(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(**options) as sessions:
        sid = await sessions.create(USER, ttl=10)
        await trio.sleep(8)
        await sessions.touch(sid)
        await trio.sleep(8)
        await sessions.update(sid, lambda m: {**m, "n": 1})
        await trio.sleep(8)
        assert (await sessions.retrieve(sid)).metadata["n"] == 1


async def test_set_ttl_changes_the_timeout_without_touching(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(**options) as sessions:
        sid = await sessions.create(USER, ttl=10)
        await trio.sleep(5)
        await sessions.set_ttl(sid, None)
        s = await sessions.peek(sid)
        assert (s.timeout_ms, s.last_accessed) == (None, s.created_at)
        await trio.sleep(10**6)
        await sessions.set_ttl(sid, 1)
        await trio.sleep(2)
        with pytest.raises(SessionExpired):
            await sessions.peek(sid)


async def test_update_is_atomic_per_session(options: dict[str, Any], vclock: MockClock) -> None:
    async with open_session_service(**options) as sessions:
        sid = await sessions.create({"n": 0})

        async def increment() -> None:
            await sessions.update(sid, lambda m: {**m, "n": m["n"] + 1})

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(increment)
        s = await sessions.peek(sid)
        assert (s.metadata["n"], s.version) == (10, 11)


async def test_a_failing_update_changes_nothing(options: dict[str, Any], vclock: MockClock) -> None:
    async with open_session_service(**options) as sessions:
        sid = await sessions.create({"n": 0})
        before = await sessions.peek(sid)

        def mutate_then_raise(m: dict[str, Any]) -> dict[str, Any]:
            m["n"] = 99
            raise RuntimeError("boom")

        with pytest.raises(UpdateFailed, match="boom"):
            await sessions.update(sid, mutate_then_raise)
        with pytest.raises(UpdateFailed, match="not a dict"):
            await sessions.update(sid, lambda m: [1, 2])
        with pytest.raises(InvalidMetadata):
            await sessions.update(sid, lambda m: {"x": object()})
        assert await sessions.peek(sid) == before


async def test_delete_is_idempotent(options: dict[str, Any], vclock: MockClock) -> None:
    async with open_session_service(**options) as sessions:
        sid = await sessions.create(USER)
        assert await sessions.delete(sid) is True
        assert await sessions.delete(sid) is False
        assert await sessions.delete("0" * 32) is False
        with pytest.raises(SessionNotFound):
            await sessions.retrieve(sid)


async def test_list_sessions_pages_through_every_live_session(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(page_size=3, **options) as sessions:
        ids = {await sessions.create({"i": i}) for i in range(10)}
        listed = await sessions.list_sessions()
        assert {s.id for s in listed} == ids and len(listed) == 10
        seen, cursor = [], None
        while True:
            page, cursor = await sessions.list_page(cursor, limit=4)
            assert len(page) <= 4
            seen += [s.id for s in page]
            if cursor is None:
                break
        assert sorted(seen) == sorted(ids)
        assert await sessions.count() == 10


async def test_backend_names_and_seed_aliases(options: dict[str, Any], vclock: MockClock) -> None:
    seed = {"memory": "ets", "disk": "dets", "lmdb": "leveldb", "redis": "mnesia"}
    backend = options["backend"]
    async with open_session_service(**{**options, "backend": seed[backend]}) as sessions:
        assert sessions.backend == backend
        assert await sessions.get_backend() == backend


async def test_returned_sessions_are_copies(options: dict[str, Any], vclock: MockClock) -> None:
    async with open_session_service(**options) as sessions:
        mine = {"prefs": {"theme": "dark"}}
        sid = await sessions.create(mine)
        mine["prefs"]["theme"] = "light"
        s = await sessions.retrieve(sid)
        s.metadata["prefs"]["theme"] = "blue"
        assert (await sessions.peek(sid)).metadata == {"prefs": {"theme": "dark"}}


@pytest.mark.parametrize(
    "metadata",
    [
        [("user_id", "x")],
        {1: "int key"},
        {"nested": {2: "int key"}},
        {"a set": {1, 2}},
        {"an object": object()},
        {"too big an int": 2**64},
    ],
)
async def test_bad_metadata_is_refused_and_writes_nothing(
    options: dict[str, Any], vclock: MockClock, metadata: Any
) -> None:
    async with open_session_service(**options) as sessions:
        with pytest.raises(InvalidMetadata):
            await sessions.create(metadata)
        assert await sessions.count() == 0


async def test_metadata_above_the_limit_is_too_large(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(max_metadata_bytes=1024, **options) as sessions:
        with pytest.raises(SessionTooLarge):
            await sessions.create({"blob": "x" * 1024})
        sid = await sessions.create({"blob": "x" * 900})
        with pytest.raises(SessionTooLarge):
            await sessions.update(sid, lambda m: {"blob": "x" * 2000})
        assert (await sessions.peek(sid)).version == 1
        assert await sessions.count() == 1


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, "10", True, 10**12])
async def test_bad_ttls_are_refused(options: dict[str, Any], vclock: MockClock, ttl: Any) -> None:
    async with open_session_service(**options) as sessions:
        with pytest.raises(InvalidTTL):
            await sessions.create(USER, ttl=ttl)
        sid = await sessions.create(USER, ttl=60)
        with pytest.raises(InvalidTTL):
            await sessions.set_ttl(sid, ttl)
        assert (await sessions.peek(sid)).timeout_ms == 60_000
        assert await sessions.count() == 1


@pytest.mark.parametrize("bad_id", [None, 42, "", "x" * 300, "line\nbreak"])
async def test_bad_ids_are_refused(options: dict[str, Any], vclock: MockClock, bad_id: Any) -> None:
    async with open_session_service(**options) as sessions:
        with pytest.raises(InvalidSessionId):
            await sessions.retrieve(bad_id)


async def test_capacity_is_refused_never_evicted(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(max_sessions=3, **options) as s:
        short = await s.create(USER, ttl=5)
        kept = [await s.create(USER, ttl=100) for _ in range(2)]
        with pytest.raises(CapacityExceeded):
            await s.create(USER)
        assert await s.count() == 3
        await trio.sleep(6)  # the short one expired: it no longer counts
        kept.append(await s.create(USER))
        with pytest.raises(CapacityExceeded):
            await s.create(USER)
        assert {x.id for x in await s.list_sessions()} == set(kept)
        assert short not in kept


async def test_patch_with_expected_version(options: dict[str, Any], vclock: MockClock) -> None:
    async with open_session_service(**options) as sessions:
        sid = await sessions.create({"a": 1, "b": 2})
        s = await sessions.patch(sid, {"c": 3}, ["a"], expected_version=1)
        assert (s.metadata, s.version) == ({"b": 2, "c": 3}, 2)
        with pytest.raises(VersionConflict):
            await sessions.patch(sid, {"d": 4}, expected_version=1)
        assert (await sessions.peek(sid)).metadata == {"b": 2, "c": 3}


async def test_rotate_moves_the_session_to_a_new_id(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(**options) as sessions:
        old = await sessions.create(USER)
        new = await sessions.rotate(old)
        assert new != old
        with pytest.raises(SessionNotFound):
            await sessions.peek(old)
        s = await sessions.peek(new)
        assert (s.metadata, s.version) == (USER, 1)


async def test_delete_where_logs_a_user_out_everywhere(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(page_size=2, **options) as sessions:
        mine = [await sessions.create({"user_id": "u1", "i": i}) for i in range(5)]
        other = await sessions.create({"user_id": "u2"})
        assert await sessions.delete_where("user_id", "u1") == 5
        assert [s.id for s in await sessions.list_sessions()] == [other]
        assert not set(mine) & {s.id for s in await sessions.list_sessions()}


async def test_the_cleanup_actor_sweeps_on_its_interval(
    options: dict[str, Any], vclock: MockClock
) -> None:
    async with open_session_service(**{**options, "cleanup_interval": 60}) as sessions:
        sid = await sessions.create(USER, ttl=10)
        await trio.sleep(11)
        with pytest.raises(SessionExpired):
            await sessions.peek(sid)
        await trio.sleep(60)
        with pytest.raises(SessionNotFound) as info:
            await sessions.peek(sid)
        assert type(info.value) is SessionNotFound


async def test_custom_id_factory(options: dict[str, Any], vclock: MockClock) -> None:
    ids = iter(["user_1_a", "user_2_b", "user_2_b"])
    async with open_session_service(id_factory=lambda: next(ids), **options) as sessions:
        assert await sessions.create(USER) == "user_1_a"
        assert await sessions.create(USER) == "user_2_b"
        with pytest.raises(UpdateFailed, match="already in use"):
            await sessions.create(USER)
        with pytest.raises(SessionError, match="id_factory raised StopIteration"):
            await sessions.create(USER)  # the factory is exhausted: an error, not a crash
        assert await sessions.count() == 2 and sessions.restarts == 0
