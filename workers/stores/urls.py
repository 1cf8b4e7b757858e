"""A store's location as logs and error messages show it: never with a password.

Apart from :mod:`workers.stores.redis_urls` (which needs coredis) so that the daemon can name
its store, and a missing-extra error can name the URL, on an install without the redis extra.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

#: Where the redis backend looks when no URL is given.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Query parameters that hold secrets: shown as ``***``.
SECRET_PARAMETERS = frozenset(("password", "sentinel_password"))


def redact_url(url: str) -> str:
    """``url`` with every password replaced by ``***`` (the one in the user part and those in
    the query), fit for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable Redis URL>"
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    query = "&".join(
        f"{piece.partition('=')[0]}=***"
        if unquote(piece.partition("=")[0]) in SECRET_PARAMETERS
        else piece
        for piece in parts.query.split("&")
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))
