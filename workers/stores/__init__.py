"""Stores: one module per backend, all behind :class:`~workers.stores.base.Store`.

=========  ========  ===========================================================================
backend    seed row  what it is
=========  ========  ===========================================================================
memory     ets       in-process dict; outlives manager restarts, not the process
disk       dets      diskcache (SQLite) directory; single owner; durable
lmdb       leveldb   LMDB environment; single owner; durable; large data sets
redis      mnesia    Redis (a server, Sentinel or Cluster) shared by many processes and machines
=========  ========  ===========================================================================
"""

from __future__ import annotations

from typing import Any

from ..record.errors import StoreError
from .base import Delete, ImmediateStore, Mark, Put, Store, Write

#: The seed's backend names, accepted as aliases of ours.
ALIASES = {"ets": "memory", "dets": "disk", "leveldb": "lmdb", "mnesia": "redis"}
BACKENDS = ("memory", "disk", "lmdb", "redis")


def canonical_backend(name: str) -> str:
    """Our name for ``name`` (one of ours or a seed alias); ValueError for anything else."""
    backend = ALIASES.get(name, name)
    if backend not in BACKENDS:
        choices = ", ".join([*BACKENDS, *ALIASES])
        raise ValueError(f"unknown backend {name!r}: choose one of {choices}")
    return backend


def make_store(
    backend: str, *, path: str | None = None, url: str | None = None, **options: Any
) -> Store:
    """Build (but not open) the store for ``backend`` with its options."""
    backend = canonical_backend(backend)
    if backend == "memory":
        from .memory import MemoryStore

        return MemoryStore(**options)
    if backend == "redis":
        from .redis import RedisStore

        return RedisStore(url or "redis://127.0.0.1:6379/0", **options)
    if path is None:
        raise StoreError(f"the {backend} backend needs path= (a directory for its files)")
    if backend == "disk":
        from .disk import DiskStore

        return DiskStore(path, **options)
    from .lmdb import LmdbStore

    return LmdbStore(path, **options)


__all__ = [
    "ALIASES",
    "BACKENDS",
    "Delete",
    "ImmediateStore",
    "Mark",
    "Put",
    "Store",
    "Write",
    "canonical_backend",
    "make_store",
]
