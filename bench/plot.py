"""Throughput against concurrency, drawn from benchmark records to a PNG (``run.py bench --plot``).

Two panels, create and retrieve: the embedded memory and disk stores and the daemon as solid
lines, each with its floor dashed in the same colour (the bare channel request/reply, raw
diskcache's sequential loop, redis-server under ``redis-benchmark``). A floor measured once,
with no concurrency of its own, is drawn flat across the panel.

matplotlib is an optional extra (``pip install -e '.[plot]'``); :func:`require_matplotlib`
says so before anything is measured, and only :func:`draw` imports it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.records import Record

INSTALL_HINT = "pip install -e '.[plot]'"
PANELS = ("create", "retrieve")
#: How the legend names each product: in process, or a daemon over TCP.
PRODUCTS = {
    "memory": "memory, embedded",
    "disk": "disk, embedded",
    "daemon": "daemon over TCP (disk)",
}
#: The records plotted: "memory create x50", "daemon retrieve c=50", ...
_PLOTTED = re.compile(r"(?P<who>memory|disk|daemon) (?P<op>create|retrieve) (?:x|c=)(?P<n>\d+)")
#: A floor measured at a concurrency of its own: "channel request/reply x50", "redis SET c=50".
_AT_LEVEL = re.compile(r"(?P<label>.+) (?:x|c=)(?P<n>\d+)")


class PlotUnavailable(RuntimeError):
    """``--plot`` was asked for but matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailable`, naming the extra to install, if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise PlotUnavailable(f"--plot needs matplotlib, an optional extra: {INSTALL_HINT}") from e


@dataclass
class Line:
    """One line of a panel: ops/s by concurrency (key None: a floor without a concurrency)."""

    label: str
    floor: bool
    colour: int
    points: dict[int | None, float] = field(default_factory=dict)


def lines(records: Sequence[Record]) -> dict[str, list[Line]]:
    """The lines of each panel, products before floors, a floor coloured as its first product."""
    panels: dict[str, dict[str, Line]] = {op: {} for op in PANELS}
    floors: dict[str, dict[str, Line]] = {op: {} for op in PANELS}
    colours: dict[str, int] = {}
    for r in records:
        match = _PLOTTED.fullmatch(r["name"])
        if match is None:
            continue
        who, op, n = match["who"], match["op"], int(match["n"])
        colour = colours.setdefault(who, len(colours))
        panels[op].setdefault(who, Line(PRODUCTS[who], False, colour)).points[n] = r["ops_per_s"]
        at_level = _AT_LEVEL.fullmatch(r["floor_name"])
        label, level = (
            (at_level["label"], int(at_level["n"])) if at_level else (r["floor_name"], None)
        )
        floors[op].setdefault(label, Line(label, True, colour)).points[level] = r["floor_ops_per_s"]
    return {op: [*panels[op].values(), *floors[op].values()] for op in PANELS}


def draw(records: Sequence[Record], path: Path) -> None:
    """Write the two panels to ``path`` (PNG) with matplotlib's Agg backend: no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(13, 6.5), sharey=True)
    panels = lines(records)
    for ax, op in zip(axes, PANELS, strict=True):
        levels = sorted({n for line in panels[op] for n in line.points if n is not None})
        for line in panels[op]:
            style = {
                "color": colours[line.colour % len(colours)],
                "linestyle": "--" if line.floor else "-",
                "label": f"{line.label} (floor)" if line.floor else line.label,
            }
            if None in line.points:
                ax.axhline(line.points[None], linewidth=1.2, **style)
            else:
                xs = sorted(n for n in line.points if n is not None)
                ys = [line.points[n] for n in xs]
                ax.plot(xs, ys, marker="." if line.floor else "o", **style)
        ax.set_xscale("log")
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("concurrent callers / connections")
        ax.grid(True, alpha=0.3)
        # Below the panel, so that no line is hidden behind it.
        ax.legend(fontsize="small", ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    axes[0].set_ylabel("operations per second")
    figure.suptitle("Throughput against concurrency (solid: product, dashed: its floor)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
