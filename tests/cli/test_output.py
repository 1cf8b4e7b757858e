"""What the verbs share (workers/cli/output.py, options.py, remote.py), tested in-process."""

from __future__ import annotations

import argparse
import io
import json
import logging
import socket

import pytest
import trio
from trio.testing import MockClock

from workers import ServiceUnavailable, StoreError
from workers.cli.admin import match
from workers.cli.output import Progress, demote_libraries, os_reason, report_failure
from workers.cli.remote import connect_daemon


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_only_on_a_terminal_and_labelled() -> None:
    terminal, pipe = Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        bar = Progress("backup", 4, stream)
        bar.advance(2)
        bar.update(4)
        bar.finish()
    assert pipe.getvalue() == ""
    assert terminal.getvalue().endswith(f"\rbackup [{'#' * 30}] 4/4\n")
    unknown = Terminal()
    Progress("migrate", None, unknown).update(3)
    assert unknown.getvalue() == "\rmigrate 3 sessions"


def test_failures_are_one_line_and_json_for_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    failure = StoreError("no disk store at /x:\n  check it")
    assert report_failure("stats", failure, json_output=True) == 1
    out, err = capsys.readouterr()
    assert err == "stats: StoreError: no disk store at /x: check it\n"
    assert json.loads(out) == {"error": "StoreError", "message": "no disk store at /x: check it"}
    report_failure("list", KeyError("bug"))
    err = capsys.readouterr().err
    assert err.startswith("list: internal error, KeyError: 'bug' (--debug")
    try:
        raise KeyError("bug")
    except KeyError as exc:
        report_failure("list", exc, debug=True)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("list: internal error, KeyError: 'bug'\n")


async def test_reasons_are_found_inside_groups_and_chains() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: refused
        port = s.getsockname()[1]
        try:
            await trio.open_tcp_stream("127.0.0.1", port)
        except OSError as exc:
            refused = exc
    assert os_reason(refused).startswith("connection refused")
    wrapped = ServiceUnavailable("cannot reach it")
    wrapped.__context__ = BaseExceptionGroup("g", [refused])
    assert os_reason(wrapped).startswith("connection refused")
    assert os_reason(socket.gaierror(-2, "Name or service not known")).startswith(
        "cannot resolve the host name"
    )
    assert os_reason(ValueError("odd")) == "odd"


def test_match_reads_strings_and_json() -> None:
    assert match("user=u1") == ("user", "u1")
    assert match("url=http://x/?a=b") == ("url", "http://x/?a=b")
    assert match("age:=42") == ("age", 42)
    assert match("admin:=true") == ("admin", True)
    assert match('name:="42"') == ("name", "42")
    for bad in ("nothing", "=value", "age:=forty"):
        with pytest.raises(argparse.ArgumentTypeError):
            match(bad)


def test_third_party_records_are_kept_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    demote_libraries()
    caplog.set_level(logging.DEBUG)
    logging.getLogger("coredis").warning("Connection closed unexpectedly!")
    (record,) = [r for r in caplog.records if r.name == "coredis"]
    assert record.levelno == logging.DEBUG


def test_ping_against_a_dead_address_waits_for_nothing() -> None:
    """No retry, no backoff, no timer: the failure is one refused connect (under 100 ms on
    any machine). Any sleep on the way would move the virtual clock, which jumps at once."""
    clock = MockClock(autojump_threshold=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        args = argparse.Namespace(address=address, token=None, timeout=10.0)

        async def ping() -> float:
            with pytest.raises(ServiceUnavailable, match="connection refused"):
                async with connect_daemon(args) as client:
                    await client.ping()
            return trio.current_time()

        assert trio.run(ping, clock=clock) == 0.0
