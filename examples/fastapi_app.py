"""A FastAPI app whose sessions live in the session daemon: log in, read the session, log out
everywhere.

    sessiond serve &                                   # tcp://127.0.0.1:7878
    SESSION_HTTPS_ONLY=0 uvicorn examples.fastapi_app:app   # 0: plain-HTTP local development

    curl -c jar -d '{"user": "ada"}' -H 'content-type: application/json' localhost:8000/login
    curl -b jar localhost:8000/me
    curl -b jar -X PUT localhost:8000/prefs/theme -d '"dark"' -H 'content-type: application/json'
    curl -b jar -X POST localhost:8000/logout-everywhere

Settings come from the environment: SESSIOND_ADDRESS, SESSIOND_TOKEN, SESSION_HTTPS_ONLY.
"""

import os
from typing import Any

from fastapi import Body, FastAPI, HTTPException, Request
from pydantic import BaseModel

from workers.integrations.asgi import SessionMiddleware

app = FastAPI()
app.add_middleware(
    SessionMiddleware,
    address=os.environ.get("SESSIOND_ADDRESS", "tcp://127.0.0.1:7878"),
    token=os.environ.get("SESSIOND_TOKEN"),
    https_only=os.environ.get("SESSION_HTTPS_ONLY", "1") != "0",  # Secure cookies by default
)


class Login(BaseModel):
    user: str


def current_user(request: Request) -> str:
    user = request.session.get("user_id")
    if user is None:
        raise HTTPException(401, "not logged in")
    return user


@app.post("/login")
async def login(request: Request, body: Login) -> dict[str, str]:
    # A real app checks a password here. Then: a new session id, against session fixation.
    request.session.rotate()
    request.session["user_id"] = body.user
    return {"user": body.user}


@app.get("/me")
async def me(request: Request) -> dict[str, Any]:
    return {"user": current_user(request), "session": dict(request.session)}


@app.put("/prefs/{name}")
async def set_pref(request: Request, name: str, value: str = Body()) -> dict[str, str]:
    current_user(request)
    request.session[name] = value
    return {name: value}


@app.post("/logout-everywhere")
async def logout_everywhere(request: Request) -> dict[str, int]:
    ended = await request.session.service.delete_where("user_id", current_user(request))
    request.session.clear()  # and expire this browser's cookie
    return {"sessions_ended": ended}
