"""argparse types: each refuses a bad value with a message naming it and what is allowed."""
from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (0 = no limit)."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return value


def positive_grid(what: str, example: str):
    """argparse type: comma-separated finite numbers > 0 (learning rates, taus); duplicates kept once."""
    def parse(text: str) -> list[float]:
        try:
            grid = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated {what} such as {example}, got {text!r}")
        if not grid or any(not math.isfinite(x) or x <= 0 for x in grid):
            raise argparse.ArgumentTypeError(f"{what} must be finite and > 0, got {text!r}")
        return list(dict.fromkeys(grid))
    return parse


lr_grid = positive_grid("learning rates", "1e-5,1e-4")
tau_grid = positive_grid("taus", "0.3,1")
