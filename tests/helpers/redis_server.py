"""A real Redis for the tests: the machine's, or a private ``redis-server`` started here.

:func:`find_redis` finds one, in this order: ``$REDIS_URL`` (or ``redis://127.0.0.1:6379/0``)
if it answers, else a private server on a free port, started from ``redis-server`` for the
rest of the test run. Without either, Redis tests are skipped, except in CI (``$CI`` set),
where they fail: there they must run (``.ci/ensure-redis.sh`` provides the server).

Tests keep to their own keys: :func:`unique_prefix` gives each one a key prefix of its own,
and every prefix handed out is deleted from the server at the end of the run (the
``redis_prefix`` fixture deletes its keys as soon as its test ends). Tests that stop and
restart Redis use a :class:`RedisServer` of their own instead, never the shared one.

A test module gets the fixtures (``redis_url``, ``redis_prefix``, ``private_redis``) with::

    pytest_plugins = ["redis_server"]

(PYTEST_DONT_REWRITE: this module is also imported as a plain helper, often before it is
loaded as a plugin, and has no assertions for pytest to rewrite.)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import NoReturn
from urllib.parse import urlsplit

import coredis
import pytest
import trio

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
#: Every key a test writes starts with this, so leftovers are easy to find and remove.
TEST_PREFIX = "trio-sessions-test:"

_prefixes: list[str] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers PING at ``host:port`` (asking for a password counts)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 without persistence, for tests that stop it.

    ``start`` and ``stop`` may alternate; the port stays the same, so a client sees the same
    server go away and come back. ``args`` are more ``redis-server`` options (``"--maxmemory",
    "1mb"``); ``config`` is the text of a configuration file to start from (a sentinel's).
    """

    def __init__(
        self, port: int | None = None, *, args: Sequence[str] = (), config: str | None = None
    ) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self._args = list(args)
        self._config = config
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        if not os.access(REDIS_SERVER, os.X_OK):
            unavailable(f"no {REDIS_SERVER} to start a private Redis with")
        head = [REDIS_SERVER]
        if self._config is not None:
            config = os.path.join(self.dir, "redis.conf")
            if not os.path.exists(config):  # a sentinel rewrites its file: keep what it wrote
                with open(config, "w") as file:
                    file.write(self._config)
            head.append(config)
        self._process = subprocess.Popen(
            [
                *head,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                self.log_path,
                *self._args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not ping("127.0.0.1", self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server did not start on port {self.port}:\n{self.log()[-2000:]}"
                )
            time.sleep(0.01)  # polling a subprocess, not timing a test

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "redis.log")

    def log(self) -> str:
        """What the server logged so far."""
        try:
            with open(self.log_path, errors="replace") as file:
                return file.read()
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server (it closes every client connection). Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            process.terminate()
            process.wait(timeout=10)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def _signal(self, signum: int) -> None:
        if self._process is None:
            raise RuntimeError("the server is not running")
        self._process.send_signal(signum)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@functools.cache
def find_redis() -> str:
    """The URL of a Redis for the tests (see the module docstring); cached for the run."""
    url = os.environ.get("REDIS_URL", DEFAULT_URL)
    parts = urlsplit(url)
    if ping(parts.hostname or "127.0.0.1", parts.port or 6379):
        return url
    if os.access(REDIS_SERVER, os.X_OK):
        server = RedisServer()
        server.start()
        atexit.register(server.__exit__)
        return server.url
    unavailable(f"no Redis at {url} and no {REDIS_SERVER} to start one (.ci/ensure-redis.sh)")


def unavailable(message: str) -> NoReturn:
    """Skip the test for want of Redis, except in CI (``$CI`` set), where that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def unique_prefix(seed: object = None) -> str:
    """A key prefix of its own: the same for the same ``seed`` (a test's ``tmp_path``, so
    that a store made again sees the same keys), fresh for ``None``. Deleted at exit."""
    tag = uuid.uuid4().hex if seed is None else hashlib.sha1(str(seed).encode()).hexdigest()
    prefix = f"{TEST_PREFIX}{tag[:20]}:"
    if prefix not in _prefixes:
        _prefixes.append(prefix)
    return prefix


async def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` at ``url``; the number deleted."""
    async with coredis.Redis.from_url(url) as client:
        keys = [key async for key in client.scan_iter(match=_glob_escape(prefix) + "*")]
        return await client.delete(keys) if keys else 0


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@atexit.register
def _delete_prefixes() -> None:
    if _prefixes and find_redis.cache_info().currsize:
        with contextlib.suppress(Exception):  # the server may be gone; nothing to clean then
            trio.run(_delete_all, find_redis(), _prefixes)


async def _delete_all(url: str, prefixes: list[str]) -> None:
    for prefix in prefixes:
        await delete_prefix(url, prefix)


@pytest.fixture
def redis_url() -> str:
    """The URL of the test Redis (skips, or fails in CI, when there is none)."""
    return find_redis()


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix for this test alone; its keys are deleted when the test ends."""
    prefix = unique_prefix()
    yield prefix
    await delete_prefix(redis_url, prefix)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A running :class:`RedisServer` of this test's own, which it may stop and restart."""
    with RedisServer() as server:
        yield server


__all__ = [
    "RedisServer",
    "delete_prefix",
    "find_redis",
    "free_port",
    "ping",
    "private_redis",
    "redis_prefix",
    "redis_url",
    "unavailable",
    "unique_prefix",
]
