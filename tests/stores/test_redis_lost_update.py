"""No lost update on a shared Redis: rotate and delete_where against another service's update.

Two services share one Redis (a server, and a Redis Cluster). The interleaving that used to
lose an update is forced with the fault tools: this service's commit hangs
(:meth:`FaultyStore.hang`) after it loaded the session, the other service updates the session
and is answered, then the commit goes on. Before the fix, the commit's unconditional delete
removed the update every time; now the delete names the version it loaded, fails, and the
operation is retried on the updated session. Each race is run 100 times and must lose nothing.

No clock fixture: the services wait on Redis's sockets. This service's wall clock is frozen,
so that it commits no clock mark of its own (which the hung commit could catch instead).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from helpers.redis_cluster import shared_cluster
from helpers.redis_server import unique_prefix

from workers import SessionNotFound, SessionService, open_session_service
from workers.faults import FaultyStore
from workers.stores.redis import RedisStore

TRIES = 100
#: Real seconds for one race; far above what it takes.
PROMPT = 20.0


@pytest.fixture(params=["server", pytest.param("cluster", marks=pytest.mark.slow)])
def shared_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The Redis both services use: the test Redis, or the run's Redis Cluster."""
    return redis_url if request.param == "server" else shared_cluster().url


@asynccontextmanager
async def two_services(url: str) -> AsyncIterator[tuple[FaultyStore, SessionService, Any]]:
    """This service (on a FaultyStore, with a frozen clock) and another one, sharing ``url``."""
    prefix = unique_prefix()
    store = FaultyStore(RedisStore(url, prefix=prefix))
    frozen = time.time()
    async with (
        open_session_service(store=store, clock=lambda: frozen, cleanup_interval=1e9) as mine,
        open_session_service(
            backend="redis", url=url, prefix=prefix, cleanup_interval=1e9
        ) as theirs,
    ):
        yield store, mine, theirs


async def race(store: FaultyStore, mine_call: Any, their_call: Any) -> Any:
    """Run ``mine_call()`` with its first commit held until ``their_call()`` was answered."""
    fault = store.hang("commit", times=1)
    commits = store.calls["commit"]
    result: dict[str, Any] = {}

    async def mine() -> None:
        result["mine"] = await mine_call()

    with trio.fail_after(PROMPT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mine)
            await fault.struck.wait()  # loaded, and held in its commit
            await their_call()
            store.remove(fault)
    assert store.calls["commit"] > commits, "the held commit never ran"
    return result["mine"]


async def test_rotate_never_loses_an_update_made_meanwhile(shared_url: str) -> None:
    async with two_services(shared_url) as (store, mine, theirs):
        lost, retried = 0, 0
        for i in range(TRIES):
            sid = await mine.create({"user_id": f"user-{i}", "n": 0})
            before = store.calls["commit"]
            new = await race(
                store,
                lambda sid=sid: mine.rotate(sid),
                lambda sid=sid: theirs.update(sid, lambda m: {**m, "n": 1}),
            )
            retried += store.calls["commit"] - before - 1  # the held commit lost: once more
            with pytest.raises(SessionNotFound):
                await theirs.peek(sid)  # never under both ids
            try:
                moved = await theirs.peek(new)
            except SessionNotFound:
                lost += 1  # under neither id
                continue
            if moved.metadata != {"user_id": f"user-{i}", "n": 1} or moved.version != 2:
                lost += 1
        assert lost == 0
        assert retried == TRIES, "every rotate's first commit should have lost the race"


async def test_delete_where_never_deletes_an_update_made_meanwhile(shared_url: str) -> None:
    async with two_services(shared_url) as (store, mine, theirs):
        lost, deleted = 0, 0
        for i in range(TRIES):
            user = f"user-{i}"
            sid = await mine.create({"user_id": user})
            keep = await mine.create({"user_id": "someone else"})
            deleted += await race(
                store,
                lambda user=user: mine.delete_where("user_id", user),
                # Moved to another user after the delete_where found it.
                lambda sid=sid: theirs.update(sid, lambda m: {**m, "user_id": "moved"}),
            )
            try:
                survivor = await theirs.peek(sid)
            except SessionNotFound:
                lost += 1
                continue
            if survivor.metadata != {"user_id": "moved"}:
                lost += 1
            assert (await theirs.peek(keep)).metadata == {"user_id": "someone else"}
        assert (lost, deleted) == (0, 0)
        # And with nothing in the way it deletes what matches.
        sid = await mine.create({"user_id": "gone"})
        assert await mine.delete_where("user_id", "gone") == 1
        with pytest.raises(SessionNotFound):
            await theirs.peek(sid)
