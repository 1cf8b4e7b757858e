"""The service's figures for operators: what it was asked, how fast, what failed, how it copes.

One :class:`Metrics` belongs to a :class:`~workers.core.service.SessionService` (so it outlives
manager restarts) and is filled where things happen:

* every request, by the service's API methods (embedded) or the daemon (over the wire):
  a count per method, a latency histogram per method, and the errors by class;
* the manager: the size of each batch it runs, the requests it answered inline (a batch of
  one in the caller's task), its read cache's hits and misses, and the store's failures;
* the supervision tree (its ``on_event`` hook): restarts per child;
* the daemon's listener: what it refused before the service saw it (unknown methods, bad
  arguments), and its own figures (connections, refusals, failed authentications...), which
  it adds as a source (:meth:`Metrics.add_source`).

Recording is cheap on purpose, since it runs for every request: a dict lookup, a few integer
increments and one ``bisect`` into a fixed bucket list. Nothing is computed until someone asks:
:meth:`Metrics.snapshot` gives plain, JSON-ready figures (what ``stats()`` returns and what the
daemon exports to Prometheus), with latency percentiles estimated from the histogram buckets
the way Prometheus's ``histogram_quantile`` does.

Labels are bounded: method names come from the method table (anything else is counted under
``"unknown"``), error names from exception classes, child ids from the tree. Nothing a client
chooses freely becomes a label.

At ``DEBUG``, every recorded request is also logged as one line (method, duration, outcome;
never an argument or a metadata value): ``sessiond serve --log-level debug``.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections.abc import Callable, Hashable
from time import perf_counter
from typing import Any, Final

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the request latency buckets: 25 us to 10 s.
LATENCY_BUCKETS: Final = (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Upper bounds of the batch size buckets (requests per manager batch).
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: The method name requests for methods the table does not have are counted under.
UNKNOWN_METHOD: Final = "unknown"


class Histogram:
    """Observations counted in fixed buckets (upper bounds ``bounds``, then +Inf), and their sum."""

    __slots__ = ("bounds", "counts", "floor", "sum")

    def __init__(self, bounds: tuple[float, ...], floor: float = 0.0) -> None:
        self.bounds = bounds
        #: The least value there can be: the lower edge of the first bucket.
        self.floor = floor
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    @classmethod
    def from_dict(
        cls, figures: dict[str, Any], scale: float = 1.0, unit: str = "", floor: float = 0.0
    ) -> Histogram:
        """The histogram that :meth:`to_dict` described with ``scale`` and ``unit``."""
        rows = [(bound_value(label), n) for label, n in figures["buckets"].items()]
        histogram = cls(tuple(bound for bound, _ in rows[:-1]), floor)
        below = 0
        for i, (_, cumulative) in enumerate(rows):
            histogram.counts[i] = cumulative - below
            below = cumulative
        histogram.sum = figures[f"sum{unit}"] / scale
        return histogram

    def since(self, earlier: Histogram) -> Histogram:
        """What was observed after ``earlier`` (the same histogram, read before)."""
        delta = Histogram(self.bounds, self.floor)
        delta.counts = [max(a - b, 0) for a, b in zip(self.counts, earlier.counts, strict=True)]
        delta.sum = max(self.sum - earlier.sum, 0.0)
        return delta

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, ending with ``(inf, count)``."""
        total, rows = 0, []
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            rows.append((bound, total))
        return rows

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (0 to 1), interpolated within its bucket as Prometheus's
        ``histogram_quantile`` does; None before any observation. A quantile in the +Inf
        bucket is reported as the largest finite bound."""
        total = self.count
        if not total:
            return None
        rank = q * total
        lower = self.floor
        for bound, below in self.cumulative():
            if below >= rank:
                if math.isinf(bound):
                    return self.bounds[-1]
                bucket = self.counts[self.bounds.index(bound)]
                inside = rank - (below - bucket)
                return lower + (bound - lower) * (inside / bucket if bucket else 1.0)
            lower = bound
        return self.bounds[-1]  # not reached: the last row holds every observation

    def to_dict(self, scale: float = 1.0, unit: str = "") -> dict[str, Any]:
        """Count, sum, p50, p99 (times ``scale``, keys suffixed ``unit``) and the cumulative
        buckets keyed by their upper bound as Prometheus writes it (``"+Inf"`` last)."""
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        return {
            "count": self.count,
            f"sum{unit}": _round(self.sum * scale),
            f"p50{unit}": None if p50 is None else _round(p50 * scale),
            f"p99{unit}": None if p99 is None else _round(p99 * scale),
            "buckets": {_bound_label(b): n for b, n in self.cumulative()},
        }


class MethodFigures:
    """What one method was asked: requests, errors by class, and the latency of those timed."""

    __slots__ = ("count", "errors", "latency")

    def __init__(self) -> None:
        self.count = 0
        self.errors: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)


class Measurement:
    """``with metrics.measure(method):`` times the block and records it with its outcome.

    A block left by an ``Exception`` counts as an error of that class; one left by
    cancellation is timed and counted, not as an error (the caller gave up, nothing failed).
    """

    __slots__ = ("method", "metrics", "start")

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.metrics = metrics
        self.method = method

    def __enter__(self) -> Measurement:
        self.start = perf_counter()
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        self.metrics.observe(
            self.method,
            perf_counter() - self.start,
            None if exc is None or not isinstance(exc, Exception) else exc,
        )


class Metrics:
    """Every figure of one service; see the module docstring for who records what."""

    def __init__(self) -> None:
        self.methods: dict[str, MethodFigures] = {}
        self.batches = Histogram(BATCH_BUCKETS, floor=1)
        #: Requests the manager answered in the caller's task (a batch of one, no message).
        self.inline = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.store_errors: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self._sources: list[Callable[[], dict[str, Any]]] = []
        self._debug = log.isEnabledFor(logging.DEBUG)

    # -- recording (hot paths: keep these cheap) ---------------------------------------------

    def measure(self, method: str) -> Measurement:
        return Measurement(self, method)

    def observe(self, method: str, seconds: float, error: BaseException | None = None) -> None:
        """One request of ``method`` that took ``seconds``, failed with ``error`` or not."""
        figures = self.methods.get(method) or self._figures(method)
        figures.count += 1
        latency = figures.latency  # Histogram.observe, inlined: this runs for every request
        latency.counts[bisect_left(latency.bounds, seconds)] += 1
        latency.sum += seconds
        if error is not None:
            name = type(error).__name__
            figures.errors[name] = figures.errors.get(name, 0) + 1
        if self._debug:
            outcome = "ok" if error is None else type(error).__name__
            log.debug("request %s %.3f ms %s", method, seconds * 1000, outcome)

    def refused(self, method: str, error: BaseException) -> None:
        """A request refused before it was run (unknown method, bad arguments): counted with
        its error, not timed."""
        figures = self.methods.get(method) or self._figures(method)
        figures.count += 1
        name = type(error).__name__
        figures.errors[name] = figures.errors.get(name, 0) + 1
        if self._debug:
            log.debug("request %s refused %s", method, name)

    def _figures(self, method: str) -> MethodFigures:
        figures = self.methods[method] = MethodFigures()
        return figures

    def store_error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.store_errors[name] = self.store_errors.get(name, 0) + 1

    def add_source(self, figures: Callable[[], dict[str, Any]]) -> None:
        """Have :meth:`snapshot` include what ``figures()`` gives (plain values, computed
        when asked: e.g. the daemon's open connections)."""
        self._sources.append(figures)

    def child_event(self, kind: str, child_id: Hashable) -> None:
        """A supervision tree event (see ``supervisor.events``): restarts are counted."""
        if kind == "restart":
            child = str(child_id)
            self.restarts[child] = self.restarts.get(child, 0) + 1

    # -- reading ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every figure as plain values (JSON-ready); see ``SessionService.stats``."""
        errors: dict[str, int] = {}
        methods = {}
        for name, figures in sorted(self.methods.items()):
            for error, n in figures.errors.items():
                errors[error] = errors.get(error, 0) + n
            methods[name] = {
                "count": figures.count,
                "errors": dict(sorted(figures.errors.items())),
                "latency": figures.latency.to_dict(1000, "_ms"),
            }
        lookups = self.cache_hits + self.cache_misses
        figures: dict[str, Any] = {
            "requests": sum(f.count for f in self.methods.values()),
            "errors": dict(sorted(errors.items())),
            "methods": methods,
            "batches": {**self.batches.to_dict(), "inline": self.inline},
            "cache": {
                "hits": self.cache_hits,
                "misses": self.cache_misses,
                "hit_rate": _round(self.cache_hits / lookups) if lookups else None,
            },
            "store_errors": dict(sorted(self.store_errors.items())),
            "restarts_by_child": dict(sorted(self.restarts.items())),
        }
        for source in self._sources:
            figures.update(source())
        return figures


def _bound_label(bound: float) -> str:
    """An upper bound as Prometheus's ``le`` label writes it."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _round(value: float) -> float:
    """Figures to 6 significant digits: what a reader can use, not float noise."""
    return float(f"{value:.6g}")


def bound_value(label: str) -> float:
    """The upper bound written as ``label`` by :meth:`Histogram.to_dict` (the inverse)."""
    return math.inf if label == "+Inf" else float(label)
