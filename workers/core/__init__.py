"""The service core: the method table, the operations, the manager and sweeper actors, and the
tree that :func:`~workers.core.service.open_session_service` starts.

Imports nothing on import: :mod:`workers.core.api` (the method table) is read by the light
client, which must not load the manager or the supervision runtime.
"""
