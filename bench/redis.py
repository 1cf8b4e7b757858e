"""The redis store on one server, a Redis Cluster and Sentinel, next to bare coredis in the run.

Each deployment is started privately for the run, on free loopback ports, from the test
helpers (``tests/helpers``): one ``redis-server``; a Redis Cluster of 3 masters, each with a
replica; a primary, its replica and a sentinel. On each, the embedded service creates and
retrieves sessions with 1 and with 50 concurrent callers, and the floor is the same client
library doing the same work bare, with as many concurrent tasks, through the same kind of
client (``coredis.Redis``, ``RedisCluster``, the Sentinel's primary): ``SET`` of the record a
create writes, ``GET`` and decoding of it for a retrieve. The ratio (service / bare) is what
to read. A retrieve is one script call (expiry check and access-time refresh in one round
trip); concurrent creates are batched into one script call per bucket.

Figures from a machine where other work runs at the same time are indicative only.

    python -m bench.redis [--ops N]
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import trio

from bench.records import Record, requests_at, throughput
from bench.report import count_command_line
from bench.sessions import METADATA, callers_rate, new_record
from tests.helpers.redis_cluster import LocalCluster, LocalSentinel
from tests.helpers.redis_server import RedisServer
from workers import open_session_service
from workers.record.codec import decode_session
from workers.record.session import new_id
from workers.stores.redis_urls import connected

DEPLOYMENTS = ("server", "cluster", "sentinel")
CALLERS = (1, 50)
#: Our operation and the bare command it is measured against.
PAIRS = (("create", "SET"), ("retrieve", "GET"))
PREFIX = "bench-redis:"


@contextlib.contextmanager
def deployment(kind: str) -> Iterator[str]:
    """A private ``kind`` deployment for the block; yields the store's URL."""
    if kind == "server":
        with RedisServer() as server:
            yield server.url
        return
    setup = LocalCluster() if kind == "cluster" else LocalSentinel()
    try:
        setup.start()
        yield setup.url
    finally:
        setup.stop()


async def bare_rates(url: str, callers: int, ops: int) -> dict[str, float]:
    """SET, then GET and decode, of session records, with coredis alone."""
    keys = [f"{PREFIX}raw:{{{new_id()}}}" for _ in range(ops)]
    record = new_record(new_id())
    async with connected(url) as client:

        async def create(i: int) -> None:
            await client.set(keys[i], record)

        async def retrieve(i: int) -> None:
            decode_session(await client.get(keys[i]))

        return {
            "SET": await callers_rate(callers, ops, create),
            "GET": await callers_rate(callers, ops, retrieve),
        }


async def service_rates(url: str, callers: int, ops: int) -> dict[str, float]:
    """create, then retrieve of the sessions just created (in random order), by the service."""
    ids = [""] * ops
    prefix = f"{PREFIX}service-{callers}:"
    async with open_session_service(backend="redis", url=url, prefix=prefix) as sessions:

        async def create(i: int) -> None:
            ids[i] = await sessions.create(METADATA)

        created = await callers_rate(callers, ops, create)
        random.shuffle(ids)

        async def retrieve(i: int) -> None:
            await sessions.retrieve(ids[i])

        return {"create": created, "retrieve": await callers_rate(callers, ops, retrieve)}


def run(ops: int = 5000) -> list[Record]:
    """Measure and return one record per (deployment, operation, callers)."""
    records = []
    for kind in DEPLOYMENTS:
        with deployment(kind) as url:
            for callers in CALLERS:
                n = requests_at(callers, ops)
                bare = trio.run(bare_rates, url, callers, n)
                ours = trio.run(service_rates, url, callers, n)
                for op, command in PAIRS:
                    records.append(
                        throughput(
                            f"redis {kind} {op} x{callers}",
                            ours[op],
                            f"coredis {kind} {command} x{callers}",
                            bare[command],
                        )
                    )
    return records


def main() -> None:
    count_command_line(__doc__, run, "--ops", 5000, "operations per measurement")


if __name__ == "__main__":
    main()
