"""The stores the backend contract suite runs against, one entry per backend.

Each entry makes a fresh, unopened store whose data lives under the test's ``tmp_path``. A
durable store made again from the same ``tmp_path`` sees what an earlier one committed; a store
that is not durable is instead reopened as the same object (the memory store outlives its
managers, not its object). Adding a backend is one entry, e.g.::

    "lmdb": StoreFactory(lambda tmp_path: LmdbStore(tmp_path / "lmdb"), durable=True),

A factory may call ``pytest.skip`` when its backend is unavailable (say, no Redis server).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers.stores.base import Store
from workers.stores.disk import DiskStore
from workers.stores.lmdb import LmdbStore
from workers.stores.memory import MemoryStore
from workers.stores.redis import RedisStore

from .redis_server import find_redis, unique_prefix


@dataclass(frozen=True)
class StoreFactory:
    #: A fresh, unopened store over the data under ``tmp_path``.
    make: Callable[[Path], Store]
    #: Whether a second ``make(tmp_path)`` sees what the first one committed.
    durable: bool


STORE_FACTORIES: dict[str, StoreFactory] = {
    "memory": StoreFactory(lambda tmp_path: MemoryStore(), durable=False),
    "disk": StoreFactory(lambda tmp_path: DiskStore(tmp_path / "disk-store"), durable=True),
    "lmdb": StoreFactory(lambda tmp_path: LmdbStore(tmp_path / "lmdb-store"), durable=True),
    # The key prefix follows tmp_path, so a store made again sees the same keys. find_redis
    # finds or starts a Redis (skipping outside CI without one); the keys are deleted at exit.
    "redis": StoreFactory(
        lambda tmp_path: RedisStore(find_redis(), prefix=unique_prefix(tmp_path)), durable=True
    ),
}
