"""What the file-backed stores (disk, lmdb) share: options, the single-owner lock, quarantine.

The lock is ``flock`` on a ``LOCK`` file inside the store directory, holding the owner's pid.
``flock`` locks belong to an open file, so a second owner is refused whether it is another
process or another store object in this one, and the kernel drops the lock when its owner dies
(a SIGKILLed daemon never leaves a stale lock behind).
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
from pathlib import Path
from typing import Literal

from ..record.errors import StoreError

log = logging.getLogger(__name__)

LOCK_NAME = "LOCK"

Durability = Literal["process", "power"]
OnCorrupt = Literal["quarantine", "fail"]


def check_file_options(durability: object, on_corrupt: object) -> None:
    """Refuse a ``durability`` or ``on_corrupt`` the file stores do not know."""
    if durability not in ("process", "power"):
        raise ValueError(f"durability is 'process' or 'power', not {durability!r}")
    if on_corrupt not in ("quarantine", "fail"):
        raise ValueError(f"on_corrupt is 'quarantine' or 'fail', not {on_corrupt!r}")


class DirectoryLock:
    """An exclusive, non-blocking lock on a store directory."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StoreError` naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"store {self.path.parent} is locked by another owner (pid {holder}); "
                "one store has one owner: stop it or use another path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock. Idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the file releases the flock


def quarantine(path: Path, now: datetime.datetime | None = None) -> Path:
    """Move a corrupt store aside to ``<path>.corrupt-<UTC timestamp>`` and return the new path."""
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    path.rename(target)
    return target


def quarantine_locked(path: Path, lock: DirectoryLock, what: str, problem: str) -> DirectoryLock:
    """Move the unusable store at ``path`` aside and return the lock of a fresh, empty one.

    The directory is renamed with our lock inside it, still held, so no other owner can slip
    into the damaged store; the fresh directory is locked before the old lock goes. An ERROR
    names both paths and the ``problem``.
    """
    moved = quarantine(path)
    fresh = DirectoryLock(path)
    try:
        fresh.acquire()
    finally:
        lock.release()
    log.error(
        "%s %s cannot be used (%s): moved it aside to %s and started an empty store",
        what,
        path,
        problem,
        moved,
    )
    return fresh
