"""The method's measures as an `evaluate` metric, loaded from this package (no hub access).

Example:
    >>> from focus_decoding.evaluation.metric import load
    >>> load().compute(labels=[1, 2], base_predictions=[0, 2], focus_predictions=[1, 2],
    ...                uncertain=[True, True])["delta_corr"]
    1
"""
from __future__ import annotations

from pathlib import Path

METRIC_PATH = Path(__file__).with_name("focus_metric.py")  # the script evaluate.load copies and runs


def load(**kwargs):
    """``evaluate.load`` of the bundled ``focus_metric.py``; kwargs go to ``evaluate.load``."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), **kwargs)
