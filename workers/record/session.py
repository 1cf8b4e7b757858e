"""The session record, its ids, and the arithmetic of idle timeouts.

A session is the seed's record: ``id``, ``created_at`` and ``last_accessed`` (wall-clock
milliseconds since the epoch), ``timeout_ms`` (``None`` for never) and ``metadata``, plus a
``version`` that counts metadata changes (1 at creation) so that writers can detect each other.

Expiry is idle-based: a session is expired once ``now_ms > last_accessed + timeout_ms``. The
rule lives in :meth:`Session.expired_at` and nowhere else.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from typing import Any, Final

from .errors import InvalidSession, InvalidSessionId, InvalidTTL, describe


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


#: ``ttl=DEFAULT`` means the service's ``default_ttl``.
DEFAULT: Final = _Default()

#: Longest id accepted from a caller or an ``id_factory`` (the default ids are 32 characters).
MAX_ID_LENGTH = 256
#: Longest ttl accepted, in seconds: about 100 years, far below any integer overflow.
MAX_TTL_SECONDS = 100 * 365 * 24 * 3600.0
#: Bounds of a record's integers, so that every store can hold them and their sums (an
#: ``expires_at`` is at most MAX_TIME_MS + MAX_TIMEOUT_MS, far inside SQLite's and LMDB's
#: signed 64 bits): times up to the end of year 9999 (what ``datetime`` can show), timeouts
#: up to MAX_TTL_SECONDS, versions up to 2**53 (exact in every JSON reader too).
MAX_TIME_MS = 253_402_300_799_999
MAX_TIMEOUT_MS = round(MAX_TTL_SECONDS * 1000)
MAX_VERSION = 2**53


@dataclass(frozen=True, slots=True)
class Session:
    """One session, as stored and as returned to callers.

    Instances handed to callers are copies: changing ``metadata`` in place changes nothing in
    the store. Use ``update`` for that.
    """

    id: str
    created_at: int
    last_accessed: int
    timeout_ms: int | None
    metadata: dict[str, Any]
    version: int

    @property
    def expires_at(self) -> int | None:
        """The last millisecond at which the session is still live, or None if it never expires."""
        if self.timeout_ms is None:
            return None
        return self.last_accessed + self.timeout_ms

    def expired_at(self, now_ms: int) -> bool:
        """Whether the session is expired at wall-clock time ``now_ms``."""
        expires_at = self.expires_at
        return expires_at is not None and now_ms > expires_at

    def accessed(self, now_ms: int) -> Session:
        """This session with ``last_accessed`` moved to ``now_ms`` (never backwards)."""
        if now_ms <= self.last_accessed:
            return self
        # Not dataclasses.replace: this runs on every read, and replace costs several times more.
        return build_session(
            self.id, self.created_at, now_ms, self.timeout_ms, self.metadata, self.version
        )

    def to_dict(self) -> dict[str, Any]:
        """The seed's record as a plain dict (``version`` included)."""
        return asdict(self)


_token_hex = secrets.token_hex

# A frozen dataclass's __init__ sets each field through object.__setattr__. Every read builds
# two sessions (the refresh and the caller's copy), so those set the slots directly: half the cost.
_new_object = object.__new__
_set_id, _set_created, _set_accessed, _set_timeout, _set_metadata, _set_version = (
    getattr(Session, name).__set__
    for name in ("id", "created_at", "last_accessed", "timeout_ms", "metadata", "version")
)


def build_session(
    id: str,
    created_at: int,
    last_accessed: int,
    timeout_ms: int | None,
    metadata: dict[str, Any],
    version: int,
) -> Session:
    """``Session(...)`` for the hot paths, with fields the caller already knows are valid."""
    s = _new_object(Session)
    _set_id(s, id)
    _set_created(s, created_at)
    _set_accessed(s, last_accessed)
    _set_timeout(s, timeout_ms)
    _set_metadata(s, metadata)
    _set_version(s, version)
    return s


def new_id() -> str:
    """A fresh session id: 32 lowercase hex characters, 128 bits from :mod:`secrets`."""
    return _token_hex(16)


def check_id(session_id: object) -> str:
    """Return ``session_id`` if it is an acceptable id, else raise :class:`InvalidSessionId`.

    Ids from an ``id_factory`` may have any printable shape, so the check is about safety
    (type, length, no control characters), not about the default hex format.
    """
    if not isinstance(session_id, str):
        raise InvalidSessionId(f"a session id is a str, not {type(session_id).__name__}")
    if not 0 < len(session_id) <= MAX_ID_LENGTH or not session_id.isprintable():
        raise InvalidSessionId(
            f"a session id is 1 to {MAX_ID_LENGTH} printable characters, "
            f"got {describe(session_id, 80)}"
        )
    return session_id


def ttl_to_ms(ttl: object) -> int | None:
    """Convert a ttl in seconds to ``timeout_ms``; ``None`` means the session never expires.

    Raises :class:`InvalidTTL` for anything that is not a positive finite number (bools included:
    ``True`` is almost certainly a mistake, not one second).
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise InvalidTTL(f"ttl is a number of seconds or None, not {type(ttl).__name__}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise InvalidTTL(f"ttl must be a positive finite number of seconds, got {ttl!r}")
    if ttl > MAX_TTL_SECONDS:
        raise InvalidTTL(f"ttl is at most {MAX_TTL_SECONDS:.0f} seconds, got {ttl!r}")
    return max(1, round(ttl * 1000))


def check_record(session: Session) -> Session:
    """Return ``session`` if every field is of its type and in range, else raise
    :class:`InvalidSession` (or :class:`InvalidSessionId`) naming the field.

    For records that come from outside as they are (``import_sessions``, a backup): the
    service's own records are in range by construction. Metadata is checked separately (it
    has its own rules and size limit: :func:`workers.record.codec.canonical_metadata`).
    """
    check_id(session.id)
    which = f"session {describe(session.id)}"
    for name, value, high in (
        ("created_at", session.created_at, MAX_TIME_MS),
        ("last_accessed", session.last_accessed, MAX_TIME_MS),
        ("timeout_ms", session.timeout_ms, MAX_TIMEOUT_MS),
        ("version", session.version, MAX_VERSION),
    ):
        if value is None and name == "timeout_ms":
            continue
        if type(value) is not int or not 0 <= value <= high:
            raise InvalidSession(
                f"{which}: {name} is an int from 0 to {high}, got {describe(value)}"
            )
    if session.timeout_ms == 0 or session.version == 0:
        raise InvalidSession(
            f"session {describe(session.id)}: timeout_ms and version are at least 1"
        )
    if not isinstance(session.metadata, dict):
        raise InvalidSession(f"{which}: metadata is a map")
    return session
