"""The daemon's guards without a daemon: the per-peer failure budget and the log limiter."""

from __future__ import annotations

import logging

import pytest

from workers.wire import guard
from workers.wire.guard import FailureBudget, LogLimiter, peer_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_peer_fails_its_burst_then_one_attempt_a_second() -> None:
    clock = Clock()
    budget = FailureBudget(3, clock=clock)
    for _ in range(3):
        assert budget.allows("10.0.0.1")
        budget.fail("10.0.0.1")
    assert not budget.allows("10.0.0.1")
    assert budget.retry_after("10.0.0.1") == pytest.approx(1.0)
    assert budget.allows("10.0.0.2")  # others are not touched
    clock.now += 0.5
    assert not budget.allows("10.0.0.1")
    clock.now += 0.5
    assert budget.allows("10.0.0.1")  # one more attempt...
    budget.fail("10.0.0.1")
    assert not budget.allows("10.0.0.1")  # ...and no more
    clock.now += 3600
    for _ in range(3):  # refilled to the burst, never beyond
        budget.fail("10.0.0.1")
    assert not budget.allows("10.0.0.1")


def test_the_budget_remembers_a_bounded_number_of_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard, "MAX_PEERS", 5)
    budget = FailureBudget(1, clock=Clock())
    for i in range(8):
        budget.fail(f"10.0.0.{i}")
    assert len(budget._peers) == 5
    assert budget.allows("10.0.0.0")  # the oldest were forgotten
    assert not budget.allows("10.0.0.7")
    with pytest.raises(ValueError):
        FailureBudget(0)


def test_peers_are_addresses_and_ipv6_networks() -> None:
    assert peer_key("192.0.2.7") == "192.0.2.7"
    assert peer_key("2001:db8::1") == peer_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert peer_key("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert peer_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert peer_key("not-an-address") == "not-an-address"


def test_log_lines_of_one_kind_are_spaced_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logs = LogLimiter(logging.getLogger("test.guard"), clock=clock)
    with caplog.at_level(logging.WARNING):
        for i in range(1000):
            logs.warning("auth", "refusing %s", f"peer-{i}")
            clock.now += 0.001
        logs.warning("other", "another kind")
        clock.now += 10
        logs.warning("auth", "refusing %s", "peer-late")
    assert [r.getMessage() for r in caplog.records] == [
        "refusing peer-0",
        "another kind",
        "refusing peer-late (and 999 more like it in the last 11 s)",
    ]
