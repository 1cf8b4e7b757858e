"""``sessiond top``: a live view of a running daemon, in the spirit of Erlang's observer and htop.

::

    sessiond top [--address A] [--interval 1]       refreshed in place; q or Ctrl-C quits
    sessiond top --once --json                      one snapshot for scripts

Every ``--interval`` seconds it asks the daemon for its supervision tree (``tree``) and its
figures (``metrics``, which never touches the store) and shows: each child of the tree (state,
restarts, last exit, mailbox depth), the manager's batches (per second, mean size, p50/p99),
its inline answers and cache hit rate, the connections, and per method the requests per
second, errors and the latency p50/p99 *of the last interval* (from the difference of two
readings of the daemon's histograms). Rates need two readings, so ``--once`` takes two,
``--interval`` apart.

On a terminal the view is redrawn in place (the alternate screen, as ``top`` does) and the
keyboard is read without echo; elsewhere (a pipe, a file) each view is printed after the
last (``--iterations`` bounds how many). A daemon that cannot be reached at the start is an
error, at once; one that goes away later (it restarted its listener after a crash, or it
stopped) is shown as such, and each refresh tries to reconnect.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shutil
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import trio

from ..core.metrics import Histogram
from ..record.errors import SessionError
from ..wire.client import Client
from .options import positive_int, positive_seconds
from .output import debug_requested, report_failure, table_lines, write_json
from .remote import Watchdog, add_daemon_options, connect_daemon

#: Keys that end the view.
QUIT_KEYS = (b"q", b"Q")


@dataclass(frozen=True, slots=True)
class Reading:
    """What the daemon said at one refresh."""

    figures: dict[str, Any]
    tree: dict[str, Any]


async def read(client: Client, timeout: float) -> Reading:
    with trio.fail_after(timeout):
        tree = await client.tree()
        figures = await client.metrics()
    return Reading(figures, tree)


def snapshot(address: str, now: Reading, before: Reading | None) -> dict[str, Any]:
    """The view as data (what ``--json`` prints): the tree, the manager, the connections and
    the methods, with rates and latencies over the time between ``before`` and ``now``
    (None where there is no earlier reading of the same daemon process)."""
    figures = now.figures
    earlier: dict[str, Any] | None = None
    between = None
    if before is not None and before.figures["pid"] == figures["pid"]:
        between = figures["uptime_s"] - before.figures["uptime_s"]
        earlier = before.figures if between > 0 else None

    def rate(count: int, then: int) -> float | None:
        return None if earlier is None else round(max(count - then, 0) / between, 1)

    methods = {}
    for name, m in figures["methods"].items():
        was = earlier["methods"].get(name) if earlier else None
        latency = Histogram.from_dict(m["latency"], 1000, "_ms")
        if was is not None:
            latency = latency.since(Histogram.from_dict(was["latency"], 1000, "_ms"))
        errors = sum(m["errors"].values())
        methods[name] = {
            "per_s": rate(m["count"], was["count"] if was else 0),
            "count": m["count"],
            "errors": errors,
            "errors_per_s": rate(errors, sum(was["errors"].values()) if was else 0),
            "p50_ms": _ms(latency.quantile(0.5)),
            "p99_ms": _ms(latency.quantile(0.99)),
        }
    batches = Histogram.from_dict(figures["batches"], floor=1)
    then = earlier or {"batches": {"count": 0, "inline": 0}, "requests": 0}
    if earlier is not None:
        batches = batches.since(Histogram.from_dict(earlier["batches"], floor=1))
    return {
        "address": address,
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "interval_s": between if earlier is not None else None,
        "pid": figures["pid"],
        "version": figures["version"],
        "backend": figures["backend"],
        "uptime_s": figures["uptime_s"],
        "tree": now.tree,
        "manager": {
            "mailbox": figures["mailbox"],
            "batches_per_s": rate(figures["batches"]["count"], then["batches"]["count"]),
            "mean_batch": round(batches.sum / batches.count, 2) if batches.count else None,
            "batch_p50": _round(batches.quantile(0.5)),
            "batch_p99": _round(batches.quantile(0.99)),
            "inline_per_s": rate(figures["batches"]["inline"], then["batches"]["inline"]),
            "cache_hit_rate": figures["cache"]["hit_rate"],
        },
        "requests_per_s": rate(figures["requests"], then["requests"]),
        "restarts": figures["restarts"],
        "connections": {
            "open": figures["connections"],
            "accepted": figures["connections_accepted"],
            "refused": figures["connections_refused"],
            "evicted": figures["connections_evicted"],
            "auth_failures": figures["auth_failures"],
        },
        "store_errors": figures["store_errors"],
        "methods": methods,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.1%}"


def _uptime(seconds_up: float) -> str:
    minutes, secs = divmod(int(seconds_up), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def render(view: dict[str, Any], interval: float) -> list[str]:
    """The view as lines of text."""
    tree, manager, conns = view["tree"], view["manager"], view["connections"]
    lines = [
        f"sessiond top - {view['address']} - {view['backend']} store - pid {view['pid']} - "
        f"up {_uptime(view['uptime_s'])} - v{view['version']}",
        f"requests {_text(view['requests_per_s'])}/s - every {interval:g} s - q quits",
        "",
        f"TREE {tree['supervisor']} ({tree['strategy']}, at most {tree['intensity']} restarts "
        f"in {tree['period']:g} s)",
    ]
    rows = []
    for child in tree["children"]:
        rows.append(
            [
                child["id"],
                "running" if child["running"] else "stopped",
                str(child["restarts"]),
                _text(child.get("mailbox")),
                _text(child["last_exit"]),
            ]
        )
    lines += table_lines(rows, ["CHILD", "STATE", "RESTARTS", "MAILBOX", "LAST EXIT"])
    lines += [
        "",
        f"MANAGER mailbox {_text(manager['mailbox'])}  batches {_text(manager['batches_per_s'])}/s"
        f"  mean size {_text(manager['mean_batch'])} (p50 {_text(manager['batch_p50'])}, "
        f"p99 {_text(manager['batch_p99'])})  inline {_text(manager['inline_per_s'])}/s  "
        f"cache hit rate {_percent(manager['cache_hit_rate'])}",
        f"CONNECTIONS {conns['open']} open, {conns['accepted']} accepted, {conns['refused']} "
        f"refused, {conns['evicted']} evicted, {conns['auth_failures']} failed auth"
        + (f"  STORE ERRORS {view['store_errors']}" if view["store_errors"] else ""),
        "",
    ]
    rows = []
    for name, m in sorted(view["methods"].items(), key=lambda kv: -(kv[1]["per_s"] or 0)):
        rows.append(
            [
                name,
                _text(m["per_s"]),
                str(m["count"]),
                str(m["errors"]),
                _text(m["p50_ms"]),
                _text(m["p99_ms"]),
            ]
        )
    lines += table_lines(rows, ["METHOD", "REQ/S", "TOTAL", "ERRORS", "P50 MS", "P99 MS"])
    return lines


class Screen:
    """The terminal, redrawn in place: alternate screen, no cursor, keys without echo."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    @contextlib.contextmanager
    def opened(self) -> Iterator[Screen]:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)  # keys arrive one by one, unechoed; Ctrl-C still interrupts
        self.out.write("\x1b[?1049h\x1b[?25l")
        try:
            yield self
        finally:
            self.out.write("\x1b[?25h\x1b[?1049l")
            self.out.flush()
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    def draw(self, lines: list[str]) -> None:
        width, height = shutil.get_terminal_size()
        shown = [line[:width] for line in lines[:height]]
        self.out.write("\x1b[H" + "\x1b[K\n".join(shown) + "\x1b[K\x1b[J")
        self.out.flush()


async def _keys(quit_scope: trio.CancelScope) -> None:
    """Read the keyboard; ``q`` ends the view."""
    fd = os.dup(sys.stdin.fileno())
    stream = trio.lowlevel.FdStream(fd)
    try:
        while True:
            data = await stream.receive_some(64)
            if not data or any(key in data for key in QUIT_KEYS):
                quit_scope.cancel()
                return
    finally:
        await stream.aclose()
        os.set_blocking(sys.stdin.fileno(), True)  # the terminal's, shared with our dup


async def run_top(args: argparse.Namespace) -> None:
    # Opening the connection is bounded by --timeout as the admin verbs' is (the same
    # watchdog, the same message); each reading is bounded by read() itself.
    watchdog = Watchdog(args.timeout)
    with watchdog.scope:
        watchdog.arm("opening")
        async with connect_daemon(args) as client:
            watchdog.disarm()
            await _view(client, args)
    if watchdog.scope.cancelled_caught:
        raise watchdog.expired()


async def _view(client: Client, args: argparse.Namespace) -> None:
    interactive = not (args.once or args.json) and sys.stdout.isatty() and sys.stdin.isatty()
    before = await read(client, args.timeout)
    if args.once:
        await trio.sleep(args.interval)
        view = snapshot(args.address, await read(client, args.timeout), before)
        _print(view, args)
        return
    with trio.CancelScope() as quit_scope:
        if interactive:
            screen = Screen(sys.stdout)
            with screen.opened():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_keys, quit_scope)
                    await _loop(client, args, before, screen)
        else:
            await _loop(client, args, before, None)


async def _loop(client: Client, args: argparse.Namespace, before: Reading, screen: Any) -> None:
    shown = 0
    while args.iterations is None or shown < args.iterations:
        start = time.monotonic()
        try:
            now = await read(client, args.timeout)
        except (SessionError, trio.TooSlowError) as exc:
            lines = [f"sessiond top - {args.address}: no answer ({exc}); trying again"]
            now = None
        else:
            view = snapshot(args.address, now, before)
            lines = render(view, args.interval)
            before = now
        if screen is not None:
            screen.draw(lines)
        elif now is not None and args.json:
            write_json(view, sys.stdout)
        else:
            print("\n".join([*lines, ""]), flush=True)
        shown += 1
        await trio.sleep(max(args.interval - (time.monotonic() - start), 0))


def _print(view: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        write_json(view, sys.stdout)
    else:
        print("\n".join(render(view, args.interval)))


def run(args: argparse.Namespace) -> int:
    """The ``top`` verb."""
    try:
        trio.run(run_top, args)
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a live view ends
    except (SessionError, OSError, trio.TooSlowError) as exc:
        return report_failure("top", exc, json_output=args.json, debug=debug_requested(args))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``top`` verb."""
    parser = subparsers.add_parser(
        "top",
        help="a live view of a running daemon: its tree, batches, requests per second",
        description=(
            "Show a running daemon's supervision tree, its manager's mailbox and batches, and "
            "the requests per second and latency of each method, refreshed in place (q or "
            "Ctrl-C quits)."
        ),
    )
    add_daemon_options(parser)
    parser.add_argument(
        "--interval",
        type=positive_seconds,
        default=1.0,
        help="seconds between refreshes (default 1)",
    )
    parser.add_argument(
        "--once", action="store_true", help="print one view (two readings, --interval apart)"
    )
    parser.add_argument(
        "--iterations", type=positive_int, help="stop after this many views (default: never)"
    )
    parser.add_argument("--json", action="store_true", help="views as JSON, one a line")
    parser.set_defaults(func=run)
