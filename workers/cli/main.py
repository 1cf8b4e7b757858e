"""The command line: ``python run.py VERB`` (and ``sessiond``, which defaults to ``serve``).

Each verb lives in the module that implements it; a module joins the command line by defining
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the
parsed arguments and returning the exit code (0 only on success).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

VERB_MODULES = (
    "workers.cli.demo",
    "workers.cli.serve",
    "workers.cli.admin",
    "workers.cli.migrate",
    "workers.cli.chaos",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessiond", description="A supervised, durable session service on Trio."
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERB_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def sessiond(argv: Sequence[str] | None = None) -> int:
    """The ``sessiond`` console script: ``serve`` unless another verb is named."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "serve")
    return main(argv)
