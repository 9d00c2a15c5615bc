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


def bounded_float(inside, allowed: str):
    """argparse type: a number for which ``inside(value)`` holds (NaN never does), ``allowed`` naming the range."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isnan(value) or not inside(value):
            raise argparse.ArgumentTypeError(f"must be a number {allowed}, got {text!r}")
        return value
    return parse


open_fraction = bounded_float(lambda x: 0.0 < x < 1.0, "in (0, 1)")
at_least_one = bounded_float(lambda x: 1.0 <= x < math.inf, ">= 1")


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
