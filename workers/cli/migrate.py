"""Copy every live session from one store to another, and the ``migrate`` command line verb.

::

    python run.py migrate --from disk:/var/lib/sessions --to redis:redis://127.0.0.1:6379/0

A location is ``BACKEND:WHERE``: a path for ``disk`` and ``lmdb``, a URL for ``redis`` (empty:
``redis://127.0.0.1:6379/0``; a ``prefix`` query parameter chooses the key prefix, as in
``redis:redis://host:6379/0?prefix=myapp:``), nothing for ``memory``. The seed's names (``dets``,
``leveldb``...) are accepted too.

Sessions are copied field for field (id, times, timeout, metadata and version), as pages of a
scan of the source, each page committed to the target as one batch. Expired sessions are not
copied. A session whose id the target already holds is **skipped and counted**, never
overwritten: the target's copy may be newer (a service may already be using it), and it makes a
migration that stopped half way (Redis went down, the disk filled) safe to run again, copying
only what is missing. Both stores are opened by the migration, so neither may be in use by a
running service, except a shared (redis) one.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio

from ..record.errors import SessionError
from ..stores import canonical_backend, make_store
from ..stores.base import Put, Store
from .options import positive_int
from .output import Progress as ProgressBar
from .output import debug_requested, report_failure

#: ``progress(done, total)``: sessions handled so far (copied or skipped), and the number of
#: live sessions the source held when the migration began (:func:`migrate` always knows it;
#: None is for callers that do not).
Progress = Callable[[int, int | None], None]


async def migrate(
    source: Store,
    target: Store,
    *,
    now_ms: int,
    batch: int = 500,
    progress: Progress | None = None,
) -> int:
    """Copy every session live at ``now_ms`` from ``source`` to ``target``, both open.

    Returns the number of sessions copied. Sessions the target already holds are skipped (see
    the module docstring); ``progress`` sees them in its count of sessions handled.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    total = await source.count(now_ms)
    done = copied = 0
    if progress is not None:
        progress(done, total)
    cursor: str | None = None
    while True:
        page, cursor = await source.scan(now_ms, cursor, batch)
        if page:
            results = await target.commit([Put(session, None) for session in page])
            copied += sum(results)
            done += len(page)
            if progress is not None:
                progress(done, total)
        if cursor is None:
            return copied


def register(subparsers: Any) -> None:
    """Add the ``migrate`` verb to the command line."""
    parser = subparsers.add_parser(
        "migrate",
        help="copy every live session from one store to another",
        description="Copy every live session from one store to another, field for field.",
        epilog="Sessions already in the target are skipped, so a migration can be run again.",
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        type=location,
        metavar="BACKEND:WHERE",
        help="the store to copy from, e.g. disk:/var/lib/sessions",
    )
    parser.add_argument(
        "--to",
        dest="target",
        required=True,
        type=location,
        metavar="BACKEND:WHERE",
        help="the store to copy to, e.g. redis:redis://127.0.0.1:6379/0",
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=500,
        help="sessions per page and per write (default 500)",
    )
    parser.add_argument(
        "--json", action="store_true", help='print {"copied": N, "skipped": M} on stdout'
    )
    parser.set_defaults(func=run)


def location(text: str) -> tuple[str, dict[str, Any]]:
    """Parse ``BACKEND:WHERE`` into a backend name and the options of :func:`make_store`."""
    backend, sep, where = text.partition(":")
    try:
        backend = canonical_backend(backend)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sep:
        raise argparse.ArgumentTypeError(f"expected BACKEND:WHERE, got {text!r}")
    if backend == "memory":
        return backend, {}
    if backend == "redis":
        return backend, _redis_options(where)
    if not where:
        raise argparse.ArgumentTypeError(f"the {backend} backend needs a path: {backend}:PATH")
    return backend, {"path": where}


def _redis_options(url: str) -> dict[str, Any]:
    if not url:
        return {}
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    options: dict[str, Any] = {}
    rest = []
    for key, value in query:
        if key == "prefix":
            options["prefix"] = value
        else:
            rest.append((key, value))
    options["url"] = urlunsplit(parts._replace(query=urlencode(rest)))
    return options


def run(args: argparse.Namespace) -> int:
    """The ``migrate`` verb: 0 when every live session is in the target, else 1."""
    try:
        if args.source == args.target:
            raise ValueError("the source and the target are the same store")
        copied, handled = trio.run(_run, args)
    except (SessionError, OSError, ValueError, ImportError) as exc:
        return report_failure("migrate", exc, json_output=args.json, debug=debug_requested(args))
    skipped = handled - copied
    if args.json:
        print(json.dumps({"copied": copied, "skipped": skipped}))
    else:
        note = f" ({skipped} already in the target, left as they were)" if skipped else ""
        print(f"Copied {copied} sessions{note}")
    return 0


async def _run(args: argparse.Namespace) -> tuple[int, int]:
    backend, options = args.source
    if backend in ("disk", "lmdb"):
        options = {**options, "read_only": True}  # a source is only read, and never made
    elif backend == "redis":
        options = {**options, "create": False}  # a prefix with no sessions is a typo
    source = make_store(backend, **options)
    target = make_store(args.target[0], **args.target[1])
    bar = ProgressBar("migrate", None)
    progress: Progress = bar.update
    await source.open()
    try:
        await target.open()
        try:
            copied = await migrate(
                source,
                target,
                now_ms=int(time.time() * 1000),
                batch=args.batch,
                progress=progress,
            )
        finally:
            await target.close()
    finally:
        await source.close()
        bar.finish()
    return copied, bar.done
