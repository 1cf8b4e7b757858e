"""The daemon's settings: defaults, then a TOML file, then ``SESSIOND_*`` variables, then flags.

Each source overrides the ones before it. With no configuration at all the daemon keeps a
disk store under ``./data`` and listens on ``tcp://127.0.0.1:7878`` only.

The TOML file holds the settings as top-level keys, named as the fields of :class:`Settings`::

    backend = "disk"
    path = "/var/lib/sessiond"
    host = "127.0.0.1"
    port = 7878
    unix = "/run/sessiond/sessiond.sock"
    default_ttl = 1800
    log_format = "json"

An environment variable is the field's name in capitals after ``SESSIOND_``
(``SESSIOND_PORT=7979``, ``SESSIOND_TOKEN_FILE=...``); the word ``none`` (or an empty value)
unsets an optional setting. Unknown keys are refused, so a misspelt setting never goes
unnoticed.

The token is a secret: give it as ``token_file`` (a file only the daemon's user can read; its
surrounding whitespace is ignored) or ``SESSIOND_TOKEN`` rather than ``--token``, which every
local user sees in ``ps``. An empty token, or ``SESSIOND_TOKEN`` set to an empty string or
``none``, is refused rather than taken as "no token": a daemon without one runs only when no
token setting is given at all. Error messages never show a token's value.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..record.codec import DEFAULT_MAX_METADATA_BYTES
from ..stores import canonical_backend
from ..wire.address import DEFAULT_HOST, DEFAULT_PORT, Address
from ..wire.protocol import DEFAULT_MAX_MESSAGE_SIZE, MIN_MESSAGE_SIZE
from ..wire.server import HELD_COPIES, MAX_TOKEN_BYTES, ServerLimits, auth_request_size

ENV_PREFIX = "SESSIOND_"
_LIMITS = ServerLimits()
#: Settings whose values never appear in a message.
SECRETS = frozenset({"token"})


class ConfigError(ValueError):
    """A setting is unknown or wrong; the message names it and where it came from."""


@dataclass(slots=True)
class Settings:
    """Everything ``serve`` can be told. Store options left at None keep the store's default."""

    backend: str = "disk"
    path: str | None = "./data"
    url: str | None = None
    #: Key prefix of the redis backend (daemons that share sessions use the same one).
    prefix: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    tcp: bool = True
    unix: str | None = None
    token: str | None = field(default=None, repr=False)
    #: A file holding the token (read when the settings are loaded; preferred to ``token``).
    token_file: str | None = None
    default_ttl: float | None = 3600.0
    cleanup_interval: float = 300.0
    max_sessions: int | None = None
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES
    durability: str | None = None
    on_corrupt: str | None = None
    max_connections: int = _LIMITS.max_connections
    #: Connections of one kind (TCP, Unix) that have not authenticated yet.
    max_unauthenticated: int = _LIMITS.max_unauthenticated
    max_in_flight: int = _LIMITS.max_in_flight
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    #: Memory for messages in progress all authenticated connections may hold together.
    max_buffered_bytes: int = _LIMITS.max_buffered_bytes
    auth_timeout: float = _LIMITS.auth_timeout
    #: Seconds a message may take to arrive in full, from its first byte.
    message_timeout: float = _LIMITS.message_timeout
    #: Failed authentications in a row allowed from one address (then one a second).
    max_auth_failures: int = _LIMITS.max_auth_failures
    shutdown_grace: float = 10.0
    #: The service tree's restart budget: at most this many restarts within the period.
    restart_intensity: int = 5
    restart_period: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"
    #: HTTP port for ``/metrics`` (Prometheus) and ``/health``; None: no metrics endpoint.
    metrics_port: int | None = None
    metrics_host: str = DEFAULT_HOST
    #: Answer the ``crash_actor`` RPC (chaos testing only; never on a production daemon).
    allow_fault_injection: bool = False

    def validate(self) -> None:
        """Raise ConfigError for values of the right type that make no sense together."""
        try:
            self.backend = canonical_backend(self.backend)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.tcp and not self.unix:
            raise ConfigError("nothing to listen on: tcp is off and no unix socket is set")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"{name} is 0 to 65535, got {value}")
        if self.unix and not os.path.isabs(self.unix):
            self.unix = os.path.abspath(self.unix)
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format is 'text' or 'json', got {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(
                f"log_level is DEBUG, INFO, WARNING, ERROR or CRITICAL: {self.log_level!r}"
            )
        self.log_level = self.log_level.upper()
        if self.restart_intensity < 0 or not self.restart_period > 0:
            raise ConfigError("restart_intensity is >= 0 and restart_period is > 0 seconds")
        for name in (
            "max_connections",
            "max_unauthenticated",
            "max_in_flight",
            "max_message_size",
            "max_buffered_bytes",
            "max_auth_failures",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} is a positive integer")
        for name in ("auth_timeout", "message_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} is a number of seconds above 0")
        if self.max_buffered_bytes < HELD_COPIES * self.max_message_size:
            raise ConfigError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must hold one message in "
                f"progress: at least {HELD_COPIES} x max_message_size ({self.max_message_size})"
            )
        self._validate_token()
        addresses = self.addresses()
        exposed = [str(a) for a in addresses if not a.is_local]
        if exposed and not self.token:
            raise ConfigError(
                f"listening on {', '.join(exposed)} (not loopback) requires a token: set "
                "token_file in the config file, SESSIOND_TOKEN_FILE, SESSIOND_TOKEN or --token-file"
            )

    def _validate_token(self) -> None:
        if self.token_file is not None:
            if self.token is not None:
                raise ConfigError("both token and token_file are set: keep one")
            self.token = read_token_file(self.token_file)
        if self.token is None:
            need = auth_request_size(None)
        else:
            size = len(self.token.encode())
            if not self.token.strip():
                raise ConfigError("the token is empty: give one, or no token setting at all")
            if size > MAX_TOKEN_BYTES:
                raise ConfigError(f"the token is {size} bytes long; at most {MAX_TOKEN_BYTES}")
            need = auth_request_size(self.token)
        if self.max_message_size < max(need, MIN_MESSAGE_SIZE):
            raise ConfigError(
                f"max_message_size={self.max_message_size} is too small for an auth request "
                f"({max(need, MIN_MESSAGE_SIZE)} bytes with this token)"
            )

    def addresses(self) -> list[Address]:
        """Where the daemon listens."""
        addresses = []
        if self.tcp:
            addresses.append(Address("tcp", host=self.host, port=self.port))
        if self.unix:
            addresses.append(Address("unix", path=self.unix))
        return addresses

    def service_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~workers.core.service.run_session_service`."""
        options: dict[str, Any] = {
            "backend": self.backend,
            "path": self.path,
            "url": self.url,
            "default_ttl": self.default_ttl,
            "cleanup_interval": self.cleanup_interval,
            "max_sessions": self.max_sessions,
            "max_metadata_bytes": self.max_metadata_bytes,
            "intensity": self.restart_intensity,
            "period": self.restart_period,
        }
        if self.backend in ("disk", "lmdb"):
            for name in ("durability", "on_corrupt"):
                if getattr(self, name) is not None:
                    options[name] = getattr(self, name)
        if self.backend == "redis" and self.prefix is not None:
            options["prefix"] = self.prefix
        return options

    def server_limits(self) -> ServerLimits:
        return ServerLimits(
            max_connections=self.max_connections,
            max_unauthenticated=self.max_unauthenticated,
            max_in_flight=self.max_in_flight,
            max_message_size=self.max_message_size,
            max_buffered_bytes=self.max_buffered_bytes,
            auth_timeout=self.auth_timeout,
            message_timeout=self.message_timeout,
            max_auth_failures=self.max_auth_failures,
        )


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token held in file ``path`` (surrounding whitespace, such as the final newline,
    left out); ConfigError when it cannot be read or is empty."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc}") from None
    if not token:
        raise ConfigError(f"the token file {path} is empty")
    return token


_HINTS = typing.get_type_hints(Settings)
FIELDS = tuple(f.name for f in dataclasses.fields(Settings))


def _types(name: str) -> tuple[type, ...]:
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


_BOOLS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLS |= {"0": False, "false": False, "no": False, "off": False}


def _parse(text: str, allowed: tuple[type, ...]) -> Any:
    """A setting given as text (environment), as the first of ``allowed`` it reads as."""
    word = text.strip().lower()
    if type(None) in allowed and word in ("", "none"):
        return None
    if str in allowed:
        return text
    if bool in allowed:
        return _BOOLS.get(word, text)
    for kind in (int, float):
        if kind in allowed:
            try:
                return kind(word)
            except ValueError:
                pass
    return text


def _coerce(name: str, value: Any, source: str, text: bool) -> Any:
    """``value`` as the type of setting ``name`` (parsed, if it is ``text``), or ConfigError."""
    allowed = _types(name)
    if text:
        if name in SECRETS and value.strip().lower() in ("", "none"):
            raise ConfigError(
                f"{source}: {ENV_PREFIX}{name.upper()} is set but empty (or 'none'): unset it "
                "to run without a token"
            )
        value = _parse(value, allowed)
    if float in allowed and type(value) is int:
        value = float(value)
    if type(value) not in allowed:
        expected = " or ".join("none" if t is type(None) else t.__name__ for t in allowed)
        shown = f"a {type(value).__name__}" if name in SECRETS else repr(value)
        raise ConfigError(f"{source}: {name} is {expected}, got {shown}")
    return value


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from the defaults, ``config_file``, ``env`` (default ``os.environ``) and
    ``overrides`` (flags given on the command line; None values are "not given"), in that order.

    Raises :class:`ConfigError` naming the setting and where it came from.
    """
    settings = Settings()
    if config_file is not None:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read the config file {path}: {exc}") from None
        _apply(settings, data, f"config file {path}", text=False)
    env = os.environ if env is None else env
    from_env = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX) and key not in (f"{ENV_PREFIX}CONFIG", f"{ENV_PREFIX}ADDRESS")
    }
    _apply(settings, from_env, "environment", text=True)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    _apply(settings, flags, "flags", text=False)
    settings.validate()
    return settings


def _apply(settings: Settings, values: Mapping[str, Any], source: str, *, text: bool) -> None:
    for name, value in values.items():
        if name not in FIELDS:
            known = ", ".join(FIELDS)
            raise ConfigError(f"{source}: unknown setting {name!r} (known: {known})")
        setattr(settings, name, _coerce(name, value, source, text))
