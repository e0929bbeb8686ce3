"""argparse types the command groups share: addresses to listen on or dial, positive counts
and day counts; each refuses a bad value with one line naming what it expected."""

from __future__ import annotations

import argparse

from ..errors import ControlPlaneError
from ..link.wire import split_address


def listen_address(text: str) -> str:
    """An argparse type: ``HOST:PORT`` to listen on (port 0: any free port)."""
    return _address(text, listening=True)


def dial_address(text: str) -> str:
    """An argparse type: ``HOST:PORT`` to connect to."""
    return _address(text, listening=False)


def _address(text: str, *, listening: bool) -> str:
    try:
        split_address(text, listening=listening)
    except ControlPlaneError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def positive_days(text: str) -> float:
    """An argparse type: a positive number of days (fractions allowed)."""
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not days > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of days")
    return days
