"""The methods of the session service, in one table: :data:`METHODS`.

Every method a daemon answers is one :class:`Method` entry here, and everything that knows the
list of methods is derived from this table:

* the daemon's dispatch (:class:`workers.wire.server.Server`): which names exist, how many
  parameters each takes, how its parameters and result travel;
* the embedded service's operation builders (:meth:`SessionService.operation
  <workers.core.service.SessionService.operation>`): a method of kind
  :attr:`Kind.OPERATION` is one manager operation, built by ``SessionService._build_<name>``;
* both clients (:mod:`workers.wire.client`): their methods are generated from the entries, with
  the signatures, defaults and checks written here.

So adding a method is one entry plus its implementation: a ``_build_<name>`` of the service for
an operation, a coroutine method of the service for :attr:`Kind.SERVICE`, or a ``_<name>`` of
the server for :attr:`Kind.SERVER`.

Parameters travel positionally, in the order of :attr:`Method.params`; trailing parameters left
at their default are not sent, and the receiver applies the same defaults. Results travel as
:class:`Result` says: a session as the map :func:`session_to_wire` gives.

This module is light on purpose (msgpack and the record layer, nothing else): the clients
import it, and a program that only talks to a daemon must not load the session manager.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..record.codec import canonical_metadata
from ..record.errors import InvalidMetadata, InvalidRequest, ProtocolError, describe
from ..record.session import DEFAULT, Session


class Kind(enum.Enum):
    """Who answers a method."""

    #: One manager operation: the service builds it (``SessionService._build_<builds>``) and the
    #: daemon sends it to the manager without a task of its own.
    OPERATION = "operation"
    #: A coroutine method of :class:`~workers.core.service.SessionService` of the same name.
    SERVICE = "service"
    #: The daemon itself (``Server._<name>``): the connection's own business.
    SERVER = "server"


class Result(enum.Enum):
    """How a method's result travels."""

    VALUE = "value"  #: as msgpack carries it
    SESSION = "session"  #: one session map
    PAGE = "page"  #: ``[[session map, ...], next cursor or None]``


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a parameter that must be given.
REQUIRED: Final = _Required()


@dataclass(frozen=True, slots=True)
class Param:
    """One positional parameter of a method.

    ``encode`` runs in the client before anything is sent (it checks the argument and gives
    its wire form, raising the embedded service's error for the same mistake); ``decode`` runs
    in the daemon on what arrived (raising :class:`InvalidRequest` for what it cannot take).
    """

    name: str
    default: Any = REQUIRED
    #: Keyword-only in the clients' signatures (it still travels positionally).
    keyword_only: bool = False
    annotation: str = "Any"
    encode: Callable[[Any], Any] | None = None
    decode: Callable[[Any], Any] | None = None


@dataclass(frozen=True, slots=True)
class Method:
    """One method of the service: its parameters, who answers it and how its result travels."""

    name: str
    params: tuple[Param, ...] = ()
    result: Result = Result.VALUE
    kind: Kind = Kind.SERVICE
    doc: str = ""
    #: The builder of an OPERATION (``_build_<builds>``), when it is not named like the method.
    builds: str = ""
    #: Other names the clients give the method (the wire knows only ``name``).
    aliases: tuple[str, ...] = ()
    #: Only a daemon started with ``allow_fault_injection`` answers it.
    fault_injection: bool = False
    #: Whether the clients get a method for it (``auth`` is the connection's own business).
    in_clients: bool = True
    #: The client's Python annotation of the result.
    returns: str = "Any"
    #: How many leading parameters must be sent. Derived once (every request reads it).
    required: int = field(init=False, repr=False, compare=False)
    #: The service's builder of an OPERATION. Derived once (every request reads it).
    builder: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        required = sum(1 for p in self.params if p.default is REQUIRED)
        object.__setattr__(self, "required", required)
        object.__setattr__(self, "builder", f"_build_{self.builds or self.name}")

    def check_params(self, params: list[Any]) -> None:
        """Raise :class:`InvalidRequest` unless ``params`` has an acceptable length."""
        if not self.required <= len(params) <= len(self.params):
            expected = (
                f"{self.required}"
                if self.required == len(self.params)
                else f"{self.required} to {len(self.params)}"
            )
            names = ", ".join(p.name for p in self.params)
            raise InvalidRequest(
                f"{self.name}({names}) takes {expected} parameters, got {len(params)}"
            )

    def decode_params(self, params: list[Any]) -> list[Any]:
        """What arrived, checked for length and decoded, with the defaults of the parameters
        left out: every parameter, in order, for the daemon's implementation."""
        self.check_params(params)
        decoded = [
            value if p.decode is None else p.decode(value)
            for p, value in zip(self.params, params, strict=False)
        ]
        return decoded + [p.default for p in self.params[len(params) :]]

    def encode_params(self, arguments: Mapping[str, Any]) -> list[Any]:
        """The wire parameters for ``arguments`` (every parameter by name, defaults applied):
        each encoded, trailing ones left at their default dropped."""
        values = [arguments[p.name] for p in self.params]
        while values and values[-1] is self.params[len(values) - 1].default:
            values.pop()
        return [
            value if p.encode is None else p.encode(value)
            for p, value in zip(self.params, values, strict=False)
        ]

    def encode_result(self, result: Any) -> Any:
        """The wire form of what the implementation returned."""
        if self.result is Result.SESSION:
            return session_to_wire(result)
        if self.result is Result.PAGE:
            sessions, cursor = result
            return [[session_to_wire(s) for s in sessions], cursor]
        return result

    def decode_result(self, result: Any) -> Any:
        """What a client returns for this method's wire result."""
        if self.result is Result.SESSION:
            return session_from_wire(result)
        if self.result is Result.PAGE:
            if not (isinstance(result, list) and len(result) == 2 and isinstance(result[0], list)):
                raise ProtocolError(f"not a page of sessions: {describe(result)}")
            return [session_from_wire(s) for s in result[0]], result[1]
        return result


# -- how sessions and arguments travel ------------------------------------------------------

_SESSION_FIELDS: Final = {
    "id": (str,),
    "created_at": (int,),
    "last_accessed": (int,),
    "timeout_ms": (int, type(None)),
    "metadata": (dict,),
    "version": (int,),
}


def session_to_wire(session: Session) -> dict[str, Any]:
    """The wire form of a session: its :meth:`~workers.record.session.Session.to_dict` map.

    Built field by field and sharing ``metadata``: it is encoded at once, and ``asdict``'s deep
    copy would cost more than the rest of a retrieve.
    """
    return {
        "id": session.id,
        "created_at": session.created_at,
        "last_accessed": session.last_accessed,
        "timeout_ms": session.timeout_ms,
        "metadata": session.metadata,
        "version": session.version,
    }


def session_from_wire(obj: object) -> Session:
    """Rebuild a session from :func:`session_to_wire`; ProtocolError if it is not one."""
    if not isinstance(obj, dict) or obj.keys() != _SESSION_FIELDS.keys():
        raise ProtocolError(f"not a session: {describe(obj)}")
    for name, types in _SESSION_FIELDS.items():
        value = obj[name]
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolError(f"session field {name} has the wrong type: {describe(value)}")
    return Session(**obj)


def _metadata(metadata: Any) -> dict[str, Any]:
    # The embedded service's check, so that the same mistakes raise the same InvalidMetadata
    # before anything is sent. Size is the daemon's business: it knows its max_metadata_bytes.
    return canonical_metadata(metadata, sys.maxsize)


def _patch(changes: Any) -> dict[str, Any]:
    if callable(changes):
        raise TypeError("over the wire, update takes a patch (set=..., unset=...), not a function")
    return _metadata(changes)


def _keys(keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    if not all(isinstance(k, str) for k in keys):
        raise InvalidMetadata("unset takes metadata keys, which are strings")
    return keys


def _unset_from_wire(keys: object) -> tuple[str, ...]:
    if not isinstance(keys, list):
        raise InvalidRequest("unset is an array of metadata keys")
    return tuple(keys)


def _records(sessions: Iterable[Session]) -> list[dict[str, Any]]:
    return [session_to_wire(s) for s in sessions]


def _sessions_from_wire(records: object) -> list[Session]:
    if not isinstance(records, list):
        raise InvalidRequest("import_sessions takes an array of session maps")
    try:
        return [session_from_wire(record) for record in records]
    except ProtocolError as exc:
        raise InvalidRequest(f"import_sessions: {exc}") from None


_ID = Param("session_id", annotation="str")

#: Every method of the service, by name. ``update`` takes a patch (``set`` map, ``unset`` keys,
#: ``expected_version``): a function cannot travel. ``list_page`` pages with a cursor.
METHODS: Final[dict[str, Method]] = {
    m.name: m
    for m in (
        Method(
            "auth",
            (Param("token"),),
            kind=Kind.SERVER,
            in_clients=False,
            doc="Authenticate the connection (its first request when the daemon has a token).",
        ),
        Method("ping", kind=Kind.SERVER, returns="str", doc='Ask the daemon for ``"pong"``.'),
        Method(
            "create",
            (
                Param("metadata", None, annotation="dict[str, Any] | None", encode=_metadata),
                Param("ttl", DEFAULT, annotation="float | None"),
            ),
            kind=Kind.OPERATION,
            returns="str",
            doc="Store a new session and return its id; ``ttl`` in idle seconds, None for never.",
        ),
        Method(
            "retrieve",
            (_ID,),
            Result.SESSION,
            Kind.OPERATION,
            returns="Session",
            doc="The live session; refreshes its access time.",
        ),
        Method(
            "peek",
            (_ID,),
            Result.SESSION,
            Kind.OPERATION,
            returns="Session",
            doc="The live session, leaving its access time alone.",
        ),
        Method(
            "update",
            (
                _ID,
                Param("set", None, annotation="dict[str, Any] | None", encode=_patch),
                Param(
                    "unset", (), annotation="Iterable[str]", encode=_keys, decode=_unset_from_wire
                ),
                Param("expected_version", None, keyword_only=True, annotation="int | None"),
            ),
            Result.SESSION,
            Kind.OPERATION,
            builds="patch",
            aliases=("patch",),
            returns="Session",
            doc=(
                "Set the keys of ``set`` and remove the keys in ``unset``, atomically; with "
                "``expected_version``, only if the session is at that version "
                "(``VersionConflict`` otherwise). Returns the updated session."
            ),
        ),
        Method(
            "touch", (_ID,), kind=Kind.OPERATION, doc="Refresh the access time of a live session."
        ),
        Method(
            "set_ttl",
            (_ID, Param("ttl", annotation="float | None")),
            kind=Kind.OPERATION,
            doc="Change a live session's idle timeout (seconds, None for never).",
        ),
        Method(
            "delete",
            (_ID,),
            kind=Kind.OPERATION,
            returns="bool",
            doc="Remove a session; True if a live one was removed. Deleting twice is fine.",
        ),
        Method(
            "rotate",
            (_ID,),
            kind=Kind.OPERATION,
            returns="str",
            doc="Move a live session to a fresh id, retiring the old one; returns the new id.",
        ),
        Method(
            "delete_where",
            (Param("key", annotation="str"), Param("value")),
            returns="int",
            doc='Delete every session whose ``metadata[key] == value`` ("log out everywhere").',
        ),
        Method(
            "list_page",
            (
                Param("cursor", None, annotation="str | None"),
                Param("limit", 100, annotation="int"),
            ),
            Result.PAGE,
            returns="tuple[list[Session], str | None]",
            doc="One page of live sessions and the next page's cursor (None after the last).",
        ),
        Method("count", returns="int", doc="The number of live sessions."),
        Method("cleanup_expired", returns="int", doc="Remove expired sessions now; how many went."),
        Method("get_backend", returns="str", doc="The canonical backend name."),
        Method(
            "stats",
            returns="dict[str, Any]",
            doc=(
                "Figures for operators: live ``sessions`` plus everything ``metrics`` gives "
                "(counts, errors and latency per method, batches, cache, restarts, connections)."
            ),
        ),
        Method(
            "metrics",
            returns="dict[str, Any]",
            doc="The figures of ``stats`` but ``sessions``, without asking the store anything.",
        ),
        Method(
            "tree",
            returns="dict[str, Any]",
            doc=(
                "The supervision tree now: each child's state, restarts and last exit, and the "
                "mailbox depth of each actor (what ``sessiond top`` shows)."
            ),
        ),
        Method(
            "health",
            returns="dict[str, Any]",
            doc=(
                'Readiness: ``{"status": "ready", ...}`` once the manager runs and the store '
                "answers a read; ``ServiceUnavailable`` or ``StoreError`` saying why not. "
                "(``ping`` only says that the daemon answers.)"
            ),
        ),
        Method(
            "import_sessions",
            (
                Param(
                    "sessions",
                    annotation="Iterable[Session]",
                    encode=_records,
                    decode=_sessions_from_wire,
                ),
            ),
            returns="int",
            doc="Store sessions from a backup as they are; ids in use are skipped. How many.",
        ),
        Method(
            "crash_actor",
            (Param("name", annotation="str"),),
            fault_injection=True,
            returns="bool",
            doc=(
                'Fault injection: crash the ``"manager"`` or ``"cleanup"`` actor. Only a daemon '
                "started with ``--allow-fault-injection`` answers; any other refuses it as an "
                "unknown method. The crash restarts the daemon's listener with the actor, so the "
                "answer may be lost (``ServiceUnavailable``): compare ``stats()['restarts']``."
            ),
        ),
    )
}

#: How many sessions a client's ``list_sessions`` asks for per page.
PAGE_SIZE: Final = 500

__all__ = [
    "METHODS",
    "PAGE_SIZE",
    "REQUIRED",
    "Kind",
    "Method",
    "Param",
    "Result",
    "session_from_wire",
    "session_to_wire",
]
