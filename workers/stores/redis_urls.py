"""The redis store's URLs: one server, a Redis Cluster, or a primary found through Sentinel.

===================================================================  ==========================
``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``                       one server (``rediss://``
                                                                     for TLS, ``unix://...``)
``redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]``       a Redis Cluster, from any
                                                                     of these seed nodes
``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/NAME``  the primary the sentinels
                                                                     know as ``NAME``
===================================================================  ==========================

The password may also be given as a ``?password=`` query parameter, and the sentinels' own as
``?sentinel_password=``; both are redacted, like the one in the user part, by
:func:`redact_url` wherever a URL is shown. The store's own settings may be given as query
parameters too (``buckets``, ``wait_replicas``, ``wait_timeout``), so that a daemon or a
``migrate`` location can set them with the URL alone. Any other query parameter of a
``redis://`` URL goes to coredis (``db``, ``client_name``...); the other forms refuse them.

:func:`clients_for` builds the coredis clients a URL needs (the store's, and the benchmarks'
floor: the same client, bare).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import coredis
from coredis.connection import TCPLocation

from .urls import SECRET_PARAMETERS, redact_url

#: Query parameters of the store itself, with their types.
STORE_PARAMETERS: dict[str, type] = {"buckets": int, "wait_replicas": int, "wait_timeout": float}

SERVER_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"
USAGE = (
    "use redis://HOST:PORT/DB for one server, redis+cluster://HOST:PORT[,HOST:PORT...] for a "
    "Redis Cluster, or redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE_NAME for Sentinel"
)


@dataclass(frozen=True)
class RedisTarget:
    """What a URL names, parsed."""

    kind: Literal["server", "cluster", "sentinel"]
    #: For a server: the URL coredis opens (the store's own parameters taken out).
    url: str = ""
    #: Cluster seed nodes, or sentinels.
    nodes: tuple[tuple[str, int], ...] = ()
    #: The sentinels' name for the primary.
    service: str = ""
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    db: int = 0
    #: The store's settings found in the query (``buckets``...), typed.
    settings: dict[str, Any] = field(default_factory=dict)


def parse_url(url: str) -> RedisTarget:
    """Parse ``url``; ``ValueError`` (its message free of secrets) saying what is wrong."""
    where = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"not a Redis URL: {where}; {USAGE}") from None
    settings: dict[str, Any] = {}
    passed: list[tuple[str, str]] = []
    secrets: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in STORE_PARAMETERS:
            try:
                settings[key] = STORE_PARAMETERS[key](value)
            except ValueError:
                raise ValueError(f"{key}={value!r} in {where} is not a number") from None
        elif key in SECRET_PARAMETERS:
            secrets[key] = value
        else:
            passed.append((key, value))
    scheme = parts.scheme.lower()
    if scheme in SERVER_SCHEMES:
        if "sentinel_password" in secrets:
            raise ValueError(f"sentinel_password is for redis+sentinel:// URLs, not {where}")
        if "buckets" in settings:
            raise ValueError(f"buckets is for redis+cluster:// URLs, not {where}")
        if "password" in secrets:  # coredis takes it from the query too
            passed.append(("password", secrets["password"]))
        return RedisTarget(
            "server", url=urlunsplit(parts._replace(query=urlencode(passed))), settings=settings
        )
    if scheme not in (CLUSTER_SCHEME, SENTINEL_SCHEME):
        raise ValueError(f"unknown Redis URL scheme {parts.scheme!r} in {where}; {USAGE}")
    if passed:
        names = ", ".join(sorted({key for key, _ in passed}))
        raise ValueError(f"unknown parameters in {where}: {names}")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    password = secrets.get("password", password)
    default_port = 26379 if scheme == SENTINEL_SCHEME else 6379
    nodes = tuple(_host_port(host, default_port, where) for host in hosts.split(","))
    path = unquote(parts.path.strip("/"))
    if scheme == CLUSTER_SCHEME:
        if path:
            raise ValueError(f"a Redis Cluster has no databases: remove /{path} from {where}")
        if "sentinel_password" in secrets:
            raise ValueError(f"sentinel_password is for redis+sentinel:// URLs, not {where}")
        return RedisTarget(
            "cluster", nodes=nodes, username=username, password=password, settings=settings
        )
    if "buckets" in settings:
        raise ValueError(f"buckets is for redis+cluster:// URLs, not {where}")
    service, _, db = path.partition("/")
    if not service:
        raise ValueError(f"name the primary the sentinels watch: {where}/SERVICE_NAME")
    if db and not db.isdigit():
        raise ValueError(f"the database after /{service}/ must be a number in {where}")
    return RedisTarget(
        "sentinel",
        nodes=nodes,
        service=service,
        username=username,
        password=password,
        sentinel_password=secrets.get("sentinel_password"),
        db=int(db or 0),
        settings=settings,
    )


def _host_port(text: str, default_port: int, where: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:PORT
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host or (port and not port.isdigit()) or not 0 < int(port or default_port) < 65536:
        raise ValueError(f"not HOST:PORT: {text!r} in {where}")
    return host, int(port or default_port)


def clients_for(target: RedisTarget, **options: Any) -> tuple[Any, ...]:
    """The coredis objects to enter, in order, for ``target``; commands go to the last one.

    ``options``: ``connect_timeout``, ``command_timeout``, ``retry_policy``.
    """
    timeouts = {
        name: options[given]
        for name, given in (
            ("connect_timeout", "connect_timeout"),
            ("stream_timeout", "command_timeout"),
        )
        if options.get(given) is not None
    }
    retry = {"retry_policy": options["retry_policy"]} if "retry_policy" in options else {}
    if target.kind == "server":
        return (coredis.Redis.from_url(target.url, **retry, **timeouts),)
    nodes = [TCPLocation(host, port) for host, port in target.nodes]
    credentials = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        cluster = coredis.RedisCluster(
            startup_nodes=nodes,
            non_atomic_cross_slot=False,  # every command the store sends is in one slot
            **retry,
            **credentials,
            **timeouts,
        )
        return (cluster,)
    sentinel = coredis.Sentinel(
        nodes,
        sentinel_kwargs={"password": target.sentinel_password, **timeouts},
        db=target.db,
        **retry,
        **credentials,
        **timeouts,
    )
    return sentinel, sentinel.primary_for(target.service)


@asynccontextmanager
async def connected(url: str, **options: Any) -> AsyncIterator[Any]:
    """A coredis client for ``url``, entered (see :func:`clients_for`)."""
    async with AsyncExitStack() as stack:
        managers = clients_for(parse_url(url), **options)
        for manager in managers:
            await stack.enter_async_context(manager)
        yield managers[-1]
