"""The metrics endpoint (``--metrics-port``): Prometheus text and readiness over plain HTTP.

In-process: a service with the endpoint as a child of its tree, scraped with urllib (a plain
HTTP client) on a worker thread. The daemon's own endpoint is scraped in
tests/cli/test_operating.py.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from supervisor import ChildSpec
from workers import StoreError, open_session_service
from workers.faults import FaultyStore
from workers.stores import make_store
from workers.wire.exposition import MetricsEndpoint, render


@asynccontextmanager
async def endpoint(**options: object) -> AsyncIterator[tuple[object, str]]:
    endpoints: list[MetricsEndpoint] = []

    def children(service: object) -> list[ChildSpec]:
        endpoints.append(MetricsEndpoint(service, "127.0.0.1", 0))
        return [ChildSpec("metrics", endpoints[-1].run)]

    async with open_session_service(extra_children=children, **options) as sessions:
        yield sessions, endpoints[-1].url


async def get(url: str, accept: str = "") -> tuple[int, str, str]:
    def fetch() -> tuple[int, str, str]:
        request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers["Content-Type"], response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()

    return await trio.to_thread.run_sync(fetch)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_counters_and_histograms_move_with_traffic() -> None:
    async with endpoint() as (sessions, url):
        status, content_type, first = await get(f"{url}/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        for _ in range(5):
            await sessions.retrieve(await sessions.create({"n": 1}))
        _, _, second = await get(f"{url}/metrics")
    before, after = samples(first), samples(second)
    create = ("sessiond_requests_total", (("method", "create"),))
    assert before.get(create, 0) == 0 and after[create] == 5
    timed = ("sessiond_request_duration_seconds_count", (("method", "retrieve"),))
    assert after[timed] == 5
    inf = ("sessiond_request_duration_seconds_bucket", (("le", "+Inf"), ("method", "retrieve")))
    assert after[inf] == 5
    assert after[("sessiond_sessions", ())] == 5
    assert after[("sessiond_child_running", (("child", "metrics"),))] == 1
    assert ("process_resident_memory_bytes", ()) in after


async def test_openmetrics_when_asked() -> None:
    async with endpoint() as (_, url):
        status, content_type, body = await get(f"{url}/metrics", "application/openmetrics-text")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


async def test_health_is_ready_only_while_the_store_answers(tmp_path: Path) -> None:
    store = FaultyStore(make_store("disk", path=str(tmp_path / "s")))
    async with endpoint(store=store) as (_, url):
        assert await get(f"{url}/health") == (200, "text/plain", "ready\n")
        store.fail("load_mark", StoreError("disk on fire"))
        status, _, body = await get(f"{url}/health")
        assert status == 503 and body == "not ready: StoreError: disk on fire\n"
        assert (await get(f"{url}/nothing"))[0] == 404


async def test_what_is_not_a_get_is_refused_and_a_huge_head_is_dropped() -> None:
    async with endpoint() as (_, url):
        host, port = url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await stream.receive_some(1000)).startswith(b"HTTP/1.1 405 ")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000)
        try:
            answer = await stream.receive_some(1000)
        except trio.BrokenResourceError:  # closed with our bytes unread: a reset
            answer = b""
        assert answer == b""  # nothing answered


def test_render_without_a_count_or_a_tree() -> None:
    async def figures() -> dict[str, object]:
        async with open_session_service() as sessions:
            return await sessions.metrics()

    body, _ = render(trio.run(figures))
    parsed = samples(body.decode())
    assert ("sessiond_sessions", ()) not in parsed
    assert parsed[("sessiond_info", (("backend", "memory"), ("version", "0.1.0")))] == 1
