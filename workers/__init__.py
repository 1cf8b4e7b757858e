"""A supervised, durable session service on Trio.

Embed it in a Trio program::

    async with open_session_service(backend="disk", path="sessions.db") as sessions:
        sid = await sessions.create({"user_id": "user123", "auth_method": "api_key"}, ttl=3600)
        session = await sessions.retrieve(sid)

or run it as a daemon (``python run.py serve``) and talk to it with :mod:`workers.client`.
"""

from .errors import (
    CapacityExceeded,
    InvalidMetadata,
    InvalidSessionId,
    InvalidTTL,
    ServiceUnavailable,
    SessionError,
    SessionExpired,
    SessionNotFound,
    SessionTooLarge,
    StoreError,
    UpdateFailed,
    VersionConflict,
)
from .protocol import AuthenticationFailed, InternalError, InvalidRequest, ProtocolError
from .service import DEFAULT, SessionService, open_session_service, run_session_service
from .session import Session

__all__ = [
    "DEFAULT",
    "AuthenticationFailed",
    "CapacityExceeded",
    "InternalError",
    "InvalidMetadata",
    "InvalidRequest",
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
