"""Server-side sessions for ASGI applications: :class:`SessionMiddleware`.

::

    from workers.integrations.asgi import SessionMiddleware

    app = FastAPI()  # or Starlette(), or any ASGI application
    app.add_middleware(SessionMiddleware, address="unix:///run/sessiond.sock", token=token)

    @app.post("/login")
    async def login(request: Request):
        request.session.rotate()                 # a new id after login (session fixation)
        request.session["user_id"] = user.id     # stored in the daemon, not in the cookie

Pure ASGI, no framework needed at run time: ``scope["session"]`` is a :class:`RequestSession`,
a mutable mapping that Starlette and FastAPI show as ``request.session``. The cookie carries the
bare session id (128 random bits: nothing to sign), ``HttpOnly``, ``SameSite`` and ``Secure``.

What a request does to its session
----------------------------------
* **Loading.** A request whose cookie names a live session gets its metadata (a ``retrieve``,
  which refreshes the idle timeout). A request without one gets an empty mapping and costs the
  store nothing. An unknown, expired or malformed cookie is a fresh empty session, never an
  error page; the stale cookie is replaced (or deleted, if the request stores nothing).
* **Saving.** The session is saved when the response starts (before its headers go out), and
  only if the request changed it: a visitor who never writes gets no session and no cookie.
  Changes after the response started cannot reach the cookie, so they raise ``RuntimeError``
  rather than vanish.
* **Concurrent requests of one user.** Changes are written as a patch of the keys this request
  set or removed, with ``expected_version`` of the session it loaded. If another request wrote
  the session meanwhile (``VersionConflict``), the same patch is applied to the session as it
  now is (the service applies a patch atomically, so this is a merge however many requests
  race): the other requests' keys are kept, and for a key both changed this request's value
  wins (it is the later write) and an INFO line names the key. Nothing is overwritten
  wholesale, and no request fails for losing a race.
* **rotate() and clear().** ``rotate()`` moves the session to a new id at the end of the
  request: the mapping is stored under a fresh id first, then the old session is deleted, so a
  failure in between leaves the visitor's old session as it was. ``clear()`` empties the
  mapping, deletes the stored session and expires the cookie; keys set after ``clear()`` go to
  a new session with a new id (a flash message after logout).
* **A session deleted meanwhile** (logged out everywhere by another request, or expired) is
  not brought back: this request's changes to it are dropped, with an INFO line.
* **The store unavailable** (``ServiceUnavailable``, ``StoreError``, ``CapacityExceeded``): the
  request is answered ``503`` with an ERROR line, before or instead of the application's own
  response, and nothing is half-written. Metadata the store refuses (``InvalidMetadata``,
  ``SessionTooLarge``) is the application's bug: it is raised to the application, which is
  told at once when it assigns a value msgpack cannot carry.

The store is a daemon (``address=``: the connection is opened in the ASGI lifespan, which
Starlette, FastAPI, uvicorn and hypercorn run) or a service object (``service=``): an embedded
:func:`~workers.open_session_service` (under Trio or asyncio) or a client from
:func:`~workers.client.connect`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any, Final

from ..record.codec import canonical_metadata, pack
from ..record.errors import (
    CapacityExceeded,
    InvalidMetadata,
    InvalidSessionId,
    ServiceUnavailable,
    SessionNotFound,
    StoreError,
    VersionConflict,
)
from ..record.session import DEFAULT, Session, check_id, ttl_to_ms
from ..wire.client import connect

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

#: Starlette's default cookie lifetime: two weeks.
DEFAULT_MAX_AGE: Final = 14 * 24 * 3600
#: What makes a request 503 instead of an error page: the store could not do its part.
UNAVAILABLE: Final = (ServiceUnavailable, StoreError, CapacityExceeded)
_SAME_SITE: Final = {"lax": "Lax", "strict": "Strict", "none": "None"}


class RequestSession(MutableMapping[str, Any]):
    """``scope["session"]``: the session of one request, as a mutable mapping.

    Values are what msgpack carries (None, bools, numbers, strings, bytes, lists and maps with
    string keys); assigning anything else raises ``InvalidMetadata`` at once. ``id`` is the
    session's id (None for a visitor with no session yet); ``service`` is the session service
    behind the middleware, for what goes beyond this request's session (``delete_where`` to
    log a user out everywhere, say).
    """

    def __init__(self, service: Any, stored: Session | None, *, stale_cookie: bool) -> None:
        self.service = service
        self._stored = stored
        self._id = None if stored is None else stored.id
        self._data: dict[str, Any] = {} if stored is None else stored.metadata
        self._loaded = {key: pack(value) for key, value in self._data.items()}
        self._stale_cookie = stale_cookie
        self._rotate = False
        self._cleared = False
        self._sealed = False

    @property
    def id(self) -> str | None:
        """The session's id, None while the visitor has none; a rotated session's new id once
        the response has started."""
        return self._id

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setitem__(self, key: str, value: Any) -> None:
        self._check_open()
        canonical_metadata({key: value}, sys.maxsize)  # refuse what cannot be stored, now
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        self._check_open()
        del self._data[key]

    def clear(self) -> None:
        """Empty the session, delete it from the store and expire the cookie (logout)."""
        self._check_open()
        self._data = {}
        self._cleared = True

    def rotate(self) -> None:
        """Give the session a new id at the end of the request, retiring the old one (call it
        after a login, against session fixation)."""
        self._check_open()
        self._rotate = True

    def __repr__(self) -> str:
        return f"<RequestSession id={self._id!r} {self._data!r}>"

    def _check_open(self) -> None:
        if self._sealed:
            raise RuntimeError(
                "the response has started and the session was saved with it: change the "
                "session before the response starts"
            )

    def _changes(self) -> tuple[dict[str, Any], list[str]]:
        """The keys this request set (with their values) and the keys it removed."""
        changed = {}
        for key, value in self._data.items():
            try:
                packed = pack(value)
            except (TypeError, ValueError, OverflowError) as exc:  # changed in place
                raise InvalidMetadata(f"session key {key!r}: {exc}") from None
            if self._loaded.get(key) != packed:
                changed[key] = value
        return changed, [key for key in self._loaded if key not in self._data]

    async def _save(self, ttl: Any) -> str | bool | None:
        """Write what the request did; the cookie's new value (an id), False to delete the
        cookie, or None to leave it alone."""
        self._sealed = True
        service, stored, data = self.service, self._stored, self._data
        if stored is None:
            if not data:
                return False if self._stale_cookie else None
            self._id = await service.create(data, ttl)
            return self._id
        if self._rotate or self._cleared:
            # The new session first: a failure before the delete leaves the old one intact.
            new_id = await service.create(data, ttl) if data else None
            await service.delete(stored.id)
            self._id = new_id
            return new_id or False
        changed, removed = self._changes()
        if changed or removed:
            await self._patch(stored, changed, removed)
        return None

    async def _patch(self, stored: Session, changed: dict[str, Any], removed: list[str]) -> None:
        try:
            try:
                await self.service.patch(
                    stored.id, changed, removed, expected_version=stored.version
                )
                return
            except VersionConflict:  # another request wrote the session since it was loaded
                current = await self.service.peek(stored.id)
            both = [
                key
                for key in (*changed, *removed)
                if _packed(current.metadata, key) != self._loaded.get(key)
            ]
            if both:
                log.info(
                    "session %s: keys %s were also changed by a concurrent request; "
                    "this request's values are kept",
                    stored.id,
                    both,
                )
            # The patch names only this request's keys and the service applies it atomically:
            # applied to the session as it now is, it is the merge, whoever else writes.
            await self.service.patch(stored.id, changed, removed)
        except SessionNotFound:
            log.info(
                "session %s was deleted or expired during the request; its changes are dropped",
                stored.id,
            )


def _packed(metadata: dict[str, Any], key: str) -> bytes | None:
    return pack(metadata[key]) if key in metadata else None


class SessionMiddleware:
    """Server-side sessions for an ASGI application (see the module for what it does).

    Give ``address`` (and ``token``) of a daemon, or ``service``: an embedded service or a
    client. ``cookie_name``, ``max_age`` (seconds, None for a cookie that ends with the browser
    session), ``path``, ``domain``, ``same_site`` (``"lax"``, ``"strict"`` or ``"none"``) and
    ``https_only`` (the ``Secure`` attribute: leave it on outside local development) shape the
    cookie, as Starlette's own middleware names them. ``ttl`` is the idle timeout of the
    stored sessions, in seconds (``DEFAULT``: the service's ``default_ttl``). ``timeout`` and
    ``reconnect_timeout`` bound a call to the daemon and reconnecting to it, so that a request
    fails fast (503) when the daemon is gone.
    """

    def __init__(
        self,
        app: Any,
        *,
        address: str | None = None,
        service: Any = None,
        token: str | None = None,
        cookie_name: str = "session",
        max_age: int | None = DEFAULT_MAX_AGE,
        path: str = "/",
        domain: str | None = None,
        same_site: str = "lax",
        https_only: bool = True,
        ttl: Any = DEFAULT,
        timeout: float = 10.0,
        reconnect_timeout: float = 1.0,
    ) -> None:
        if (address is None) == (service is None):
            raise ValueError("SessionMiddleware takes address= (a daemon) or service=, not both")
        same = _SAME_SITE.get(same_site.lower())
        if same is None:
            raise ValueError(f"same_site is 'lax', 'strict' or 'none', got {same_site!r}")
        if same == "None" and not https_only:
            raise ValueError("same_site='none' needs https_only=True: browsers refuse it else")
        if max_age is not None and (isinstance(max_age, bool) or max_age < 1):
            raise ValueError(f"max_age is a positive number of seconds or None, got {max_age!r}")
        if ttl is not DEFAULT:
            ttl_to_ms(ttl)  # InvalidTTL now rather than at the first request
        self.app = app
        self._address = address
        self._connect_options = {
            "token": token,
            "timeout": timeout,
            "reconnect_timeout": reconnect_timeout,
        }
        self._service = service
        self._ttl = ttl
        self._cookie_name = cookie_name
        attributes = [f"Path={path}"]
        if domain is not None:
            attributes.append(f"Domain={domain}")
        attributes += ["HttpOnly", f"SameSite={same}"]
        if https_only:
            attributes.append("Secure")
        self._attributes = "; ".join(attributes)
        self._max_age = "" if max_age is None else f"; Max-Age={max_age}"

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan" and self._address is not None:
            await self._lifespan(scope, receive, send)
        elif kind in ("http", "websocket"):
            await self._handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Any, send: Any) -> None:
        """Keep a connection to the daemon for the application's life (opened lazily: a
        daemon that starts after the application is fine)."""
        assert self._address is not None
        async with connect(self._address, lazy=True, **self._connect_options) as client:
            self._service = client
            try:
                await self.app(scope, receive, send)
            finally:
                self._service = None

    async def _handle(self, scope: Scope, receive: Any, send: Any) -> None:
        service = self._service
        if service is None:
            log.error(
                "SessionMiddleware(address=%s) has no connection: its ASGI lifespan did not "
                "run (run the server with lifespan on, or pass service=)",
                self._address,
            )
            await _unavailable(scope, send)
            return
        cookie = _cookie(scope, self._cookie_name)
        try:
            session = await self._load(service, cookie)
        except UNAVAILABLE as exc:
            log.error("the session store is unavailable; answering 503: %s", exc)
            await _unavailable(scope, send)
            return
        scope["session"] = session
        failed = False

        async def send_with_session(message: Message) -> None:
            nonlocal failed
            if failed:
                return  # the 503 went out instead of this response
            if message["type"] in ("http.response.start", "websocket.accept"):
                try:
                    action = await session._save(self._ttl)
                except UNAVAILABLE as exc:
                    failed = True
                    log.error("the session store is unavailable; answering 503: %s", exc)
                    await _unavailable(scope, send)
                    return
                if action is not None:
                    headers = [*message.get("headers", ()), (b"set-cookie", self._set(action))]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_session)

    async def _load(self, service: Any, cookie: str | None) -> RequestSession:
        stored = None
        if cookie is not None:
            try:
                stored = await service.retrieve(check_id(cookie))
            except (SessionNotFound, InvalidSessionId):  # expired, unknown, or garbage
                pass
        return RequestSession(service, stored, stale_cookie=cookie is not None and stored is None)

    def _set(self, value: str | bool) -> bytes:
        if value is False:
            cookie = (
                f"{self._cookie_name}=; {self._attributes}; Max-Age=0; "
                "Expires=Thu, 01 Jan 1970 00:00:00 GMT"
            )
        else:
            cookie = f"{self._cookie_name}={value}; {self._attributes}{self._max_age}"
        return cookie.encode("latin-1")


def _cookie(scope: Scope, name: str) -> str | None:
    """The value of cookie ``name`` in the request, or None; lenient, as browsers are."""
    for header, value in scope.get("headers", ()):
        if header != b"cookie":
            continue
        for pair in value.decode("latin-1").split(";"):
            key, sep, text = pair.partition("=")
            if sep and key.strip() == name:
                return text.strip().strip('"')
    return None


async def _unavailable(scope: Scope, send: Any) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1013})  # try again later
        return
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1")],
        }
    )
    await send({"type": "http.response.body", "body": b"session store unavailable\n"})


__all__ = ["RequestSession", "SessionMiddleware"]
