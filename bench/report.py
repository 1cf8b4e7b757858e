"""Printing and saving benchmark records (the :mod:`bench.records` shape): one table, one summary.

Pure functions of the records, so every benchmark's standalone entry point and ``run.py bench``
print the same table, and the tests can check it without running a benchmark.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.records import Record

HEADER = (
    "benchmark", "rate / value", "floor", "floor rate / value", "ratio", "added", "target",
    "holds",
)  # fmt: skip
#: Which columns hold numbers, right-aligned; the others are names, left-aligned.
NUMERIC = (False, True, False, True, True, True, False, False)


def _number(value: float) -> str:
    """Whole numbers with thousands separators from 100 up; three significant digits below."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _amount(rate: float | None, value: float | None, unit: str | None) -> str:
    if rate is not None:
        return f"{rate:,.0f}/s"
    if value is not None:
        return f"{_number(value)} {unit}"
    return "-"


def added_text(record: Record) -> str:
    """The microseconds an operation takes beyond its floor's (``+12.3 us``), or ``-``."""
    added = record.get("added_us")
    return "-" if added is None else f"{added:+.1f} us"


def target_text(record: Record) -> str:
    """The target with its direction: ``">= 0.75"`` for a rate, ``"<= 2.0"`` for a cost."""
    if record["target"] is None:
        return "-"
    direction = "<=" if record.get("better") == "lower" else ">="
    return f"{direction} {float(record['target'])}"


def holds_text(record: Record) -> str:
    """``yes`` or ``no`` against the target; ``-`` for a record that is only reported."""
    return {True: "yes", False: "no", None: "-"}[record["holds"]]


def row(record: Record) -> tuple[str, ...]:
    """The table's cells for one record."""
    unit = record.get("unit")
    return (
        record["name"],
        _amount(record["ops_per_s"], record.get("value"), unit),
        record["floor_name"],
        _amount(record["floor_ops_per_s"], record.get("floor_value"), unit),
        f"{record['ratio']:.2f}",
        added_text(record),
        target_text(record),
        holds_text(record),
    )


def format_table(records: Sequence[Record]) -> str:
    """One line per record under a header, columns as wide as their widest cell."""
    rows = [HEADER, *(row(r) for r in records)]
    widths = [max(len(cells[i]) for cells in rows) for i in range(len(HEADER))]
    lines = [
        "  ".join(
            cell.rjust(width) if numeric else cell.ljust(width)
            for cell, width, numeric in zip(cells, widths, NUMERIC, strict=True)
        ).rstrip()
        for cells in rows
    ]
    return "\n".join(lines)


def summary(records: Sequence[Record]) -> str:
    """``"N of M targets hold"``, naming the records below their target."""
    judged = [r for r in records if r["target"] is not None]
    if not judged:
        return "no targets among these records"
    below = [r["name"] for r in judged if not r["holds"]]
    line = f"{len(judged) - len(below)} of {len(judged)} targets hold"
    return f"{line}; below: {', '.join(below)}" if below else line


def print_table(records: Sequence[Record]) -> None:
    """Print the table and the summary line: what every benchmark's entry point shows."""
    print(format_table(records))
    print(summary(records))


def write_json(records: Sequence[Record], path: Path) -> None:
    """Write the records as a JSON list, as they are (every key of :mod:`bench.records`)."""
    path.write_text(json.dumps(list(records), indent=2) + "\n", encoding="utf-8")


def count_command_line(
    doc: str, run: Callable[[int], Sequence[Record]], option: str, default: int, help: str
) -> None:
    """The standalone entry point of a benchmark whose one option is a count: parse it, run,
    print the table (``doc``'s first line is the description)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(option, type=int, default=default, help=help)
    print_table(run(getattr(parser.parse_args(), option.lstrip("-"))))
