"""Where a daemon listens and clients connect: ``tcp://HOST:PORT`` or ``unix:///abs/path``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

DEFAULT_HOST: Final = "127.0.0.1"
#: The daemon's documented default TCP port.
DEFAULT_PORT: Final = 7878
DEFAULT_ADDRESS: Final = f"tcp://{DEFAULT_HOST}:{DEFAULT_PORT}"


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed daemon address: ``tcp://HOST:PORT`` or ``unix:///abs/path``."""

    scheme: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def is_local(self) -> bool:
        """Whether only this machine can reach the address (a Unix socket or loopback TCP)."""
        return self.scheme == "unix" or is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback interface (``localhost`` or a loopback IP)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str) -> Address:
    """Parse ``tcp://HOST:PORT`` or ``unix:///abs/path``; ValueError naming the problem."""
    parts = urlsplit(text)
    if parts.scheme == "unix":
        path = parts.path
        if parts.netloc or not path.startswith("/"):
            raise ValueError(f"a unix address is unix:///absolute/path, got {text!r}")
        return Address("unix", path=path)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ValueError(f"a tcp address is tcp://HOST:PORT, got {text!r}")
        return Address("tcp", host=parts.hostname, port=port)
    raise ValueError(f"an address is tcp://HOST:PORT or unix:///abs/path, got {text!r}")
