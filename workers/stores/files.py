"""What the file-backed stores (disk, lmdb) share: their directory, marker, lock and quarantine.

A store owns one directory::

    path/
        SESSIONS      the marker: "trio-sessions <backend> store", written when the store is
                      made; how a directory is recognised as a session store
        LOCK          flock()ed by the owner, holding its pid
        ...           the backend's own files (StoreFiles.own_files)

Rules, in :class:`StoreFiles`:

- **Nothing is created by accident.** A store is made only when asked (``create=True``, the
  default of a service); a read-only open (``read_only=True``: the admin verbs that only read)
  never creates, moves or writes anything, and a missing directory is an error naming it.
- **Only our own files are ever moved.** A directory is a session store when it holds our
  marker, for the backend asked. A directory without one is adopted only while it holds
  nothing but the backend's own files (a store made before markers existed: the backend then
  checks the files are its own, and the marker is written) or nothing at all. Quarantine moves
  the backend's own files, and only from a marked directory, into a sibling directory
  ``<path>.corrupt-<UTC time>``; the marker, the lock and anything else stay.
- **Private.** Directories are made 0700 and files 0600, whatever the umask, and an existing
  store's directory and files are narrowed to that when it is opened for writing: sessions are
  credentials.
- **One owner.** The lock is ``flock`` on ``LOCK``. ``flock`` locks belong to an open file, so
  a second owner is refused whether it is another process or another store object in this
  one, and the kernel drops the lock when its owner dies (a SIGKILLed daemon never leaves a
  stale lock behind).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from ..record.errors import StoreError

log = logging.getLogger(__name__)

LOCK_NAME = "LOCK"
MARKER_NAME = "SESSIONS"
#: Modes of what a store makes (and narrows existing ones to).
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600

Durability = Literal["process", "power"]
OnCorrupt = Literal["quarantine", "fail"]


def check_file_options(durability: object, on_corrupt: object) -> None:
    """Refuse a ``durability`` or ``on_corrupt`` the file stores do not know."""
    if durability not in ("process", "power"):
        raise ValueError(f"durability is 'process' or 'power', not {durability!r}")
    if on_corrupt not in ("quarantine", "fail"):
        raise ValueError(f"on_corrupt is 'quarantine' or 'fail', not {on_corrupt!r}")


def marker_text(backend: str) -> str:
    return f"trio-sessions {backend} store\n"


class StoreFiles:
    """The directory of one file store (see the module docstring): open it, lock it, mark it,
    narrow its modes, quarantine its own files. Used on the store's thread."""

    def __init__(self, path: Path, backend: str, own_files: Iterable[str]) -> None:
        self.path = path
        self.backend = backend
        #: The files the backend writes in the directory: the ones quarantine moves.
        self.own_files = frozenset(own_files)
        #: Whether the directory carries our marker (known once :meth:`open` ran).
        self.marked = False
        self._lock_fd: int | None = None
        #: The LOCK file this open made, in a directory not (yet) marked as ours: removed
        #: again if the store is released unmarked, so a refused directory is left as it was.
        self._made_lock = False

    @property
    def what(self) -> str:
        return f"{self.backend} store {self.path}"

    def open(self, *, create: bool, read_only: bool) -> None:
        """Check the directory (making it if asked), recognise it and take its lock.

        Raises :class:`StoreError` naming the cause: no such store, a file where the directory
        should be, another application's directory, another backend's store, the lock held.
        """
        path = self.path
        try:
            status = path.stat()
        except FileNotFoundError:
            if read_only or not create:
                raise StoreError(
                    f"no {self.backend} store at {path}: the directory does not exist "
                    "(check the path; only a service or a restore makes a new store)"
                ) from None
            _make_directory(path)
            status = path.stat()
        except OSError as exc:
            raise StoreError(f"cannot open {self.what}: {exc.strerror or exc}") from None
        if not stat.S_ISDIR(status.st_mode):
            raise StoreError(
                f"cannot open {self.what}: {path} is a file, not a directory; a store is a "
                "directory of its own (give a new or empty directory)"
            )
        self._recognise(read_only)
        self._lock(read_only)

    def _recognise(self, read_only: bool) -> None:
        try:
            marker = (self.path / MARKER_NAME).read_text(errors="replace")
        except FileNotFoundError:
            marker = None
        except OSError as exc:
            raise StoreError(f"cannot open {self.what}: {exc.strerror or exc}") from None
        if marker is not None:
            if marker != marker_text(self.backend):
                raise StoreError(
                    f"{self.path} is not a store of the {self.backend} backend (its marker says "
                    f"{marker.strip()[:60]!r}): open it with its own backend"
                )
            self.marked = True
            return
        names = os.listdir(self.path)
        others = sorted(
            name
            for name in names
            if name not in self.own_files and name not in (LOCK_NAME, MARKER_NAME)
        )
        if others:
            raise StoreError(
                f"{self.path} is not a session store ({self.backend}): it holds "
                f"{', '.join(others[:5])} and no {MARKER_NAME} marker; nothing was touched "
                "(give a new or empty directory)"
            )
        if read_only and not self.own_files.intersection(names):
            raise StoreError(f"no {self.backend} store at {self.path}: the directory is empty")

    def _lock(self, read_only: bool) -> None:
        lock = self.path / LOCK_NAME
        try:
            if read_only:
                fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
            else:
                self._made_lock = not lock.exists()
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
        except FileNotFoundError:
            raise StoreError(f"no {self.backend} store at {self.path}: it has no LOCK") from None
        except OSError as exc:
            raise StoreError(f"cannot open {self.what}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"store {self.path} is locked by another owner (pid {holder}); "
                "one store has one owner: stop it or use another path"
            ) from None
        if not read_only:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def mark_and_narrow(self) -> None:
        """Write the marker if it is missing, and narrow the modes of the directory and of
        every file in it to 0700 / 0600 (an open for writing, once the store is usable)."""
        if not self.marked:
            _write_private(self.path / MARKER_NAME, marker_text(self.backend))
            self.marked = True
        _narrow(self.path, DIRECTORY_MODE)
        for name in (*self.own_files, LOCK_NAME, MARKER_NAME):
            _narrow(self.path / name, FILE_MODE)

    def quarantine(self, problem: str, now: datetime.datetime | None = None) -> Path:
        """Move the backend's own files aside to ``<path>.corrupt-<UTC time>/``, so the store
        starts empty here; an ERROR names both places. Only from a marked directory: anything
        else raises StoreError and moves nothing. Call it with the lock held."""
        if not self.marked:
            raise StoreError(
                f"{self.what} cannot be used ({problem}), and the directory has no "
                f"{MARKER_NAME} marker, so nothing was moved: move it aside yourself or "
                "restore a backup"
            )
        stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        _make_directory(target)
        for name in sorted(self.own_files):
            source = self.path / name
            if source.exists():
                source.rename(target / name)
        log.error(
            "%s cannot be used (%s): moved its files aside to %s and started an empty store",
            self.what,
            problem,
            target,
        )
        return target

    def release(self) -> None:
        """Drop the lock (and the LOCK file it made, if the store never became ours).
        Idempotent."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            if self._made_lock and not self.marked:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / LOCK_NAME)
            os.close(fd)  # closing the file releases the flock


def create_private(path: Path) -> None:
    """Make the empty file ``path`` with mode 0600 (so that a library that then opens it keeps
    that mode, and SQLite gives its journal files the same), if it does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def _make_directory(path: Path) -> None:
    path.mkdir(mode=DIRECTORY_MODE, parents=True)
    _narrow(path, DIRECTORY_MODE)  # mkdir's mode is filtered by the umask


def _narrow(path: Path, mode: int) -> None:
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(status.st_mode):
        return  # never follow a link planted among the store's files
    current = stat.S_IMODE(status.st_mode)
    if current & ~mode:
        os.chmod(path, current & mode)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
