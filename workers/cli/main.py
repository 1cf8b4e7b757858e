"""The command line: ``sessiond VERB`` (``python -m workers VERB``, ``python run.py VERB``).

Each verb lives in the module that implements it; a module joins the command line by defining
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the
parsed arguments and returning the exit status: 0 success, 1 failure, 2 bad usage (argparse's
own). What every verb shares (one-line failures, ``--json`` errors, ``--debug``, progress bars,
a quiet end on a closed pipe) is in :mod:`workers.cli.output`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import workers

from .output import configure_verb_logging, debug_requested, quiet_broken_pipe, report_failure

VERB_MODULES = (
    "workers.cli.demo",
    "workers.cli.serve",
    "workers.cli.admin",
    "workers.cli.top",
    "workers.cli.migrate",
    "workers.cli.chaos",
)


class Parser(argparse.ArgumentParser):
    """argparse's parser, but bad usage is one line (and exit status 2, as argparse's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """``--version``: the version is read from the package metadata only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(f"sessiond {workers.__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sessiond", description="A supervised, durable session service on Trio.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in VERB_MODULES:
        importlib.import_module(name).register(subparsers)
    for verb in subparsers.choices.values():
        verb.add_argument(
            "--debug",
            action="store_true",
            help="show tracebacks and debug logs (also SESSIOND_DEBUG=1)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = debug_requested(args)
    if not getattr(args, "own_logging", False):
        configure_verb_logging(debug)
    try:
        status = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `sessiond list | head`: the reader has what it wanted
        quiet_broken_pipe()
        return 0
    except KeyboardInterrupt:
        print(f"{args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a verb's own failures are reported by the verb; this is a bug
        return report_failure(args.verb, exc, json_output=getattr(args, "json", False), debug=debug)
    return status


def sessiond(argv: Sequence[str] | None = None) -> int:
    """The ``sessiond`` console script: ``serve`` unless another verb is named."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    return main(argv)
