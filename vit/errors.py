"""The errors a user fixes in their configuration or command line, shown as one message."""

from __future__ import annotations

import argparse


class ConfigError(ValueError):
    """An option, a combination of options, or the data they point at cannot work.

    The message names the option (``--model.patch_size``, ``--data.root``, ...) and says what
    to set instead.
    """


def positive_int(value: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse names the option)."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def non_negative_int(value: str) -> int:
    """An argparse type: a whole number of at least 0 (argparse names the option)."""
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


def positive_float(value: str) -> float:
    """An argparse type: a number above 0."""
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {number}")
    return number


def divisors_text(number: int) -> str:
    """The divisors of ``number`` as "1, 2, 4, ...", for a message that asks to choose one."""
    return ", ".join(str(d) for d in range(1, number + 1) if number % d == 0)
