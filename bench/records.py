"""The one shape every benchmark reports in, so that ``run.py bench`` can print and save them all.

A record is a plain dict (it goes to JSON as is) with these keys, always present:

=================  ===========================================================================
name               what was measured, e.g. ``"disk retrieve x50"``
ops_per_s          the product's rate, or None for a measurement that is not a rate
floor_name         what it is compared with, e.g. ``"raw diskcache get"``
floor_ops_per_s    the floor's rate in the same run, or None
ratio              product / floor (for a rate), or value / floor_value (for a measurement)
target             the ratio the issue asks for, or None when the record is only reported
holds              whether ``ratio`` meets ``target`` in the record's direction; None without one
=================  ===========================================================================

A rate measured with one caller may also have ``added_us``: the microseconds each operation
takes beyond its floor's (service latency minus floor latency), which is what a lone caller
pays for the service. A measurement that is not a rate (seconds to open, megabytes resident,
milliseconds of p99 latency) also has ``value``, ``floor_value`` (None when it is judged
against a fixed limit instead of a floor), ``unit`` and ``better`` (``"lower"``); a limit such
as "opens in under a second" is written as a floor of 1 s with a target ratio of 1.0.
"""

from __future__ import annotations

from typing import Any

Record = dict[str, Any]


def throughput(
    name: str,
    ops_per_s: float,
    floor_name: str,
    floor_ops_per_s: float,
    target: float | None = None,
    *,
    added_us: bool = False,
) -> Record:
    """A rate next to its floor's rate; higher is better, so it holds when ratio >= target.

    ``added_us=True`` (one caller: the rate is one over the latency) also records how many
    microseconds an operation takes beyond the floor's.
    """
    ratio = ops_per_s / floor_ops_per_s
    extra = {"added_us": 1e6 / ops_per_s - 1e6 / floor_ops_per_s} if added_us else {}
    return {
        "name": name,
        "ops_per_s": ops_per_s,
        "floor_name": floor_name,
        "floor_ops_per_s": floor_ops_per_s,
        "ratio": ratio,
        "target": target,
        "holds": None if target is None else ratio >= target,
        **extra,
    }


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (0 to 1) of ``ordered``, a sorted list that is not empty."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def requests_at(callers: int, requests: int) -> int:
    """Requests per measurement: a quarter of them with one caller, which is slow."""
    return requests if callers > 1 else requests // 4


def measurement(
    name: str,
    value: float,
    unit: str,
    floor_name: str,
    floor_value: float,
    target: float | None = None,
) -> Record:
    """A cost (time, memory, latency) next to its floor or limit; lower is better.

    It holds when ``value / floor_value <= target``: "at most twice a plain dict" is
    ``floor_value=dict_mb, target=2.0``; "under 150 MB" is ``floor_value=150, target=1.0``.
    """
    ratio = value / floor_value
    return {
        "name": name,
        "ops_per_s": None,
        "floor_name": floor_name,
        "floor_ops_per_s": None,
        "ratio": ratio,
        "target": target,
        "holds": None if target is None else ratio <= target,
        "value": value,
        "floor_value": floor_value,
        "unit": unit,
        "better": "lower",
    }
