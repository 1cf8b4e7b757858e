"""The admin verbs: ``ping list inspect stats cleanup delete backup restore check``.

Each works against a running daemon (``--address``, default ``tcp://127.0.0.1:7878`` or
``SESSIOND_ADDRESS``; ``--token-file`` or ``SESSIOND_TOKEN``). All but ``ping`` also work on a
stopped store: give ``--path`` (and ``--backend`` when it is not ``disk``) or ``--url`` for redis,
and the verb opens the store itself; the store's single-owner lock refuses this while a
daemon owns it. Output is a human table by default, JSON with ``--json`` (``list --json`` prints
one JSON object a line). The exit status is 0 on success, 1 when the verb failed (the daemon
unreachable, no such session, a damaged store...), 2 for bad usage.

A backup file is a msgpack stream: a header map ``{"format": "sessiond-backup", "version": 1,
"created_at": ms, "backend": name, "count": n}``, then each session as a bin object holding its
:func:`workers.record.codec.encode_session` record, then a trailer map ``{"end": true, "count": n}``
that tells a complete backup from a truncated one. ``restore`` stores the sessions as they are
(ids, times, versions) and skips ids already in use. Both show a progress bar on stderr for
large stores when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

import msgpack
import trio

from ..core.service import open_session_service
from ..record.codec import decode_session, encode_session, pack
from ..record.errors import ServiceUnavailable, SessionError, SessionNotFound, StoreError
from ..record.session import Session
from ..stores import canonical_backend, make_store
from ..wire.address import DEFAULT_ADDRESS
from ..wire.client import connect
from .config import read_token_file

BACKUP_FORMAT = "sessiond-backup"
BACKUP_VERSION = 1
#: Sessions per page when paging through a store, and per batch on restore.
BATCH = 500
#: Largest single record a backup may hold (far above any max_metadata_bytes in use).
MAX_RECORD_BYTES = 64 * 1024 * 1024
#: Stores at least this large get a progress bar (when stderr is a terminal).
PROGRESS_THRESHOLD = 2000


class Failed(Exception):
    """A verb could not do its job; the message says why (exit status 1)."""


# -- where the sessions are ------------------------------------------------------------------


def _is_local(args: argparse.Namespace) -> bool:
    return any(getattr(args, name, None) for name in ("path", "backend", "url"))


def _store_options(args: argparse.Namespace, verb: Verb) -> dict[str, Any]:
    """How ``verb`` opens a stopped store: read-only when it only reads, never making a store
    unless it makes one by nature (restore)."""
    backend = canonical_backend(args.backend or "disk")
    if backend == "memory":
        raise Failed("a memory store lives inside its daemon: use --address")
    options: dict[str, Any] = {"backend": backend, "path": args.path, "url": args.url}
    if getattr(args, "prefix", None) is not None:
        options["prefix"] = args.prefix
    if verb.reads_only:
        options["read_only"] = True
    elif not verb.creates and backend in ("disk", "lmdb"):
        options["create"] = False
    return options


@asynccontextmanager
async def open_target(
    args: argparse.Namespace, verb: Verb, watchdog: Watchdog
) -> AsyncIterator[Any]:
    """The daemon's client, or the service opened on a stopped store: the same methods, the
    opening and each call bounded by ``--timeout`` (``watchdog``)."""
    if _is_local(args):
        opened = open_session_service(**_store_options(args, verb), cleanup_interval=1e9)
    else:
        # No reconnecting: a daemon that is not there fails the verb at once.
        token = read_token_file(args.token_file) if args.token_file else args.token
        opened = connect(args.address, token=token, reconnect_timeout=0)
    watchdog.arm("opening")
    async with opened as target:
        watchdog.disarm()
        yield watchdog.bound(target)


class Watchdog:
    """Bounds each wait of a verb (opening, then every call) by ``seconds``: a daemon that
    accepts and never answers, or a stuck store, fails the verb with ServiceUnavailable
    instead of hanging it. One cancel scope around the whole verb, its deadline moved to
    now + ``seconds`` while a wait is under way and away otherwise (the verb's own work, such
    as writing a backup, is not bounded)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.scope = trio.CancelScope()
        self._what = "opening"

    def arm(self, what: str) -> None:
        """A wait for ``what`` begins: it has ``seconds``."""
        self._what = what
        self.scope.deadline = trio.current_time() + self.seconds

    def disarm(self) -> None:
        self.scope.deadline = math.inf

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        self.arm(what)
        try:
            yield
        finally:
            self.disarm()

    def bound(self, target: Any) -> Any:
        return _Bounded(target, self)

    def expired(self) -> ServiceUnavailable:
        return ServiceUnavailable(f"{self._what}: no answer within {self.seconds:g} s (--timeout)")


class _Bounded:
    """``target``'s async methods, each waited for under a :class:`Watchdog`."""

    def __init__(self, target: Any, watchdog: Watchdog) -> None:
        self._target = target
        self._watchdog = watchdog

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._target, name)

        async def bounded(*args: Any) -> Any:
            with self._watchdog.waiting(name):
                return await method(*args)

        return bounded


async def _pages(target: Any) -> AsyncIterator[list[Session]]:
    cursor = None
    while True:
        page, cursor = await target.list_page(cursor, BATCH)
        yield page
        if cursor is None:
            return


# -- output ----------------------------------------------------------------------------------


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: list[list[str]], headers: list[str], out: IO[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def _session_row(s: Session) -> list[str]:
    ttl = "never" if s.timeout_ms is None else f"{s.timeout_ms / 1000:g}s"
    metadata = json.dumps(s.metadata, default=repr, ensure_ascii=False)
    return [s.id, _time(s.created_at), _time(s.last_accessed), ttl, str(s.version), metadata[:60]]


def _json(value: Any, out: IO[str]) -> None:
    out.write(json.dumps(value, default=repr, ensure_ascii=False) + "\n")


class Progress:
    """A one-line progress bar on stderr, shown only for large jobs on a terminal."""

    def __init__(self, label: str, total: int | None, stream: IO[str] = sys.stderr) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream
        self._shown = bool(total and total >= PROGRESS_THRESHOLD and stream.isatty())
        self._last = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self._shown and (now - self._last > 0.1 or self.done >= (self.total or 0)):
            self._last = now
            fraction = min(1.0, self.done / (self.total or 1))
            bar = "#" * int(30 * fraction)
            self._stream.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total}")
            self._stream.flush()

    def finish(self) -> None:
        if self._shown:
            self._stream.write("\n")


# -- the verbs -------------------------------------------------------------------------------


async def ping(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    start = time.perf_counter()
    answer = await target.ping()
    elapsed_ms = (time.perf_counter() - start) * 1000
    if args.json:
        _json({"address": args.address, "reply": answer, "ms": round(elapsed_ms, 3)}, out)
    else:
        out.write(f"{answer} from {args.address} in {elapsed_ms:.2f} ms\n")


async def list_(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    rows = []
    async for page in _pages(target):
        for s in page:
            if args.json:
                _json(s.to_dict(), out)
            else:
                rows.append(_session_row(s))
    if not args.json:
        headers = ["ID", "CREATED (UTC)", "LAST ACCESSED", "TTL", "VER", "METADATA"]
        _table(rows, headers, out)
        out.write(f"{len(rows)} live sessions\n")


async def inspect(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    s = await target.peek(args.id)
    if args.json:
        _json(s.to_dict(), out)
        return
    rows = [
        ["id", s.id],
        ["created", _time(s.created_at)],
        ["last accessed", _time(s.last_accessed)],
        ["expires", _time(s.expires_at) if s.expires_at is not None else "never"],
        ["version", str(s.version)],
        ["metadata", json.dumps(s.metadata, indent=2, default=repr, ensure_ascii=False)],
    ]
    for name, value in rows:
        out.write(f"{name + ':':<15}{value}\n")


async def stats(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    figures = await target.stats()
    if args.json:
        _json(figures, out)
    else:
        _table([[k, str(v)] for k, v in figures.items()], ["STAT", "VALUE"], out)


async def cleanup(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    removed = await target.cleanup_expired()
    if args.json:
        _json({"removed": removed}, out)
    else:
        out.write(f"removed {removed} expired sessions\n")


async def delete(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    removed = await target.delete(args.id)
    if args.json:
        _json({"id": args.id, "deleted": removed}, out)
    elif removed:
        out.write(f"deleted {args.id}\n")
    if not removed:
        raise SessionNotFound(f"no live session {args.id!r}")


async def backup(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    total = await target.count()
    progress = Progress("backup", total)
    # A private temporary file of a fresh name (O_EXCL, O_NOFOLLOW, 0600) beside the backup, so
    # that no file or link already there is followed or overwritten; renamed into place only
    # when complete, removed on any failure.
    directory, name = os.path.split(os.path.abspath(args.file))
    fd, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            await _write_backup(target, f, total, progress)
        os.replace(partial, args.file)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    progress.finish()
    written = progress.done
    if args.json:
        _json({"file": args.file, "sessions": written}, out)
    else:
        out.write(f"backed up {written} sessions to {args.file}\n")


async def _write_backup(target: Any, f: BinaryIO, total: int, progress: Progress) -> None:
    """The backup format of the module docstring, synced to disk; ``progress`` counts it."""
    header = {
        "format": BACKUP_FORMAT,
        "version": BACKUP_VERSION,
        "created_at": int(time.time() * 1000),
        "backend": await target.get_backend(),
        "count": total,
    }
    f.write(pack(header))
    async for page in _pages(target):
        f.write(b"".join(pack(encode_session(s)) for s in page))
        progress.advance(len(page))
    f.write(pack({"end": True, "count": progress.done}))
    f.flush()
    os.fsync(f.fileno())


def read_backup(f: BinaryIO) -> tuple[dict[str, Any], Iterator[Session]]:
    """The header of backup file ``f`` and an iterator over its sessions.

    The iterator raises :class:`Failed` on a damaged or truncated file, after the sessions
    before the damage.
    """
    unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=MAX_RECORD_BYTES)
    try:
        header = unpacker.unpack()
    except (msgpack.OutOfData, ValueError) as exc:
        raise Failed(f"not a backup file: {exc or 'empty'}") from None
    if not isinstance(header, dict) or header.get("format") != BACKUP_FORMAT:
        raise Failed("not a backup file (no sessiond-backup header)")
    if header.get("version") != BACKUP_VERSION:
        raise Failed(f"backup version {header.get('version')!r} is not supported")

    def sessions() -> Iterator[Session]:
        read = 0
        while True:
            try:
                item = unpacker.unpack()
            except msgpack.OutOfData:
                raise Failed(f"the backup is truncated after {read} sessions") from None
            except ValueError as exc:
                raise Failed(f"the backup is damaged after {read} sessions: {exc}") from None
            if isinstance(item, dict) and item.get("end") is True:
                if item.get("count") != read:
                    raise Failed(f"the backup says {item.get('count')} sessions, holds {read}")
                return
            if not isinstance(item, bytes):
                raise Failed(f"the backup is damaged after {read} sessions")
            try:
                yield decode_session(item)
            except StoreError as exc:
                raise Failed(f"session {read + 1} of the backup is damaged: {exc}") from None
            read += 1

    return header, sessions()


async def restore(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    with open(args.file, "rb") as f:
        header, sessions = read_backup(f)
        progress = Progress("restore", header.get("count"))
        restored = seen = 0
        batch: list[Session] = []
        for session in sessions:
            batch.append(session)
            if len(batch) == BATCH:
                restored += await target.import_sessions(batch)
                seen += len(batch)
                progress.advance(len(batch))
                batch = []
        if batch:
            restored += await target.import_sessions(batch)
            seen += len(batch)
            progress.advance(len(batch))
        progress.finish()
    if args.json:
        _json({"file": args.file, "restored": restored, "skipped": seen - restored}, out)
    else:
        out.write(f"restored {restored} sessions from {args.file} ({seen - restored} skipped)\n")


async def check(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    """Against a daemon: read every live session through it and compare with its count."""
    counted = await target.count()
    read = 0
    async for page in _pages(target):
        read += len(page)
    report = {"sessions": read, "count": counted, "ok": True}
    _report(report, args, out)


async def check_store(args: argparse.Namespace, out: IO[str], watchdog: Watchdog) -> None:
    """On a stopped store: open it (quarantining it with --repair if it is corrupt) and decode
    every record."""
    backend = canonical_backend(args.backend or "disk")
    options: dict[str, Any] = {}
    if args.prefix is not None:
        options["prefix"] = args.prefix
    if backend in ("disk", "lmdb"):
        # Only --repair may change anything: it quarantines a damaged store.
        options["on_corrupt"] = "quarantine" if args.repair else "fail"
        options.update({"create": False} if args.repair else {"read_only": True})
    store = watchdog.bound(make_store(backend, path=args.path, url=args.url, **options))
    await store.open()
    try:
        now_ms = int(time.time() * 1000)
        live, cursor = 0, None
        while True:
            page, cursor = await store.scan(now_ms, cursor, BATCH)
            live += len(page)
            if cursor is None:
                break
        expired = len(await store.expired(now_ms, 2**31))
        counted = await store.count(now_ms)
    finally:
        await store.close()
    report = {"path": args.path, "sessions": live, "count": counted, "expired": expired}
    _report({**report, "ok": True}, args, out)


def _report(report: dict[str, Any], args: argparse.Namespace, out: IO[str]) -> None:
    if report["sessions"] != report["count"]:
        report["ok"] = False
    if args.json:
        _json(report, out)
    else:
        _table([[k, str(v)] for k, v in report.items()], ["CHECK", "RESULT"], out)
    if not report["ok"]:
        raise Failed(f"{report['sessions']} sessions read but the store counts {report['count']}")


# -- command line ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verb:
    name: str
    run: Callable[..., Any]
    help: str
    local: bool = True  # also works on a stopped store
    argument: str | None = None  # one positional argument (ID or FILE)
    reads_only: bool = True  # opens a stopped store read-only
    creates: bool = False  # may make a new store (restore)


VERBS = (
    Verb("ping", ping, "check that the daemon answers", local=False),
    Verb("list", list_, "list live sessions"),
    Verb("inspect", inspect, "show one session (does not refresh it)", argument="id"),
    Verb("stats", stats, "the service's figures"),
    Verb("cleanup", cleanup, "remove expired sessions now", reads_only=False),
    Verb("delete", delete, "delete one session", argument="id", reads_only=False),
    Verb("backup", backup, "write every live session to a backup file", argument="file"),
    Verb(
        "restore",
        restore,
        "store the sessions of a backup file",
        argument="file",
        reads_only=False,
        creates=True,
    ),
    Verb("check", check, "check the store's integrity"),
)


def _run(verb: Verb, args: argparse.Namespace) -> int:
    async def main() -> None:
        watchdog = Watchdog(args.timeout)
        with watchdog.scope:
            if verb.name == "check" and _is_local(args):
                await check_store(args, sys.stdout, watchdog)
            else:
                async with open_target(args, verb, watchdog) as target:
                    await verb.run(target, args, sys.stdout)
        if watchdog.scope.cancelled_caught:
            raise watchdog.expired()

    try:
        trio.run(main)
    except (Failed, SessionError, OSError, ValueError) as exc:
        kind = "" if isinstance(exc, Failed) else f"{type(exc).__name__}: "
        print(f"{verb.name}: {kind}{exc}", file=sys.stderr)
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the admin verbs."""
    for verb in VERBS:
        where = "a running daemon" + (" or a stopped store (--path)" if verb.local else "")
        parser = subparsers.add_parser(
            verb.name,
            help=verb.help,
            description=f"{verb.help[0].upper()}{verb.help[1:]}, on {where}.",
        )
        if verb.argument:
            parser.add_argument(verb.argument, metavar=verb.argument.upper())
        parser.add_argument(
            "--address",
            default=os.environ.get("SESSIOND_ADDRESS", DEFAULT_ADDRESS),
            help=f"the daemon: tcp://HOST:PORT or unix:///path (default {DEFAULT_ADDRESS})",
        )
        parser.add_argument(
            "--token-file",
            default=os.environ.get("SESSIOND_TOKEN_FILE"),
            help="a file holding the daemon's token (preferred, as is SESSIOND_TOKEN)",
        )
        parser.add_argument(
            "--token",
            default=os.environ.get("SESSIOND_TOKEN"),
            help="the daemon's token itself: visible to every local user in ps",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            help="seconds each call may take, connecting included (default 10)",
        )
        if verb.local:
            parser.add_argument("--backend", help="a stopped store's backend (default disk)")
            parser.add_argument("--path", help="a stopped store's directory")
            parser.add_argument("--url", help="a redis store's URL")
            parser.add_argument("--prefix", help="a redis store's key prefix (default sessions:)")
        if verb.name == "check":
            parser.add_argument(
                "--repair",
                action="store_true",
                help="move a corrupt stopped store aside (quarantine) and start it empty",
            )
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.set_defaults(func=lambda args, verb=verb: _run(verb, args))
