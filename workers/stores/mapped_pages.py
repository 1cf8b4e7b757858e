"""Dropping the pages of a memory-mapped file from this process's resident memory.

LMDB reads through a read-only shared mapping of its data file, and every page read stays
mapped into the process, with up to 16 neighbours that are in the page cache (the kernel's
fault-around). So a process reading a large store at random soon has the whole file in its
resident memory (``RssFile``), though it loaded nothing: shared, clean, reclaimable page
cache that a ``read(2)`` of the same pages would leave uncounted. :class:`MappedPages` keeps
that figure bounded: after every so many records it drops the mapping's pages with
``madvise(MADV_DONTNEED)``. The pages stay in the page cache; the next read maps one again
with a minor fault. See the lmdb store's "Memory" section for what it costs and saves.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


class MappedPages:
    """Keeps the pages of a file mapped into this process few.

    Counts the records read or written, and after ``every`` of them drops every page of the
    data file's mapping with ``madvise(MADV_DONTNEED)``. Only the page tables change: the
    pages stay in the page cache, and the next read of one maps it again (a minor fault, a
    microsecond or two). Safe at any moment, inside a transaction too, and while another
    thread reads or writes the store: without ``writemap`` LMDB only reads the mapping, so
    dropped pages come back unchanged.

    The mapping's address is read from ``/proc/self/maps``, by the data file's inode, at the
    first drop and again after every :meth:`remapping` (LMDB maps the file anew when the map
    grows, and only then): a stale address would make ``MADV_DONTNEED`` zero whatever memory
    took its place, so a drop and a remapping never overlap either. Reading the maps is
    Python work that holds the GIL for a while; remembered, a drop is one ``madvise``, which
    releases it. Where there is no ``/proc`` (not Linux) nothing is dropped.

    When a drop is due, :meth:`touched` calls ``schedule`` (the store hands the drop to its
    thread, to run after the current call) rather than dropping there and then. A thread
    that needs the GIL to start runs behind a busy Trio thread (up to 5 ms a time): if as
    many records again are touched before the drop asked for has run, the caller drops them
    itself, so the bound holds whatever the threads do.
    """

    def __init__(self, data: Path, every: int | None, schedule: Callable[[], None]) -> None:
        self._data = data
        self._schedule = schedule
        self._lock = threading.Lock()
        #: Where the file is mapped; None: to be read from /proc/self/maps at the next drop.
        self._where: list[tuple[int, int]] | None = None
        #: Records read (a write counts three) between drops; None: never. Each page read maps
        #: up to 16 neighbours that are in the page cache too (fault-around): measured at 1M
        #: sessions, 256 keeps 35-65 MB mapped, 512 55-90 MB, 2048 about 220 MB.
        self.every = every
        self._count = 0
        self._asked = False
        #: Drops done so far (for tests and diagnostics).
        self.drops = 0

    def touched(self, records: int) -> None:
        self._count += records
        every = self.every
        if every is None or self._count < every:
            return
        if self._count >= 2 * every:  # the drop asked for has not run yet: no more waiting
            self.drop()
        elif not self._asked:
            self._asked = True
            self._schedule()

    def drop(self) -> None:
        self._count = 0
        self._asked = False
        if self.every is None or _madvise is None:
            return
        with self._lock:
            if self._where is None:
                self._where = _mappings_of(self._data)
            for start, length in self._where:
                _madvise(start, length, mmap.MADV_DONTNEED)
            self.drops += 1

    @contextlib.contextmanager
    def remapping(self) -> Iterator[None]:
        """Hold off drops while the mapping moves (LMDB's map grows, or the store closes)."""
        with self._lock:
            self._where = None
            try:
                yield
            finally:
                self._where = None


def _load_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def _mappings_of(path: Path) -> list[tuple[int, int]]:
    """(start, length) of every mapping of the file ``path`` in this process."""
    try:
        stat = os.stat(path)
        with open("/proc/self/maps", "rb") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    inode = str(stat.st_ino).encode()
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}".encode()
    found = []
    for line in lines:
        # address perms offset dev inode [path]
        fields = line.split(maxsplit=5)
        if len(fields) >= 5 and fields[4] == inode and fields[3] == device:
            low, _, high = fields[0].partition(b"-")
            found.append((int(low, 16), int(high, 16) - int(low, 16)))
    return found
