"""What the verbs share about output, so that a script can trust every one of them.

* **Failures are one line** on stderr, ``VERB: ErrorClass: what went wrong``, and with
  ``--json`` also a JSON object on stdout, ``{"error": "ErrorClass", "message": "..."}``. The
  traceback is shown only with ``--debug`` or ``SESSIOND_DEBUG=1``.
* **Exit status**: 0 success, 1 failure, 2 bad usage (argparse's own code).
* **Logs** of a verb (not of ``serve``) are only what the operator must know (ERROR records,
  one line each, no traceback); the supervision tree's own records stay out, since what
  failed is the verb's error line. ``--debug`` shows every record, tracebacks included.
* **Progress bars** only on a terminal, with a label, never on a pipe or a file.
* **A reader that goes away** (``sessiond list | head``) ends the verb quietly, status 0.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import sys
import time
import traceback
from typing import IO, Any

from ..record.errors import InternalError, SessionError

#: Set to 1 (or anything but 0) for tracebacks, like ``--debug``.
DEBUG_ENV = "SESSIOND_DEBUG"


class Failed(Exception):
    """A verb could not do its job; the message says why (exit status 1)."""


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """Whether tracebacks and debug logs were asked for (``--debug`` or ``SESSIOND_DEBUG``)."""
    if args is not None and getattr(args, "debug", False):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: str) -> str:
    """``text`` on one line (messages of other libraries sometimes span several)."""
    return " ".join(text.split())


def _name_and_message(exc: BaseException) -> tuple[str, str]:
    """The (error name, one-line message) a failure is reported with."""
    name = type(exc).__name__
    return name, one_line(str(exc)) or name


def report_failure(
    verb: str, exc: BaseException, *, json_output: bool = False, debug: bool = False
) -> int:
    """Say why ``verb`` failed (see the module docstring); returns the exit status, 1.

    An exception the verb did not expect (a bug) says so and how to see its traceback.
    """
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    name, message = _name_and_message(exc)
    if isinstance(exc, Failed):
        line = message
    elif _expected(exc):
        line = f"{name}: {message}"
    else:
        hint = "" if debug else f" (--debug or {DEBUG_ENV}=1 shows the traceback)"
        line = f"internal error, {name}: {message}{hint}"
    print(f"{verb}: {line}", file=sys.stderr)
    if json_output:
        try:
            write_json({"error": name, "message": message}, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            quiet_broken_pipe()
    return 1


def _expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure a verb reports as such, rather than a bug."""
    if isinstance(exc, InternalError):
        return False
    return isinstance(exc, (Failed, SessionError, OSError, ValueError, ImportError))


#: What to say about a socket error, by errno: the cause, and what to do.
_OS_REASONS: dict[int, str] = {
    errno.ECONNREFUSED: "connection refused: nothing listens there (is sessiond running?)",
    errno.ENOENT: "no such socket file (is sessiond running?)",
    errno.EADDRINUSE: "the address is in use (another sessiond? stop it or choose another port)",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address",
    errno.EACCES: "permission denied (ports below 1024 and some paths need privileges)",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "no route to the host",
    errno.ENETUNREACH: "the network is unreachable",
}


#: The same when listening, where some errors mean something else.
_LISTEN_REASONS = {
    **_OS_REASONS,
    errno.ENOENT: "the socket's directory does not exist",
    errno.EEXIST: "a file that is not a socket is in the way",
}


def os_reason(exc: BaseException, *, listening: bool = False) -> str:
    """Why a connect (or, ``listening``, a bind) failed, in words an operator can act on.
    Searches the exception groups and the ``raise ... from`` chains Trio and the client build
    around the real error; the message of ``exc`` itself when none is known."""
    reasons = _LISTEN_REASONS if listening else _OS_REASONS
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return f"cannot resolve the host name ({one_line(str(current.strerror or current))})"
        if isinstance(current, OSError) and current.errno in reasons:
            return reasons[current.errno]
        if isinstance(current, BaseExceptionGroup):
            pending += current.exceptions
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
    if isinstance(exc, OSError) and exc.strerror:
        return one_line(exc.strerror)  # without the "[Errno N]" in front
    return one_line(str(exc))


def quiet_broken_pipe() -> None:
    """The reader of stdout went away: point stdout at /dev/null, so that nothing more is
    written and the interpreter's last flush does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def write_json(value: Any, out: IO[str]) -> None:
    """``value`` as one line of JSON."""
    out.write(json.dumps(value, default=repr, ensure_ascii=False) + "\n")


def table_lines(rows: list[list[str]], headers: list[str]) -> list[str]:
    """A plain text table with a header row, columns padded to their widest cell."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]


def table(rows: list[list[str]], headers: list[str], out: IO[str]) -> None:
    """:func:`table_lines`, written to ``out``."""
    out.writelines(line + "\n" for line in table_lines(rows, headers))


class Progress:
    """A labelled progress bar on ``stream`` (stderr), redrawn in place at most ten times a
    second, and only when ``stream`` is a terminal: ``backup [#####     ] 512/1024``."""

    width = 30

    def __init__(self, label: str, total: int | None, stream: IO[str] | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._stream = sys.stderr if stream is None else stream
        self.shown = self._stream.isatty()
        self._drawn = False
        self._last = 0.0

    def update(self, done: int, total: int | None = None) -> None:
        """``done`` units of ``total`` (the total given at first, if None) are done."""
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        finished = self.total is not None and done >= self.total
        if self.shown and (finished or now - self._last >= 0.1):
            self._last = now
            self._stream.write(f"\r{self.label} {self._bar()}")
            self._stream.flush()
            self._drawn = True

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def _bar(self) -> str:
        if not self.total:
            return f"{self.done} sessions"
        filled = min(self.done * self.width // self.total, self.width)
        return f"[{'#' * filled}{' ' * (self.width - filled)}] {self.done}/{self.total}"

    def finish(self) -> None:
        """End the bar's line, if one was drawn."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


class _OneLine(logging.Formatter):
    """``sessiond: LEVEL: message``, one line, without the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        return f"sessiond: {record.levelname.lower()}: {one_line(record.getMessage())}"


#: Libraries whose log records are kept at DEBUG: coredis reports every retry and dropped
#: connection, which the store already turns into one clear error of its own.
QUIET_LIBRARIES = ("coredis",)


def _to_debug(record: logging.LogRecord) -> bool:
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return True


def demote_libraries() -> None:
    """Make the records of :data:`QUIET_LIBRARIES` DEBUG records (shown only at DEBUG)."""
    for name in QUIET_LIBRARIES:
        logger = logging.getLogger(name)
        if _to_debug not in logger.filters:
            logger.addFilter(_to_debug)


def _not_the_tree(record: logging.LogRecord) -> bool:
    return not record.name.startswith("supervisor")


def configure_verb_logging(debug: bool) -> None:
    """Logging for a verb other than ``serve``: see the module docstring."""
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    if debug:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.setLevel(logging.DEBUG)
    else:
        handler.setFormatter(_OneLine())
        handler.addFilter(_not_the_tree)
        handler.setLevel(logging.ERROR)
        root.setLevel(logging.ERROR)
    root.handlers[:] = [handler]
    demote_libraries()
