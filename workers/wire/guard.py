"""What the daemon keeps against clients that guess tokens or flood it, besides the protocol's
own limits: a budget of failed authentications per peer, and log lines that a flood cannot
multiply.

Both take the time from a clock callable (Trio's by default), so tests drive them with a
virtual one. Neither does I/O of its own beyond handing lines to :mod:`logging`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Callable

import trio

#: Seconds for a peer's failure budget to regain one attempt.
REFILL_INTERVAL = 1.0
#: Peers whose failures are remembered at most (the most recent ones).
MAX_PEERS = 10_000
#: Seconds between two log lines of one kind.
LOG_INTERVAL = 10.0


def peer_key(host: str) -> str:
    """Whose budget a TCP peer at ``host`` spends: its IPv4 address, or its IPv6 /64 network
    (one machine usually holds a whole /64, so counting single IPv6 addresses would give it
    billions of budgets)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class FailureBudget:
    """Failed authentications per peer, as a token bucket.

    A peer may fail ``burst`` times in a row; its budget then regains one attempt every
    :data:`REFILL_INTERVAL` seconds. A peer out of budget is refused without its token being
    looked at, so guessing from one address runs at one guess a second at most, however many
    connections it opens. A correct token costs nothing and is never delayed while the peer
    has budget left. Clients that share an address with a guesser (behind one NAT, or local
    TCP clients next to a local attacker) share its budget: local clients should use the Unix
    socket, which is not budgeted.

    Only peers with failures are remembered, at most :data:`MAX_PEERS` of them (the oldest are
    forgotten first), so the memory this takes is bounded whatever the number of addresses.
    """

    def __init__(self, burst: int, *, clock: Callable[[], float] = trio.current_time) -> None:
        if burst < 1:
            raise ValueError("the failure budget allows at least one failure")
        self.burst = burst
        self._clock = clock
        self._peers: OrderedDict[str, tuple[float, float]] = OrderedDict()  # budget, as of when

    def _left(self, peer: str, now: float) -> float:
        entry = self._peers.get(peer)
        if entry is None:
            return float(self.burst)
        budget, since = entry
        return min(float(self.burst), budget + (now - since) / REFILL_INTERVAL)

    def allows(self, peer: str) -> bool:
        """Whether ``peer`` may try a token now."""
        return self._left(peer, self._clock()) >= 1.0

    def retry_after(self, peer: str) -> float:
        """Seconds until ``peer`` may try again (0 when it may now)."""
        return max(0.0, (1.0 - self._left(peer, self._clock())) * REFILL_INTERVAL)

    def fail(self, peer: str) -> None:
        """Spend one attempt of ``peer``'s budget."""
        now = self._clock()
        self._peers[peer] = (max(0.0, self._left(peer, now) - 1.0), now)
        self._peers.move_to_end(peer)
        if len(self._peers) > MAX_PEERS:
            self._peers.popitem(last=False)


class LogLimiter:
    """At most one line per :data:`LOG_INTERVAL` seconds for each kind of event; the next line
    of a kind says how many of it were left out meanwhile.

    A flood of bad connections would otherwise write a line each (thousands a second), and the
    log would bury the one line an operator needs.
    """

    def __init__(
        self, logger: logging.Logger, *, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self._logger = logger
        self._clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        """Log ``message % args`` at WARNING, unless a line of ``kind`` went out recently."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < LOG_INTERVAL:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return
        left_out = self._left_out.pop(kind, 0)
        if left_out:
            message += f" (and {left_out} more like it in the last {now - last:.0f} s)"
        self._last[kind] = now
        self._logger.warning(message, *args)
