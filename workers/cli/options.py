"""Argument types and options the verbs share. A malformed value is argparse's usage error
(exit status 2), named with the option, before anything runs."""

from __future__ import annotations

import argparse
import math

from ..wire.address import parse_address


def address(text: str) -> str:
    """A daemon address, ``tcp://HOST:PORT`` or ``unix:///abs/path``, checked."""
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A duration in seconds: a finite number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A duration in seconds above 0."""
    value = seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds above 0, got {text!r}")
    return value
