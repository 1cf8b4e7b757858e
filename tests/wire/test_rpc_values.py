"""Hostile values in well-formed requests, against a real daemon on the disk and lmdb stores.

The reproductions of issue 13 (integers past 64 bits, versions and times at the edge, a crafted
backup, metadata nested deep, msgpack ext values), then Hypothesis driving every method of the
table with arbitrary msgpack values: every refusal is a typed error, and no request crashes
the manager (the daemon's pid and its restart count do not change).
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers.daemon_process import DaemonProcess, run_verb
from helpers.wire_values import msgpack_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.core.api import METHODS
from workers.record.codec import encode_session, pack
from workers.record.session import Session
from workers.wire.protocol import WIRE_ERRORS

pytestmark = pytest.mark.slow

#: What a refusal may be: any error the wire names, but never a crash or a daemon's bug.
REFUSALS = set(WIRE_ERRORS) - {"InternalError", "SessionError"}


class Raw:
    """A msgpack-RPC connection that sends any values at all (the clients check theirs)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.ids = itertools.count()

    def call(self, method: str, *params: Any) -> tuple[Any, Any]:
        """``(error, result)`` of one request."""
        msgid = next(self.ids) % 2**32
        self.sock.sendall(msgpack.packb([0, msgid, method, list(params)]))
        while True:
            for message in self.unpacker:
                assert message[0] == 1 and message[1] == msgid, message
                return message[2], message[3]
            data = self.sock.recv(65536)
            assert data, "the daemon closed the connection"
            self.unpacker.feed(data)

    def ok(self, method: str, *params: Any) -> Any:
        error, result = self.call(method, *params)
        assert error is None, error
        return result

    def refused(self, method: str, *params: Any) -> str:
        error, _ = self.call(method, *params)
        assert error is not None, f"{method}{params!r:.200} was accepted"
        assert error[0] in REFUSALS, error
        return error[0]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module", params=["disk", "lmdb"])
def daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp(request.param), backend=request.param).start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def raw(daemon: DaemonProcess) -> Iterator[Raw]:
    connection = Raw(daemon.port)
    try:
        yield connection
    finally:
        connection.close()


def standing(daemon: DaemonProcess, raw: Raw) -> None:
    """The daemon still runs as the same process, and no request made it restart anything."""
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
    stats = raw.ok("stats")
    assert stats["pid"] == daemon.process.pid
    assert stats["restarts"] == 0, daemon.log()


def record(**fields: Any) -> dict[str, Any]:
    base = {
        "id": "e" * 32,
        "created_at": 1_700_000_000_000,
        "last_accessed": 1_700_000_000_000,
        "timeout_ms": 3_600_000,
        "metadata": {},
        "version": 1,
    }
    return {**base, **fields}


def test_integers_past_what_a_store_holds_are_refused(daemon: DaemonProcess, raw: Raw) -> None:
    for _ in range(10):  # more than the restart budget: one crash each would end the daemon
        assert raw.refused("list_page", None, 2**63) == "InvalidRequest"
        assert raw.refused("list_page", None, 10**6) == "InvalidRequest"
        assert raw.refused("list_page", "x" * 5000, 10) == "InvalidRequest"
    for fields in (
        {"timeout_ms": 2**63 - 1},
        {"version": 2**64 - 1},
        {"last_accessed": 2**63 - 10},
        {"created_at": -1},
        {"timeout_ms": 0},
    ):
        assert raw.refused("import_sessions", [record(**fields)]) == "InvalidSession"
    assert raw.ok("count") == 0  # nothing of a refused import was written
    # At the edge of the ranges, the sessions are stored and every operation on them works.
    edge = record(id="f" * 32, version=2**53 - 1, last_accessed=253_402_300_799_999 - 1)
    assert raw.ok("import_sessions", [edge]) == 1
    assert raw.ok("update", "f" * 32, {"k": 1})["version"] == 2**53
    assert raw.refused("update", "f" * 32, {"k": 2}) == "UpdateFailed"  # the highest version
    assert raw.ok("set_ttl", "f" * 32, 100 * 365 * 24 * 3600.0) is None
    assert raw.refused("set_ttl", "f" * 32, 2**64 - 1) == "InvalidTTL"
    assert raw.refused("create", {}, 2**64 - 1) == "InvalidTTL"
    standing(daemon, raw)


def test_expected_version_of_the_wrong_type_is_a_type_error(
    daemon: DaemonProcess, raw: Raw
) -> None:
    sid = raw.ok("create", {"a": 1})
    error, _ = raw.call("update", sid, {"a": 2}, [], "1")
    assert error[0] == "InvalidRequest" and "expected_version is an int or None" in error[1]
    assert raw.ok("peek", sid)["version"] == 1


def test_deep_or_odd_metadata_is_refused_at_the_door(daemon: DaemonProcess, raw: Raw) -> None:
    deep: Any = "bottom"
    for _ in range(500):
        deep = [deep]
    assert raw.refused("create", {"deep": deep}) == "InvalidMetadata"
    assert raw.refused("create", {"ext": msgpack.ExtType(7, b"x")}) == "InvalidMetadata"
    assert raw.refused("create", {"at": msgpack.Timestamp(1, 0)}) == "InvalidMetadata"
    sid = raw.ok("create", {"ok": [[["three levels"]]]})
    assert raw.refused("update", sid, {"deep": deep}) == "InvalidMetadata"
    assert raw.refused("import_sessions", [record(metadata={"deep": deep})]) in REFUSALS
    done = run_verb("list", "--address", daemon.tcp, "--json")
    assert done.returncode == 0, done.stderr
    standing(daemon, raw)


def test_a_crafted_backup_is_refused_whole(daemon: DaemonProcess, tmp_path: Path) -> None:
    crafted = Session("c" * 32, 1_700_000_000_000, 2**63 - 5, 2**62, {}, 2**64 - 1)
    backup = tmp_path / "crafted.bak"
    header = {"format": "sessiond-backup", "version": 1, "created_at": 0, "backend": "disk"}
    backup.write_bytes(
        pack({**header, "count": 1})
        + pack(encode_session(crafted))
        + pack({"end": True, "count": 1})
    )
    done = run_verb("restore", str(backup), "--address", daemon.tcp)
    assert done.returncode == 1
    assert "InvalidSession" in done.stderr
    raw = Raw(daemon.port)
    try:
        standing(daemon, raw)
    finally:
        raw.close()


# -- every method, arbitrary values -----------------------------------------------------------

values = msgpack_values(text_size=40, key_size=8, max_leaves=16, ext=True)
integers = st.integers(-(2**63), 2**64 - 1) | st.sampled_from(
    [2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -1, 0, 1]
)
records = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["d" * 32, "a" * 32]) | st.text(max_size=40),
        "created_at": integers,
        "last_accessed": integers,
        "timeout_ms": integers | st.none(),
        "metadata": st.dictionaries(st.text(max_size=8), values, max_size=3),
        "version": integers,
    }
)
ids = st.sampled_from(["d" * 32, "a" * 32]) | st.text(max_size=40)
#: Values of about the kind a parameter's annotation in the table names (an id the daemon
#: knows, an integer at an edge, session records...), so that requests get past the first
#: checks and reach the manager and the store; anything at all stands for each parameter too.
KINDS = {
    "str": ids,
    "str | None": ids | st.none(),
    "int": integers,
    "int | None": integers | st.none(),
    "float | None": integers | st.floats() | st.none(),
    "dict[str, Any] | None": st.dictionaries(st.text(max_size=8), values, max_size=4),
    "Iterable[str]": st.lists(st.text(max_size=8) | values, max_size=3),
    "Iterable[Session]": st.lists(records, max_size=3),
}


def parameter(annotation: str) -> st.SearchStrategy[Any]:
    kind = KINDS.get(annotation, values)
    return st.one_of(kind, kind, kind, values)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, list[Any]]:
    """A method of the table and about as many parameters as it takes (one more or less)."""
    method = METHODS[draw(st.sampled_from(sorted(name for name in METHODS if name != "auth")))]
    wanted = len(method.params)
    count = draw(st.integers(max(0, wanted - 1), wanted + 1))
    kinds = [p.annotation for p in method.params] + ["Any"]
    return method.name, [draw(parameter(kinds[min(i, wanted)])) for i in range(count)]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(requests(), min_size=1, max_size=8))
def test_no_value_in_any_method_crashes_the_manager(
    daemon: DaemonProcess, raw: Raw, batch: list[tuple[str, list[Any]]]
) -> None:
    # Known ids, some of them imported at the edges of the ranges, so updates reach them.
    raw.call("import_sessions", [record(id="d" * 32, version=2**53, last_accessed=2**40)])
    for method, params in batch:
        error, _ = raw.call(method, *params)
        if error is not None:
            assert error[0] in REFUSALS, (method, params, error)
    standing(daemon, raw)
