"""Daemon throughput next to Redis, measured in the same run at the same concurrency.

A real daemon (``run.py serve``, disk store in a temporary directory) and a private
``redis-server`` (no persistence) are started on free loopback ports. Our async client drives
the daemon with 1 and with 50 connections, each connection sending one request at a time;
``redis-benchmark`` drives Redis the same way (``-c 1`` / ``-c 50``, no pipelining). ``create``
is compared with Redis ``SET`` and ``retrieve`` with ``GET``. The ratio (ours / Redis) is what
to read; the target is at least 0.5.

    python -m bench.daemon [--requests N]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from bench.sessions import METADATA, print_table
from tests.daemon_process import DaemonProcess, free_port
from workers.client import Client, connect

CONNECTIONS = (1, 50)
#: Our operation and the Redis command it is measured against.
PAIRS = (("create", "SET"), ("retrieve", "GET"))
TARGET = 0.5
REDIS_SERVER = "/usr/bin/redis-server"
REDIS_BENCHMARK = "/usr/bin/redis-benchmark"


@contextlib.contextmanager
def private_redis() -> Iterator[int]:
    """A redis-server of our own on a free port, without persistence; yields the port."""
    port = free_port()
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            != "PONG"
        ):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield port
    finally:
        server.terminate()
        server.wait()


def redis_rates(port: int, connections: int, requests: int) -> dict[str, float]:
    """Requests per second of ``redis-benchmark`` for SET and GET."""
    done = subprocess.run(
        [REDIS_BENCHMARK, "-h", "127.0.0.1", "-p", str(port), "-c", str(connections),
         "-n", str(requests), "-t", "set,get", "-d", "100", "--csv"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = csv.reader(io.StringIO(done.stdout))
    return {row[0]: float(row[1]) for row in rows if row and row[0] in ("SET", "GET")}


async def _drive(clients: list[Client], requests: int, op: str, ids: list[str]) -> float:
    per_client = max(1, requests // len(clients))

    async def loop(c: Client) -> None:
        if op == "create":
            for _ in range(per_client):
                ids.append(await c.create(METADATA))
        else:
            for sid in random.choices(ids, k=per_client):
                await c.retrieve(sid)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(loop, c)
    return per_client * len(clients) / (time.perf_counter() - start)


async def daemon_rates(address: str, connections: int, requests: int) -> dict[str, float]:
    """Requests per second of create and retrieve through ``connections`` client connections."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(address)) for _ in range(connections)]
        ids: list[str] = []
        return {op: await _drive(clients, requests, op, ids) for op, _ in PAIRS}


def run(requests: int = 20_000) -> list[dict[str, Any]]:
    """Measure and return one record per (operation, connections), as bench.sessions does."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    daemon = DaemonProcess(workdir, "--log-level", "WARNING")
    try:
        daemon.start()
        records = []
        with private_redis() as redis_port:
            for connections in CONNECTIONS:
                n = requests if connections > 1 else requests // 4
                ours = trio.run(daemon_rates, daemon.tcp, connections, n)
                theirs = redis_rates(redis_port, connections, n)
                for op, command in PAIRS:
                    ratio = ours[op] / theirs[command]
                    records.append(
                        {
                            "name": f"daemon {op} c={connections}",
                            "ops_per_s": ours[op],
                            "floor_name": f"redis {command} c={connections}",
                            "floor_ops_per_s": theirs[command],
                            "ratio": ratio,
                            "target": TARGET,
                            "holds": ratio >= TARGET,
                        }
                    )
        return records
    finally:
        daemon.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per measurement")
    args = parser.parse_args()
    records = run(args.requests)
    print_table(records)
    for r in records:
        verdict = "meets" if r["holds"] else "below"
        print(f"{r['name']}: ratio {r['ratio']:.2f} {verdict} the target {r['target']}")


if __name__ == "__main__":
    main()
