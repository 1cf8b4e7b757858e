"""Daemon throughput next to Redis, measured in the same run at the same concurrency.

A real daemon (``run.py serve``, disk store in a temporary directory) and two private
``redis-server`` processes are started on free loopback ports: one without persistence, and
one with ``appendonly yes`` and ``appendfsync everysec`` (the durable configuration a user would
compare a disk store with: every write logged, synced once a second in the background). Each
is driven with 1 and with 50 connections, each connection sending one request at a time and
the next as soon as the answer is in (no pipelining): ``redis-benchmark`` drives Redis (``-c``,
random keys over a 100,000-key space with ``-r``, 100-byte values), and :func:`drive`, a load
generator of ours, drives the daemon. ``create`` is compared with Redis ``SET`` and
``retrieve`` (of sessions created in the run, chosen at random) with ``GET``. The ratio (ours /
Redis) is what to read. Targets at 50 connections: retrieve on disk >= 0.5 of ``GET``, create
on the memory store >= 0.4 of ``SET``; create on disk is judged against the embedded disk
service's create with 50 callers of the same run (``run.py bench`` passes it: >= 0.8, the
protocol and the sockets may cost 20%), since a durable SQLite write is not Redis's ``SET``.

The load generator is one thread over non-blocking sockets with prepared requests, so that
the daemon is measured and not a client library: it costs a few microseconds per request,
and drives redis-server at least as fast as ``redis-benchmark`` does (checked once by hand
with the same loop speaking RESP). Every answer is decoded and checked; an error fails the
benchmark. A memory-store daemon is measured too, without a target, to separate what the
protocol and the I/O cost from what the disk store costs, and so is :mod:`bench.bare_server`,
a bare loop on the daemon's reactor that answers every request with a fixed session: the
most a Python daemon on Trio could do with these sockets and this load generator.

The retrieves read the 20,000 sessions just created, more than the disk store's read cache
holds by default (16,384): about a fifth of them go to the store thread. ``--requests 12000``
measures a working set that fits.

    python -m bench.daemon [--requests N]
"""

from __future__ import annotations

import contextlib
import csv
import io
import random
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from bench.records import Record, requests_at, throughput
from bench.report import count_command_line
from bench.sessions import METADATA
from tests.helpers import ROOT
from tests.helpers.daemon_process import DaemonProcess, free_port

CONNECTIONS = (1, 50)
#: Our operation and the Redis command it is measured against.
PAIRS = (("create", "SET"), ("retrieve", "GET"))
#: Targets against Redis by (backend, operation), at TARGET_CONNECTIONS.
TARGETS = {("disk", "retrieve"): 0.5, ("memory", "create"): 0.4}
#: Disk create's target against the embedded service's create x50 of the same run.
EMBEDDED_TARGET = 0.8
#: Connections at which the target applies; the other counts are reported only.
TARGET_CONNECTIONS = 50
REDIS_SERVER = "/usr/bin/redis-server"
REDIS_BENCHMARK = "/usr/bin/redis-benchmark"
REDIS_KEYSPACE = 100_000


@contextlib.contextmanager
def _server(
    argv: list[str], ready: Callable[[], bool], what: str, **options: Any
) -> Iterator[None]:
    """Run ``argv`` until the block ends, entering it once ``ready()`` holds (within 10 s)."""
    server = subprocess.Popen(argv, **options)
    try:
        deadline = time.monotonic() + 10
        while not ready():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.02)
        yield
    finally:
        server.terminate()
        server.wait()


def _redis_pongs(port: int) -> bool:
    ping = ["redis-cli", "-p", str(port), "ping"]
    return subprocess.run(ping, capture_output=True, text=True).stdout.strip() == "PONG"


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


#: How each private redis-server runs: without persistence, and logging every write.
REDIS_MODES = {
    "": ["--appendonly", "no"],
    " (appendonly everysec)": ["--appendonly", "yes", "--appendfsync", "everysec"],
}


@contextlib.contextmanager
def private_redis(persistence: list[str] | None = None) -> Iterator[int]:
    """A redis-server of our own on a free port, in a scratch directory, with ``persistence``
    options (default: none); yields the port."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
        argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--dir", directory, *(persistence or REDIS_MODES[""])]  # fmt: skip
        with _server(argv, lambda: _redis_pongs(port), "redis-server", stdout=subprocess.DEVNULL):
            yield port


def redis_rates(port: int, connections: int, requests: int) -> dict[str, float]:
    """Requests per second of ``redis-benchmark`` for SET and GET."""
    done = subprocess.run(
        [REDIS_BENCHMARK, "-h", "127.0.0.1", "-p", str(port), "-c", str(connections),
         "-n", str(requests), "-r", str(REDIS_KEYSPACE), "-t", "set,get", "-d", "100", "--csv"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = csv.reader(io.StringIO(done.stdout))
    return {row[0]: float(row[1]) for row in rows if row and row[0] in ("SET", "GET")}


def drive(
    port: int, connections: int, requests: int, request: Callable[[int], bytes]
) -> tuple[float, list[object]]:
    """Send ``requests`` requests over ``connections`` connections, one in flight on each.

    ``request(i)`` gives the bytes of the i-th request. Returns the rate and every result, in
    no particular order; raises RuntimeError on the first error answer.
    """
    per_connection = max(1, requests // connections)
    selector = selectors.DefaultSelector()
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    results: list[object] = []
    try:
        sent = [0] * connections
        unpackers = [msgpack.Unpacker(raw=False) for _ in range(connections)]
        start = time.perf_counter()
        for c, sock in enumerate(sockets):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            sock.send(request(c * per_connection))
            sent[c] = 1
            selector.register(sock, selectors.EVENT_READ, c)
        remaining = per_connection * connections
        while remaining:
            for key, _ in selector.select():
                c, sock = key.data, key.fileobj
                data = sock.recv(65536)  # type: ignore[union-attr]
                if not data:
                    raise RuntimeError("the daemon closed a connection")
                unpackers[c].feed(data)
                for _, _, error, result in unpackers[c]:
                    if error is not None:
                        raise RuntimeError(f"the daemon answered with an error: {error}")
                    results.append(result)
                    remaining -= 1
                    if sent[c] < per_connection:
                        sock.send(request(c * per_connection + sent[c]))  # type: ignore[union-attr]
                        sent[c] += 1
        rate = per_connection * connections / (time.perf_counter() - start)
    finally:
        selector.close()
        for sock in sockets:
            sock.close()
    return rate, results


@contextlib.contextmanager
def bare_server() -> Iterator[int]:
    """A :mod:`bench.bare_server` process on a free port; yields the port once it accepts."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_server", str(port)]
    with _server(argv, lambda: _accepts(port), "the bare server", cwd=ROOT):
        yield port


def daemon_rates(port: int, connections: int, requests: int) -> dict[str, float]:
    """Requests per second of create, then of retrieve of the sessions just created."""
    create = msgpack.packb([0, 1, "create", [METADATA]])
    rate_create, ids = drive(port, connections, requests, lambda i: create)
    chosen = random.choices(ids, k=requests)
    frames = [msgpack.packb([0, 1, "retrieve", [sid]]) for sid in chosen]
    rate_retrieve, _ = drive(port, connections, requests, frames.__getitem__)
    return {"create": rate_create, "retrieve": rate_retrieve}


def run(requests: int = 20_000, embedded_create: float | None = None) -> list[Record]:
    """Measure and return one record per (backend, operation, connections, Redis).

    ``embedded_create`` (the embedded disk service's create rate with 50 callers, measured in
    the same run) adds disk create c=50 against it.
    """
    workdir = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    daemons = {}
    for backend in ("disk", "memory"):
        (workdir / backend).mkdir()
        daemons[backend] = DaemonProcess(
            workdir / backend, "--log-level", "WARNING", backend=backend
        )
    try:
        records = []
        with contextlib.ExitStack() as servers:
            redis_ports = {
                mode: servers.enter_context(private_redis(options))
                for mode, options in REDIS_MODES.items()
            }
            for backend, daemon in daemons.items():
                daemon.start()
                for connections in CONNECTIONS:
                    n = requests_at(connections, requests)
                    ours = daemon_rates(daemon.port, connections, n)
                    records += _against_redis(backend, connections, n, ours, redis_ports)
                    if (backend, connections) == ("disk", TARGET_CONNECTIONS) and embedded_create:
                        records.append(
                            throughput(
                                f"daemon create c={connections}",
                                ours["create"],
                                f"embedded disk create x{connections}",
                                embedded_create,
                                EMBEDDED_TARGET,
                            )
                        )
                daemon.close()
            with bare_server() as port:
                retrieve = msgpack.packb([0, 1, "retrieve", ["0" * 32]])
                for connections in CONNECTIONS:
                    n = requests_at(connections, requests)
                    ours, _ = drive(port, connections, n, lambda i: retrieve)
                    theirs = redis_rates(redis_ports[""], connections, n)
                    records.append(
                        throughput(
                            f"bare loop retrieve c={connections}",
                            ours,
                            f"redis GET c={connections}",
                            theirs["GET"],
                        )
                    )
        return records
    finally:
        for daemon in daemons.values():
            daemon.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _against_redis(
    backend: str, connections: int, n: int, ours: dict[str, float], redis_ports: dict[str, int]
) -> list[Record]:
    """The daemon's rates next to each Redis's, measured now with the same request count."""
    records = []
    label = "daemon" if backend == "disk" else f"daemon {backend}"
    for mode, port in redis_ports.items():
        theirs = redis_rates(port, connections, n)
        for op, command in PAIRS:
            judged = mode == "" and connections == TARGET_CONNECTIONS
            records.append(
                throughput(
                    f"{label} {op} c={connections}",
                    ours[op],
                    f"redis {command} c={connections}{mode}",
                    theirs[command],
                    TARGETS.get((backend, op)) if judged else None,
                )
            )
    return records


def main() -> None:
    count_command_line(__doc__, run, "--requests", 20_000, "requests per measurement")


if __name__ == "__main__":
    main()
