"""The session record, ids, ttl arithmetic and the msgpack codec, without a service."""

from __future__ import annotations

import dataclasses
import pickle
import threading

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from workers import InvalidMetadata, InvalidTTL, Session, SessionTooLarge, StoreError
from workers.record.codec import canonical_metadata, decode_session, encode_session, pack
from workers.record.session import build_session, new_id, ttl_to_ms
from workers.stores.thread import StoreThread

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
sessions = st.builds(
    Session,
    id=st.text(min_size=1, max_size=40),
    created_at=st.integers(0, 2**53),
    last_accessed=st.integers(0, 2**53),
    timeout_ms=st.none() | st.integers(1, 2**40),
    metadata=st.dictionaries(st.text(), json_like, max_size=5),
    version=st.integers(1, 2**31),
)


@given(sessions)
def test_records_round_trip_field_for_field(session: Session) -> None:
    assert decode_session(encode_session(session)) == session


@given(sessions)
def test_the_fast_constructor_builds_the_same_frozen_session(session: Session) -> None:
    s = session
    built = build_session(s.id, s.created_at, s.last_accessed, s.timeout_ms, s.metadata, s.version)
    assert type(built) is Session and built == session and repr(built) == repr(session)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.version = 2  # type: ignore[misc]


@given(st.dictionaries(st.text(), json_like, max_size=5))
def test_canonical_metadata_equals_what_was_given(metadata: dict) -> None:
    copy = canonical_metadata(metadata, 1 << 20)
    assert copy == metadata and copy is not metadata


def test_records_that_are_not_ours_are_store_errors() -> None:
    for data in (b"", b"\xc1", pack([99, "id"]), pickle.dumps({"a": 1}), pack({"a": 1})):
        with pytest.raises(StoreError):
            decode_session(data)


def test_metadata_limits() -> None:
    with pytest.raises(SessionTooLarge):
        canonical_metadata({"x": "y" * 100}, 50)
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(InvalidMetadata):
        canonical_metadata({"cycle": cycle}, 1 << 20)


def test_expiry_is_idle_based_and_inclusive() -> None:
    s = Session("a", 0, 1000, 500, {}, 1)
    assert s.expires_at == 1500
    assert not s.expired_at(1500) and s.expired_at(1501)
    assert not Session("a", 0, 0, None, {}, 1).expired_at(2**62)
    assert s.accessed(900) is s and s.accessed(2000).last_accessed == 2000


def test_ids_are_128_random_bits_in_hex() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_ttl_arithmetic() -> None:
    assert ttl_to_ms(None) is None
    assert ttl_to_ms(2) == 2000 and ttl_to_ms(0.0001) == 1 and ttl_to_ms(1.5) == 1500
    for bad in (0, -1, float("nan"), float("inf"), "1", True, [1]):
        with pytest.raises(InvalidTTL):
            ttl_to_ms(bad)


async def test_the_store_thread_is_one_long_lived_thread() -> None:
    worker = StoreThread("test-store")
    try:
        seen = {await worker.run(threading.get_ident) for _ in range(20)}
        assert len(seen) == 1 and threading.get_ident() not in seen
        with pytest.raises(ZeroDivisionError):
            await worker.run(lambda: 1 / 0)
        assert await worker.run(sum, [1, 2, 3]) == 6
    finally:
        worker.stop()


async def test_a_cancelled_caller_waits_for_its_job_to_finish() -> None:
    worker = StoreThread("test-store")
    started, release, done = threading.Event(), threading.Event(), []

    def job() -> None:
        started.set()
        release.wait()
        done.append(True)

    try:
        with trio.move_on_after(0.01) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.run, job)
                await trio.to_thread.run_sync(started.wait)
                scope.cancel()
                release.set()
        assert done == [True]
    finally:
        worker.stop()
