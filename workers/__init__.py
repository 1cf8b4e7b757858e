"""A supervised, durable session service on Trio.

Embed it in a Trio program::

    async with open_session_service(backend="disk", path="sessions.db") as sessions:
        sid = await sessions.create({"user_id": "user123", "auth_method": "api_key"}, ttl=3600)
        session = await sessions.retrieve(sid)

or run it as a daemon (``sessiond serve``) and talk to it with :mod:`workers.client`.

The package is in layers, each importing only the ones below it::

    cli/          the command line: serve, the admin verbs, migrate, demo, chaos
    wire/         the daemon's msgpack-RPC: protocol (sans-IO), transport, server, clients
    core/         the service: method table, operations, manager and sweeper actors, the tree
    stores/       one module per backend behind one Store protocol
    record/       the session record, its msgpack encoding, the errors

The service itself (``open_session_service`` and friends) is loaded on first use, so that
``import workers.client`` in a program that only talks to a daemon does not load the session
manager, the supervision runtime or any store.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

#: The distribution this package comes from: its version is the package's.
DISTRIBUTION = "trio-sessions"


def _version() -> str:
    """The installed distribution's version: pyproject.toml is the one place it is written."""
    import importlib.metadata  # 25 ms: only when asked

    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def _check_supervisor() -> None:
    """Refuse to load, in one line, when the top-level ``supervisor`` package that Python
    finds is not this distribution's (supervisord's package has the same name), instead of
    failing later with an unrelated ImportError. Reads the package's ``__init__.py`` rather
    than importing it: ``import workers`` stays light."""
    module = sys.modules.get("supervisor")
    if module is not None:
        where = getattr(module, "__file__", None)
        ours = getattr(module, "__distribution__", None) == DISTRIBUTION
    else:
        spec = importlib.util.find_spec("supervisor")
        where = spec.origin if spec is not None else None
        try:
            ours = where is not None and _MARK in Path(where).read_bytes()
        except OSError:
            ours = False
    if not ours:
        found = f"the 'supervisor' package at {where}" if where else "no 'supervisor' package"
        raise ImportError(
            f"trio-sessions needs its own 'supervisor' package, but Python finds {found} "
            "(supervisord's has the same name): install trio-sessions in a virtual "
            "environment without supervisord, or reinstall trio-sessions there"
        )


_MARK = f'__distribution__ = "{DISTRIBUTION}"'.encode()
_check_supervisor()

from .record.errors import (  # noqa: E402  (after the check: a clash fails first, in one line)
    AuthenticationFailed,
    CapacityExceeded,
    InternalError,
    InvalidMetadata,
    InvalidRequest,
    InvalidSession,
    InvalidSessionId,
    InvalidTTL,
    ProtocolError,
    ServiceUnavailable,
    SessionError,
    SessionExpired,
    SessionNotFound,
    SessionTooLarge,
    StoreError,
    UpdateFailed,
    VersionConflict,
)
from .record.session import DEFAULT, Session  # noqa: E402

if TYPE_CHECKING:
    __version__: str
    from .core.service import SessionService, open_session_service, run_session_service

#: Names loaded from their module on first use (PEP 562), with that module.
_LAZY = {
    "SessionService": "workers.core.service",
    "open_session_service": "workers.core.service",
    "run_session_service": "workers.core.service",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = version = _version()
        return version
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'workers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT",
    "AuthenticationFailed",
    "CapacityExceeded",
    "InternalError",
    "InvalidMetadata",
    "InvalidRequest",
    "InvalidSession",
    "InvalidSessionId",
    "InvalidTTL",
    "ProtocolError",
    "ServiceUnavailable",
    "Session",
    "SessionError",
    "SessionExpired",
    "SessionNotFound",
    "SessionService",
    "SessionTooLarge",
    "StoreError",
    "UpdateFailed",
    "VersionConflict",
    "open_session_service",
    "run_session_service",
]
