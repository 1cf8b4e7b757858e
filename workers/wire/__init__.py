"""The daemon's wire: addresses, the sans-IO msgpack-RPC protocol, the socket I/O around it,
the server that puts a :class:`~workers.core.service.SessionService` on it, and the clients.
"""
