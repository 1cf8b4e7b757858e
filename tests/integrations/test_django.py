"""The Django session engine against a real daemon: Django's session behaviours, one by one.

A small Django project is configured here (the engine, a URLconf with two views, Django's own
SessionMiddleware), so the engine is also driven the way a site drives it: through Django's
test client, cookie and all. The daemon's clock is real: expiry is checked through the stored
timeout, and a session that must be expired is given a 1 ms timeout and polled until it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import django
import pytest
from django.conf import settings

settings.configure(
    SECRET_KEY="test-only",
    SESSION_ENGINE="workers.integrations.django",
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware"],
    ALLOWED_HOSTS=["testserver"],
    USE_TZ=True,
)
django.setup()

from django.contrib.sessions.backends.base import CreateError, UpdateError  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.test import Client, override_settings  # noqa: E402
from django.urls import path  # noqa: E402
from django.utils import timezone  # noqa: E402
from helpers.daemon_process import DaemonProcess, expire, serving  # noqa: E402

from workers import SessionNotFound  # noqa: E402
from workers.client import SyncClient  # noqa: E402
from workers.integrations.django import SessionStore  # noqa: E402

TOKEN = "django-test-token-0123456789"

pytestmark = pytest.mark.slow


def visits(request: HttpRequest) -> JsonResponse:
    request.session["visits"] = request.session.get("visits", 0) + 1
    return JsonResponse({"visits": request.session["visits"]})


def log_in(request: HttpRequest) -> JsonResponse:
    request.session.cycle_key()
    request.session["_auth_user_id"] = "42"
    return JsonResponse({})


urlpatterns = [path("visits", visits), path("login", log_in)]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with serving(tmp_path_factory.mktemp("daemon"), "--token", TOKEN) as d:
        yield d


@pytest.fixture(autouse=True)
def engine(daemon: DaemonProcess) -> Iterator[None]:
    with override_settings(SESSIOND_ADDRESS=daemon.unix, SESSIOND_TOKEN=TOKEN):
        yield


@pytest.fixture
def store(daemon: DaemonProcess) -> Iterator[SyncClient]:
    """A direct look at the daemon's sessions."""
    with SyncClient(daemon.tcp, token=TOKEN) as c:
        yield c


def test_create_save_load_modify(store: SyncClient) -> None:
    s = SessionStore()
    assert s.session_key is None and not s.modified
    s["cat"] = "dog"
    s["n"] = [1, 2]
    s.save()
    key = s.session_key
    assert key is not None and s.exists(key)
    assert store.peek(key).metadata == {"cat": "dog", "n": [1, 2]}
    again = SessionStore(key)
    assert again["cat"] == "dog"
    del again["cat"]
    again["fish"] = True
    again.save()
    assert store.peek(key).metadata == {"n": [1, 2], "fish": True}
    assert SessionStore(key).load() == {"n": [1, 2], "fish": True}
    empty = SessionStore()
    empty.save()  # an empty session is stored too, as Django's backends do
    assert empty.exists(empty.session_key)


def test_loading_an_unknown_key_creates_nothing(store: SyncClient) -> None:
    before = store.count()
    s = SessionStore("someunknownkey")
    assert s.load() == {}
    assert s.session_key is None and not s.exists(s.session_key)
    s2 = SessionStore("1")  # too short for Django: not even looked up
    s2.save()
    assert s2.session_key not in (None, "1")
    assert store.count() == before + 1


def test_must_create_refuses_a_key_in_use(store: SyncClient) -> None:
    s = SessionStore()
    s["a"] = 1
    s.save(must_create=True)  # no key yet: a new session
    taken = s.session_key
    assert taken is not None
    clash = SessionStore(taken)
    clash._session_cache = {"a": 2}
    with pytest.raises(CreateError):
        clash.save(must_create=True)
    assert store.peek(taken).metadata == {"a": 1}  # untouched
    chosen = SessionStore("chosen-key-" + taken)
    chosen["b"] = 2
    chosen.save(must_create=True)
    assert store.peek(chosen.session_key).metadata == {"b": 2}
    assert store.peek(chosen.session_key).timeout_ms == settings.SESSION_COOKIE_AGE * 1000


def test_a_session_deleted_elsewhere_is_not_resurrected() -> None:
    s1 = SessionStore()
    s1["test_data"] = "value1"
    s1.save(must_create=True)
    SessionStore(s1.session_key).delete()  # logged out in another request
    s1["test_data"] = "value2"
    with pytest.raises(UpdateError):
        s1.save()
    assert s1.load() == {}


def test_delete_and_flush(store: SyncClient) -> None:
    s = SessionStore()
    s["foo"] = "bar"
    s.save()
    key = s.session_key
    s.flush()
    assert s.session_key is None and s.modified
    assert not s.exists(key)
    s.save()  # a fresh one
    s.delete(s.session_key)
    assert not s.exists(s.session_key)


def test_cycle_key_keeps_the_data_under_a_new_key(store: SyncClient) -> None:
    s = SessionStore()
    s["a"], s["b"] = "c", "d"
    s.save()
    old = s.session_key
    s.cycle_key()
    assert s.session_key != old and not s.exists(old)
    assert dict(s.items()) == {"a": "c", "b": "d"}
    fresh = SessionStore(s.session_key)  # without a loaded cache
    fresh.cycle_key()
    assert dict(fresh.items()) == {"a": "c", "b": "d"}
    assert store.peek(fresh.session_key).metadata == {"a": "c", "b": "d"}


def test_clear_then_save_removes_every_stored_key(store: SyncClient) -> None:
    s = SessionStore()
    s.update({"a": 1, "b": 2})
    s.save()
    fresh = SessionStore(s.session_key)
    fresh.clear()  # no load happened: the engine must learn what to remove
    fresh["c"] = 3
    fresh.save()
    assert store.peek(s.session_key).metadata == {"c": 3}


def test_expiry_follows_get_expiry_age(store: SyncClient) -> None:
    s = SessionStore()
    s["x"] = 1
    s.save()
    assert store.peek(s.session_key).timeout_ms == settings.SESSION_COOKIE_AGE * 1000
    s.set_expiry(10)
    s.save()
    assert store.peek(s.session_key).timeout_ms == 10_000
    s.set_expiry(timezone.now() + timedelta(hours=1))
    s.save()
    assert abs(store.peek(s.session_key).timeout_ms - 3_600_000) <= 2_000
    s.set_expiry(None)
    with override_settings(SESSION_COOKIE_AGE=600):
        s.save()
        assert store.peek(s.session_key).timeout_ms == 600_000
        other = SessionStore()
        other.save()
        assert store.peek(other.session_key).timeout_ms == 600_000


def test_an_expiry_in_the_past_expires_at_once() -> None:
    s = SessionStore()
    s["foo"] = "bar"
    s.set_expiry(-timedelta(seconds=10))
    s.save()
    assert s.session_key is not None
    assert "foo" not in SessionStore(s.session_key)
    kept = SessionStore()
    kept["foo"] = "bar"
    kept.save()
    kept.set_expiry(-10)
    kept.save()
    assert "foo" not in SessionStore(kept.session_key)


def test_clear_expired_sweeps_the_daemon(store: SyncClient) -> None:
    sid = store.create({"short": True})
    expire(store, sid)
    SessionStore.clear_expired()
    with pytest.raises(SessionNotFound) as info:
        store.peek(sid)
    assert type(info.value) is SessionNotFound  # swept, not merely expired


def test_the_async_api(store: SyncClient) -> None:
    async def main() -> None:
        s = SessionStore()
        await s.aset("cat", "dog")
        await s.asave()
        key = s.session_key
        assert await s.aexists(key)
        again = SessionStore(key)
        assert await again.aget("cat") == "dog"
        await again.aset("cat", "cow")
        await again.asave()
        assert (await SessionStore(key).aload()) == {"cat": "cow"}
        await again.acycle_key()
        assert not await again.aexists(key) and await again.aexists(again.session_key)
        s2 = SessionStore()
        await s2.acreate()
        assert await s2.aexists(s2.session_key)
        await s2.adelete()
        assert not await s2.aexists(s2.session_key)
        await SessionStore.aclear_expired()

    asyncio.run(main())


def test_through_djangos_middleware_and_test_client(store: SyncClient) -> None:
    browser = Client()
    assert browser.get("/visits").json() == {"visits": 1}
    key = browser.cookies[settings.SESSION_COOKIE_NAME].value
    assert browser.get("/visits").json() == {"visits": 2}
    assert store.peek(key).metadata == {"visits": 2}
    browser.get("/login")  # cycle_key: a new key, the old one gone
    new = browser.cookies[settings.SESSION_COOKIE_NAME].value
    assert new != key
    with pytest.raises(SessionNotFound):
        store.peek(key)
    assert store.peek(new).metadata == {"visits": 2, "_auth_user_id": "42"}
    assert store.delete_where("_auth_user_id", "42") == 1  # log out everywhere
    assert browser.get("/visits").json() == {"visits": 1}


def test_settings_pick_the_daemon(daemon: DaemonProcess) -> None:
    with override_settings(SESSIOND_ADDRESS=daemon.tcp, SESSIOND_TOKEN="wrong"):
        from workers import AuthenticationFailed

        with pytest.raises(AuthenticationFailed):
            SessionStore().save()
    s: Any = SessionStore()
    s.save()  # the right settings again: a new connection
    assert s.exists(s.session_key)
