"""SessionMiddleware in a Starlette application, with Starlette's TestClient against a real
daemon (on asyncio and on Trio), and in-process on the embedded service under asyncio, whose
injected wall clock makes sessions expire without waiting.

The same application is served by a real uvicorn process in ``test_examples.py``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import EPOCH
from helpers.daemon_process import DaemonProcess, serving
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from workers import SessionNotFound, open_session_service
from workers.client import SyncClient
from workers.faults import FaultyStore
from workers.integrations.asgi import SessionMiddleware
from workers.stores import make_store

TOKEN = "asgi-test-token-0123456789"


async def login(request: Request) -> JSONResponse:
    request.session.rotate()
    request.session["user_id"] = request.query_params["user"]
    return JSONResponse({"id": request.session.id})  # the old id: the new one comes with the cookie


async def me(request: Request) -> JSONResponse:
    return JSONResponse({"user_id": request.session.get("user_id"), "id": request.session.id})


async def put(request: Request) -> JSONResponse:
    for key, value in request.query_params.items():
        request.session[key] = value
    gate = request.app.state.gates.get(request.query_params.get("wait"))
    if gate is not None:  # hold this request until the test lets it answer
        request.app.state.arrived.set()
        await gate.wait()
    return JSONResponse(dict(request.session))


async def logout(request: Request) -> JSONResponse:
    request.session.clear()
    return JSONResponse({})


async def logout_everywhere(request: Request) -> JSONResponse:
    user = request.session["user_id"]
    gone = await request.session.service.delete_where("user_id", user)
    request.session.clear()
    return JSONResponse({"deleted": gone})


async def bad_value(request: Request) -> PlainTextResponse:
    try:
        request.session["when"] = object()
    except ValueError as exc:
        return PlainTextResponse(type(exc).__name__)
    return PlainTextResponse("accepted")  # pragma: no cover


def application(**options: Any) -> Starlette:
    app = Starlette(
        routes=[
            Route("/login", login, methods=["POST"]),
            Route("/me", me),
            Route("/put", put, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/logout-everywhere", logout_everywhere, methods=["POST"]),
            Route("/bad-value", bad_value, methods=["POST"]),
        ]
    )
    app.state.gates = {}
    app.state.arrived = asyncio.Event()
    app.add_middleware(SessionMiddleware, **options)
    return app


def set_cookie(response: httpx.Response) -> SimpleCookie | None:
    header = response.headers.get("set-cookie")
    return None if header is None else SimpleCookie(header)


# -- TestClient against a real daemon ---------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with serving(tmp_path_factory.mktemp("daemon"), "--token", TOKEN) as d:
        yield d


@pytest.fixture(params=["asyncio", "trio"])
def client(daemon: DaemonProcess, request: pytest.FixtureRequest) -> Iterator[TestClient]:
    app = application(address=daemon.unix, token=TOKEN, max_age=3600)
    with TestClient(app, base_url="https://testserver", backend=request.param) as c:
        yield c


@pytest.fixture
def store(daemon: DaemonProcess) -> Iterator[SyncClient]:
    """A direct look at the daemon's sessions."""
    with SyncClient(daemon.tcp, token=TOKEN) as c:
        yield c


@pytest.mark.slow
def test_login_read_logout(client: TestClient, store: SyncClient) -> None:
    before = store.count()
    answer = client.post("/login", params={"user": "ada"})
    cookie = set_cookie(answer)
    assert cookie is not None
    morsel = cookie["session"]
    assert answer.json() == {"id": None}  # a new visitor has no id until the session is saved
    sid = morsel.value  # the bare id, nothing else
    assert (morsel["path"], morsel["max-age"], morsel["samesite"]) == ("/", "3600", "Lax")
    assert morsel["httponly"] and morsel["secure"]
    assert store.peek(sid).metadata == {"user_id": "ada"}
    assert store.count() == before + 1

    read = client.get("/me")
    assert read.json() == {"user_id": "ada", "id": sid}
    assert set_cookie(read) is None  # nothing changed: nothing written, no cookie

    out = client.post("/logout")
    expired = set_cookie(out)
    assert expired is not None and expired["session"]["max-age"] == "0"
    with pytest.raises(SessionNotFound):
        store.peek(sid)
    assert client.get("/me").json() == {"user_id": None, "id": None}


@pytest.mark.slow
def test_a_visitor_who_writes_nothing_gets_no_session_and_no_cookie(
    client: TestClient, store: SyncClient
) -> None:
    before = store.count()
    for _ in range(3):
        answer = client.get("/me")
        assert answer.json() == {"user_id": None, "id": None}
        assert set_cookie(answer) is None
    assert store.count() == before


@pytest.mark.slow
def test_rotate_moves_the_session_and_retires_the_old_id(
    client: TestClient, store: SyncClient
) -> None:
    first = client.post("/put", params={"cart": "3 apples"}).headers["set-cookie"]
    old = SimpleCookie(first)["session"].value
    assert client.post("/login", params={"user": "ada"}).json() == {"id": old}
    new = client.cookies["session"]
    assert new != old
    with pytest.raises(SessionNotFound):
        store.peek(old)
    assert store.peek(new).metadata == {"cart": "3 apples", "user_id": "ada"}


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0" * 32, "not a session id", "x" * 300, '"\x7f"', ""])
def test_tampered_cookies_get_a_fresh_session(
    client: TestClient, store: SyncClient, value: str
) -> None:
    client.cookies.set("session", value)
    answer = client.get("/me")
    assert answer.status_code == 200
    assert answer.json() == {"user_id": None, "id": None}
    cookie = set_cookie(answer)
    assert cookie is not None and cookie["session"]["max-age"] == "0"  # the stale one goes
    client.cookies.set("session", value)
    written = client.post("/put", params={"k": "v"})
    new = set_cookie(written)
    assert new is not None and new["session"].value not in (value, "")
    assert store.peek(new["session"].value).metadata == {"k": "v"}


@pytest.mark.slow
def test_logout_everywhere_through_the_service(client: TestClient, daemon: DaemonProcess) -> None:
    with TestClient(application(address=daemon.unix, token=TOKEN), base_url="https://x") as other:
        other.post("/login", params={"user": "grace"})
        client.post("/login", params={"user": "grace"})
        assert client.post("/logout-everywhere").json() == {"deleted": 2}
        assert other.get("/me").json()["user_id"] is None


@pytest.mark.slow
def test_values_msgpack_cannot_carry_are_refused_at_assignment(client: TestClient) -> None:
    assert client.post("/bad-value").text == "InvalidMetadata"


@pytest.mark.slow
def test_a_daemon_that_is_down_gives_503_and_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = DaemonProcess(tmp_path)
    app = application(address=d.tcp, reconnect_timeout=0.1)
    with TestClient(app, base_url="https://testserver") as c:  # starts before its daemon
        with caplog.at_level(logging.ERROR, "workers.integrations.asgi"):
            answer = c.post("/put", params={"k": "v"})
        assert answer.status_code == 503
        assert set_cookie(answer) is None
        assert "session store is unavailable" in caplog.text
        try:
            d.start()
            assert c.post("/put", params={"k": "v"}).status_code == 200  # it connects now
        finally:
            d.close()
        with caplog.at_level(logging.ERROR, "workers.integrations.asgi"):
            assert c.get("/me").status_code == 503  # loading the session fails too


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"address= .* or service="):
        SessionMiddleware(None)
    with pytest.raises(ValueError, match="same_site"):
        SessionMiddleware(None, service=object(), same_site="sometimes")
    with pytest.raises(ValueError, match="https_only"):
        SessionMiddleware(None, service=object(), same_site="none", https_only=False)


# -- in process, on the embedded service under asyncio ----------------------------------------


class Wall:
    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> float:
        return self.now


def http(app: Starlette, cookie: str | None = None) -> httpx.AsyncClient:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="https://test")
    if cookie is not None:
        client.cookies.set("session", cookie)
    return client


def test_an_expired_cookie_gets_a_fresh_session() -> None:
    wall = Wall()

    async def main() -> None:
        async with open_session_service(clock=wall) as sessions:
            app = application(service=sessions, ttl=60)
            async with http(app) as c:
                await c.post("/login", params={"user": "ada"})
                sid = c.cookies["session"]
                assert (await sessions.peek(sid)).timeout_ms == 60_000
                wall.now += 59
                assert (await c.get("/me")).json()["user_id"] == "ada"  # refreshes
                wall.now += 61
                answer = await c.get("/me")
                assert answer.json() == {"user_id": None, "id": None}
                assert set_cookie(answer)["session"]["max-age"] == "0"  # type: ignore[index]
                await c.post("/put", params={"k": "v"})
                assert c.cookies["session"] != sid

    asyncio.run(main())


async def concurrently(app: Starlette, cookie: str, slow: dict[str, str], fast: dict[str, str]):
    """Two requests of one user: ``slow`` loads the session, then waits while ``fast`` loads,
    writes and answers; then ``slow`` writes, having lost the race."""
    gate = app.state.gates["slow"] = asyncio.Event()
    app.state.arrived = asyncio.Event()
    async with http(app, cookie) as a, http(app, cookie) as b:
        first = asyncio.create_task(a.post("/put", params={**slow, "wait": "slow"}))
        await app.state.arrived.wait()
        await b.post("/put", params=fast)
        gate.set()
        await first


def test_two_concurrent_requests_of_one_user_lose_no_key(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with open_session_service() as sessions:
            sid = await sessions.create({"user_id": "ada", "theme": "light"})
            app = application(service=sessions)
            await concurrently(app, sid, {"cart": "apples"}, {"theme": "dark"})
            s = await sessions.peek(sid)
            assert s.metadata == {
                "user_id": "ada",
                "theme": "dark",
                "cart": "apples",
                "wait": "slow",
            }
            assert s.version == 3
            with caplog.at_level(logging.INFO, "workers.integrations.asgi"):
                await concurrently(app, sid, {"theme": "blue"}, {"theme": "green"})
            assert (await sessions.peek(sid)).metadata["theme"] == "blue"  # the later write
            assert "keys ['theme'] were also changed by a concurrent request" in caplog.text

    asyncio.run(main())


def test_a_session_deleted_during_a_request_is_not_brought_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with open_session_service() as sessions:
            sid = await sessions.create({"user_id": "ada"})
            app = application(service=sessions)
            gate = app.state.gates["slow"] = asyncio.Event()
            async with http(app, sid) as c:
                request = asyncio.create_task(c.post("/put", params={"k": "v", "wait": "slow"}))
                await app.state.arrived.wait()
                await sessions.delete(sid)  # logged out everywhere meanwhile
                gate.set()
                with caplog.at_level(logging.INFO, "workers.integrations.asgi"):
                    assert (await request).status_code == 200
            with pytest.raises(SessionNotFound):
                await sessions.peek(sid)
            assert await sessions.count() == 0
            assert "its changes are dropped" in caplog.text

    asyncio.run(main())


def test_a_failing_store_gives_503_and_writes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FaultyStore(make_store("disk", path=str(tmp_path / "store")))

    async def main() -> None:
        async with open_session_service(store=store) as sessions:
            sid = await sessions.create({"user_id": "ada"})
            app = application(service=sessions)
            async with http(app, sid) as c:
                store.fail("commit", OSError(errno.EIO, "Input/output error"))
                with caplog.at_level(logging.ERROR, "workers.integrations.asgi"):
                    rotated = await c.post("/login", params={"user": "grace"})
                    changed = await c.post("/put", params={"k": "v"})
                for answer in (rotated, changed):
                    assert answer.status_code == 503
                    assert answer.text == "session store unavailable\n"
                    assert set_cookie(answer) is None
                assert caplog.text.count("session store is unavailable") == 2
                store.clear()
                assert (await sessions.peek(sid)).metadata == {"user_id": "ada"}
                assert await sessions.count() == 1  # no half-made rotated copy
                assert (await c.get("/me")).json()["user_id"] == "ada"

    asyncio.run(main())


def test_changes_after_the_response_started_raise() -> None:
    seen: list[BaseException] = []

    async def late_writer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            scope["session"]["late"] = True
        except RuntimeError as exc:
            seen.append(exc)
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> None:
        async with open_session_service() as sessions:
            app = SessionMiddleware(late_writer, service=sessions)
            async with http(app) as c:  # type: ignore[arg-type]
                assert (await c.get("/")).text == "ok"
            assert await sessions.count() == 0

    asyncio.run(main())
    assert seen and "the response has started" in str(seen[0])
