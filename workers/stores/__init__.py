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

import contextlib
from collections.abc import Iterator
from typing import Any

from ..record.errors import StoreError
from .base import Delete, ImmediateStore, Mark, Put, Store, Write
from .urls import DEFAULT_REDIS_URL

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


#: The library a backend needs beyond the base install, by backend (its extra has the
#: backend's name: `pip install 'trio-sessions[redis]'`).
LIBRARIES = {"lmdb": "lmdb", "redis": "coredis"}


def make_store(
    backend: str, *, path: str | None = None, url: str | None = None, **options: Any
) -> Store:
    """Build (but not open) the store for ``backend`` with its options.

    StoreError when the backend's library is not installed, naming the extra that brings it
    (``pip install 'trio-sessions[lmdb]'``).
    """
    backend = canonical_backend(backend)
    if backend == "memory":
        from .memory import MemoryStore

        return MemoryStore(**options)
    if backend == "redis":
        with _extra("redis"):
            from .redis import RedisStore

        return RedisStore(url or DEFAULT_REDIS_URL, **options)
    if path is None:
        raise StoreError(f"the {backend} backend needs path= (a directory for its files)")
    if backend == "disk":
        from .disk import DiskStore

        return DiskStore(path, **options)
    with _extra("lmdb"):
        from .lmdb import LmdbStore

    return LmdbStore(path, **options)


@contextlib.contextmanager
def _extra(backend: str) -> Iterator[None]:
    """Turn the ImportError of a backend's missing library into one line saying what to do."""
    library = LIBRARIES[backend]
    try:
        yield
    except ModuleNotFoundError as exc:
        if exc.name != library:
            raise
        raise StoreError(
            f"the {backend} backend needs the {library} library, which is not installed: "
            f"pip install 'trio-sessions[{backend}]'"
        ) from None


__all__ = [
    "ALIASES",
    "BACKENDS",
    "LIBRARIES",
    "Delete",
    "ImmediateStore",
    "Mark",
    "Put",
    "Store",
    "Write",
    "canonical_backend",
    "make_store",
]
