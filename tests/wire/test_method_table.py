"""The method table really drives the daemon and both clients: one entry is a new method."""

from __future__ import annotations

from pathlib import Path

import trio

from supervisor import ChildSpec
from workers import SessionNotFound, open_session_service
from workers.client import Client, SyncClient, connect
from workers.core.api import METHODS, Kind, Method, Param, Result
from workers.wire.address import Address
from workers.wire.server import Server

#: Nothing but a table entry: ``look`` is built by the service's existing ``peek`` builder.
LOOK = Method(
    "look",
    (Param("session_id", annotation="str"),),
    Result.SESSION,
    Kind.OPERATION,
    builds="peek",
    returns="Session",
    doc="peek under another name",
)
TABLE = {**METHODS, LOOK.name: LOOK}


class LookingClient(Client):
    methods = TABLE


class LookingSyncClient(SyncClient):
    methods = TABLE


async def test_one_entry_is_a_method_of_the_daemon_and_both_clients(tmp_path: Path) -> None:
    socket = tmp_path / "sessiond.sock"

    def listener(service: object) -> list[ChildSpec]:
        server = Server(service, [Address("unix", path=str(socket))], methods=TABLE)
        return [ChildSpec("listener", server.run)]

    async with open_session_service(extra_children=listener) as sessions:
        sid = await sessions.create({"user": "u1"})
        address = f"unix://{socket}"
        async with connect(address, client_class=LookingClient) as client:
            assert (await client.look(sid)).metadata == {"user": "u1"}
            try:
                await client.look("0" * 32)
            except SessionNotFound:
                pass
            else:
                raise AssertionError("look found a session that does not exist")

        def sync_look() -> dict[str, object]:
            with LookingSyncClient(address) as c:
                return c.look(sid).metadata

        assert await trio.to_thread.run_sync(sync_look) == {"user": "u1"}
        assert not hasattr(SyncClient, "look")  # the released table is unchanged


def test_the_generated_methods_have_the_tables_signatures() -> None:
    import inspect

    update = inspect.signature(Client.update)
    assert list(update.parameters) == ["self", "session_id", "set", "unset", "expected_version"]
    assert update.parameters["expected_version"].kind is inspect.Parameter.KEYWORD_ONLY
    assert Client.patch.__doc__ == Client.update.__doc__ == METHODS["update"].doc
    assert not hasattr(Client, "auth")  # the connection's own business
    for name, method in METHODS.items():
        if method.in_clients:
            assert inspect.signature(getattr(SyncClient, name)) == inspect.signature(
                getattr(Client, name)
            )
