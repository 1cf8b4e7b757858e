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
from typing import TYPE_CHECKING, Any

from .record.errors import (
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
from .record.session import DEFAULT, Session

if TYPE_CHECKING:
    from .core.service import SessionService, open_session_service, run_session_service

#: Names loaded from their module on first use (PEP 562), with that module.
_LAZY = {
    "SessionService": "workers.core.service",
    "open_session_service": "workers.core.service",
    "run_session_service": "workers.core.service",
}


def __getattr__(name: str) -> Any:
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
