"""What the file-backed stores (disk, lmdb) share: the single-owner lock and quarantine.

The lock is ``flock`` on a ``LOCK`` file inside the store directory, holding the owner's pid.
``flock`` locks belong to an open file, so a second owner is refused whether it is another
process or another store object in this one, and the kernel drops the lock when its owner dies
(a SIGKILLed daemon never leaves a stale lock behind).
"""

from __future__ import annotations

import datetime
import fcntl
import os
from pathlib import Path

from ..record.errors import StoreError

LOCK_NAME = "LOCK"


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
