"""Latency against concurrency, per store and its raw floor, to a PNG (``run.py bench --plot``).

One panel per operation (create, retrieve, update). Each store is a solid line: the latency a
caller sees with 1, 4, 16 and 50 concurrent callers (callers over operations per second, in
microseconds); its floor is dashed in the same colour: the raw library doing the same work
one operation at a time (a floor measured with no concurrency of its own is drawn flat), or
for the memory store the bare channel request/reply at the same concurrency. A store whose
line meets its floor adds nothing to its library; at 50 callers a store below its floor
answers faster than one caller alone could (group commit).

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
PANELS = ("create", "retrieve", "update")
#: The stores drawn, in this order (the legend's and the colours').
STORES = ("memory", "disk", "lmdb", "redis")
#: The records plotted: "memory create x50", "lmdb retrieve x4", ...
_PLOTTED = re.compile(r"(?P<who>memory|disk|lmdb|redis) (?P<op>create|retrieve|update) x(?P<n>\d+)")
#: A floor measured at a concurrency of its own: "channel request/reply x50".
_AT_LEVEL = re.compile(r"(?P<label>.+) x(?P<n>\d+)")


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
    """One line of a panel: latency in us by concurrency (key None: a floor without one)."""

    label: str
    floor: bool
    colour: int
    points: dict[int | None, float] = field(default_factory=dict)


def latency_us(ops_per_s: float, callers: int) -> float:
    """What each of ``callers`` waits per operation when together they do ``ops_per_s``."""
    return callers / ops_per_s * 1e6


def lines(records: Sequence[Record]) -> dict[str, list[Line]]:
    """The lines of each panel: per store, its latency, then its floor's (same colour).

    Only the records of the stores' own floors are drawn (a raw library, the channel): a
    record against another floor (Erlang DETS, say) is left out.
    """
    panels: dict[str, dict[tuple[str, bool], Line]] = {op: {} for op in PANELS}
    for r in records:
        match = _PLOTTED.fullmatch(r["name"])
        if match is None or r["ops_per_s"] is None:
            continue
        floor_name = r["floor_name"]
        if not (floor_name.startswith("raw ") or floor_name.startswith("channel ")):
            continue
        who, op, n = match["who"], match["op"], int(match["n"])
        colour = STORES.index(who)
        at_level = _AT_LEVEL.fullmatch(floor_name)
        if at_level is not None and floor_name.startswith("channel "):
            label, level = at_level["label"], int(at_level["n"])
        else:
            label, level = floor_name, None
        mine = panels[op].setdefault((who, False), Line(who, False, colour))
        mine.points[n] = latency_us(r["ops_per_s"], n)
        floor = panels[op].setdefault((who, True), Line(f"{who}: {label}", True, colour))
        floor.points[level] = latency_us(r["floor_ops_per_s"], 1 if level is None else level)
    return {
        op: [line for key, line in sorted(panel.items(), key=_order)]
        for op, panel in panels.items()
    }


def _order(item: tuple[tuple[str, bool], Line]) -> tuple[int, bool]:
    (who, floor), _ = item
    return STORES.index(who), floor


def draw(records: Sequence[Record], path: Path) -> None:
    """Write the panels to ``path`` (PNG) with matplotlib's Agg backend: no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(16, 6.5), sharey=True)
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
        if levels:
            ax.set_xticks(levels, [str(n) for n in levels])
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("concurrent callers")
        ax.grid(True, alpha=0.3)
        # Below the panel, so that no line is hidden behind it.
        ax.legend(fontsize="small", ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    axes[0].set_ylabel("latency per operation (us)")
    figure.suptitle("Latency against concurrency (solid: the store, dashed: its floor)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
