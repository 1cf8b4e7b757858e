"""The errors of the session service.

Every error a caller can see is a :class:`SessionError`, so ``except SessionError`` catches the
service's own failures and nothing else. The same classes are raised by the embedded service and
by the daemon's clients: an error crosses the wire as its class name and message (see
:func:`workers.wire.protocol.decode_error`), never as a pickled object. The wire's own errors
(:class:`ProtocolError`, :class:`InvalidRequest`, :class:`AuthenticationFailed`,
:class:`InternalError`) are here too, so that a client needs nothing else to raise them.
"""

from __future__ import annotations

import msgpack


class SessionError(Exception):
    """Base class of every error the session service raises on purpose."""


class SessionNotFound(SessionError, LookupError):
    """No session has this id (it never existed, was deleted, or was swept after expiring)."""


class SessionExpired(SessionNotFound):
    """The session exists but its idle timeout has passed; it will never be returned again."""


class InvalidSessionId(SessionError, ValueError):
    """The id is not a string of the accepted shape; nothing was looked up."""


class UpdateFailed(SessionError):
    """An update function raised or returned a non-dict; the stored session is unchanged."""


class VersionConflict(SessionError):
    """``expected_version`` did not match the stored version; the session is unchanged."""


class InvalidMetadata(SessionError, ValueError):
    """Metadata is not a dict with string keys of values msgpack can carry; nothing was written."""


class InvalidTTL(SessionError, ValueError):
    """A ttl is not a positive finite number of seconds or None; nothing was written."""


class InvalidSession(SessionError, ValueError):
    """A session record given as it is (import, restore) has a field of the wrong type or out of
    range; nothing was written."""


class SessionTooLarge(SessionError, ValueError):
    """Encoded metadata is above ``max_metadata_bytes``; nothing was written."""


class CapacityExceeded(SessionError):
    """The store already holds ``max_sessions`` live sessions. Sessions are never evicted."""


class ServiceUnavailable(SessionError):
    """The service could not answer (its manager is restarting or stopped, or the daemon is
    unreachable). The request may be retried; a write reported this way may or may not have
    been applied only if it was in flight when the failure happened."""


class StoreError(SessionError):
    """The backing store failed or could not be opened (locked by another owner, corrupt, full)."""


class ProtocolError(SessionError):
    """Base class of protocol violations: someone sent what the protocol does not allow."""


class InvalidRequest(ProtocolError, ValueError):
    """A request named an unknown method or gave it arguments of the wrong number or shape."""


class AuthenticationFailed(SessionError):
    """The connection did not authenticate first, or gave a wrong token; nothing was done."""


class InternalError(SessionError):
    """The daemon failed in an unexpected way while answering; the error is in its log."""


#: Every error class by name, for errors that travel over the wire.
ERRORS: dict[str, type[SessionError]] = {
    cls.__name__: cls
    for cls in (
        SessionError,
        SessionNotFound,
        SessionExpired,
        InvalidSessionId,
        UpdateFailed,
        VersionConflict,
        InvalidMetadata,
        InvalidTTL,
        InvalidSession,
        SessionTooLarge,
        CapacityExceeded,
        ServiceUnavailable,
        StoreError,
        ProtocolError,
        InvalidRequest,
        AuthenticationFailed,
        InternalError,
    )
}


def describe(value: object, width: int = 40) -> str:
    """A short description of a value that arrived, for error messages and logs.

    Its cost and length are bounded whatever the value holds: containers are described by
    their size, strings and bytes by their first ``width`` characters. Never ``repr`` a
    value from the wire: that walks all of it.
    """
    if isinstance(value, list):
        return f"an array of {len(value)}"
    if isinstance(value, dict):
        return f"a map of {len(value)}"
    if isinstance(value, str | bytes):
        more = f"... ({len(value)} long)" if len(value) > width else ""
        return f"{value[:width]!r}{more}"
    if isinstance(value, msgpack.ExtType):
        return f"ext type {value.code} of {len(value.data)} bytes"
    if value is None or isinstance(value, bool | int | float):
        return repr(value)[:width]  # msgpack ints are 64-bit at most
    return type(value).__name__


def error_to_wire(exc: SessionError) -> tuple[str, str]:
    """The (class name, message) pair that represents ``exc`` on the wire."""
    return type(exc).__name__, str(exc)
