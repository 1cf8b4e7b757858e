"""The stores the backend contract suite runs against, one entry per backend.

Each entry makes a fresh, unopened store whose data lives under the test's ``tmp_path``. A
durable store made again from the same ``tmp_path`` sees what an earlier one committed; a store
that is not durable is instead reopened as the same object (the memory store outlives its
managers, not its object). Adding a backend is one entry, e.g.::

    "lmdb": StoreFactory(lambda tmp_path: LmdbStore(tmp_path / "lmdb"), durable=True),

A factory may call ``pytest.skip`` when its backend is unavailable (say, no Redis server).
The redis store runs three ways: on the test Redis, on a Redis Cluster and through Sentinel
(both started for the run by ``helpers.redis_cluster``: slow, so marked ``slow``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from workers.stores.base import Store
from workers.stores.disk import DiskStore
from workers.stores.lmdb import LmdbStore
from workers.stores.memory import MemoryStore
from workers.stores.redis import RedisStore

from .redis_cluster import shared_cluster, shared_sentinel
from .redis_server import find_redis, unique_prefix


@dataclass(frozen=True)
class StoreFactory:
    #: A fresh, unopened store over the data under ``tmp_path``.
    make: Callable[[Path], Store]
    #: Whether a second ``make(tmp_path)`` sees what the first one committed.
    durable: bool
    #: Whether it starts processes (a Redis Cluster...): its tests are marked ``slow``.
    slow: bool = False


STORE_FACTORIES: dict[str, StoreFactory] = {
    "memory": StoreFactory(lambda tmp_path: MemoryStore(), durable=False),
    "disk": StoreFactory(lambda tmp_path: DiskStore(tmp_path / "disk-store"), durable=True),
    "lmdb": StoreFactory(lambda tmp_path: LmdbStore(tmp_path / "lmdb-store"), durable=True),
    # The key prefix follows tmp_path, so a store made again sees the same keys. find_redis
    # finds or starts a Redis (skipping outside CI without one); the keys are deleted at exit.
    "redis": StoreFactory(
        lambda tmp_path: RedisStore(find_redis(), prefix=unique_prefix(tmp_path)), durable=True
    ),
    "redis-cluster": StoreFactory(
        lambda tmp_path: RedisStore(shared_cluster().url, prefix=unique_prefix(tmp_path)),
        durable=True,
        slow=True,
    ),
    "redis-sentinel": StoreFactory(
        lambda tmp_path: RedisStore(shared_sentinel().url, prefix=unique_prefix(tmp_path)),
        durable=True,
        slow=True,
    ),
}


def factory_params() -> list[Any]:
    """The factories' names as pytest parameters, the slow ones marked ``slow``."""
    return [
        pytest.param(name, marks=pytest.mark.slow) if STORE_FACTORIES[name].slow else name
        for name in sorted(STORE_FACTORIES)
    ]
