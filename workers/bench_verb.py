"""The ``bench`` verb: every benchmark in one table of ratios against its floor, with targets.

The benchmarks live in the repository's ``bench/`` directory (a namespace package next to
``run.py``), not in the installed package: they drive the daemon through the tests' helpers and
belong to a checkout. So this module only adds the verb, and imports ``bench.run`` when the verb
runs; where there is no ``bench`` to import it says so instead of failing with a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` verb."""
    parser = subparsers.add_parser(
        "bench",
        help="run every benchmark and print one table of ratios against their floors",
        description=(
            "Run the benchmarks (actor calls, embedded stores, daemon, scale), each next to a "
            "floor measured in the same run, and print one table with the issue's targets and "
            "whether each holds. Exit status 0 even when a target does not hold; nonzero on an "
            "error. Run it from a checkout of the repository: the benchmarks are in bench/."
        ),
    )
    add = parser.add_argument
    add("--json", type=Path, metavar="FILE", help="also write the records to FILE as JSON")
    add(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw throughput against concurrency (needs: pip install -e '.[plot]')",
    )
    add("--only", metavar="GROUPS", help="comma-separated from actor,sessions,daemon,scale")
    add("--quick", action="store_true", help="smaller op counts: a minute or two, noisier")
    parser.set_defaults(func=run_bench_verb)


def run_bench_verb(args: argparse.Namespace) -> int:
    """Run ``bench.run.main`` with the parsed options; 2 when ``bench`` cannot be imported."""
    try:
        runner = importlib.import_module("bench.run")
    except ModuleNotFoundError as e:
        if e.name not in ("bench", "bench.run"):
            raise
        print(
            "run.py bench: the benchmarks are not importable here. They live in the bench/ "
            "directory next to run.py in a checkout of the repository, which an installed copy "
            "does not have: run `python run.py bench` from the repository's top directory.",
            file=sys.stderr,
        )
        return 2
    return runner.main(args.only, args.quick, args.json, args.plot)
