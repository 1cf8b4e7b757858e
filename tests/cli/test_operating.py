"""Operating the daemon: its metrics endpoint, its logs, readiness, and how it fails to start.

Real daemons (``python -m workers serve``), real redis-servers, a plain HTTP client.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import coredis
import pytest
import trio
from helpers.daemon_process import DaemonProcess, free_port, run_verb, run_verbs
from helpers.redis_server import RedisServer, find_redis, unique_prefix
from prometheus_client.parser import text_string_to_metric_families

from workers.client import SyncClient

pytestmark = pytest.mark.slow


def with_password(url: str) -> str:
    return url.replace("redis://", "redis://:s3cret-pw@")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_port_counters_and_histograms_move_and_stats_carries_them(
    tmp_path: Path,
) -> None:
    port = free_port()
    d = DaemonProcess(tmp_path, "--metrics-port", str(port)).start()
    try:
        before = scrape(port)
        with SyncClient(d.tcp) as c:
            ids = [c.create({"n": i}) for i in range(20)]
            for sid in ids:
                c.retrieve(sid)
            with pytest.raises(Exception, match="no session"):
                c.retrieve("0" * 32)
        after = scrape(port)
        done = run_verb("stats", "--address", d.tcp, "--json")
        assert done.returncode == 0, done.stderr
        stats = json.loads(done.stdout)
    finally:
        assert d.stop() == 0
    method = (("method", "create"),)
    assert before.get(("sessiond_requests_total", method), 0) == 0
    assert after[("sessiond_requests_total", method)] == 20
    assert after[("sessiond_request_duration_seconds_count", method)] == 20
    assert after[("sessiond_request_duration_seconds_sum", method)] > 0
    errors = (("error", "SessionNotFound"), ("method", "retrieve"))
    assert after[("sessiond_request_errors_total", errors)] == 1
    assert after[("sessiond_connections_accepted_total", ())] >= 1
    assert after[("sessiond_batch_size_count", ())] > before[("sessiond_batch_size_count", ())]
    assert after[("sessiond_sessions", ())] == 20
    # The same figures through the stats verb.
    assert stats["methods"]["create"]["count"] == 20
    assert stats["methods"]["create"]["latency"]["count"] == 20
    assert stats["methods"]["retrieve"]["errors"] == {"SessionNotFound": 1}
    assert stats["sessions"] == 20 and stats["connections_accepted"] >= 2
    assert stats["batches"]["count"] >= after[("sessiond_batch_size_count", ())]


def test_debug_logs_one_line_per_request_without_metadata(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, "--log-level", "debug").start()
    try:
        with SyncClient(d.tcp) as c:
            sid = c.create({"password": "hunter2"})
            c.retrieve(sid)
            with pytest.raises(Exception, match="no session"):
                c.peek("0" * 32)
    finally:
        assert d.stop() == 0
    log = d.log()
    lines = [line for line in log.splitlines() if "workers.core.metrics: request " in line]
    assert [re.sub(r".* request (\w+) .*", r"\1", line) for line in lines] == [
        "create",
        "retrieve",
        "peek",
    ]
    assert lines[0].endswith(" ms ok") and lines[2].endswith(" ms SessionNotFound")
    assert "hunter2" not in log and sid not in log


def test_the_ready_line_names_the_store_never_its_password(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path).start()
    d.wait_for_log("ready")
    assert d.stop() == 0
    assert re.search(rf"sessiond \S+ ready: pid \d+, disk store at {d.store_path}\n", d.log())
    with RedisServer(args=["--requirepass", "s3cret-pw"]) as server:
        prefix = unique_prefix()
        d = DaemonProcess(
            tmp_path / "redis", backend="redis"
        )  # the path is ignored by the redis backend
        (tmp_path / "redis").mkdir()
        d.args += ["--url", with_password(server.url), "--prefix", prefix]
        d.start()
        assert d.stop() == 0
    url = f"redis://:***@127.0.0.1:{server.port}/0"
    assert f"ready: pid {d.process.pid}, redis store at {url} prefix {prefix!r}" in d.log()
    assert "s3cret-pw" not in d.log()


def one_error(done_log: str) -> str:
    """The one ERROR line of a daemon that did not start (and no traceback)."""
    errors = [line for line in done_log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in done_log, done_log
    return errors[0]


def test_start_failures_are_one_line_naming_the_cause(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with RedisServer(args=["--requirepass", "s3cret-pw"]) as server:
        dead_redis = with_password(server.url)  # stopped: Redis is down
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    holder = DaemonProcess(tmp_path / "held", backend="disk")
    (tmp_path / "held").mkdir()
    holder.start()
    try:
        port = busy.getsockname()[1]
        cases = {
            "port in use": (["--port", str(port)], f"cannot listen on tcp://127.0.0.1:{port}: "),
            "path is a file": (["--path", "afile"], "afile is a file, not a directory"),
            "socket is a file": (
                ["--unix", str(tmp_path / "afile")],
                "a file that is not a socket is in the way",
            ),
            "socket directory missing": (
                ["--unix", str(tmp_path / "no" / "s.sock")],
                "the socket's directory does not exist",
            ),
            "store locked": (
                ["--path", str(holder.store_path)],
                f"locked by another owner (pid {holder.process.pid})",
            ),
            "redis down": (
                ["--backend", "redis", "--url", dead_redis],
                f"Redis at redis://:***@127.0.0.1:{server.port}/0 is unreachable",
            ),
            "bad host": (
                ["--host", "no-such-host.invalid", "--token", "t"],
                "cannot resolve the host name",
            ),
            "metrics port in use": (
                ["--metrics-port", str(port)],
                f"cannot serve metrics on 127.0.0.1:{port} (--metrics-port): the address is in use",
            ),
        }
        argvs = [
            ["serve", "--port", "0", "--path", f"store-{i}", *argv]
            for i, (argv, _) in enumerate(cases.values())
        ]
        argvs.append(["serve", "--port", "0", "--path", "afile", "--debug"])
        results = run_verbs(*argvs, cwd=tmp_path)
    finally:
        holder.close()
        busy.close()
    for (case, (_, expected)), done in zip(cases.items(), results, strict=False):
        assert done.returncode == 1, (case, done.stderr)
        assert expected in one_error(done.stderr), (case, done.stderr)
        assert "s3cret-pw" not in done.stderr
    debug = results[-1]
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    # Bad settings are bad usage.
    done = run_verb("serve", "--port", "70000", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1


def test_health_needs_the_store_while_ping_needs_only_the_daemon(tmp_path: Path) -> None:
    redis = RedisServer()
    redis.start()
    d = DaemonProcess(tmp_path, backend="redis")
    d.args += ["--url", redis.url, "--prefix", unique_prefix()]
    d.start()
    try:
        assert run_verb("health", "--address", d.tcp).returncode == 0
        redis.stop()
        ping, health = run_verbs(
            ["ping", "--address", d.tcp], ["health", "--address", d.tcp, "--json"]
        )
        assert ping.returncode == 0 and ping.stdout.startswith("pong")
        assert health.returncode == 1
        assert f"Redis at {redis.url} is unreachable" in health.stderr
        assert json.loads(health.stdout)["error"] == "ServiceUnavailable"
        redis.start()  # the store reconnects by itself
        done = run_verb("health", "--address", d.tcp)
        assert done.returncode == 0 and done.stdout.startswith("ready: the redis store")
    finally:
        d.close()
        redis.stop()
    # Third-party chatter (coredis's reconnections) stayed out of the INFO log.
    assert " coredis" not in d.log()


async def redis_state(url: str, prefix: str) -> dict[bytes, bytes]:
    """Every key under ``prefix`` with its value (DUMP), to compare before and after."""
    async with coredis.Redis.from_url(url) as client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        return {key: await client.dump(key) for key in keys}


def test_offline_verbs_that_only_read_write_no_key(tmp_path: Path) -> None:
    url, prefix = find_redis(), unique_prefix()
    d = DaemonProcess(tmp_path, backend="redis")
    d.args += ["--url", url, "--prefix", prefix]
    d.start()
    with SyncClient(d.tcp) as c:
        sid = c.create({"user": "u1"})
    assert d.stop() == 0
    before = trio.run(redis_state, url, prefix)
    assert before  # the sessions, their indexes, the clock mark
    store = ["--backend", "redis", "--url", url, "--prefix", prefix, "--json"]
    results = run_verbs(
        ["list", *store],
        ["list", "--count-only", "--where", "user=u1", *store],
        ["inspect", sid, *store],
        ["stats", *store],
        ["check", *store],
        ["backup", str(tmp_path / "b.bak"), *store],
        ["delete-where", "user=u1", "--dry-run", *store],
        cwd=tmp_path,
    )
    assert [done.returncode for done in results] == [0] * len(results), results
    assert json.loads(results[1].stdout) == {"count": 1}
    assert trio.run(redis_state, url, prefix) == before
