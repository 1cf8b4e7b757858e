"""The programs in examples/, each started as a real process against a real daemon: the FastAPI
app under uvicorn, driven by httpx, and the MCP server under the MCP SDK's own client (stdio).

The FastAPI app is also where the ASGI middleware meets a real server: cookies over real HTTP,
concurrent requests of one user, a daemon that dies and comes back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest
from helpers import ROOT
from helpers.daemon_process import PATIENCE, DaemonProcess, expire, free_port

from workers import SessionNotFound
from workers.client import SyncClient

TOKEN = "examples-test-token-0123456789"

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path, "--token", TOKEN).start()
    yield d
    d.close()


class Uvicorn:
    """``uvicorn examples.fastapi_app:app`` on a free port, against ``daemon``."""

    def __init__(self, daemon: DaemonProcess, log: Path) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "SESSIOND_ADDRESS": daemon.unix,
            "SESSIOND_TOKEN": TOKEN,
            "SESSION_HTTPS_ONLY": "0",  # plain HTTP on loopback
        }
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app",
                 "--port", str(self.port), "--log-level", "warning"],
                cwd=ROOT, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.log = log
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                httpx.get(f"{self.url}/docs", timeout=1)
                return
            except httpx.TransportError:
                assert self.process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(PATIENCE)


@pytest.fixture
def app(daemon: DaemonProcess, tmp_path: Path) -> Iterator[Uvicorn]:
    server = Uvicorn(daemon, tmp_path / "uvicorn.log")
    yield server
    server.stop()


def session_cookie(response: httpx.Response) -> SimpleCookie | None:
    header = response.headers.get("set-cookie")
    return None if header is None else SimpleCookie(header)


def test_the_fastapi_example_under_uvicorn(app: Uvicorn, daemon: DaemonProcess) -> None:
    with SyncClient(daemon.tcp, token=TOKEN) as store, httpx.Client(base_url=app.url) as browser:
        visitor = browser.get("/me")
        assert visitor.status_code == 401 and session_cookie(visitor) is None
        assert store.count() == 0  # a visitor who writes nothing gets no session

        cookie = session_cookie(browser.post("/login", json={"user": "ada"}))
        assert cookie is not None
        first = cookie["session"].value
        assert cookie["session"]["httponly"] and cookie["session"]["samesite"] == "Lax"
        assert store.peek(first).metadata == {"user_id": "ada"}
        assert browser.get("/me").json() == {"user": "ada", "session": {"user_id": "ada"}}

        browser.post("/login", json={"user": "ada"})  # logging in again rotates the id
        second = browser.cookies["session"]
        assert second != first
        with pytest.raises(SessionNotFound):
            store.peek(first)

        async def twenty_at_once() -> None:
            async with httpx.AsyncClient(base_url=app.url, cookies=browser.cookies) as c:
                answers = await asyncio.gather(
                    *(c.put(f"/prefs/k{i}", json=f"v{i}") for i in range(20))
                )
            assert [a.status_code for a in answers] == [200] * 20

        asyncio.run(twenty_at_once())
        stored = store.peek(second).metadata
        assert {k: v for k, v in stored.items() if k.startswith("k")} == {
            f"k{i}": f"v{i}" for i in range(20)
        }  # twenty concurrent writers of one session, no key lost

        with httpx.Client(base_url=app.url, cookies={"session": "tampered"}) as forger:
            answer = forger.get("/me")
            assert answer.status_code == 401
            assert session_cookie(answer)["session"]["max-age"] == "0"  # type: ignore[index]

        with httpx.Client(base_url=app.url) as phone:
            phone.post("/login", json={"user": "ada"})
            assert phone.get("/me").status_code == 200
            ended = browser.post("/logout-everywhere")
            assert ended.json() == {"sessions_ended": 2}
            assert session_cookie(ended)["session"]["max-age"] == "0"  # type: ignore[index]
            assert phone.get("/me").status_code == 401
            assert browser.get("/me").status_code == 401


def test_an_expired_session_and_a_dead_daemon(
    app: Uvicorn, daemon: DaemonProcess, tmp_path: Path
) -> None:
    with httpx.Client(base_url=app.url) as browser:
        browser.post("/login", json={"user": "ada"})
        sid = browser.cookies["session"]
        with SyncClient(daemon.tcp, token=TOKEN) as store:
            expire(store, sid)
        expired = browser.get("/me")
        assert expired.status_code == 401
        assert session_cookie(expired)["session"]["max-age"] == "0"  # type: ignore[index]

        browser.post("/login", json={"user": "ada"})
        daemon.close()  # SIGKILL: the store is down
        down = browser.get("/me")
        assert down.status_code == 503
        assert "session store is unavailable" in app.log.read_text()
        daemon.start()  # the same store on disk: the session is still there
        assert browser.get("/me").json()["user"] == "ada"


def test_the_mcp_example_keeps_notes_across_server_processes(daemon: DaemonProcess) -> None:
    from mcp import Client, StdioServerParameters

    server = StdioServerParameters(
        command=sys.executable,
        args=[str(ROOT / "examples" / "mcp_server.py")],
        env={"SESSIOND_ADDRESS": daemon.unix, "SESSIOND_TOKEN": TOKEN},
        cwd=ROOT,
    )

    async def call(client: Client, tool: str, **arguments: str) -> object:
        result = await client.call_tool(tool, arguments)
        assert not result.is_error, result
        assert result.structured_content is not None
        return result.structured_content["result"]

    async def main() -> None:
        async with Client(server) as client:
            sid = await call(client, "start_session", user="ada")
            assert await call(client, "add_note", session_id=sid, note="buy milk") == ["buy milk"]
            await call(client, "add_note", session_id=sid, note="call bob")
        async with Client(server) as client:  # a new server process
            assert await call(client, "list_notes", session_id=sid) == ["buy milk", "call bob"]
            assert await call(client, "end_session", session_id=sid) is True
            gone = await client.call_tool("list_notes", {"session_id": sid})
            assert gone.is_error

    asyncio.run(main())
    with SyncClient(daemon.tcp, token=TOKEN) as store:
        assert store.count() == 0
