"""Evaluation returns reports and writes no files: the method's measures (``FocusReport``), next-token
evaluation on text, classifier evaluation on images, and the ``evaluate`` metric (``evaluation.metric.load``).
"""
from .classifier import evaluate_classifier
from .next_token import evaluate_next_token
from .outcomes import CO_CO, CO_WR, CORRECT_AFTER, WR_CO, WR_OTHER, WR_SAME, outcome
from .report import FocusReport, exact_mcnemar, jsonable, markdown_table
from .windows import Window, scan, tokenize_stream, window_bounds

__all__ = ["evaluate_classifier", "evaluate_next_token", "CO_CO", "CO_WR", "CORRECT_AFTER", "WR_CO", "WR_OTHER",
           "WR_SAME", "outcome", "FocusReport", "exact_mcnemar", "jsonable", "markdown_table", "Window", "scan",
           "tokenize_stream", "window_bounds"]
