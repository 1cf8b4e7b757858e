"""The manager's bounded read cache.

A manager that owns its store alone knows every write to it, so it can keep the sessions it
read or wrote and answer later reads without a trip to the store thread. The cache is bounded
(least recently used out first): it saves I/O, it never holds the only copy of anything.
Stores shared with other processes (redis) and the memory store get no cache.
"""

from __future__ import annotations

from collections import OrderedDict

from ..record.session import Session


class ReadCache:
    """Up to ``capacity`` sessions by id, as last committed; capacity 0 keeps nothing."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def get(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None:
            self._sessions.move_to_end(session_id)
        return session

    def put(self, session: Session) -> None:
        if self.capacity:
            self._sessions[session.id] = session
            self._sessions.move_to_end(session.id)
            if len(self._sessions) > self.capacity:
                self._sessions.popitem(last=False)

    def drop(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
