"""The admin verbs: ``ping health list inspect stats cleanup delete delete-where backup restore
check``.

Each works against a running daemon (``--address``, default ``tcp://127.0.0.1:7878`` or
``SESSIOND_ADDRESS``; ``--token-file`` or ``SESSIOND_TOKEN``). All but ``ping`` and ``health`` also
work on a stopped store: give ``--path`` (and ``--backend`` when it is not ``disk``) or ``--url``
(and ``--prefix``) for redis, and the verb opens the store itself; the store's single-owner
lock refuses this while a daemon owns it. A stopped store is never made by accident: a path
with no store, or a Redis prefix with no sessions, is an error, except for ``restore``. Output
is a human table by default, JSON with ``--json`` (``list --json`` prints one JSON object a
line). The exit status is 0 on success, 1 when the verb failed (the daemon unreachable, no such
session, a damaged store...), 2 for bad usage; see :mod:`workers.cli.output`.

A backup file is a msgpack stream: a header map ``{"format": "sessiond-backup", "version": 1,
"created_at": ms, "backend": name, "count": n}``, then each session as a bin object holding its
:func:`workers.record.codec.encode_session` record, then a trailer map ``{"end": true, "count": n}``
that tells a complete backup from a truncated one. ``restore`` stores the sessions as they are
(ids, times, versions) and skips ids already in use. Both show a labelled progress bar on
stderr when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

import msgpack
import trio

from ..core.service import open_session_service
from ..record.codec import decode_session, encode_session, pack
from ..record.errors import (
    SessionError,
    SessionNotFound,
    StoreError,
)
from ..record.session import Session
from ..stores import canonical_backend, make_store
from .options import positive_int
from .output import (
    Failed,
    Progress,
    debug_requested,
    report_failure,
    table,
    write_json,
)
from .remote import Watchdog, add_daemon_options, connect_daemon

BACKUP_FORMAT = "sessiond-backup"
BACKUP_VERSION = 1
#: Sessions per page when paging through a store, and per batch on restore.
BATCH = 500
#: Largest single record a backup may hold (far above any max_metadata_bytes in use).
MAX_RECORD_BYTES = 64 * 1024 * 1024


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
    read_only = verb.reads_only or getattr(args, "dry_run", False)
    if read_only:
        options["read_only"] = True  # implies create=False on disk and lmdb
    if backend == "redis" or not (read_only or verb.creates):
        options["create"] = verb.creates
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
        opened = connect_daemon(args)
    watchdog.arm("opening")
    async with opened as target:
        watchdog.disarm()
        yield watchdog.bound(target)


async def _pages(target: Any, size: int = BATCH) -> AsyncIterator[list[Session]]:
    cursor = None
    while True:
        page, cursor = await target.list_page(cursor, size)
        yield page
        if cursor is None:
            return


_MISSING = object()


def match(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (VALUE a string) or ``KEY:=JSON`` (any JSON value: ``age:=42``,
    ``admin:=true``) as a (key, value) pair; argparse's error (exit status 2) otherwise."""
    raw = ":=" in text and text.index(":=") < text.find("=") + 1
    key, _, value = text.partition(":=" if raw else "=")
    if not key or (not raw and "=" not in text):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or KEY:=JSON, got {text!r}")
    if not raw:
        return key, value
    try:
        return key, json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}:= takes a JSON value, got {value!r}") from None


def _matches(session: Session, where: list[tuple[str, Any]]) -> bool:
    return all(session.metadata.get(key, _MISSING) == value for key, value in where)


async def _selected(target: Any, args: argparse.Namespace) -> AsyncIterator[Session]:
    """The live sessions ``list`` shows: those matching every ``--where``, ``--limit`` at most."""
    where = args.where or []
    limit = args.limit
    size = min(BATCH, limit) if limit and not where else BATCH
    shown = 0
    async for page in _pages(target, size):
        for s in page:
            if limit is not None and shown >= limit:
                return
            if _matches(s, where):
                shown += 1
                yield s


# -- output ----------------------------------------------------------------------------------


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _session_row(s: Session) -> list[str]:
    ttl = "never" if s.timeout_ms is None else f"{s.timeout_ms / 1000:g}s"
    metadata = json.dumps(s.metadata, default=repr, ensure_ascii=False)
    return [s.id, _time(s.created_at), _time(s.last_accessed), ttl, str(s.version), metadata[:60]]


# -- the verbs -------------------------------------------------------------------------------


async def ping(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    start = time.perf_counter()
    answer = await target.ping()
    elapsed_ms = (time.perf_counter() - start) * 1000
    if args.json:
        write_json({"address": args.address, "reply": answer, "ms": round(elapsed_ms, 3)}, out)
    else:
        out.write(f"{answer} from {args.address} in {elapsed_ms:.2f} ms\n")


async def health(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    answer = await target.health()
    if args.json:
        write_json({"address": args.address, **answer}, out)
    else:
        out.write(f"ready: the {answer['backend']} store answered in {answer['store_ms']} ms\n")


async def list_(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    if args.count_only:
        if args.where:
            n = 0
            async for _ in _selected(target, args):
                n += 1
        else:
            n = await target.count()
            n = n if args.limit is None else min(n, args.limit)
        if args.json:
            write_json({"count": n}, out)
        else:
            out.write(f"{n}\n")
        return
    rows = []
    async for s in _selected(target, args):
        if args.json:
            write_json(s.to_dict(), out)
        else:
            rows.append(_session_row(s))
    if not args.json:
        headers = ["ID", "CREATED (UTC)", "LAST ACCESSED", "TTL", "VER", "METADATA"]
        table(rows, headers, out)
        out.write(f"{len(rows)} live sessions\n")


async def inspect(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    s = await target.peek(args.id)
    if args.json:
        write_json(s.to_dict(), out)
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
        write_json(figures, out)
    else:
        write_stats(figures, out)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "-"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def write_stats(figures: dict[str, Any], out: IO[str]) -> None:
    """The figures of ``stats()`` for a person: the service, then a row per method."""
    batches, cache = figures["batches"], figures["cache"]
    hit_rate = "-" if cache["hit_rate"] is None else f"{cache['hit_rate']:.1%}"
    rows = [
        [name, str(figures[name])]
        for name in ("backend", "sessions", "version", "pid", "uptime_s", "mailbox", "requests")
        if name in figures
    ]
    rows += [
        ["errors", _counts(figures["errors"])],
        ["restarts", f"{figures['restarts']} ({_counts(figures['restarts_by_child'])})"],
        [
            "batches",
            f"{batches['count']} (p50 {_ms(batches['p50'])}, p99 {_ms(batches['p99'])}), "
            f"{batches['inline']} answered inline",
        ],
        ["cache", f"hit rate {hit_rate} ({cache['hits']} hits, {cache['misses']} misses)"],
        ["store errors", _counts(figures["store_errors"])],
    ]
    if "connections" in figures:  # a daemon's
        rows.append(
            [
                "connections",
                f"{figures['connections']} open ({figures['unauthenticated']} not "
                f"authenticated), {figures['connections_accepted']} accepted, "
                f"{figures['connections_refused']} refused, "
                f"{figures['connections_evicted']} evicted",
            ]
        )
        rows.append(
            [
                "refusals",
                f"{figures['auth_failures']} failed auth, {figures['timeouts']} timed out, "
                f"{figures['invalid_messages']} invalid messages",
            ]
        )
    table(rows, ["STAT", "VALUE"], out)
    methods = figures["methods"]
    if methods:
        out.write("\n")
        table(
            [
                [
                    name,
                    str(m["count"]),
                    _counts(m["errors"]),
                    _ms(m["latency"]["p50_ms"]),
                    _ms(m["latency"]["p99_ms"]),
                ]
                for name, m in methods.items()
            ],
            ["METHOD", "COUNT", "ERRORS", "P50 MS", "P99 MS"],
            out,
        )


async def cleanup(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    removed = await target.cleanup_expired()
    if args.json:
        write_json({"removed": removed}, out)
    else:
        out.write(f"removed {removed} expired sessions\n")


async def delete(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    removed = await target.delete(args.id)
    if args.json:
        write_json({"id": args.id, "deleted": removed}, out)
    elif removed:
        out.write(f"deleted {args.id}\n")
    if not removed:
        raise SessionNotFound(f"no live session {args.id!r}")


async def delete_where(target: Any, args: argparse.Namespace, out: IO[str]) -> None:
    key, value = args.match
    if args.dry_run:
        n = 0
        async for page in _pages(target):
            n += sum(1 for s in page if _matches(s, [(key, value)]))
    else:
        n = await target.delete_where(key, value)
    if args.json:
        write_json({"key": key, "value": value, "deleted": n, "dry_run": args.dry_run}, out)
    else:
        verb = "would delete" if args.dry_run else "deleted"
        out.write(f"{verb} {n} sessions where {key} = {json.dumps(value, default=repr)}\n")


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
        write_json({"file": args.file, "sessions": written}, out)
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

        async def flush() -> None:
            nonlocal restored, seen, batch
            restored += await target.import_sessions(batch)
            seen += len(batch)
            progress.advance(len(batch))
            batch = []

        for session in sessions:
            batch.append(session)
            if len(batch) == BATCH:
                await flush()
        if batch:
            await flush()
        progress.finish()
    if args.json:
        write_json({"file": args.file, "restored": restored, "skipped": seen - restored}, out)
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
    elif backend == "redis":
        options["create"] = False
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
        write_json(report, out)
    else:
        table([[k, str(v)] for k, v in report.items()], ["CHECK", "RESULT"], out)
    if not report["ok"]:
        raise Failed(f"{report['sessions']} sessions read but the store counts {report['count']}")


# -- command line ----------------------------------------------------------------------------


def _add_match(
    parser: argparse.ArgumentParser, name: str, what: str, more: str = "", **options: Any
) -> None:
    """A ``KEY=VALUE`` argument (see :func:`match`)."""
    parser.add_argument(
        name,
        type=match,
        metavar="KEY=VALUE",
        help=f"{what} whose metadata KEY is the string VALUE (KEY:=JSON for other values, "
        f"e.g. age:=42){more}",
        **options,
    )


def _list_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=positive_int, help="show at most N sessions")
    _add_match(parser, "--where", "only sessions", "; repeat to require several", action="append")
    parser.add_argument(
        "--count-only", action="store_true", help="print only how many sessions there are"
    )


def _delete_where_options(parser: argparse.ArgumentParser) -> None:
    _add_match(parser, "match", "delete the sessions")
    parser.add_argument(
        "--dry-run", action="store_true", help="only count the sessions that would go"
    )


def _check_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repair",
        action="store_true",
        help="move a corrupt stopped store aside (quarantine) and start it empty",
    )


@dataclass(frozen=True, slots=True)
class Verb:
    name: str
    run: Callable[..., Any]
    help: str
    local: bool = True  # also works on a stopped store
    argument: str | None = None  # one positional argument (ID or FILE)
    reads_only: bool = True  # opens a stopped store read-only
    creates: bool = False  # may make a new store (restore)
    options: Callable[[argparse.ArgumentParser], None] | None = None  # the verb's own


VERBS = (
    Verb("ping", ping, "check that the daemon answers (liveness)", local=False),
    Verb(
        "health",
        health,
        "check that the daemon and its store answer (readiness)",
        local=False,
    ),
    Verb("list", list_, "list live sessions", options=_list_options),
    Verb("inspect", inspect, "show one session (does not refresh it)", argument="id"),
    Verb("stats", stats, "the service's figures"),
    Verb("cleanup", cleanup, "remove expired sessions now", reads_only=False),
    Verb("delete", delete, "delete one session", argument="id", reads_only=False),
    Verb(
        "delete-where",
        delete_where,
        'delete every session whose metadata KEY is VALUE ("log out everywhere")',
        reads_only=False,
        options=_delete_where_options,
    ),
    Verb("backup", backup, "write every live session to a backup file", argument="file"),
    Verb(
        "restore",
        restore,
        "store the sessions of a backup file",
        argument="file",
        reads_only=False,
        creates=True,
    ),
    Verb("check", check, "check the store's integrity", options=_check_options),
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
    except BrokenPipeError:
        raise  # the reader went away: the command line ends quietly
    except (Failed, SessionError, OSError, ValueError, ImportError) as exc:
        return report_failure(verb.name, exc, json_output=args.json, debug=debug_requested(args))
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
        add_daemon_options(parser)
        if verb.local:
            parser.add_argument("--backend", help="a stopped store's backend (default disk)")
            parser.add_argument("--path", help="a stopped store's directory")
            parser.add_argument("--url", help="a redis store's URL")
            parser.add_argument("--prefix", help="a redis store's key prefix (default sessions:)")
        if verb.options is not None:
            verb.options(parser)
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.set_defaults(func=lambda args, verb=verb: _run(verb, args))
