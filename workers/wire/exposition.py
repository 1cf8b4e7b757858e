"""The daemon's figures over HTTP, for Prometheus and for health probes (``--metrics-port``).

::

    GET /metrics    the figures of ``stats()`` in the Prometheus text format (OpenMetrics when
                    the scraper asks for it), plus the process's own (memory, CPU, open files)
    GET /health     200 "ready" once the manager runs and the store answers a read; 503 and
                    the reason otherwise (a readiness probe: see ``SessionService.health``)

The format is written by ``prometheus-client`` (its metric families and its encoder: escaping,
number formatting and content negotiation follow the specification exactly). The figures
themselves are the service's own (:mod:`workers.core.metrics`), taken on the Trio thread when
a scrape arrives, so that recording a request stays a few integer increments: no lock, no
registry on the hot path.

The endpoint is a child of the service tree, like the listener: it starts once the store is
open, and a port in use fails the start. It answers one request per connection and closes
it; what it reads is bounded (a request head of at most ``MAX_HEAD`` bytes within
``REQUEST_TIMEOUT`` seconds, no body) and so is the number of connections it serves at once.
It needs no token: it shows counts and timings, never a session or its metadata. It listens on
loopback unless told otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import trio
from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from ..core.service import SessionService
from ..record.errors import SessionError
from .address import Address

log = logging.getLogger(__name__)

#: Bytes of a request head the endpoint reads at most, and seconds it waits for them.
MAX_HEAD = 8192
REQUEST_TIMEOUT = 5.0
#: Connections served at once; more are closed at once.
MAX_CONNECTIONS = 32
#: Every metric's name starts with this.
NAMESPACE = "sessiond"
#: The process's own metrics (made once: its constructor reads /proc/stat for the boot time).
_PROCESS = ProcessCollector(registry=None)


def families(figures: dict[str, Any], tree: dict[str, Any] | None = None) -> Iterator[Metric]:
    """Prometheus metric families for ``figures`` (what ``stats()`` gives) and ``tree``."""
    ns = NAMESPACE
    info = GaugeMetricFamily(
        f"{ns}_info", "The daemon's version and backend.", labels=["version", "backend"]
    )
    info.add_metric([str(figures["version"]), str(figures["backend"])], 1)
    yield info
    if "sessions" in figures:
        yield GaugeMetricFamily(f"{ns}_sessions", "Live sessions.", figures["sessions"])
    yield GaugeMetricFamily(
        f"{ns}_uptime_seconds", "Seconds since the service started.", figures["uptime_s"]
    )

    requests = CounterMetricFamily(f"{ns}_requests", "Requests by method.", labels=["method"])
    errors = CounterMetricFamily(
        f"{ns}_request_errors", "Failed requests by method and error.", labels=["method", "error"]
    )
    latency = HistogramMetricFamily(
        f"{ns}_request_duration_seconds",
        "How long requests took, by method.",
        labels=["method"],
        unit="",
    )
    for method, m in figures["methods"].items():
        requests.add_metric([method], m["count"])
        for error, n in m["errors"].items():
            errors.add_metric([method, error], n)
        timed = m["latency"]
        latency.add_metric([method], _buckets(timed), timed["sum_ms"] / 1000)
    yield from (requests, errors, latency)

    batches = figures["batches"]
    batch = HistogramMetricFamily(
        f"{ns}_batch_size", "Requests per batch the manager ran (one store transaction)."
    )
    batch.add_metric([], _buckets(batches), batches["sum"])
    yield batch
    yield CounterMetricFamily(
        f"{ns}_inline_answers",
        "Requests the manager answered in the caller's task, with no store I/O.",
        batches["inline"],
    )
    cache = figures["cache"]
    yield CounterMetricFamily(f"{ns}_cache_hits", "Sessions read from the cache.", cache["hits"])
    yield CounterMetricFamily(
        f"{ns}_cache_misses", "Sessions the cache did not hold.", cache["misses"]
    )
    yield _labelled_counter(
        f"{ns}_store_errors", "Store failures by error.", "error", figures["store_errors"]
    )
    if "store_warnings" in figures:
        yield CounterMetricFamily(
            f"{ns}_store_warnings",
            "Reads answered although the store refused to write their access time.",
            figures["store_warnings"],
        )
    yield _labelled_counter(
        f"{ns}_restarts", "Restarts by child of the tree.", "child", figures["restarts_by_child"]
    )
    if figures.get("mailbox") is not None:
        yield GaugeMetricFamily(
            f"{ns}_manager_mailbox_messages",
            "Messages waiting in the session manager's mailbox.",
            figures["mailbox"],
        )
    if tree is not None:
        running = GaugeMetricFamily(
            f"{ns}_child_running", "1 while a child of the tree runs.", labels=["child"]
        )
        for child in tree["children"]:
            running.add_metric([child["id"]], 1 if child["running"] else 0)
        yield running
    if "connections" in figures:  # the daemon's own figures
        yield from _daemon_families(figures)


def _daemon_families(figures: dict[str, Any]) -> Iterator[Metric]:
    ns = NAMESPACE
    for name, doc in (
        ("connections", "Open client connections."),
        ("unauthenticated", "Connections that have not authenticated yet."),
        ("buffered_bytes", "Bytes held for messages in progress."),
    ):
        yield GaugeMetricFamily(f"{ns}_{name}", doc, figures[name])
    for name, doc in (
        ("connections_accepted", "Client connections accepted."),
        ("connections_refused", "Connections refused (too many, shutting down, no descriptors)."),
        ("connections_evicted", "Unauthenticated connections closed for newer ones."),
        ("auth_failures", "Authentications refused (a wrong or missing token)."),
        ("timeouts", "Connections closed for taking too long (auth, a message)."),
        ("invalid_messages", "Invalid messages received."),
    ):
        yield CounterMetricFamily(f"{ns}_{name}", doc, figures[name])


def _buckets(histogram: dict[str, Any]) -> list[tuple[str, float]]:
    return list(histogram["buckets"].items())


def _labelled_counter(name: str, doc: str, label: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in counts.items():
        family.add_metric([value], n)
    return family


class _Families:
    """What ``prometheus_client``'s encoder reads: ``collect()`` over the given families."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = list(metrics)

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def render(
    figures: dict[str, Any], tree: dict[str, Any] | None = None, accept: str = ""
) -> tuple[bytes, str]:
    """The exposition of ``figures`` (and the process's own metrics) in the format ``accept``
    (an HTTP Accept header) asks for; the body and its content type."""
    encoder, content_type = choose_encoder(accept)
    process = _PROCESS.collect()
    return encoder(_Families([*families(figures, tree), *process])), content_type


class MetricsEndpoint:
    """``GET /metrics`` and ``GET /health`` for ``service`` on ``host:port`` (see the module).

    Run :meth:`run` as a child of the service tree; ``task_status`` gets the bound URL.
    """

    def __init__(self, service: SessionService, host: str, port: int) -> None:
        self.service = service
        self.address = Address("tcp", host=host, port=port)
        self._serving = 0

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.address.port, host=self.address.host)
        host, port = listeners[0].socket.getsockname()[:2]
        url = "http" + str(Address("tcp", host=host, port=port))[len("tcp") :]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            #: Where it listens, once it does (``http://HOST:PORT``).
            self.url = url
            log.info("metrics on %s/metrics, readiness on %s/health", url, url)
            task_status.started(url)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._serving >= MAX_CONNECTIONS:
                return
            self._serving += 1
            try:
                head = b""
                with trio.move_on_after(REQUEST_TIMEOUT):
                    head = await _read_head(stream)
                if head:
                    await stream.send_all(await self._respond(head))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away
            finally:
                self._serving -= 1

    async def _respond(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, "text/plain", b"bad request\n")
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return _response(405, "text/plain", b"only GET\n", method == "HEAD")
        if target == "/metrics":
            accept = _header(lines, "accept")
            figures = await self.service.stats()
            tree = await self.service.tree()
            body, content_type = render(figures, tree, accept)
            return _response(200, content_type, body, method == "HEAD")
        if target == "/health":
            try:
                await self.service.health()
            except SessionError as exc:
                reason = f"not ready: {type(exc).__name__}: {exc}\n".encode()
                return _response(503, "text/plain", reason, method == "HEAD")
            return _response(200, "text/plain", b"ready\n", method == "HEAD")
        return _response(404, "text/plain", b"not found: try /metrics or /health\n")


def _header(lines: list[str], name: str) -> str:
    """The value of header ``name`` among the head's ``lines`` ("" when absent)."""
    prefix = f"{name}:"
    for line in lines[1:]:
        if line.lower().startswith(prefix):
            return line[len(prefix) :].strip()
    return ""


async def _read_head(stream: trio.SocketStream) -> bytes:
    """The request head (up to the blank line), or b"" if it is cut or above MAX_HEAD."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            return b""
        chunk = await stream.receive_some(MAX_HEAD)
        if not chunk:
            return b""
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip


def _response(status: int, content_type: str, body: bytes, head_only: bool = False) -> bytes:
    headers = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return headers.encode("latin-1") + (b"" if head_only else body)
