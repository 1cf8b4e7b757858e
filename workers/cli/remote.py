"""How a verb reaches a running daemon: ``--address``, ``--token-file`` (or ``--token``),
``--timeout``, and a connection whose failures say plainly what went wrong (refused, no such
socket, unknown host, a token missing or wrong)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..record.errors import AuthenticationFailed, ServiceUnavailable
from ..wire.address import DEFAULT_ADDRESS, parse_address
from ..wire.client import connect
from ..wire.transport import open_stream
from .config import read_token_file
from .options import address, seconds
from .output import os_reason


def add_daemon_options(parser: argparse.ArgumentParser) -> None:
    """``--address``, ``--token`` and ``--timeout``: how a verb reaches a running daemon."""
    parser.add_argument(
        "--address",
        type=address,
        default=os.environ.get("SESSIOND_ADDRESS", DEFAULT_ADDRESS),
        help=f"the daemon: tcp://HOST:PORT or unix:///path (default {DEFAULT_ADDRESS}, or "
        "SESSIOND_ADDRESS)",
    )
    parser.add_argument(
        "--token-file",
        default=os.environ.get("SESSIOND_TOKEN_FILE"),
        help="a file holding the daemon's token (preferred, as is SESSIOND_TOKEN)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("SESSIOND_TOKEN"),
        help="the daemon's token itself: visible to every local user in ps",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        help="seconds each call may take, connecting included (default 10)",
    )


@asynccontextmanager
async def connect_daemon(args: argparse.Namespace) -> AsyncIterator[Any]:
    """:func:`connect` to ``--address`` at once (no retries), its failures said plainly."""
    token_file = getattr(args, "token_file", None)
    token = read_token_file(token_file) if token_file else args.token
    async with contextlib.AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(
                connect(args.address, token=token, reconnect_timeout=0)
            )
        except AuthenticationFailed as exc:
            if token is None:
                raise AuthenticationFailed(
                    f"the daemon at {args.address} requires a token: give --token-file (or "
                    "--token) or set SESSIOND_TOKEN"
                ) from None
            raise AuthenticationFailed(
                f"the daemon at {args.address} refused the token ({exc}): check --token-file, "
                "--token or SESSIOND_TOKEN"
            ) from None
        except ServiceUnavailable as exc:
            raise ServiceUnavailable(await unreachable(args.address, exc)) from None
        yield client


class Watchdog:
    """Bounds each wait of a verb (opening, then every call) by ``seconds``: a daemon that
    accepts and never answers, or a stuck store, fails the verb with ServiceUnavailable
    instead of hanging it. One cancel scope around the whole verb, its deadline moved to
    now + ``seconds`` while a wait is under way and away otherwise (the verb's own work, such
    as writing a backup, is not bounded)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.scope = trio.CancelScope()
        self._what = "opening"

    def arm(self, what: str) -> None:
        """A wait for ``what`` begins: it has ``seconds``."""
        self._what = what
        self.scope.deadline = trio.current_time() + self.seconds

    def disarm(self) -> None:
        self.scope.deadline = math.inf

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        self.arm(what)
        try:
            yield
        finally:
            self.disarm()

    def bound(self, target: Any) -> Any:
        return _Bounded(target, self)

    def expired(self) -> ServiceUnavailable:
        return ServiceUnavailable(f"{self._what}: no answer within {self.seconds:g} s (--timeout)")


class _Bounded:
    """``target``'s async methods, each waited for under a :class:`Watchdog`."""

    def __init__(self, target: Any, watchdog: Watchdog) -> None:
        self._target = target
        self._watchdog = watchdog

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._target, name)

        async def bounded(*args: Any) -> Any:
            with self._watchdog.waiting(name):
                return await method(*args)

        return bounded


async def unreachable(address: str, exc: ServiceUnavailable) -> str:
    """Why the daemon at ``address`` could not be reached. The client's error says that it
    could not; one more plain connect, made only now that it failed, says why (refused, no
    such socket, unknown host...)."""
    try:
        stream = await open_stream(parse_address(address))
    except OSError as error:
        return f"cannot reach the daemon at {address}: {os_reason(error)}"
    await stream.aclose()
    return str(exc)
