"""Several session services sharing one Redis, and a service riding out a Redis outage.

The sharing tests run each service in an OS process of its own (``sys.executable -c PEER``),
the way several daemons or application processes share sessions: every peer opens
``open_session_service(backend="redis")`` on the same URL and key prefix and answers JSON
commands, one per line, on its stdin. The outage tests run one service in this process
against a private ``redis-server`` that they stop, freeze and start again.

No clock fixture: Trio's virtual clock would jump while a service waits on Redis's socket, so
the bounds here (``PROMPT``) are real seconds, far above what a prompt answer takes and far
below a hang.
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers import ROOT
from helpers.redis_cluster import command, data_commands, info
from helpers.redis_server import RedisServer, unique_prefix

from workers import ServiceUnavailable, SessionNotFound, StoreError, open_session_service
from workers.faults import FaultyStore
from workers.stores.redis import RedisStore

#: Every test here starts processes (see the slow marker in pyproject.toml).
pytestmark = pytest.mark.slow

#: Real seconds: a peer starting, a prompt failure, a contended batch of increments.
PROMPT = 20.0

#: A service in a process of its own. argv: Redis URL, key prefix. Reads ``[op, args]`` lines
#: and answers ``{"ok": result}`` or ``{"error": class name, "message": ...}`` lines.
PEER = r"""
import json, os, sys
import trio
from workers import StoreError, open_session_service


async def commands(stream):
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = await stream.receive_some()
            if not chunk:
                return
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        yield json.loads(line)

async def increment(service, sid, times, report):
    done = 0
    while done < times:
        try:
            await service.update(sid, lambda m: {**m, "n": m["n"] + 1})
        except StoreError as exc:
            if "kept changing" not in str(exc):
                raise
            report["gave up"] += 1  # lost every race: nothing was written, so try again
        else:
            done += 1

async def run(service, op, args):
    if op == "increment":  # sid, updates per task, tasks: how often the manager gave up
        sid, times, tasks = args
        report = {"gave up": 0}
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(increment, service, sid, times, report)
        return report
    if op == "set":  # sid, key, value: update(sid, fn) with an fn that sets one key
        sid, key, value = args
        session = await service.update(sid, lambda m: {**m, key: value})
        return session.to_dict()
    result = await getattr(service, op)(*args)
    if isinstance(result, list):
        return [s.to_dict() for s in result]
    return result.to_dict() if hasattr(result, "to_dict") else result

async def main(url, prefix):
    options = dict(backend="redis", url=url, prefix=prefix, cleanup_interval=1e9)
    async with open_session_service(**options) as service:
        print(json.dumps({"ok": os.getpid()}), flush=True)
        async for op, args in commands(trio.lowlevel.FdStream(os.dup(0))):
            try:
                answer = {"ok": await run(service, op, args)}
            except Exception as exc:
                answer = {"error": type(exc).__name__, "message": str(exc)}
            print(json.dumps(answer), flush=True)

trio.run(main, *sys.argv[1:])
"""


class PeerError(Exception):
    """A peer answered a command with an error (its class name is ``kind``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class Peer:
    """One service process, driven over its stdin and stdout."""

    def __init__(self, process: trio.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr
        self._buffer = b""

    async def ask(self, op: str, *args: Any) -> Any:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(json.dumps([op, args]).encode() + b"\n")
        return await self.answer()

    async def answer(self) -> Any:
        assert self.process.stdout is not None
        with trio.fail_after(PROMPT):
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    raise AssertionError(
                        f"peer {self.process.pid} exited ({self.process.poll()}): "
                        + self.stderr.read_text()[-3000:]
                    )
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer = json.loads(line)
        if "error" in answer:
            raise PeerError(answer["error"], answer["message"])
        return answer["ok"]

    async def stop(self) -> None:
        """Close its stdin: the peer leaves its service block and exits."""
        assert self.process.stdin is not None
        await self.process.stdin.aclose()
        with trio.move_on_after(PROMPT):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(f"peer {self.process.pid} did not exit when its stdin closed")
        assert self.process.returncode == 0, self.stderr.read_text()[-3000:]


@asynccontextmanager
async def peers(n: int, url: str, prefix: str, tmp_path: Path) -> AsyncIterator[list[Peer]]:
    """``n`` service processes on ``url`` and ``prefix``, all started and ready."""
    started: list[Peer] = []
    try:
        for i in range(n):
            stderr = tmp_path / f"peer-{i}.stderr"
            with stderr.open("wb") as err:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-c", PEER, url, prefix],
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                )
            started.append(Peer(process, stderr))
        # They start in parallel; each says its pid once its service is up.
        pids = [await peer.answer() for peer in started]
        assert len(set(pids)) == n
        yield started
        for peer in started:
            await peer.stop()
    finally:
        for peer in started:
            if peer.process.returncode is None:
                peer.process.kill()
        with trio.CancelScope(shield=True):
            for peer in started:
                await peer.process.wait()


# --- several processes, one Redis ---


async def test_a_session_made_in_one_process_is_used_in_another(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with peers(2, redis_url, redis_prefix, tmp_path) as (one, two):
        sid = await one.ask("create", {"user_id": "user123", "auth_method": "api_key"}, 600)

        seen = await two.ask("retrieve", sid)
        assert seen["id"] == sid
        assert seen["metadata"] == {"user_id": "user123", "auth_method": "api_key"}

        updated = await two.ask("set", sid, "theme", "dark")
        assert updated["version"] == 2
        back = await one.ask("peek", sid)
        assert back["metadata"] == {"user_id": "user123", "auth_method": "api_key", "theme": "dark"}
        assert back["version"] == 2
        assert [s["id"] for s in await one.ask("list_sessions")] == [sid]
        assert await one.ask("count") == 1

        assert await two.ask("delete", sid) is True
        with pytest.raises(PeerError) as caught:
            await one.ask("retrieve", sid)
        assert caught.value.kind == "SessionNotFound"
        assert await one.ask("delete", sid) is False
        assert await two.ask("count") == 0


async def test_concurrent_increments_from_several_processes_lose_nothing(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    processes, tasks, per_task = 3, 5, 10  # 50 updates per process, from 5 tasks each
    async with peers(processes, redis_url, redis_prefix, tmp_path) as group:
        sid = await group[0].ask("create", {"n": 0}, None)
        reports: list[dict[str, int]] = [{} for _ in group]

        async def increment(i: int) -> None:
            reports[i] = await group[i].ask("increment", sid, per_task, tasks)

        async with trio.open_nursery() as nursery:
            for i in range(processes):
                nursery.start_soon(increment, i)

        # Every increment is applied exactly once: none lost, none doubled, and the managers'
        # jittered retries mean none ran out of attempts (StoreError "kept changing").
        total = processes * tasks * per_task
        final = await group[-1].ask("peek", sid)
        assert final["metadata"] == {"n": total}
        assert final["version"] == 1 + total
        gave_up = sum(report["gave up"] for report in reports)
        assert gave_up == 0, reports


# --- the failed-write rule, seen from the service ---


class Interloper:
    """A redis store whose next commit is preceded by ``before_commit()``, once.

    That is how a test puts another writer's commit between a manager's load and its commit,
    the race every sharing manager must survive. Everything else goes to the wrapped store.
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self.before_commit: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def commit(self, writes: Any) -> list[bool]:
        hook, self.before_commit = self.before_commit, None
        if hook is not None:
            await hook()
        return await self._store.commit(writes)


async def test_a_batch_that_lost_a_race_is_retried_whole(redis_url: str, redis_prefix: str) -> None:
    # One batch of this service holds update(sid) and then delete(sid). Another service
    # updates sid between the batch's load and its commit, so the update's Put fails, and by
    # the failed-write rule so does the delete. Both must be retried: the delete too, or it
    # would report success for a session it never removed.
    store = Interloper(RedisStore(redis_url, prefix=redis_prefix))
    async with (
        open_session_service(store=store, cleanup_interval=1e9) as mine,
        open_session_service(
            backend="redis", url=redis_url, prefix=redis_prefix, cleanup_interval=1e9
        ) as theirs,
    ):
        sid = await mine.create({"n": 0})
        other = await mine.create({"n": 0})
        held = trio.Event()
        release = trio.Event()

        async def hold() -> None:
            held.set()
            await release.wait()

        async def interfere() -> None:
            await theirs.update(sid, lambda m: {**m, "n": m["n"] + 100})

        results: dict[str, Any] = {}

        async def update() -> None:
            results["update"] = await mine.update(sid, lambda m: {**m, "n": m["n"] + 1})

        async def delete() -> None:
            results["delete"] = await mine.delete(sid)

        async with trio.open_nursery() as nursery:
            # Hold the manager inside a commit, so that the next two requests queue up in
            # order and make one batch of their own.
            store.before_commit = hold
            nursery.start_soon(mine.update, other, lambda m: {**m, "n": 1})
            await held.wait()
            nursery.start_soon(update)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(delete)
            await trio.testing.wait_all_tasks_blocked()
            store.before_commit = interfere
            release.set()

        assert results["update"].metadata == {"n": 101}  # on top of the other service's
        assert results["delete"] is True
        with pytest.raises(SessionNotFound):
            await theirs.peek(sid)
        with pytest.raises(SessionNotFound):
            await mine.peek(sid)


# --- Redis down and back ---


def outage_options(server: RedisServer) -> dict[str, Any]:
    return {
        "backend": "redis",
        "url": server.url,
        "prefix": unique_prefix(),
        "connect_timeout": 0.5,
        "command_timeout": 0.5,
        "cleanup_interval": 1e9,
    }


async def every_call_is_unavailable(service: Any, sid: str) -> None:
    calls = [
        lambda: service.create({"user_id": "during"}),
        lambda: service.retrieve(sid),
        lambda: service.peek(sid),
        lambda: service.update(sid, lambda m: {**m, "x": 1}),
        lambda: service.touch(sid),
        lambda: service.delete(sid),
        service.count,
        service.list_sessions,
        service.cleanup_expired,
    ]
    for make_call in calls:
        with pytest.raises(ServiceUnavailable):
            await make_call()


async def test_calls_fail_promptly_while_redis_is_down_and_work_once_it_is_back(
    private_redis: RedisServer,
) -> None:
    async with open_session_service(**outage_options(private_redis)) as service:
        sid = await service.create({"user_id": "before"})
        assert (await service.retrieve(sid)).metadata == {"user_id": "before"}

        private_redis.stop()
        with trio.fail_after(PROMPT):
            for _ in range(3):  # again and again: the tree must not give up
                await every_call_is_unavailable(service, sid)
        assert service.restarts == 0  # Redis's failures are the callers', not crashes

        private_redis.start()  # same port, empty: this private server keeps nothing
        with trio.fail_after(PROMPT):
            with pytest.raises(SessionNotFound):
                await service.retrieve(sid)
            again = await service.create({"user_id": "after"})
            updated = await service.update(again, lambda m: {**m, "theme": "dark"})
            assert updated.metadata == {"user_id": "after", "theme": "dark"}
            assert await service.count() == 1
            assert await service.delete(again) is True
        assert service.restarts == 0
    # Leaving the block stopped the tree normally: no SupervisorShutdown was raised.


async def test_a_frozen_redis_fails_calls_promptly_and_recovers(
    private_redis: RedisServer,
) -> None:
    async with open_session_service(**outage_options(private_redis)) as service:
        sid = await service.create({"user_id": "before"})
        private_redis.pause()
        try:
            with trio.fail_after(PROMPT):
                with pytest.raises(ServiceUnavailable):
                    await service.retrieve(sid)
                with pytest.raises(ServiceUnavailable):
                    await service.create({"user_id": "during"})
        finally:
            private_redis.resume()
        with trio.fail_after(PROMPT):
            # The create's reply was lost, so it may or may not have been applied.
            assert await service.count() in (1, 2)
            assert (await service.retrieve(sid)).metadata == {"user_id": "before"}
        assert service.restarts == 0


# --- a full Redis, and what a read costs ---


async def test_a_full_redis_keeps_serving_reads(caplog: pytest.LogCaptureFixture) -> None:
    with RedisServer(args=["--maxmemory-policy", "noeviction"]) as server:
        options = outage_options(server)
        store = FaultyStore(RedisStore(server.url, prefix=options["prefix"]))
        async with open_session_service(store=store, cleanup_interval=1e9) as service:
            sids = [await service.create({"user_id": f"user-{i}"}) for i in range(5)]
            used = int(info(server.port, "memory")["used_memory"])
            command(server.port, "CONFIG", "SET", "maxmemory", used + 1_000_000)
            with trio.fail_after(PROMPT), pytest.raises(StoreError, match="full"):
                for _ in range(1000):  # fill it: 60 kB at a time, up to maxmemory
                    await service.create({"pad": "x" * 60_000})
            full = int(info(server.port, "memory")["used_memory"])
            assert full > used + 900_000
            # Stay full: the refused create's 60 kB argument was counted until it was refused,
            # so the data alone may be just below the limit, with room for a few small writes.
            command(server.port, "CONFIG", "SET", "maxmemory", full - 100_000)

            # Reads go on: the access time cannot be written, the session is returned anyway.
            with caplog.at_level(logging.WARNING, logger="workers.core.manager"):
                for sid in sids:
                    user = f"user-{sids.index(sid)}"
                    assert (await service.retrieve(sid)).metadata == {"user_id": user}
                    await service.touch(sid)
                    assert (await service.peek(sid)).id == sid
            assert (await service.stats())["store_warnings"] == 2 * len(sids)
            assert "reads answered without writing their access time" in caplog.text
            # Writes fail as before, and change nothing.
            with pytest.raises(StoreError, match="full"):
                await service.update(sids[0], lambda m: {**m, "theme": "dark"})
            with pytest.raises(StoreError, match="full"):
                await service.rotate(sids[0])
            assert (await service.peek(sids[0])).metadata == {"user_id": "user-0"}

            # In one batch with a write that fails, a read of the same session fails too (it
            # would show what was not written); a read of another session is answered.
            answers: dict[str, Any] = {}

            async def ask(name: str, call: Any) -> None:
                try:
                    answers[name] = await call()
                except StoreError as exc:
                    answers[name] = exc

            held = store.hang("load", times=1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "held", lambda: service.peek(sids[2]))
                await held.struck.wait()  # the manager waits in that batch's load
                nursery.start_soon(ask, "update", lambda: service.patch(sids[0], {"x": 1}))
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(ask, "same", lambda: service.peek(sids[0]))
                nursery.start_soon(ask, "other", lambda: service.peek(sids[1]))
                await trio.testing.wait_all_tasks_blocked()
                store.remove(held)  # the three queued requests now make one batch
            assert isinstance(answers["update"], StoreError)
            assert isinstance(answers["same"], StoreError)
            assert answers["other"].metadata == {"user_id": "user-1"}
            assert service.restarts == 0

            command(server.port, "CONFIG", "SET", "maxmemory", 0)  # room again
            updated = await service.update(sids[0], lambda m: {**m, "theme": "dark"})
            assert updated.metadata == {"user_id": "user-0", "theme": "dark"}


async def test_a_retrieve_is_one_round_trip(private_redis: RedisServer) -> None:
    ticks = itertools.count()
    base = time.time()

    def clock() -> float:  # a millisecond further at each reading: no clock mark is due
        return base + next(ticks) / 1000

    options = {**outage_options(private_redis), "clock": clock}
    async with open_session_service(**options) as service:
        ids = [await service.create({"n": i}) for i in range(20)]
        await service.retrieve(ids[0])  # the script is loaded
        command(private_redis.port, "CONFIG", "RESETSTAT")
        for sid in ids:
            before = await service.peek(sid)
            assert (await service.retrieve(sid)).last_accessed > before.last_accessed
        calls = data_commands(private_redis.port)
    # 20 peeks (an MGET each) and 20 retrieves (one EVALSHA each, refresh included). Redis
    # counts the commands a script runs too: the script's GET, SET and ZADD of each session.
    assert calls == Counter({"mget": 20, "evalsha": 20, "get": 20, "set": 20, "zadd": 20})
