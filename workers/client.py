"""Clients of the session daemon: :func:`connect` (async) and :class:`SyncClient` (blocking).

This is the public home of the clients (``from workers.client import connect, SyncClient``);
they are built in :mod:`workers.wire.client`. Importing it loads the wire protocol and msgpack,
not the session manager, the supervision runtime or any store.
"""

from .wire.client import Client, SyncClient, connect

__all__ = ["Client", "SyncClient", "connect"]
