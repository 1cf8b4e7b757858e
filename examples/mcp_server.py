"""An MCP server (official MCP SDK) that keeps each user's notes in the session daemon, so they
survive restarts of the server and are shared by every server process that uses the daemon.

    sessiond serve &
    SESSIOND_ADDRESS=tcp://127.0.0.1:7878 python examples/mcp_server.py   # MCP over stdio

A client calls ``start_session(user)`` once and passes the id it gets to the other tools.
Settings come from the environment: SESSIOND_ADDRESS, SESSIOND_TOKEN.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp.server import MCPServer
from mcp.server.mcpserver import Context

from workers import VersionConflict
from workers.client import Client, connect


@asynccontextmanager
async def daemon(server: MCPServer) -> AsyncIterator[Client]:
    address = os.environ.get("SESSIOND_ADDRESS", "tcp://127.0.0.1:7878")
    async with connect(address, token=os.environ.get("SESSIOND_TOKEN")) as sessions:
        yield sessions


mcp = MCPServer("notes", lifespan=daemon)


def sessions(ctx: Context) -> Client:
    return ctx.request_context.lifespan_context


@mcp.tool()
async def start_session(user: str, ctx: Context) -> str:
    """Open a session for ``user`` (idle for an hour, it ends); returns its id."""
    return await sessions(ctx).create({"user_id": user, "notes": []}, ttl=3600)


@mcp.tool()
async def add_note(session_id: str, note: str, ctx: Context) -> list[str]:
    """Add a note to the session; returns all its notes."""
    store = sessions(ctx)
    while True:  # read, modify, write: again if another call wrote in between
        current = await store.retrieve(session_id)
        notes = [*current.metadata["notes"], note]
        try:
            await store.update(session_id, {"notes": notes}, expected_version=current.version)
            return notes
        except VersionConflict:
            continue


@mcp.tool()
async def list_notes(session_id: str, ctx: Context) -> list[str]:
    """The session's notes."""
    return (await sessions(ctx).retrieve(session_id)).metadata["notes"]


@mcp.tool()
async def end_session(session_id: str, ctx: Context) -> bool:
    """End the session; True if it was still open."""
    return await sessions(ctx).delete(session_id)


if __name__ == "__main__":
    mcp.run()
