"""Argument types shared by the CLI's verbs: a bad value is argparse's one-line error, exit 2."""

from __future__ import annotations

import argparse
import math


def port(value: str) -> int:
    """A TCP port, 0..65535 (0: the system picks one)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is out of range (0..65535)")
    return number


def positive_seconds(value: str) -> float:
    """A duration in seconds, > 0 and finite (a deadline that has already passed is a mistake)."""
    return _seconds(value, zero_ok=False)


def non_negative_seconds(value: str) -> float:
    """A duration in seconds, >= 0 and finite (0: at once)."""
    return _seconds(value, zero_ok=True)


def _seconds(value: str, zero_ok: bool) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, e.g. 30, got {value!r}") from None
    if not ((seconds > 0 or (zero_ok and seconds == 0)) and math.isfinite(seconds)):
        what = "0 or a positive number" if zero_ok else "a positive number"
        raise argparse.ArgumentTypeError(f"must be {what} of seconds, got {value}")
    return seconds
