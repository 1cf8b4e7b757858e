"""msgpack encoding of session records and metadata, with the limits untrusted bytes need.

Disk records and the daemon's wire share this module. Nothing here ever unpickles: msgpack
carries None, bools, integers (64-bit), floats, strings, bytes, lists and string-keyed maps,
and that is exactly what metadata may hold. Tuples are accepted and come back as lists.

A stored record is the array ``[RECORD_FORMAT, id, created_at, last_accessed, timeout_ms,
version, metadata]``; the leading format number lets a later release read old records.
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

from .errors import InvalidMetadata, SessionTooLarge, StoreError, describe
from .session import Session

RECORD_FORMAT = 1
#: Default cap on the encoded size of one session's metadata.
DEFAULT_MAX_METADATA_BYTES = 64 * 1024
#: Deepest nesting of metadata (the metadata map itself is level 1). Deeper values break
#: recursive consumers (json, repr) long before they carry any meaning for a session.
MAX_METADATA_DEPTH = 32
#: What metadata may hold besides maps and arrays. msgpack's ext types and timestamps are
#: refused: other clients could not read them back the same way, and JSON output cannot show
#: them.
_SCALARS = frozenset((str, int, float, bool, type(None), bytes))

_packer_options = {"use_bin_type": True}
#: Each thread reuses one Packer: ``msgpack.packb`` makes a new one, with a 256 KiB buffer, per
#: call (half the cost of packing a session). A packer whose buffer grew past this for a large
#: message is dropped after it, so no thread keeps a large buffer for good.
_KEEP_PACKER_BELOW = 64 * 1024
_packers = threading.local()


def pack(obj: Any) -> bytes:
    """Encode ``obj`` with msgpack (bytes stay bytes, strings stay strings)."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(**_packer_options)
    try:
        data = packer.pack(obj)
    except BaseException:
        del _packers.packer  # it may hold half a message
        raise
    if len(data) >= _KEEP_PACKER_BELOW:
        del _packers.packer
    return data


def unpack(data: bytes) -> Any:
    """Decode msgpack from a trusted or untrusted source.

    Sizes are bounded by ``len(data)`` (msgpack refuses lengths past the buffer) and nesting by
    msgpack's own fixed stack; map keys must be strings or bytes. Raises ``ValueError`` (or a
    subclass) on anything malformed, never anything else.
    """
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise ValueError(f"malformed msgpack: {exc}") from None


def canonical_metadata(metadata: object, max_bytes: int) -> dict[str, Any]:
    """Validate ``metadata`` and return the copy that will be stored.

    The copy is what msgpack gives back, so what a caller later reads equals what was stored,
    and the caller's own dict is never kept. Raises :class:`InvalidMetadata` or
    :class:`SessionTooLarge`; nothing is written by anyone before this returns.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidMetadata(f"metadata is a dict, not {type(metadata).__name__}")
    for key in metadata:
        if not isinstance(key, str):
            raise InvalidMetadata(f"metadata keys are strings, got {describe(key)}")
    try:
        data = pack(metadata)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidMetadata(f"metadata cannot be stored as msgpack: {exc}") from None
    if len(data) > max_bytes:
        raise SessionTooLarge(
            f"metadata is {len(data)} bytes encoded, above max_metadata_bytes={max_bytes}"
        )
    scalars = _SCALARS
    for key, value in metadata.items():
        if type(key) is not str or type(value) not in scalars:
            break
    else:
        # Flat, of plain types: msgpack would give back an equal dict of the same types.
        return dict(metadata)
    try:
        stored = unpack(data)
    except ValueError as exc:  # a nested map with non-string keys
        raise InvalidMetadata(f"metadata cannot be stored: {exc}") from None
    _check_shape(stored)
    return stored


def _check_shape(metadata: dict[str, Any]) -> None:
    """Refuse values msgpack carries but sessions do not: ext types, timestamps, and nesting
    deeper than :data:`MAX_METADATA_DEPTH`. Iterative, so no depth can exhaust the stack."""
    scalars = _SCALARS
    pending: list[tuple[object, int]] = [(metadata, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            raise InvalidMetadata(
                f"metadata cannot hold {type(value).__name__} values (msgpack ext types and "
                "timestamps are refused): use str, int, float, bool, None, bytes, list or dict"
            )
        for child in children:
            if type(child) in scalars:
                continue
            if depth >= MAX_METADATA_DEPTH:
                raise InvalidMetadata(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
            pending.append((child, depth + 1))


def copy_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of already-canonical metadata (msgpack round trip: faster than deepcopy)."""
    return msgpack.unpackb(pack(metadata), raw=False)


def encode_session(session: Session) -> bytes:
    """The stored form of ``session``."""
    return pack(
        (
            RECORD_FORMAT,
            session.id,
            session.created_at,
            session.last_accessed,
            session.timeout_ms,
            session.version,
            session.metadata,
        )
    )


def decode_session(data: bytes) -> Session:
    """Rebuild a session from :func:`encode_session` output; StoreError if it is not one."""
    try:
        fmt, sid, created_at, last_accessed, timeout_ms, version, metadata = unpack(data)
    except (ValueError, TypeError) as exc:
        raise StoreError(f"unreadable session record: {exc}") from None
    if fmt != RECORD_FORMAT:
        raise StoreError(f"session record format {fmt!r} is unknown (expected {RECORD_FORMAT})")
    return Session(sid, created_at, last_accessed, timeout_ms, metadata, version)
