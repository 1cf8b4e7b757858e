"""The Store contract, run against every backend in ``store_factories.STORE_FACTORIES``.

A new backend joins by adding its factory there; nothing here changes. Times are explicit
wall-clock milliseconds: a store never reads a clock of its own. No clock fixture is used,
because Trio cannot see a threaded store's worker (see DESIGN.md, "Rules that hold everywhere").
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from helpers.store_factories import STORE_FACTORIES, StoreFactory, factory_params

from workers.record.errors import StoreError
from workers.record.session import Session
from workers.stores import BACKENDS
from workers.stores.base import BucketedStore, Delete, Mark, Put, Store, Write

T0 = 1_700_000_000_000
MINUTE = 60_000


def session(
    sid: str,
    *,
    last_accessed: int = T0,
    timeout_ms: int | None = MINUTE,
    version: int = 1,
    metadata: dict | None = None,
) -> Session:
    return Session(
        id=sid,
        created_at=T0,
        last_accessed=last_accessed,
        timeout_ms=timeout_ms,
        metadata={"user_id": f"user-{sid}"} if metadata is None else metadata,
        version=version,
    )


def bumped(s: Session, **changes: object) -> Session:
    """The next version of ``s``, as a manager would Put it."""
    return replace(s, version=s.version + 1, **changes)


class Harness:
    """Opens stores from one factory over one tmp_path, and closes them all at the end."""

    def __init__(self, factory: StoreFactory, tmp_path: Path) -> None:
        self.factory = factory
        self.tmp_path = tmp_path
        self.opened: list[Store] = []

    async def open(self) -> Store:
        store = self.factory.make(self.tmp_path)
        await store.open()
        self.opened.append(store)
        return store

    async def reopen(self, store: Store) -> Store:
        """Close ``store`` and open the same data again, the way a restarted manager would."""
        await store.close()
        if self.factory.durable:
            return await self.open()
        await store.open()
        return store

    async def close_all(self) -> None:
        for store in reversed(self.opened):
            await store.close()


@pytest.fixture(params=factory_params())
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(STORE_FACTORIES[request.param], tmp_path)
    try:
        yield harness
    finally:
        await harness.close_all()


@pytest.fixture
async def store(harness: Harness) -> Store:
    return await harness.open()


async def put_all(store: Store, sessions: Sequence[Session]) -> None:
    assert await store.commit([Put(s, None) for s in sessions]) == [True] * len(sessions)


async def scan_all(store: Store, now_ms: int, limit: int) -> list[list[Session]]:
    """Every page of a complete scan, checking the paging rules on the way."""
    pages: list[list[Session]] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.scan(now_ms, cursor, limit)
        assert len(page) <= limit
        pages.append(page)
        if cursor is None:
            return pages
        assert isinstance(cursor, str)
        assert len(pages) < 1000, "the scan does not advance"


def ids_of(pages: list[list[Session]]) -> list[str]:
    return [s.id for page in pages for s in page]


# --- lifecycle ---


async def test_is_a_store_with_a_canonical_name(store: Store) -> None:
    assert isinstance(store, Store)
    assert store.backend in BACKENDS
    assert isinstance(store.shared, bool)


async def test_a_new_store_is_empty(store: Store) -> None:
    assert await store.load([]) == {}
    assert await store.load(["absent"]) == {}
    assert await store.scan(T0, None, 10) == ([], None)
    assert await store.expired(T0, 10) == []
    assert await store.count(T0) == 0
    assert await store.commit([]) == []


async def test_close_is_safe_twice_and_before_open(harness: Harness) -> None:
    never_opened = harness.factory.make(harness.tmp_path / "other")
    await never_opened.close()
    store = await harness.open()
    await store.close()
    await store.close()


async def test_opening_an_open_store_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match="already open"):
        await store.open()
    assert await store.count(T0) == 0  # and it is still open


async def test_a_closed_store_refuses_calls(store: Store) -> None:
    await store.close()
    with pytest.raises(StoreError):
        await store.load(["a"])
    with pytest.raises(StoreError):
        await store.commit([Put(session("a"), None)])
    with pytest.raises(StoreError):
        await store.count(T0)


async def test_sessions_survive_close_and_reopen(harness: Harness, store: Store) -> None:
    metadata = {
        "user_id": "user123",
        "auth_method": "api_key",
        "n": -(2**63),
        "big": 2**64 - 1,
        "ratio": 0.1,
        "none": None,
        "flag": False,
        "unicode": "héllo ✓",
        "raw": b"\x00\xff",
        "nested": {"list": [1, "two", {"three": [3.0]}], "empty": {}},
    }
    kept = [
        session("a", metadata=metadata),
        session("b", timeout_ms=None),
        session("c", last_accessed=T0 - 10 * MINUTE),  # already expired: kept until swept
    ]
    await put_all(store, [*kept, session("gone")])
    assert await store.commit([Delete("gone"), Put(bumped(kept[0]), 1)]) == [True, True]
    kept[0] = bumped(kept[0])

    store = await harness.reopen(store)

    assert await store.load(["a", "b", "c", "gone"]) == {s.id: s for s in kept}
    assert sorted(ids_of(await scan_all(store, T0, 2))) == ["a", "b"]
    assert await store.expired(T0, 10) == ["c"]
    assert await store.count(T0) == 2
    # And the reopened store takes writes as before.
    assert await store.commit([Put(bumped(kept[0]), 2), Put(session("a"), None)]) == [True, False]


async def test_the_same_object_opens_again_after_close(store: Store) -> None:
    # The service owns one store object, and every manager incarnation opens and closes it.
    await put_all(store, [session("a")])
    for _ in range(2):
        await store.close()
        await store.open()
        assert list(await store.load(["a"])) == ["a"]
    assert await store.commit([Put(session("b"), None)]) == [True]


# --- Put: create and compare-and-set ---


async def test_load_returns_what_was_stored_field_for_field(store: Store) -> None:
    s = session("a", metadata={"k": [1, {"x": b"y"}], "s": "v"}, version=7)
    await put_all(store, [s])
    (loaded,) = (await store.load(["a"])).values()
    assert loaded == s
    assert loaded.to_dict() == s.to_dict()


async def test_create_refuses_an_existing_id(store: Store) -> None:
    live, expired = session("live"), session("expired", last_accessed=T0 - 10 * MINUTE)
    await put_all(store, [live, expired])
    again = [Put(session("live", metadata={"x": 1}), None), Put(session("expired"), None)]
    assert await store.commit(again) == [False, False]
    assert await store.load(["live", "expired"]) == {"live": live, "expired": expired}


async def test_a_run_of_creates_with_one_id_in_use_stores_the_others(store: Store) -> None:
    # Stores write a run of creates at once (lmdb's putmulti, SQLite's executemany): one taken
    # id must still fail alone, and the writes after it to that id with it.
    taken = session("c", metadata={"n": 0})
    await put_all(store, [taken])
    fresh = [session(sid) for sid in "abde"]
    batch: list[Write] = [Put(s, None) for s in fresh[:2]]
    batch += [Put(session("c"), None), *(Put(s, None) for s in fresh[2:])]
    batch.append(Put(bumped(session("c")), 1))  # after a failed write to c: fails too
    assert await store.commit(batch) == [True, True, False, True, True, False]
    assert await store.load(list("abcde")) == {s.id: s for s in [*fresh, taken]}
    assert set(await store.expired(T0 + 2 * MINUTE, 10)) == set("abcde")


async def test_put_replaces_only_the_expected_version(store: Store) -> None:
    v1 = session("a")
    await put_all(store, [v1])
    v2 = bumped(v1, metadata={"theme": "dark"})
    assert await store.commit([Put(v2, 1)]) == [True]
    stale = bumped(v1, metadata={"theme": "light"})
    assert await store.commit([Put(stale, 1), Put(stale, 3)]) == [False, False]
    assert await store.load(["a"]) == {"a": v2}


async def test_put_with_an_expected_version_never_creates(store: Store) -> None:
    assert await store.commit([Put(session("a", version=2), 1)]) == [False]
    assert await store.load(["a"]) == {}
    assert await store.count(T0) == 0


# --- Delete ---


async def test_delete_reports_whether_it_removed_something(store: Store) -> None:
    await put_all(store, [session("a")])
    assert await store.commit([Delete("a"), Delete("a"), Delete("never")]) == [True, False, False]
    assert await store.load(["a"]) == {}


async def test_conditional_delete_never_removes_a_live_session(store: Store) -> None:
    expires_at = T0 + MINUTE
    await put_all(store, [session("a"), session("forever", timeout_ms=None)])
    conditional = [Delete("a", if_expired_at=expires_at), Delete("forever", if_expired_at=T0 * 2)]
    assert await store.commit(conditional) == [False, False]  # at expires_at it is still live
    assert set(await store.load(["a", "forever"])) == {"a", "forever"}
    assert await store.commit([Delete("a", if_expired_at=expires_at + 1)]) == [True]
    assert await store.commit([Delete("a", if_expired_at=expires_at + 1)]) == [False]
    assert await store.load(["a"]) == {}


async def test_conditional_delete_sees_a_refreshed_session(store: Store) -> None:
    old = session("a")
    await put_all(store, [old])
    touched = replace(old, last_accessed=T0 + MINUTE)  # a retrieve refreshed it meanwhile
    assert await store.commit([Put(touched, 1)]) == [True]
    assert await store.commit([Delete("a", if_expired_at=T0 + MINUTE + 1)]) == [False]
    assert await store.load(["a"]) == {"a": touched}


async def test_a_delete_with_a_version_removes_only_that_version(store: Store) -> None:
    v1 = session("a")
    await put_all(store, [v1, session("b")])
    v2 = bumped(v1, metadata={"theme": "dark"})  # another writer's update, after our load
    assert await store.commit([Put(v2, 1)]) == [True]
    assert await store.commit([Delete("a", expected_version=1)]) == [False]
    assert await store.load(["a"]) == {"a": v2}
    assert await store.commit([Delete("a", expected_version=2), Delete("b")]) == [True, True]
    assert await store.commit([Delete("a", expected_version=2)]) == [False]
    assert await store.load(["a", "b"]) == {}


async def test_both_conditions_of_a_delete_must_hold(store: Store) -> None:
    old = session("a", last_accessed=T0 - 2 * MINUTE)  # expired at T0
    await put_all(store, [old])
    assert await store.commit([Delete("a", if_expired_at=T0, expected_version=2)]) == [False]
    assert await store.commit([Delete("a", if_expired_at=T0 - 2 * MINUTE, expected_version=1)]) == [
        False
    ]
    assert await store.commit([Delete("a", if_expired_at=T0, expected_version=1)]) == [True]


# --- rotate: a Put that moves a session, and the Delete of its old id ---


def moved(s: Session, new_id: str) -> list[Write]:
    """A rotate's writes, as the manager makes them from the loaded ``s``."""
    return [
        Put(replace(s, id=new_id, last_accessed=T0 + 1), None, moved_from=s.id),
        Delete(s.id, expected_version=s.version),
    ]


def near(store: Store, sid: str) -> str:
    """An id a rotate may move ``sid`` to: in its bucket, on a store with buckets."""
    if not isinstance(store, BucketedStore):
        return "b"
    return next(f"b{i}" for i in range(10_000) if store.bucket_of(f"b{i}") == store.bucket_of(sid))


async def test_a_rotate_moves_the_session_it_loaded(store: Store) -> None:
    a, b = session("a", version=3), near(store, "a")
    await put_all(store, [a, session("other")])
    assert await store.commit(moved(a, b)) == [True, True]
    assert await store.load(["a", b]) == {b: replace(a, id=b, last_accessed=T0 + 1)}
    assert await store.count(T0) == 2
    assert sorted(ids_of(await scan_all(store, T0, 10))) == [b, "other"]


async def test_a_rotate_of_a_version_changed_meanwhile_moves_nothing(store: Store) -> None:
    a, b = session("a"), near(store, "a")
    await put_all(store, [a])
    theirs = bumped(a, metadata={"by": "them"})  # updated after the rotate's load
    assert await store.commit([Put(theirs, 1)]) == [True]
    assert await store.commit(moved(a, b)) == [False, False]
    assert await store.load(["a", b]) == {"a": theirs}  # under neither id would lose it
    assert await store.count(T0) == 1


async def test_a_rotate_of_a_gone_session_creates_nothing(store: Store) -> None:
    a, b = session("a"), near(store, "a")
    await put_all(store, [a])
    assert await store.commit([Delete("a")]) == [True]  # deleted after the rotate's load
    assert await store.commit(moved(a, b)) == [False, False]
    assert await store.load(["a", b]) == {}
    assert await store.count(T0) == 0


async def test_a_rotate_to_a_taken_id_keeps_the_old_one(store: Store) -> None:
    a, b = session("a"), near(store, "a")
    taken = session(b, metadata={"someone": "else"})
    await put_all(store, [a, taken])
    assert await store.commit(moved(a, b)) == [False, False]  # under neither would lose a
    assert await store.load(["a", b]) == {"a": a, b: taken}


async def test_a_failed_write_to_the_old_id_stops_the_rotate(store: Store) -> None:
    a, b = session("a"), near(store, "a")
    await put_all(store, [a])
    batch: list[Write] = [Put(bumped(a), 5), *moved(a, b)]  # the first fails
    assert await store.commit(batch) == [False, False, False]
    assert await store.load(["a", b]) == {"a": a}


# --- batches ---


async def test_a_batch_applies_in_order_and_sees_its_own_writes(store: Store) -> None:
    a1 = session("a")
    a2 = bumped(a1, metadata={"step": 2})
    fresh = session("a", metadata={"step": "recreated"})
    batch: list[Write] = [
        Put(a1, None),
        Put(a2, 1),  # replaces the a1 of this very batch
        Delete("a"),
        Put(fresh, None),  # a is free again
        Put(bumped(fresh), 1),
        Put(session("b"), None),
    ]
    assert await store.commit(batch) == [True] * len(batch)
    assert await store.load(["a", "b"]) == {"a": bumped(fresh), "b": session("b")}
    assert await store.count(T0) == 2


# The failed-write rule: once a write to an id does not take effect, the later writes of the
# batch to that id do not either. They were computed from the state the failed write expected,
# and letting one through can lose another writer's update (see base.py).


async def test_a_failed_write_fails_the_later_writes_to_its_id(store: Store) -> None:
    mine = session("a", metadata={"by": "me"})
    await put_all(store, [mine, session("b")])
    # Another manager sharing the store moves a to version 2 meanwhile.
    theirs = bumped(mine, metadata={"by": "them"}, timeout_ms=None)
    assert await store.commit([Put(theirs, 1)]) == [True]
    # This manager's batch was computed from version 1: two updates of a, each on the other.
    my_v2 = bumped(mine, metadata={"n": 1})
    my_v3 = bumped(my_v2, metadata={"n": 2}, timeout_ms=1)
    batch: list[Write] = [Put(my_v2, 1), Put(my_v3, 2)]
    # Without the rule, the second Put would succeed on *their* version 2, losing their write.
    assert await store.commit(batch) == [False, False]
    assert await store.load(["a"]) == {"a": theirs}
    # The index follows the stored session, never a write that failed.
    # my_v3 would expire a at T0 + 1: only b, which nobody touched, is expired later on.
    assert await store.expired(T0 + 2 * MINUTE, 10) == ["b"]
    assert await store.count(T0 + 2 * MINUTE) == 1


async def test_a_failed_put_then_a_delete_leaves_the_session_alone(store: Store) -> None:
    a = session("a")
    await put_all(store, [a])
    stale = bumped(session("a", version=5))
    assert await store.commit([Put(stale, 5), Delete("a")]) == [False, False]
    assert await store.load(["a"]) == {"a": a}
    # The same after a failed create, and after a conditional delete that found a live session.
    assert await store.commit([Put(session("a"), None), Delete("a")]) == [False, False]
    assert await store.commit([Delete("a", if_expired_at=T0), Delete("a")]) == [False, False]
    assert await store.load(["a"]) == {"a": a}
    assert await store.count(T0) == 1


async def test_a_failed_delete_fails_the_later_writes_to_its_id(store: Store) -> None:
    batch: list[Write] = [Delete("a"), Put(session("a"), None), Delete("a")]
    assert await store.commit(batch) == [False, False, False]
    assert await store.load(["a"]) == {}
    # The rule holds for the rest of the batch only: the next batch starts afresh.
    assert await store.commit([Put(session("a"), None)]) == [True]


async def test_a_failed_write_to_one_id_leaves_other_ids_alone(store: Store) -> None:
    a, b = session("a"), session("b")
    await put_all(store, [a, b])
    b2 = bumped(b, metadata={"step": 2})
    batch: list[Write] = [
        Put(bumped(a), 7),  # fails: a is at version 1
        Put(b2, 1),
        Put(session("a", version=9), 8),  # fails by the rule
        Put(session("c"), None),
        Delete("a"),  # fails by the rule
        Put(bumped(b2), 2),  # b's own chain goes on
        Delete("c"),
    ]
    assert await store.commit(batch) == [False, True, False, True, False, True, True]
    assert await store.load(["a", "b", "c"]) == {"a": a, "b": bumped(b2)}
    assert await store.count(T0) == 2


async def test_a_batch_with_a_malformed_write_changes_nothing(store: Store) -> None:
    before = session("before")
    await put_all(store, [before])
    batch = [Put(session("a"), None), Delete("before"), "not a write"]
    with pytest.raises(TypeError):
        await store.commit(batch)  # type: ignore[list-item]
    assert await store.load(["a", "before"]) == {"before": before}
    assert await store.count(T0) == 1


async def test_load_reads_many_ids_in_one_call(store: Store) -> None:
    sessions = [session(f"s{i:02}", last_accessed=T0 - i * MINUTE // 10) for i in range(30)]
    await put_all(store, sessions)
    wanted = [s.id for s in sessions[::3]] + ["absent", sessions[0].id]
    # Expired sessions are loaded too: deciding what to do with them is the manager's job.
    assert await store.load(wanted) == {s.id: s for s in sessions[::3]}


# --- scan ---


async def test_scan_pages_through_every_live_session_once(store: Store) -> None:
    live = [session(f"live-{i:03}") for i in range(40)]
    live += [session(f"forever-{i}", timeout_ms=None) for i in range(5)]
    expired = [session(f"old-{i}", last_accessed=T0 - 2 * MINUTE) for i in range(12)]
    await put_all(store, live + expired)
    for limit in (1, 7, 45, 1000):
        pages = await scan_all(store, T0, limit)
        seen = ids_of(pages)
        assert len(seen) == len(set(seen)), f"duplicates with limit {limit}"
        assert set(seen) == {s.id for s in live}
        assert {s.id: s for page in pages for s in page} == {s.id: s for s in live}
    assert len(await scan_all(store, T0, 7)) >= len(live) // 7


async def test_scan_completes_with_writes_between_pages(store: Store) -> None:
    originals = [session(f"s{i:03}") for i in range(60)]
    await put_all(store, originals)
    never_touched = {s.id for s in originals[::3]}
    updatable = [s for s in originals[1::3]]
    deletable = [s.id for s in originals[2::3]]
    seen: list[str] = []
    cursor: str | None = None
    step = 0
    while True:
        page, cursor = await store.scan(T0, cursor, 4)
        seen += [s.id for s in page]
        if cursor is None:
            break
        # Between pages, as a manager serving other requests would: create, update, delete.
        writes: list[Write] = [
            Put(session(f"new-{step:03}"), None),
            Put(session(f"s{step:03}+"), None),
        ]
        if updatable:
            old = updatable.pop()
            writes.append(Put(bumped(old, metadata={"step": step}), old.version))
        if deletable:
            writes.append(Delete(deletable.pop()))
        assert await store.commit(writes) == [True] * len(writes)
        step += 1
    assert len(seen) == len(set(seen)), "a session appeared twice"
    assert never_touched <= set(seen), "a session present throughout was missed"
    assert {s.id for s in originals[1::3]} <= set(seen), "an updated session was missed"


async def test_scan_cursors_cope_with_any_id(store: Store) -> None:
    ids = ["a", "a:b", "0:", ":", "1:2:3", "Z", "zz", "é", "日本", "a b", "~", "0"]
    await put_all(store, [session(sid) for sid in ids])
    for limit in (1, 2, 5):
        seen = ids_of(await scan_all(store, T0, limit))
        assert sorted(seen) == sorted(ids)


async def test_limits_must_be_positive(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.scan(T0, None, 0)
    with pytest.raises(ValueError):
        await store.expired(T0, 0)


# --- expiry ---


async def test_expired_lists_only_expired_sessions_up_to_limit(store: Store) -> None:
    # s{i} expires at T0 + i * 1000 (live at that very millisecond, expired one later).
    sessions = [session(f"s{i:02}", timeout_ms=1000 * i) for i in range(1, 21)]
    await put_all(store, [*sessions, session("forever", timeout_ms=None)])
    assert await store.expired(T0 + 1000, 100) == []
    assert await store.expired(T0 + 1001, 100) == ["s01"]
    at = T0 + 10_500  # s01..s10 are expired
    expected = {f"s{i:02}" for i in range(1, 11)}
    assert set(await store.expired(at, 100)) == expected
    some = await store.expired(at, 4)
    assert len(some) == 4 and set(some) <= expected
    assert set(await store.expired(T0 * 2, 100)) == {s.id for s in sessions}


async def test_count_counts_live_sessions_only(store: Store) -> None:
    sessions = [session(f"s{i:02}", timeout_ms=1000 * i) for i in range(1, 11)]
    await put_all(store, [*sessions, session("forever", timeout_ms=None)])
    assert await store.count(T0) == 11
    assert await store.count(T0 + 1000) == 11
    assert await store.count(T0 + 1001) == 10
    assert await store.count(T0 + 5500) == 6
    assert await store.count(T0 * 2) == 1
    # Asking about an earlier time again (a clock that stepped back) is answered correctly.
    assert await store.count(T0 + 5500) == 6
    assert set(await store.expired(T0 + 2500, 100)) == {"s01", "s02"}


async def test_expiry_follows_every_put(store: Store) -> None:
    a, b, c = session("a"), session("b"), session("c", timeout_ms=None)
    await put_all(store, [a, b, c])
    later = T0 + 2 * MINUTE
    assert set(await store.expired(later, 10)) == {"a", "b"}
    assert await store.count(later) == 1
    touched = replace(a, last_accessed=later)  # refreshed: live until later + MINUTE
    never = bumped(b, timeout_ms=None)  # set_ttl(None)
    shortened = bumped(c, timeout_ms=1)  # set_ttl(0.001): expired from T0 + 2
    assert await store.commit([Put(touched, 1), Put(never, 1), Put(shortened, 1)]) == [True] * 3
    assert await store.expired(later, 10) == ["c"]
    assert await store.count(later) == 2
    assert set(await store.expired(later + MINUTE + 1, 10)) == {"a", "c"}
    assert await store.expired(T0 + 1, 10) == []


async def test_a_sweep_in_batches_removes_exactly_the_expired(store: Store) -> None:
    expired = [session(f"old-{i:03}", last_accessed=T0 - 2 * MINUTE) for i in range(130)]
    live = [session(f"new-{i:03}") for i in range(20)]
    await put_all(store, expired + live)
    removed: list[str] = []
    for _ in range(20):
        batch = await store.expired(T0, 25)
        assert len(batch) <= 25
        if not batch:
            break
        results = await store.commit([Delete(sid, if_expired_at=T0) for sid in batch])
        assert results == [True] * len(batch)
        removed += batch
    assert sorted(removed) == sorted(s.id for s in expired)
    assert await store.count(T0) == 20
    assert set(await store.load([s.id for s in expired + live])) == {s.id for s in live}


# --- against a model ---


class Model:
    """The contract in its plainest form: what every store must agree with."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    def commit(self, writes: Sequence[Write]) -> list[bool]:
        failed: set[str] = set()  # the failed-write rule
        results = []
        for write in writes:
            ids = {write.session.id, write.moved_from} if isinstance(write, Put) else {write.id}
            ids.discard(None)
            ok = failed.isdisjoint(ids) and self._apply(write)
            if not ok:
                failed |= ids
            results.append(ok)
        return results

    def _apply(self, write: Write) -> bool:
        if isinstance(write, Put):
            current = self.sessions.get(write.session.id)
            stored_version = None if current is None else current.version
            if stored_version != write.expected_version:
                return False
            if write.moved_from is not None:
                source = self.sessions.get(write.moved_from)
                if source is None or source.version != write.session.version:
                    return False
            self.sessions[write.session.id] = write.session
            return True
        current = self.sessions.get(write.id)
        if current is None:
            return False
        if write.if_expired_at is not None and not current.expired_at(write.if_expired_at):
            return False
        if write.expected_version is not None and current.version != write.expected_version:
            return False
        del self.sessions[write.id]
        return True

    def live(self, now_ms: int) -> dict[str, Session]:
        return {sid: s for sid, s in self.sessions.items() if not s.expired_at(now_ms)}


async def test_random_batches_agree_with_the_model(harness: Harness, store: Store) -> None:
    rng = random.Random(20261123)
    model = Model()
    ids = [f"id{i:02}" for i in range(14)]
    bucket = store.bucket_of if isinstance(store, BucketedStore) else len  # moves stay in one
    now = T0
    for step in range(60):
        now += rng.choice([0, 1, 500, 20_000, 70_000])
        if rng.random() < 0.2:
            now -= rng.randint(0, 30_000)  # clocks step back; expiry must still be exact
        writes: list[Write] = []
        for _ in range(rng.randint(1, 8)):
            sid = rng.choice(ids)
            known = model.sessions.get(sid)
            version = known.version if known else rng.randint(1, 3)
            kind = rng.random()
            if kind < 0.4:
                timeout = rng.choice([None, 1, 1000, MINUTE, 3 * MINUTE])
                new = session(sid, last_accessed=now, timeout_ms=timeout, version=version + 1)
                expected = rng.choice([None, version, version, version + 1])
                writes.append(Put(new, expected))
            elif kind < 0.6:
                writes.append(Delete(sid, if_expired_at=now + rng.randint(-MINUTE, MINUTE)))
            elif kind < 0.75:
                expected = rng.choice([version, version, version + 1])
                writes.append(Delete(sid, expected_version=expected))
            elif kind < 0.85:
                target = rng.choice([i for i in ids if bucket(i) == bucket(sid)])
                moving = session(target, last_accessed=now, version=rng.choice([version, 1]))
                writes += [Put(moving, None, moved_from=sid), Delete(sid, expected_version=version)]
            else:
                writes.append(Delete(sid))
        assert await store.commit(writes) == model.commit(writes), f"step {step}"
        assert await store.load(ids) == model.sessions
        live = model.live(now)
        assert await store.count(now) == len(live)
        assert set(await store.expired(now, 100)) == set(model.sessions) - set(live)
        pages = await scan_all(store, now, rng.choice([1, 3, 50]))
        assert sorted(ids_of(pages)) == sorted(live)
        if step % 20 == 19:
            store = await harness.reopen(store)


async def test_calls_from_concurrent_tasks_are_each_atomic(store: Store) -> None:
    # The manager is the only caller, but a store must not interleave two calls' effects.
    async def creator(prefix: str) -> None:
        for i in range(20):
            await store.commit([Put(session(f"{prefix}{i:02}-{j}"), None) for j in range(3)])

    async with trio.open_nursery() as nursery:
        for prefix in "abcd":
            nursery.start_soon(creator, prefix)
    assert await store.count(T0) == 4 * 20 * 3


# --- the clock high-water mark ---


async def test_the_clock_mark_only_rises_and_survives_a_reopen(
    harness: Harness, store: Store
) -> None:
    assert await store.load_mark() == 0
    assert await store.commit([Mark(T0), Put(session("a"), None), Mark(T0 + 5)]) == [True] * 3
    assert await store.commit([Mark(T0 + 1)]) == [True]  # takes effect, lowers nothing
    assert await store.load_mark() == T0 + 5
    store = await harness.reopen(store)
    assert await store.load_mark() == T0 + 5


async def test_the_clock_mark_is_never_a_session(store: Store) -> None:
    await store.commit([Mark(T0 + MINUTE), Put(session("a"), None)])
    assert ids_of(await scan_all(store, T0, 10)) == ["a"]
    assert await store.count(T0) == 1
    assert await store.expired(T0 + 10 * MINUTE, 10) == ["a"]
    assert await store.load(["<mark>", "mark", "sessions_mark"]) == {}


async def test_a_failed_put_does_not_stop_the_mark(store: Store) -> None:
    assert await store.commit([Put(session("a"), 7), Mark(T0)]) == [False, True]
    assert await store.load_mark() == T0
