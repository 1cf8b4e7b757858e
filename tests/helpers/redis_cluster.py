"""A real Redis Cluster and a real Sentinel setup for the tests, from ``redis-server`` alone.

:class:`LocalCluster` starts six cluster-enabled ``redis-server`` processes on free loopback
ports and makes them one cluster of three masters, each with one replica, the way
``redis-cli --cluster create ... --cluster-replicas 1`` would, but with the cluster commands
themselves (``CLUSTER ADDSLOTS``, ``MEET``, ``REPLICATE``), so no ``redis-cli`` is needed.
:class:`LocalSentinel` starts a primary, its replica and one sentinel watching them.

Both take a while to start (the cluster about two seconds), so the test run shares one of
each: :func:`shared_cluster` and :func:`shared_sentinel` (and the session-scoped fixtures
``redis_cluster`` and ``redis_sentinel``) start them on first use, and they stop when the run
ends. Tests keep to their own key prefix (:func:`~helpers.redis_server.unique_prefix`).
A test that fails over leaves a healthy setup behind (same shape, other roles): tests never
assume which port is the master. Without ``redis-server`` these tests are skipped, except in
CI (``$CI`` set), where that is a failure.

A test module gets the fixtures with ``pytest_plugins = ["helpers.redis_cluster"]``
(PYTEST_DONT_REWRITE).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from .redis_server import RedisServer, free_port

S = TypeVar("S", "LocalCluster", "LocalSentinel")

#: Slots of a Redis Cluster.
SLOTS = 16384
#: Real seconds the setups get to form, or to finish a failover.
PATIENCE = 30.0
#: A replica syncs at once (Redis waits 5 s for more replicas to share a diskless sync).
QUICK_SYNC = ["--repl-diskless-sync-delay", "0"]


class RespError(Exception):
    """An error reply."""


def command(port: int, *args: object, timeout: float = 5.0) -> Any:
    """Send one command to the Redis at 127.0.0.1:``port`` and return its decoded reply.

    A few lines of RESP2 with a plain socket: the helpers run outside Trio, at fixture setup.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        parts = [str(a).encode() if not isinstance(a, bytes) else a for a in args]
        request = b"*%d\r\n" % len(parts)
        for part in parts:
            request += b"$%d\r\n%s\r\n" % (len(part), part)
        sock.sendall(request)
        reader = sock.makefile("rb")
        return _reply(reader)


def _reply(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise ConnectionError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2].decode()
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_reply(reader) for _ in range(size)]
    raise RespError(f"unexpected reply {line!r}")


def info(port: int, section: str) -> dict[str, str]:
    """``INFO section`` as a dict."""
    lines = command(port, "INFO", section).splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def data_commands(port: int) -> Counter[str]:
    """Calls of each command on the Redis at ``port`` since ``CONFIG RESETSTAT``, less the
    housekeeping clients do (INFO, CLUSTER, PING...). Commands a script runs count too, and a
    replica counts the writes its master sends it."""
    housekeeping = {"info", "config", "cluster", "ping", "hello", "client", "command"}
    counts: Counter[str] = Counter()
    for name, stats in info(port, "commandstats").items():
        command_name = name.removeprefix("cmdstat_")
        if command_name.partition("|")[0] not in housekeeping:
            counts[command_name] = int(re.search(r"calls=(\d+)", stats).group(1))  # type: ignore[union-attr]
    return +counts


def wait_until(check: Callable[[], bool], what: str, patience: float = PATIENCE) -> None:
    """Poll ``check`` (a subprocess's state, not a test's timing) until it holds."""
    deadline = time.monotonic() + patience
    while True:
        with contextlib.suppress(OSError, RespError):
            if check():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting: {what}")
        time.sleep(0.05)


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


class LocalCluster:
    """Three masters and three replicas on loopback (see the module docstring)."""

    def __init__(self) -> None:
        self.nodes = [
            RedisServer(
                cluster_port(),
                args=["--cluster-enabled", "yes", "--cluster-node-timeout", "3000", *QUICK_SYNC],
            )
            for _ in range(6)
        ]

    @property
    def url(self) -> str:
        """The store's URL: every master and replica as a seed node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        masters, replicas = self.ports[:3], self.ports[3:]
        for i, port in enumerate(masters):
            command(port, "CLUSTER", "ADDSLOTS", *range(i * SLOTS // 3, (i + 1) * SLOTS // 3))
        for i, port in enumerate(self.ports):  # all pairs: no waiting for gossip
            for other in self.ports[i + 1 :]:
                command(port, "CLUSTER", "MEET", "127.0.0.1", other)
        wait_until(self._all_known, "the cluster nodes to know each other")
        for master, replica in zip(masters, replicas, strict=True):
            command(replica, "CLUSTER", "REPLICATE", self.node_id(master))
        wait_until(self.healthy, "the cluster to be ok with every replica in sync")

    def _all_known(self) -> bool:
        """Every node knows the other five by their ids (no handshake under way)."""
        ids = {self.node_id(port) for port in self.ports}
        return all({n["id"] for n in self.cluster_nodes(port)} == ids for port in self.ports)

    def node_id(self, port: int) -> str:
        return next(n["id"] for n in self.cluster_nodes(port) if "myself" in n["flags"])

    def cluster_nodes(self, port: int) -> list[dict[str, Any]]:
        """``CLUSTER NODES`` of the node at ``port``, one dict per node."""
        rows = []
        for line in command(port, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            rows.append(
                {
                    "id": fields[0],
                    "port": int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                    "flags": fields[2].split(","),
                    "master": fields[3],
                    "slots": fields[8:],
                }
            )
        return rows

    def masters(self) -> list[int]:
        """The ports of the masters that hold slots now."""
        return sorted(
            n["port"]
            for n in self.cluster_nodes(self.ports[0])
            if "master" in n["flags"] and n["slots"] and "fail" not in n["flags"]
        )

    def master_of_slot(self, slot: int) -> int:
        """The port of the master serving hash slot ``slot`` now."""
        for node in self.cluster_nodes(self.ports[0]):
            if "master" not in node["flags"]:
                continue
            for served in node["slots"]:
                first, _, last = served.partition("-")
                if not first.startswith("[") and int(first) <= slot <= int(last or first):
                    return node["port"]
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master: int) -> int:
        rows = self.cluster_nodes(master)
        master_id = next(n["id"] for n in rows if n["port"] == master)
        return next(n["port"] for n in rows if n["master"] == master_id)

    def healthy(self) -> bool:
        """Every node sees an ok cluster of 3 masters; every replica's link is up."""
        for port in self.ports:
            if info(port, "cluster").get("cluster_enabled") != "1":
                return False
            state = dict(
                line.split(":", 1)
                for line in command(port, "CLUSTER", "INFO").splitlines()
                if ":" in line
            )
            if state.get("cluster_state") != "ok":
                return False
            replication = info(port, "replication")
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
        return len(self.masters()) == 3 and all(
            len(command(p, "CLUSTER", "NODES").splitlines()) == 6 for p in self.ports
        )

    def failover(self, master: int) -> int:
        """``CLUSTER FAILOVER`` on the replica of ``master``; its port, once it took over."""
        replica = self.replica_of(master)
        command(replica, "CLUSTER", "FAILOVER")
        wait_until(
            lambda: info(replica, "replication")["role"] == "master" and self.healthy(),
            f"the replica on {replica} to take over from {master}",
        )
        return replica

    def stop(self) -> None:
        for node in self.nodes:
            node.__exit__()


class LocalSentinel:
    """A primary, its replica and one sentinel watching them as ``service``."""

    service = "sessions"

    def __init__(self) -> None:
        self.primary = RedisServer(args=QUICK_SYNC)
        self.replica = RedisServer(
            args=["--replicaof", "127.0.0.1", str(self.primary.port), *QUICK_SYNC]
        )
        config = (
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 2000\n"
            f"sentinel failover-timeout {self.service} 10000\n"
        )
        self.sentinel = RedisServer(args=["--sentinel"], config=config)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.service}"

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        wait_until(self._replica_in_sync, "the replica to sync")
        self.sentinel.start()
        with contextlib.suppress(RespError):  # Redis 7: sentinels that poll more often
            # A demoted primary is made a replica 4 publish periods after it was seen (8 s).
            command(
                self.sentinel.port, "SENTINEL", "DEBUG", "INFO-PERIOD", 500, "PUBLISH-PERIOD", 250
            )
        wait_until(self._sentinel_sees_replica, "the sentinel to find the replica")

    def primary_port(self) -> int:
        return int(
            command(self.sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)[1]
        )

    def replica_port(self) -> int:
        primary = self.primary_port()
        return next(s.port for s in (self.primary, self.replica) if s.port != primary)

    def _replica_in_sync(self) -> bool:
        replica = self.replica_port() if self.sentinel_running() else self.replica.port
        return info(replica, "replication").get("master_link_status") == "up"

    def sentinel_running(self) -> bool:
        try:
            command(self.sentinel.port, "PING")
        except OSError:
            return False
        return True

    def _sentinel_sees_replica(self) -> bool:
        replicas = command(self.sentinel.port, "SENTINEL", "REPLICAS", self.service)
        return any(
            dict(zip(r[::2], r[1::2], strict=True)).get("flags") == "slave" for r in replicas
        )

    def failover(self) -> int:
        """``SENTINEL FAILOVER``; the new primary's port once the old one follows it."""
        old = self.primary_port()
        command(self.sentinel.port, "SENTINEL", "FAILOVER", self.service)
        wait_until(lambda: self.primary_port() != old, "the sentinel to promote the replica")
        new = self.primary_port()
        wait_until(
            lambda: (
                info(new, "replication")["role"] == "master"
                and info(old, "replication").get("master_link_status") == "up"
                and self._sentinel_sees_replica()
            ),
            "the old primary to follow the new one",
        )
        return new

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.primary):
            server.__exit__()


def _started(setup: S) -> S:
    """``setup`` running, and stopped when the test run ends."""
    try:
        setup.start()
    except BaseException:
        setup.stop()
        raise
    atexit.register(setup.stop)
    return setup


@functools.cache
def shared_cluster() -> LocalCluster:
    """The run's Redis Cluster, started on first use (skips, or fails in CI, without Redis)."""
    return _started(LocalCluster())


@functools.cache
def shared_sentinel() -> LocalSentinel:
    """The run's Sentinel setup, started on first use."""
    return _started(LocalSentinel())


@pytest.fixture(scope="session")
def redis_cluster() -> LocalCluster:
    """The run's :class:`LocalCluster` (see :func:`shared_cluster`)."""
    return shared_cluster()


@pytest.fixture(scope="session")
def redis_sentinel() -> LocalSentinel:
    """The run's :class:`LocalSentinel` (see :func:`shared_sentinel`)."""
    return shared_sentinel()


__all__ = [
    "LocalCluster",
    "LocalSentinel",
    "RespError",
    "command",
    "data_commands",
    "info",
    "redis_cluster",
    "redis_sentinel",
    "shared_cluster",
    "shared_sentinel",
    "wait_until",
]
