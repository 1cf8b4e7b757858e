"""The ``chaos`` verb: many clients hammer the service while its parts are crashed and killed.

::

    python run.py chaos --duration 10 --backend disk            # embedded; crash the actors
    python run.py chaos --duration 30 --backend lmdb --daemon   # SIGKILL and restart a daemon

Clients create, retrieve, update and delete sessions while the manager and cleanup actors are
crashed at random (:mod:`supervisor.testing`) and, with ``--daemon``, the daemon process is
also SIGKILLed and restarted. The daemon is started with ``--allow-fault-injection`` and its
actors are crashed over the wire (the ``crash_actor`` RPC). Every outcome goes into a
:class:`Ledger`; at the end every session in it is read back and checked. Exit status 0 only
when no acknowledged write was lost and no call waited past its timeout.

Theory of operation
-------------------
Each client task owns its sessions, so the calls on one session happen one after another and
"the last acknowledged value" is well defined. A session's value is a counter in its metadata.

- An acknowledged write (create, update, delete) fixes the session's value.
- A write that failed with ``ServiceUnavailable`` (the manager died or did not answer, the
  connection broke) has an unknown outcome: the ledger accepts the old value or the new one
  until a later acknowledged write or a read settles it. A request is never applied after a
  later one on the same session (one mailbox, first in first out), which makes that sound.
- A write that failed with any other error (``StoreError``: nothing of its batch was written;
  ``SessionNotFound``) changed nothing.
- A read must return an accepted value; what it returns then settles the session.
- A session may be missing only if it was (possibly) deleted, or if its idle timeout has passed
  since the last acknowledged access began (it expired on time). Anything else is a lost write.

Calls are timed: one that takes longer than its timeout (the service's ``call_timeout``, plus
the client's ``reconnect_timeout`` over the wire) by more than :data:`SLACK` is counted overdue.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ..core.operations import DEFER_SHARE
from ..core.service import (
    DEFAULT_ACCESS_WRITE_DELAY,
    DEFERS_ACCESS,
    InjectedCrash,
    SessionService,
    open_session_service,
)
from ..record.errors import ServiceUnavailable, SessionError, SessionNotFound
from ..stores import BACKENDS, Store, canonical_backend

#: Seconds a call may take beyond its timeout before it counts as overdue (scheduling noise).
SLACK = 1.0
#: A session's value in the ledger: its counter, or None for deleted.
Value = int | None
#: Slack for the store's whole-millisecond timestamps when judging an expiry.
_MS = 0.002


@dataclass
class ChaosConfig:
    """What a chaos run does; the defaults are the command line's."""

    duration: float = 10.0
    backend: str = "memory"
    path: str | None = None
    url: str | None = None
    daemon: bool = False
    seed: int | None = None
    clients: int = 32
    #: The service's call timeout; over the wire, also the client's reconnect timeout.
    call_timeout: float = 5.0
    #: Seconds between crashes of each actor (embedded) or kills of the daemon, drawn at random.
    crash_every: tuple[float, float] = (0.2, 1.0)
    kill_every: tuple[float, float] = (1.0, 2.5)
    #: A quarter of the sessions get this short idle timeout, so some expire during the run.
    short_ttl: float = 2.0
    cleanup_interval: float = 0.5
    #: Embedded runs: a store object of your own (a wrapper, say) instead of ``backend``'s.
    store: Store | None = None
    #: Called about once a second with the running figures (the progress line).
    progress: Callable[[ChaosReport], None] | None = None


@dataclass
class _Entry:
    acked: Value
    ttl: float | None
    #: When the latest acknowledged access began: a lower bound of the stored last_accessed.
    touched: float
    pending: set[Value] = field(default_factory=set)

    def accepts(self, value: Value) -> bool:
        return value == self.acked or value in self.pending

    def settle(self, value: Value, touched: float | None = None) -> None:
        self.acked = value
        self.pending.clear()
        if touched is not None:
            self.touched = touched


@dataclass
class ChaosReport:
    """The figures of a run; :meth:`ok` is the verdict."""

    duration: float = 0.0
    elapsed: float = 0.0
    operations: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    crashes: int = 0
    restarts: int = 0
    kills: int = 0
    sessions_checked: int = 0
    expired_on_time: int = 0
    lost_writes: int = 0
    overdue_calls: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost_writes or self.overdue_calls or self.problems)

    def lost(self, what: str) -> None:
        self.lost_writes += 1
        if len(self.problems) < 20:
            self.problems.append(what)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "duration_s": self.duration,
            "elapsed_s": round(self.elapsed, 3),
            "operations": dict(self.operations),
            "failures": dict(self.failures),
            "errors": dict(self.errors),
            "crashes": self.crashes,
            "restarts": self.restarts,
            "kills": self.kills,
            "sessions_checked": self.sessions_checked,
            "expired_on_time": self.expired_on_time,
            "lost_writes": self.lost_writes,
            "overdue_calls": self.overdue_calls,
            "problems": self.problems,
        }

    def table(self) -> str:
        """The report as a plain-text table."""
        lines = [f"{'operation':<12}{'calls':>10}{'failed':>10}"]
        for op in ("create", "retrieve", "update", "delete"):
            lines.append(f"{op:<12}{self.operations[op]:>10}{self.failures[op]:>10}")
        lines.append("errors by type:")
        lines += [f"  {name:<22}{n:>8}" for name, n in self.errors.most_common()] or ["  none"]
        for label, value in (
            ("actor crashes", self.crashes),
            ("restarts", self.restarts),
            ("daemon kills", self.kills),
            ("sessions checked", self.sessions_checked),
            ("expired on time", self.expired_on_time),
            ("overdue calls", self.overdue_calls),
            ("lost writes", self.lost_writes),
        ):
            lines.append(f"{label:<24}{value:>8}")
        lines += [f"  ! {p}" for p in self.problems]
        lines.append(f"verdict: {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines)


class Ledger:
    """Every session the run created, with the values its outcomes allow (module docstring)."""

    def __init__(self, report: ChaosReport, expiry_slack: float = 0.0) -> None:
        self.entries: dict[str, _Entry] = {}
        self.report = report
        #: How much earlier than its last acknowledged access a session may expire: a SIGKILL
        #: loses the access-time refreshes the daemon had not written yet (access_write_delay,
        #: and never more than a DEFER_SHARE-th of the session's idle timeout).
        self.expiry_slack = expiry_slack

    def missing(self, sid: str, entry: _Entry, now: float, context: str) -> None:
        """``sid`` was found missing at ``now``: fine if deleted or expired on time."""
        if entry.accepts(None):
            entry.settle(None)
        elif (
            entry.ttl is not None
            and now + _MS + min(self.expiry_slack, entry.ttl / DEFER_SHARE)
            >= entry.touched + entry.ttl
        ):
            self.report.expired_on_time += 1
            del self.entries[sid]
        else:
            self.report.lost(f"{context}: session {sid} is missing, expected {entry.acked}")
            del self.entries[sid]

    def found(self, sid: str, entry: _Entry, value: Value, started: float, context: str) -> None:
        """A read of ``sid`` that began at ``started`` returned ``value``."""
        if not entry.accepts(value):
            allowed = sorted({entry.acked, *entry.pending} - {None})
            self.report.lost(f"{context}: session {sid} has {value}, expected one of {allowed}")
        entry.settle(value, started)


class _Caller:
    """Runs calls with a time limit, counting operations, errors and overdue calls."""

    def __init__(self, report: ChaosReport, limit: float) -> None:
        self.report = report
        self.limit = limit

    async def __call__(self, op: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """``await fn(*args)``; raises SessionError (ServiceUnavailable for one cut off here)."""
        self.report.operations[op] += 1
        started = time.monotonic()
        try:
            with trio.fail_after(2 * self.limit + SLACK):
                return await fn(*args)
        except trio.TooSlowError:
            self.report.failures[op] += 1
            self.report.errors["Overdue"] += 1
            raise ServiceUnavailable("the call was cut off after twice its timeout") from None
        except SessionError as exc:
            self.report.failures[op] += 1
            self.report.errors[type(exc).__name__] += 1
            raise
        finally:
            if time.monotonic() - started > self.limit + SLACK:
                self.report.overdue_calls += 1


async def _client(
    sessions: Any, n: int, config: ChaosConfig, ledger: Ledger, call: _Caller, end: float
) -> None:
    rng = random.Random(None if config.seed is None else config.seed * 1000 + n)
    mine: list[str] = []
    counter = 0
    while trio.current_time() < end:
        choice = rng.random()
        if not mine or choice < 0.15:
            ttl = config.short_ttl if rng.random() < 0.25 else 3600.0
            started = time.time()
            try:
                sid = await call("create", partial(sessions.create, ttl=ttl), {"c": n, "v": 0})
            except SessionError:
                continue  # an unknown outcome leaves at most an orphan no one expects
            ledger.entries[sid] = _Entry(0, ttl, started)
            mine.append(sid)
            continue
        sid = rng.choice(mine)
        entry = ledger.entries.get(sid)
        if entry is None or (entry.acked is None and not entry.pending):
            mine.remove(sid)
            continue
        started = time.time()
        try:
            if choice < 0.5:
                s = await call("retrieve", sessions.retrieve, sid)
                ledger.found(sid, entry, s.metadata["v"], started, "retrieve")
            elif choice < 0.9:
                counter += 1
                value = counter
                try:
                    await call("update", sessions.patch, sid, {"v": value})
                except ServiceUnavailable:
                    entry.pending.add(value)
                    raise
                entry.settle(value, started)
            else:
                try:
                    removed = await call("delete", sessions.delete, sid)
                except ServiceUnavailable:
                    entry.pending.add(None)
                    raise
                if removed:
                    entry.settle(None)
                else:  # it was not live: fine only if deleted or expired before
                    ledger.missing(sid, entry, time.time(), "delete")
                mine.remove(sid)
        except SessionNotFound:
            ledger.missing(sid, entry, time.time(), "during the run")
            mine.remove(sid)
        except SessionError:
            pass  # counted by the caller; the ledger already holds what it implies


async def _verify(sessions: Any, ledger: Ledger, patience: float) -> None:
    """Read back every session in the ledger (retrying while the service recovers)."""
    deadline = trio.current_time() + patience
    for sid in list(ledger.entries):
        entry = ledger.entries[sid]
        ledger.report.sessions_checked += 1
        while True:
            started = time.time()
            try:
                s = await sessions.peek(sid)
            except SessionNotFound:
                ledger.missing(sid, entry, time.time(), "at the end")
            except ServiceUnavailable:
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(0.05)
                continue
            else:
                ledger.found(sid, entry, s.metadata["v"], started, "at the end")
            break


async def _progress(config: ChaosConfig, report: ChaosReport, start: float) -> None:
    while config.progress is not None:
        await trio.sleep(1.0)
        report.elapsed = trio.current_time() - start
        config.progress(report)


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    """Run one chaos session as ``config`` says and return its report."""
    report = ChaosReport(duration=config.duration)
    killed_refreshes = config.daemon and canonical_backend(config.backend) in DEFERS_ACCESS
    ledger = Ledger(report, DEFAULT_ACCESS_WRITE_DELAY if killed_refreshes else 0.0)
    start = trio.current_time()
    end = start + config.duration
    target = _daemon_service(config, report) if config.daemon else _embedded_service(config, report)
    limit = config.call_timeout * (2 if config.daemon else 1)
    call = _Caller(report, limit)
    async with target as service:
        async with trio.open_nursery() as progress:
            progress.start_soon(_progress, config, report, start)
            async with trio.open_nursery() as clients:
                for n in range(config.clients):
                    clients.start_soon(_client, service.sessions, n, config, ledger, call, end)
            progress.cancel_scope.cancel()
        await service.stop_faults()
        await _verify(service.sessions, ledger, patience=4 * limit)
    report.elapsed = trio.current_time() - start
    return report


class _Target:
    """The service under test (embedded, or a client of the daemon) and how to end the faults."""

    def __init__(self, sessions: Any, stop_faults: Callable[[], Awaitable[None]]) -> None:
        self.sessions = sessions
        self.stop_faults = stop_faults


@asynccontextmanager
async def _embedded_service(config: ChaosConfig, report: ChaosReport) -> AsyncIterator[_Target]:
    """The embedded service, its manager and cleanup actors crashed at random."""

    faults = trio.CancelScope()

    async def crash_at_random(service: SessionService, name: str, seed: int | None) -> None:
        for delay in _intervals(config.crash_every, seed):
            await trio.sleep(delay)
            await service.crash_actor(name)
            report.crashes += 1

    async def inject(service: SessionService) -> None:
        with faults:
            async with trio.open_nursery() as nursery:
                for i, name in enumerate(("manager", "cleanup")):
                    seed = None if config.seed is None else config.seed + i
                    nursery.start_soon(crash_at_random, service, name, seed)

    async def stop_faults() -> None:
        faults.cancel()

    with _store_dir(config) as path:
        async with open_session_service(
            backend=config.backend,
            path=path,
            url=config.url,
            call_timeout=config.call_timeout,
            cleanup_interval=config.cleanup_interval,
            store=config.store,
            intensity=1_000_000,  # the run crashes on purpose; the budget is tested elsewhere
            period=1.0,
        ) as service:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(inject, service)
                try:
                    yield _Target(service, stop_faults)
                finally:
                    faults.cancel()
            report.restarts = service.restarts


def _intervals(bounds: tuple[float, float], seed: int | None) -> Iterator[float]:
    """Delays drawn uniformly between ``bounds`` by ``random.Random(seed)``: reproducible."""
    rng = random.Random(seed)
    while True:
        yield rng.uniform(*bounds)


class _Daemon:
    """A ``sessiond serve`` subprocess, SIGKILLed and restarted at random until ``stop_faults``."""

    def __init__(self, config: ChaosConfig, path: str, workdir: Path, report: ChaosReport) -> None:
        self.config = config
        self.report = report
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.log_path = workdir / "sessiond.log"
        self.argv = [
            sys.executable, "-m", "workers", "serve",
            "--backend", config.backend, "--path", path,
            "--port", str(self.port),
            "--cleanup-interval", str(config.cleanup_interval),
            "--log-level", "WARNING",
            "--allow-fault-injection",
            "--restart-intensity", "1000000",  # crashes on purpose; the budget is tested elsewhere
            "--restart-period", "1",
        ]  # fmt: skip
        if config.url:
            self.argv += ["--url", config.url]
        self.process: trio.Process | None = None
        self.stopping = trio.Event()
        self.stopped = trio.Event()
        self.crashers: list[trio.Event] = []

    async def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = await trio.lowlevel.open_process(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = trio.current_time() + 30
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            except OSError:
                if self.process.poll() is not None or trio.current_time() > deadline:
                    raise RuntimeError(f"the daemon did not start:\n{self.log()}") from None
                await trio.sleep(0.02)
            else:
                await stream.aclose()
                return

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def kill_at_random(self) -> None:
        rng = random.Random(self.config.seed)
        try:
            while True:
                with trio.move_on_after(rng.uniform(*self.config.kill_every)):
                    await self.stopping.wait()
                if self.stopping.is_set():
                    return
                assert self.process is not None
                self.process.send_signal(signal.SIGKILL)
                await self.process.wait()
                self.report.kills += 1
                await self.start()
                self.report.restarts += 1
        finally:
            self.stopped.set()

    async def crash_at_random(self, name: str, seed: int | None) -> None:
        """Crash the daemon's actor ``name`` at random intervals (``crash_every``), over the wire.

        The crash takes the listener down with it, so its answer is often lost; a crash counts
        when it was answered, or when the same daemon process shows more restarts after it (a
        SIGKILL in between makes it uncountable, and it is not counted).
        """
        done = trio.Event()
        self.crashers.append(done)
        try:
            await self._crash_at_random(name, seed)
        finally:
            done.set()

    async def _crash_at_random(self, name: str, seed: int | None) -> None:
        from ..wire.client import connect

        schedule = _intervals(self.config.crash_every, seed)
        async with connect(self.address, reconnect_timeout=self.config.call_timeout) as client:
            for delay in schedule:
                with trio.move_on_after(delay):
                    await self.stopping.wait()
                if self.stopping.is_set():
                    return
                try:
                    before = await client.stats()
                    try:
                        crashed = await client.crash_actor(name)
                    except ServiceUnavailable:
                        after = await client.stats()
                        crashed = (
                            after["pid"] == before["pid"] and after["restarts"] > before["restarts"]
                        )
                except SessionError:
                    continue  # the daemon was killed meanwhile, or is restarting
                if crashed:
                    self.report.crashes += 1

    async def stop_killing(self) -> None:
        """Stop the kills; returns once the daemon runs again."""
        self.stopping.set()
        await self.stopped.wait()
        for done in self.crashers:
            await done.wait()

    async def stop(self) -> None:
        """SIGTERM the daemon and wait; a non-zero exit is a problem of the run."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(30):
                status = await self.process.wait()
                if status != 0:
                    self.report.problems.append(f"the daemon exited {status}:\n{self.log()}")
                return
            self.process.kill()
            await self.process.wait()


@asynccontextmanager
async def _daemon_service(config: ChaosConfig, report: ChaosReport) -> AsyncIterator[_Target]:
    """A client of a daemon subprocess that is SIGKILLed and restarted at random, and whose
    actors are crashed at random."""
    from ..wire.client import connect

    with _store_dir(config) as path, tempfile.TemporaryDirectory(prefix="chaos-") as workdir:
        daemon = _Daemon(config, path or os.path.join(workdir, "store"), Path(workdir), report)
        await daemon.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.kill_at_random)
                for i, name in enumerate(("manager", "cleanup")):
                    seed = None if config.seed is None else config.seed + i
                    nursery.start_soon(daemon.crash_at_random, name, seed)
                try:
                    async with connect(
                        daemon.address, reconnect_timeout=config.call_timeout
                    ) as client:
                        yield _Target(client, daemon.stop_killing)
                finally:
                    daemon.stopping.set()
        finally:
            with trio.CancelScope(shield=True):
                await daemon.stop()


@contextmanager
def _store_dir(config: ChaosConfig) -> Iterator[str | None]:
    """``config.path``, or a temporary directory for the disk and lmdb stores (None otherwise)."""
    if config.path is not None or config.backend not in ("disk", "lmdb"):
        yield config.path
        return
    with tempfile.TemporaryDirectory(prefix="chaos-store-") as tmp:
        yield os.path.join(tmp, "store")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _progress_line(report: ChaosReport) -> None:
    errors = sum(report.errors.values())
    line = (
        f"chaos {report.elapsed:5.1f}/{report.duration:g} s  "
        f"ops {sum(report.operations.values())}  errors {errors}  "
        f"crashes {report.crashes}  kills {report.kills}  lost {report.lost_writes}"
    )
    end = "\r" if sys.stderr.isatty() else "\n"
    print(line, end=end, file=sys.stderr, flush=True)


def _not_injected(record: logging.LogRecord) -> bool:
    """Leave out the log records of the crashes the run makes on purpose."""
    return not (record.exc_info and isinstance(record.exc_info[1], InjectedCrash))


def run_chaos_verb(args: argparse.Namespace) -> int:
    """The ``chaos`` verb."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_injected)
    backend = canonical_backend(args.backend)
    if args.daemon and backend == "memory":
        print(
            "chaos: memory sessions die with the daemon process; --daemon needs disk, lmdb "
            "or redis",
            file=sys.stderr,
        )
        return 2
    config = ChaosConfig(
        duration=args.duration,
        backend=backend,
        path=args.path,
        url=args.url,
        daemon=args.daemon,
        seed=args.seed,
        clients=args.clients,
        progress=_progress_line,
    )
    report = trio.run(run_chaos, config)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``chaos`` verb."""
    parser = subparsers.add_parser(
        "chaos",
        help="hammer the service while crashing it; check no acknowledged write is lost",
        description=(
            "Run many clients against the service while its actors are crashed at random "
            "(or, with --daemon, the daemon is SIGKILLed and restarted), then check every "
            "acknowledged write. Exit status 0 only when nothing was lost."
        ),
    )
    add = parser.add_argument
    add("--duration", type=float, default=10.0, help="seconds of chaos (default 10)")
    add("--backend", default="memory", choices=[*BACKENDS], help="store backend")
    add("--path", help="store directory for disk and lmdb (default: a temporary one)")
    add("--url", help="redis URL for the redis backend")
    add("--daemon", action="store_true", help="run a daemon subprocess and SIGKILL it")
    add("--seed", type=int, help="seed for reproducible schedules and client choices")
    add("--clients", type=int, default=32, help="concurrent clients (default 32)")
    add("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_chaos_verb)


__all__ = ["ChaosConfig", "ChaosReport", "Ledger", "register", "run_chaos"]
