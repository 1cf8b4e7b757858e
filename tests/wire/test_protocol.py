"""The sans-IO msgpack-RPC protocol, without sockets."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.core.api import METHODS, session_from_wire, session_to_wire
from workers.record.errors import (
    AuthenticationFailed,
    InvalidRequest,
    ProtocolError,
    SessionExpired,
    SessionNotFound,
    VersionConflict,
)
from workers.record.session import Session
from workers.wire.address import parse_address
from workers.wire.protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    InvalidMessage,
    LocalProtocolError,
    Notification,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    _holds_at_most,
    decode_error,
    describe,
    encode_error,
)


def events(conn: Connection) -> list[object]:
    out = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def pair(max_message_size: int = 1024) -> tuple[Connection, Connection]:
    return (
        Connection(Role.CLIENT, max_message_size=max_message_size),
        Connection(Role.SERVER, max_message_size=max_message_size),
    )


def test_request_response_round_trip() -> None:
    client, server = pair()
    msgid, data = client.send_request("retrieve", ["abc"])
    server.receive_data(data)
    assert events(server) == [Request(msgid, "retrieve", ["abc"])]
    client.receive_data(server.send_response(msgid, result={"x": 1}))
    assert events(client) == [Response(msgid, None, {"x": 1})]
    assert client.in_flight == server.in_flight == set()


def test_pipelined_responses_in_any_order_byte_by_byte() -> None:
    client, server = pair()
    sent = [client.send_request("ping", []) for _ in range(5)]
    stream = b"".join(data for _, data in sent)
    for i in range(len(stream)):  # one byte at a time
        server.receive_data(stream[i : i + 1])
    requests = events(server)
    assert [r.msgid for r in requests] == [msgid for msgid, _ in sent]
    answers = b"".join(server.send_response(r.msgid, result=r.msgid) for r in reversed(requests))
    client.receive_data(answers)
    assert [(e.msgid, e.result) for e in events(client)] == [
        (msgid, msgid) for msgid, _ in reversed(sent)
    ]


@given(
    st.lists(
        st.tuples(st.text(max_size=20), st.lists(st.integers(-(2**63), 2**64 - 1), max_size=5)),
        max_size=8,
    ),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1),
)
def test_any_chunking_gives_the_same_events(
    calls: list[tuple[str, list[int]]], cuts: list[int]
) -> None:
    client, server = pair()
    stream = b"".join(client.send_request(method, params)[1] for method, params in calls)
    pos, i = 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        server.receive_data(stream[pos : pos + step])
        pos, i = pos + step, i + 1
    server.receive_data(b"")
    got = events(server)
    assert [(e.method, e.params) for e in got[:-1]] == [(m, p) for m, p in calls]
    assert got[-1] == ConnectionClosed()


def test_notifications_travel_both_ways() -> None:
    client, server = pair()
    server.receive_data(client.send_notification("hello", [1]))
    client.receive_data(server.send_notification("bye", []))
    assert events(server) == [Notification("hello", [1])]
    assert events(client) == [Notification("bye", [])]


def test_clean_eof_is_connection_closed() -> None:
    _, server = pair()
    server.receive_data(b"")
    assert events(server) == [ConnectionClosed()]
    server.receive_data(b"")  # idempotent
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")


def test_truncated_message_is_fatal_at_eof() -> None:
    client, server = pair()
    _, data = client.send_request("ping", [])
    server.receive_data(data[:-1])
    assert events(server) == []
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="ended inside a message"):
        server.next_event()


def test_garbage_is_fatal_after_the_good_messages() -> None:
    client, server = pair()
    _, good = client.send_request("ping", [])
    server.receive_data(good + b"\xc1" + good)
    assert isinstance(server.next_event(), Request)
    with pytest.raises(RemoteProtocolError, match="not msgpack"):
        server.next_event()
    assert server.broken
    with pytest.raises(RemoteProtocolError):  # stays broken
        server.next_event()


@pytest.mark.parametrize("chunk", [1, 7, 100, 10_000])
def test_oversized_message_is_fatal_whatever_the_chunking(chunk: int) -> None:
    client, server = pair(max_message_size=1024)
    _, small = client.send_request("ping", [])
    _, big = client.send_request("create", [{"blob": "x" * 2000}])
    stream = small + big + small
    for pos in range(0, len(stream), chunk):
        server.receive_data(stream[pos : pos + chunk])
    assert isinstance(server.next_event(), Request)
    with pytest.raises(RemoteProtocolError, match="longer than 1024"):
        server.next_event()


def test_oversized_header_alone_is_refused_early() -> None:
    _, server = pair(max_message_size=1024)
    # A request whose str claims 1 GiB: refused without waiting for (or buffering) the body.
    server.receive_data(b"\x94\x00\x01\xdb\x40\x00\x00\x00" + b"x" * 2000)
    with pytest.raises(RemoteProtocolError):
        server.next_event()


@pytest.mark.parametrize(
    ("message", "msgid"),
    [
        (5, None),
        ([], None),
        (["0", 1, "m", []], None),
        ([0, -1, "m", []], None),
        ([0, 2**32, "m", []], None),
        ([0, 7, 3, []], 7),
        ([0, 7, "m", {"a": 1}], 7),
        ([1, 7, None, None], None),  # a client cannot send responses
        ([2, 1, []], None),
        ([9, 1, 2, 3], None),
        ([0, 1, "m"], None),
    ],
)
def test_invalid_messages_are_reported_and_the_stream_goes_on(
    message: object, msgid: int | None
) -> None:
    client, server = pair()
    _, good = client.send_request("ping", [])
    server.receive_data(msgpack.packb(message) + good)
    bad, request = events(server)
    assert isinstance(bad, InvalidMessage)
    assert bad.msgid == msgid
    assert isinstance(request, Request)
    if msgid is not None:  # it can be answered
        assert b"InvalidRequest" in server.send_response(msgid, error=InvalidRequest("bad"))


def test_duplicate_msgid_in_flight_is_invalid() -> None:
    _, server = pair()
    server.receive_data(msgpack.packb([0, 3, "ping", []]) * 2)
    first, second = events(server)
    assert first == Request(3, "ping", [])
    assert isinstance(second, InvalidMessage)
    assert second.msgid is None


def test_a_message_in_progress_builds_nothing() -> None:
    """Partial bytes are kept as bytes: an array of a million empty maps arriving in pieces
    costs its bytes (twice), not the ~70 MB its maps would be in Python."""
    _, server = pair(max_message_size=4 * 1024 * 1024)
    body = b"\x80" * (1024 * 1024)
    stream = b"\x94\x00\x01\xa6create\x91\xdd" + (2**20).to_bytes(4, "big") + body
    tracemalloc.start()
    try:
        for pos in range(0, len(stream) - 1, 65536):
            server.receive_data(stream[pos : min(pos + 65536, len(stream) - 1)])
            assert server.next_event() is NEED_DATA
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert server.buffered == len(stream) - 1
    assert held < 3 * len(stream), held
    assert peak < 4 * len(stream), peak


def test_a_message_holds_a_bounded_number_of_values() -> None:
    """Past value_limit values a message is refused from its headers, before anything is built
    (the count is by value, not by byte); it is answered, and the stream goes on."""
    client, server = pair(max_message_size=1024 * 1024)
    assert server.value_limit == 131072
    dense = msgpack.packb([0, 1, "create", [[{}] * 60_000] * 3])  # 180,000 maps in 180 KB
    fine = msgpack.packb([0, 2, "create", [[0] * 100_000]])
    flat = msgpack.packb([0, 3, "create", [[None] * 140_000]])
    _, ping = client.send_request("ping", [])
    tracemalloc.start()
    try:
        server.receive_data(dense + fine + flat + ping)
        got = events(server)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [type(e) for e in got] == [InvalidMessage, Request, InvalidMessage, Request]
    assert (got[0].msgid, got[2].msgid) == (1, 3)
    assert all("more than 131072 values" in got[i].reason for i in (0, 2))
    assert len(got[1].params[0]) == 100_000
    assert peak < 8 * 1024 * 1024, peak  # the bytes, and the 100,000 values that were fine


#: msgpack values of every type and size class (the lengths that switch str8/16/32 and such).
_any_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(-1e30, 1e30)  # packed as float32 too (use_single_float)
    | st.text(max_size=40)
    | st.binary(max_size=300)
    | st.sampled_from(["x" * 255, "y" * 256, "z" * 65_536, b"b" * 65_536])
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=300))
    | st.sampled_from([msgpack.ExtType(1, b"e" * n) for n in (1, 2, 4, 8, 16, 65_536)]),
    lambda inner: (
        st.lists(inner, max_size=20)
        | st.dictionaries(st.text(max_size=5), inner, max_size=20)
        | st.lists(st.none(), min_size=16, max_size=70_000)
    ),
    max_leaves=50,
)


def _values(value: object) -> int:
    if isinstance(value, list):
        return len(value) + sum(_values(v) for v in value)
    if isinstance(value, dict):
        return 2 * len(value) + sum(_values(v) for v in value.values())
    return 0


@given(_any_value, st.booleans())
def test_values_are_counted_from_the_headers_exactly(value: object, single: bool) -> None:
    data = msgpack.packb(value, use_bin_type=True, use_single_float=single)
    exact = _values(value)
    assert _holds_at_most(data, exact)
    assert not _holds_at_most(data, exact - 1) or exact == 0


def test_the_limit_can_be_lowered_until_the_peer_authenticates() -> None:
    client, server = pair(max_message_size=1024 * 1024)
    server.max_message_size = 4096
    _, auth = client.send_request("auth", ["t" * 100])
    _, big = client.send_request("create", [{"blob": "x" * 50_000}])
    server.receive_data(auth + big)
    first = server.next_event()
    assert isinstance(first, Request) and first.method == "auth"
    server.max_message_size = 1024 * 1024  # authenticated: the full limit from now on
    assert events(server)[0].method == "create"
    _, server = pair(max_message_size=1024 * 1024)
    server.max_message_size = 4096
    server.receive_data(client.send_request("auth", ["t" * 5000])[1])
    with pytest.raises(RemoteProtocolError, match="longer than 4096"):
        server.next_event()
    with pytest.raises(ValueError):
        server.max_message_size = 8


@pytest.mark.parametrize(
    ("message", "msgid", "reason"),
    [
        (b"\x94\x00\x07\xa4ping\x91\xa2\xff\xfe", 7, "cannot be decoded"),  # not UTF-8
        (b"\x94\x00\x07\xa4ping\x91\x81\x01\x02", 7, "cannot be decoded"),  # an int key
        (b"\x94\x00\x07\xc4\x02\xff\xfe\x90", 7, "method: str (UTF-8)"),  # bin, not UTF-8
        (b"\x92\x01\xa2\xff\xfe", None, "cannot be decoded"),  # not even a request
        (b"\x93\x02\xa1x\x91\x81\x01\x02", None, "cannot be decoded"),  # a notification
    ],
)
def test_well_formed_but_undecodable_messages_are_answered(
    message: bytes, msgid: int | None, reason: str
) -> None:
    client, server = pair()
    _, good = client.send_request("ping", [])
    server.receive_data(message + good)
    bad, request = events(server)
    assert isinstance(bad, InvalidMessage)
    assert (bad.msgid, reason in bad.reason) == (msgid, True), bad
    assert isinstance(request, Request)
    if msgid is not None:
        assert b"InvalidRequest" in server.send_response(msgid, error=InvalidRequest(bad.reason))


def test_method_names_sent_as_bytes_are_read_as_utf8() -> None:
    _, server = pair()
    old = msgpack.Packer(use_bin_type=False)  # bytes as raw: clients before the str/bin split
    new = msgpack.Packer(use_bin_type=True)  # bytes as bin
    server.receive_data(
        old.pack([0, 1, b"ping", []])
        + new.pack([0, 2, b"ping", []])
        + new.pack([2, "caf\u00e9".encode(), [1]])
    )
    assert events(server) == [
        Request(1, "ping", []),
        Request(2, "ping", []),
        Notification("caf\u00e9", [1]),
    ]


def test_nesting_past_msgpacks_limit_is_fatal() -> None:
    _, server = pair(max_message_size=4096)
    server.receive_data(b"\x91" * 1024 + b"\xc0" + b"\x91" * 1025 + b"\xc0")
    assert isinstance(server.next_event(), InvalidMessage)  # 1024 deep: not a message
    with pytest.raises(RemoteProtocolError, match="deeper than msgpack's 1024 levels"):
        server.next_event()


def test_a_client_gives_up_on_a_response_it_cannot_decode() -> None:
    client, _ = pair()
    msgid, _ = client.send_request("ping", [])
    client.receive_data(b"\x94\x01" + bytes([msgid]) + b"\xc0\xa2\xff\xfe")
    with pytest.raises(RemoteProtocolError, match="cannot be decoded"):
        client.next_event()


def test_descriptions_of_what_arrived_are_bounded() -> None:
    huge = 4 * 1024 * 1024
    client, server = pair(max_message_size=2 * huge)
    _, good = client.send_request("ping", [])
    server.receive_data(
        msgpack.packb({"k": "x" * huge})
        + msgpack.packb([7, "x" * huge])
        + msgpack.packb([0, "x" * huge, "m", []])
        + msgpack.packb([2, ["x"] * 100_000, []])
        + good
    )
    *bad, request = events(server)
    assert isinstance(request, Request)
    assert all(isinstance(e, InvalidMessage) and len(e.reason) < 200 for e in bad), bad
    assert describe("x" * huge) == "'" + "x" * 40 + "'... (4194304 long)"
    assert describe(b"ab") == "b'ab'"
    assert describe({"a": 1}) == "a map of 1"
    assert describe(msgpack.ExtType(5, b"x" * huge)) == "ext type 5 of 4194304 bytes"
    assert describe(2**64 - 1) == repr(2**64 - 1)
    assert describe(object()) == "object"


def test_client_side_checks() -> None:
    client, server = pair()
    client.receive_data(msgpack.packb([1, 99, None, 1]))  # never asked
    client.receive_data(msgpack.packb([0, 1, "ping", []]))  # servers do not call
    assert all(isinstance(e, InvalidMessage) for e in events(client))
    with pytest.raises(LocalProtocolError):
        server.send_request("ping", [])
    with pytest.raises(LocalProtocolError):
        client.send_response(1, result=None)
    with pytest.raises(LocalProtocolError):
        server.send_response(42, result=None)  # not in flight


def test_forgotten_request_answer_is_invalid() -> None:
    client, server = pair()
    msgid, data = client.send_request("ping", [])
    server.receive_data(data)
    events(server)
    client.forget(msgid)
    client.receive_data(server.send_response(msgid, result="pong"))
    assert isinstance(client.next_event(), InvalidMessage)


def test_msgids_wrap_and_skip_those_in_flight() -> None:
    client, _ = pair()
    client._next_msgid = 2**32 - 1
    first, _ = client.send_request("ping", [])
    second, _ = client.send_request("ping", [])
    assert (first, second) == (2**32 - 1, 0)
    client._next_msgid = 0
    assert client.send_request("ping", [])[0] == 1


def test_unencodable_result_still_answers() -> None:
    _, server = pair()
    server.receive_data(msgpack.packb([0, 1, "stats", []]))
    events(server)
    response = msgpack.unpackb(server.send_response(1, result=object()))
    assert response[:2] == [1, 1]
    assert response[2][0] == "InternalError"
    with pytest.raises(LocalProtocolError):
        server.send_notification("x", [object()])


@pytest.mark.parametrize(
    "exc",
    [
        SessionNotFound("gone"),
        SessionExpired("old"),
        VersionConflict("v"),
        AuthenticationFailed("no"),
    ],
)
def test_errors_round_trip_to_the_same_class(exc: Exception) -> None:
    back = decode_error(msgpack.unpackb(msgpack.packb(encode_error(exc))))
    assert type(back) is type(exc)
    assert str(back) == str(exc)


def test_unknown_and_malformed_errors() -> None:
    back = decode_error(["NoSuchError", "m"])
    assert type(back).__name__ == "SessionError"
    assert isinstance(decode_error("oops"), RemoteProtocolError)


def test_session_wire_round_trip_and_validation() -> None:
    session = Session("ab" * 16, 1, 2, None, {"k": [1, "v"]}, 3)
    wire = msgpack.unpackb(msgpack.packb(session_to_wire(session)))
    assert session_from_wire(wire) == session
    for bad in ({**wire, "version": "3"}, {**wire, "extra": 1}, {**wire, "created_at": True}, []):
        with pytest.raises(ProtocolError):
            session_from_wire(bad)


def test_method_table_checks_arity_and_pages() -> None:
    METHODS["create"].check_params([])
    METHODS["create"].check_params([{}, 10])
    with pytest.raises(InvalidRequest, match="takes 0 to 2"):
        METHODS["create"].check_params([{}, 1, 2])
    with pytest.raises(InvalidRequest, match="takes 2"):
        METHODS["set_ttl"].check_params(["id"])
    session = Session("s", 1, 1, 1000, {}, 1)
    page = METHODS["list_page"]
    assert page.decode_result(page.encode_result(([session], "next"))) == ([session], "next")
    with pytest.raises(ProtocolError):
        page.decode_result({"not": "a page"})


def test_addresses() -> None:
    tcp = parse_address("tcp://127.0.0.1:7878")
    assert (tcp.host, tcp.port, tcp.is_local, str(tcp)) == (
        "127.0.0.1",
        7878,
        True,
        "tcp://127.0.0.1:7878",
    )
    assert parse_address("tcp://[::1]:9").is_local
    assert str(parse_address("tcp://[::1]:9")) == "tcp://[::1]:9"
    assert not parse_address("tcp://0.0.0.0:9").is_local
    assert not parse_address("tcp://example.com:9").is_local
    unix = parse_address("unix:///tmp/s.sock")
    assert (unix.path, unix.is_local) == ("/tmp/s.sock", True)
    for bad in (
        "tcp://host",
        "tcp://:80",
        "unix://rel/path",
        "http://x:1",
        "unix:relative",
        "tcp://h:99999",
    ):
        with pytest.raises(ValueError):
            parse_address(bad)
