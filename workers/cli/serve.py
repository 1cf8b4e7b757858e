"""The ``serve`` verb: the session service tree plus a msgpack-RPC listener, as a daemon.

::

    python run.py serve                          # disk store in ./data, tcp://127.0.0.1:7878
    python run.py serve --unix /run/sessiond.sock --no-tcp
    python run.py serve --host 0.0.0.0 --token-file /etc/sessiond/token

Settings come from :mod:`workers.cli.config` (defaults, ``--config`` TOML file, ``SESSIOND_*``
variables, flags). Logs go to stderr, as text or one JSON object a line (``--log-format json``).

Lifecycle: the listener (and, with ``--metrics-port``, the HTTP endpoint of
:mod:`workers.wire.exposition`) are the last children of the service's rest_for_one tree, so
they start once the store is open and are stopped first. SIGTERM or SIGINT drains the listener
(no new connections or requests; requests in flight are answered within ``shutdown_grace`` seconds),
then stops the tree in reverse order, which closes the store, and the process exits 0. A second
signal during that exits at once with status 128 + signal number; acknowledged writes are
already committed. A tree that exceeds its restart budget, a store that cannot be opened and an
address that cannot be bound each end the process with status 1 and one ERROR line saying why
(no traceback: ``--debug`` or ``SESSIOND_DEBUG=1`` adds it); bad settings exit with status 2.

The ready line names the store (a Redis URL with its password redacted) and the version. At
``--log-level debug`` every request is logged as one line (:mod:`workers.core.metrics`);
third-party libraries' records (coredis's retries and reconnections) are shown only then.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import logging
import os
import resource
import signal
import stat
import sys
from collections.abc import Sequence
from types import FrameType

import trio

import workers
from supervisor import ChildSpec, StartError, SupervisorShutdown

from ..core.service import SessionService, open_session_service
from ..record.errors import StoreError
from ..stores.urls import DEFAULT_REDIS_URL, redact_url
from ..wire.server import Server
from .config import FIELDS, ConfigError, Settings, load_settings
from .output import debug_requested, demote_libraries, os_reason

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: File descriptors the daemon needs besides its connections (store, listeners, selectors).
FD_HEADROOM = 64


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and exception, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _StartupFilter(logging.Filter):
    """Until the daemon is ready, leave out the tree's "failed to start" records: the reason
    is the one ERROR line :func:`serve` logs (the traceback only with ``--debug``)."""

    def __init__(self) -> None:
        super().__init__()
        self.starting = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.starting and getattr(record, "supervisor_event", None) == "start_failed")


def configure_logging(level: str, log_format: str, *, debug: bool = False) -> _StartupFilter:
    """Send every log record at ``level`` or above to stderr, as text or JSON lines; returns
    the filter that hides start failures until the daemon is ready (none with ``debug``)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    startup = _StartupFilter()
    startup.starting = not debug
    handler.addFilter(startup)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    demote_libraries()
    return startup


def describe_store(settings: Settings) -> str:
    """Where the sessions are, for the ready line: never a password."""
    if settings.backend == "redis":
        prefix = settings.prefix or "sessions:"
        return f"redis store at {redact_url(settings.url or DEFAULT_REDIS_URL)} prefix {prefix!r}"
    if settings.backend == "memory":
        return "memory store (its sessions end with this process)"
    return f"{settings.backend} store at {os.path.abspath(settings.path or '.')}"


def start_failure(settings: Settings, exc: StartError) -> str:
    """The ERROR line for a child of the tree that could not start."""
    cause = exc.cause
    if exc.child_id == "listener" and isinstance(cause, OSError):
        where = ", ".join(str(a) for a in settings.addresses())
        return f"cannot listen on {where}: {os_reason(cause, listening=True)}"
    if exc.child_id == "metrics" and isinstance(cause, OSError):
        where = f"{settings.metrics_host}:{settings.metrics_port}"
        reason = os_reason(cause, listening=True)
        return f"cannot serve metrics on {where} (--metrics-port): {reason}"
    return f"cannot start the {exc.child_id}: {type(cause).__name__}: {cause}"


def _exit_at_once(signum: int, frame: FrameType | None) -> None:
    log.warning("second %s: exiting at once", signal.Signals(signum).name)
    sys.stderr.flush()
    os._exit(128 + signum)


def fit_descriptor_limit(max_connections: int) -> None:
    """Raise the soft limit on open files to what ``max_connections`` needs, as far as the hard
    limit allows, and say so when it stays short (connections past it are refused)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < need:
        wanted = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "max_connections=%d needs about %d file descriptors but the limit is %d (ulimit "
            "-n): connections past it are refused",
            max_connections,
            need,
            soft,
        )


#: glibc's mallopt parameter for the size from which allocations are mmap'd (malloc.h).
_M_MMAP_THRESHOLD = -3
#: ...which the daemon pins here: above the 256 KiB buffer a msgpack Packer takes (an mmap and
#: munmap per answer cost the daemon a third of its throughput at 128 KiB, when every answer
#: made a Packer of its own; now each thread keeps one, see workers.record.codec.pack).
MMAP_THRESHOLD = 1024 * 1024


def return_large_buffers_to_the_system() -> None:
    """Make glibc give freed message buffers back to the system at once.

    glibc serves large allocations with mmap, but after the first such block is freed it
    raises that threshold to the block's size (up to 32 MiB), so later message buffers come
    from the heap, and once freed stay in the process: after a burst of 4 MiB messages the
    daemon kept its peak size (139 MB against 31 MB idle) for good. Pinning the threshold keeps
    every buffer of :data:`MMAP_THRESHOLD` or more in a mapping of its own, unmapped when
    freed. Elsewhere than glibc this does nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def warn_about_loose_token_file(path: str | None) -> None:
    """A token file others can read is no secret: say so (the daemon still starts)."""
    if path is None:
        return
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        log.warning(
            "the token file %s has mode %04o: other users may read it (chmod 600 %s)",
            path,
            mode,
            path,
        )


async def serve(settings: Settings, startup: _StartupFilter | None = None) -> int:
    """Run the daemon until a signal stops it; returns the process exit status."""
    servers: list[Server] = []

    def listener(service: SessionService) -> Sequence[ChildSpec]:
        server = Server(
            service,
            settings.addresses(),
            token=settings.token,
            limits=settings.server_limits(),
            allow_fault_injection=settings.allow_fault_injection,
        )
        servers.append(server)
        children = [ChildSpec("listener", server.run)]
        if settings.metrics_port is not None:
            from ..wire.exposition import MetricsEndpoint  # prometheus-client, only when asked

            endpoint = MetricsEndpoint(service, settings.metrics_host, settings.metrics_port)
            children.append(ChildSpec("metrics", endpoint.run))
        return children

    try:
        with trio.open_signal_receiver(*_SIGNALS) as signals:
            options = settings.service_options()
            async with open_session_service(**options, extra_children=listener):
                if startup is not None:
                    startup.starting = False
                where = describe_store(settings)
                log.info("sessiond %s ready: pid %d, %s", workers.__version__, os.getpid(), where)
                if settings.allow_fault_injection:
                    log.warning("fault injection is on: crash_actor can crash service actors")
                signum = await signals.__anext__()
                for sig in _SIGNALS:
                    signal.signal(sig, _exit_at_once)
                log.info(
                    "%s: stopping (requests in flight get %s s)",
                    signal.Signals(signum).name,
                    settings.shutdown_grace,
                )
                await servers[-1].drain(settings.shutdown_grace)
    except SupervisorShutdown as exc:
        log.error("the session service gave up after too many restarts: %s", exc)
        return 1
    except StoreError as exc:
        log.error("cannot open the store: %s", exc)
        return 1
    except StartError as exc:
        log.error("%s", start_failure(settings, exc))
        return 1
    log.info("sessiond stopped; the store is closed")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """The ``serve`` verb."""
    overrides = {name: getattr(args, name, None) for name in FIELDS}
    try:
        settings = load_settings(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    startup = configure_logging(
        settings.log_level, settings.log_format, debug=debug_requested(args)
    )
    warn_about_loose_token_file(settings.token_file)
    fit_descriptor_limit(settings.max_connections)
    return_large_buffers_to_the_system()
    return trio.run(serve, settings, startup)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` verb."""
    parser = subparsers.add_parser(
        "serve",
        help="run the session daemon",
        description=(
            "Run the session service and listen for msgpack-RPC clients. Settings: defaults, "
            "then --config FILE (TOML), then SESSIOND_* variables, then these flags. The "
            "limits are explained in the README's Security section."
        ),
    )
    add = parser.add_argument
    add("--config", default=os.environ.get("SESSIOND_CONFIG"), help="TOML settings file")
    add("--backend", help="memory, disk, lmdb or redis (default disk)")
    add("--path", help="store directory for disk and lmdb (default ./data)")
    add("--url", help="redis URL for the redis backend")
    add("--prefix", help="key prefix of the redis backend (default sessions:)")
    add("--host", help="TCP host to listen on (default 127.0.0.1)")
    add("--port", type=int, help="TCP port to listen on (default 7878)")
    add("--no-tcp", dest="tcp", action="store_const", const=False, help="no TCP listener")
    add("--unix", metavar="PATH", help="also listen on this Unix socket (mode 0600)")
    add(
        "--token-file",
        metavar="PATH",
        help="file holding the shared secret clients must send (required off loopback); "
        "preferred to --token, as is SESSIOND_TOKEN",
    )
    add("--token", help="the shared secret itself: visible to every local user in ps")
    add("--default-ttl", type=float, help="idle seconds of a session created without ttl")
    add("--cleanup-interval", type=float, help="seconds between sweeps of expired sessions")
    add("--max-sessions", type=int, help="refuse creates past this many live sessions")
    add("--durability", choices=("process", "power"), help="disk and lmdb commit durability")
    add("--on-corrupt", choices=("quarantine", "fail"), help="what to do with a corrupt store")
    add("--max-connections", type=int, help="simultaneous connections (default 1024)")
    add("--max-unauthenticated", type=int, help="connections yet to authenticate (128)")
    add("--auth-timeout", type=float, help="seconds a connection gets to authenticate (5)")
    add("--max-auth-failures", type=int, help="wrong tokens in a row from one address (10)")
    add("--max-in-flight", type=int, help="requests in flight per connection (default 64)")
    add("--max-message-size", type=int, help="largest request in bytes (default 4 MiB)")
    add("--max-buffered-bytes", type=int, help="memory for partial messages (64 MiB)")
    add("--message-timeout", type=float, help="seconds a message may take to arrive (30)")
    add("--shutdown-grace", type=float, help="seconds in-flight requests get on stop (10)")
    add("--restart-intensity", type=int, help="restarts allowed per period (default 5)")
    add("--restart-period", type=float, help="seconds of the restart budget (default 10)")
    add("--log-level", help="DEBUG, INFO (default), WARNING, ERROR")
    add("--log-format", choices=("text", "json"), help="stderr log format (default text)")
    add(
        "--metrics-port",
        type=int,
        help="serve /metrics (Prometheus) and /health over HTTP on this port (default: none)",
    )
    add("--metrics-host", help="host of the metrics endpoint (default 127.0.0.1)")
    add(
        "--allow-fault-injection",
        action="store_const",
        const=True,
        help="answer the crash_actor RPC, which crashes a service actor (chaos tests only)",
    )
    parser.set_defaults(func=run_serve, own_logging=True)
