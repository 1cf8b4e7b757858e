"""A Django session engine on the session daemon.

::

    # settings.py
    SESSION_ENGINE = "workers.integrations.django"
    SESSIOND_ADDRESS = "unix:///run/sessiond.sock"     # default tcp://127.0.0.1:7878
    SESSIOND_TOKEN = os.environ.get("SESSIOND_TOKEN")  # the daemon's token, if it has one
    SESSIOND_TIMEOUT = 10.0                            # seconds a call may take (optional)

Django's :class:`~django.contrib.sessions.backends.base.SessionBase` contract, kept the way its
database backend keeps it:

* The session dict is the session's metadata, key for key (values are what msgpack carries:
  what Django's JSON serializer carries, and bytes), so ``sessiond inspect`` shows it and
  ``delete_where("_auth_user_id", ...)`` logs a user out everywhere.
* Keys are the daemon's ids (128 random bits): ``create()`` asks the daemon for one.
  ``save(must_create=True)`` under a key chosen by the caller stores the session only if the
  key is free, else raises ``CreateError``.
* ``save()`` writes the keys the request set and removes the ones it deleted, and never brings
  back a session deleted meanwhile (``UpdateError``, which Django's middleware turns into
  ``SessionInterrupted``).
* Expiry: the stored session's idle timeout is ``get_expiry_age()`` (``SESSION_COOKIE_AGE`` or
  ``set_expiry``), counted from its last save, as Django's database backend counts it; loading
  does not extend it. An age of zero or less expires the session at once.
* ``clear_expired()`` sweeps the daemon now (it also sweeps by itself).

A daemon that cannot be reached makes these methods raise ``ServiceUnavailable`` (a 500 error
page through Django) rather than log users out silently. Each thread talks to the daemon over a
connection of its own (a :class:`~workers.client.SyncClient`); the async methods of Django 5
(``aload``, ``asave``...) run the same calls in worker threads.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.sessions.backends.base import CreateError, SessionBase, UpdateError

from ..record.errors import InvalidSessionId, SessionNotFound
from ..record.session import Session
from ..wire.address import DEFAULT_ADDRESS
from ..wire.client import SyncClient

#: Seconds a call to the daemon may take, unless ``SESSIOND_TIMEOUT`` says otherwise.
DEFAULT_TIMEOUT = 10.0
#: Seconds spent reconnecting to a daemon that went away before a call gives up.
RECONNECT_TIMEOUT = 1.0

_local = threading.local()
_GONE = (SessionNotFound, InvalidSessionId)


def _client() -> SyncClient:
    """This thread's connection to the daemon the settings name (a new one if they changed)."""
    key = (
        getattr(settings, "SESSIOND_ADDRESS", DEFAULT_ADDRESS),
        getattr(settings, "SESSIOND_TOKEN", None),
        getattr(settings, "SESSIOND_TIMEOUT", DEFAULT_TIMEOUT),
    )
    client: SyncClient | None = getattr(_local, "client", None)
    if client is None or _local.key != key:
        if client is not None:
            client.close()
        address, token, timeout = key
        client = SyncClient(
            address, token=token, timeout=timeout, reconnect_timeout=RECONNECT_TIMEOUT
        )
        _local.client, _local.key = client, key
    return client


def _in_thread(fn: Any) -> Any:
    """``fn`` as a coroutine function run in a worker thread (each with its own connection)."""
    return sync_to_async(fn, thread_sensitive=False)


class SessionStore(SessionBase):
    """Django sessions kept by the session daemon (see the module)."""

    def __init__(self, session_key: str | None = None) -> None:
        super().__init__(session_key)
        #: The keys the stored session holds, as last loaded or saved (None: not known yet).
        self._stored_keys: set[str] | None = None

    def _remember(self, session: Session) -> None:
        self._stored_keys = set(session.metadata)

    def load(self) -> dict[str, Any]:
        try:
            session = _client().peek(self.session_key)  # peek: loading does not extend expiry
        except _GONE:
            self._session_key = None
            self._stored_keys = None
            return {}
        self._remember(session)
        return session.metadata

    def exists(self, session_key: str | None) -> bool:
        if not session_key:
            return False
        try:
            _client().peek(session_key)
        except _GONE:
            return False
        return True

    def create(self) -> None:
        data = self._get_session(no_load=True)
        age = self.get_expiry_age()
        client = _client()
        self._session_key = client.create(data, ttl=age if age > 0 else None)
        if age <= 0:  # expired at once: it had a key, and is gone
            client.delete(self._session_key)
        self._stored_keys = set(data)
        self.modified = True

    def save(self, must_create: bool = False) -> None:
        if self.session_key is None:
            self.create()
            return
        key = self.session_key
        data = self._get_session(no_load=must_create)
        age = self.get_expiry_age()
        client = _client()
        if must_create:
            now = int(time.time() * 1000)
            record = Session(key, now, now, _ms(age) if age > 0 else 1, data, 1)
            if client.import_sessions([record]) == 0:
                raise CreateError
            if age <= 0:
                client.delete(key)
            self._stored_keys = set(data)
            return
        if age <= 0:
            if not client.delete(key):
                raise UpdateError
            return
        if self._stored_keys is None:  # never loaded here (cleared, say): learn what is stored
            try:
                self._remember(client.peek(key))
            except _GONE:
                raise UpdateError from None
        assert self._stored_keys is not None
        removed = [k for k in self._stored_keys if k not in data]
        try:
            saved = client.update(key, set=data, unset=removed)
            if saved.timeout_ms != _ms(age):
                client.set_ttl(key, age)
        except _GONE:
            raise UpdateError from None
        self._stored_keys = set(data)

    def delete(self, session_key: str | None = None) -> None:
        if session_key is None:
            if self.session_key is None:
                return
            session_key = self.session_key
        try:
            _client().delete(session_key)
        except InvalidSessionId:
            pass  # nothing can be stored under it

    @classmethod
    def clear_expired(cls) -> None:
        _client().cleanup_expired()

    # Django 5's async API: the same calls, each in a worker thread of its own.

    async def aexists(self, session_key: str | None) -> bool:
        return await _in_thread(self.exists)(session_key)

    async def acreate(self) -> None:
        await _in_thread(self.create)()

    async def asave(self, must_create: bool = False) -> None:
        await _in_thread(self.save)(must_create)

    async def adelete(self, session_key: str | None = None) -> None:
        await _in_thread(self.delete)(session_key)

    async def aload(self) -> dict[str, Any]:
        return await _in_thread(self.load)()

    @classmethod
    async def aclear_expired(cls) -> None:
        await _in_thread(cls.clear_expired)()


def _ms(age: float) -> int:
    return round(age * 1000)


__all__ = ["SessionStore"]
