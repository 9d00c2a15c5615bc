"""The test: the chosen setting on the disjoint test split, and the verdict read from that report alone.

Every number is relative to the plain model ("off"), which costs nothing. Below ``MIN_TEST_TOKENS``
uncertain test tokens there is no verdict: the exact two-sided McNemar test needs at least 6
discordant pairs, all one way, to reach p < 0.05, and the steps we measured change 5-20 % of the
uncertain predictions, so on fewer than about 100 tokens even a step that only ever helps could
not be told from chance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..config import FocusConfig
from ..evaluation.group import Group
from ..evaluation.next_token import evaluate_next_token
from ..evaluation.report import FocusReport

MIN_TEST_TOKENS = 100
KINDS = ("helps", "harmful", "no significant gain", "not enough data")


def judge_on_test(model, tokenizer, texts: Sequence[str], config: FocusConfig, *, context_length: int = 128,
                  max_uncertain: int | None = None, prior: FocusReport | None = None, start_window: int = 0,
                  on_window: Callable[[int, FocusReport], None] | None = None,
                  progress: bool = False, group: Group | None = None) -> FocusReport:
    """``evaluate_next_token`` on the test split (its windows over ``group``'s processes), continuing ``prior``
    (windows before ``start_window``)."""
    left = None if max_uncertain is None else max_uncertain - (prior.n_uncertain if prior else 0)
    if prior is not None and left is not None and left <= 0:
        return prior

    def merged(w: int, so_far: FocusReport) -> None:
        if on_window is not None:
            on_window(w, prior.merge(so_far) if prior is not None else so_far)

    report = evaluate_next_token(model, tokenizer, texts, config, context_length=context_length,
                                 max_uncertain=left, progress=progress, name="test",
                                 start_window=start_window, on_window=merged, group=group)
    return prior.merge(report) if prior is not None else report


@dataclass(frozen=True)
class Verdict:
    """The answer read from the test report alone: ``kind`` is one of ``KINDS``."""

    kind: str
    line: str
    delta_acc: float
    p_value: float


def verdict(report: FocusReport, alpha: float = 0.05, min_tokens: int = MIN_TEST_TOKENS) -> Verdict:
    """"helps" when Δ_Corr > 0 with p < alpha, "harmful" when Δ_Corr < 0 with p < alpha, "not enough data"
    below ``min_tokens`` uncertain test tokens, else "no significant gain" (leave it off)."""
    p, n = report.p_value, report.n_uncertain
    acc = report.delta_acc if n else 0.0
    if n < min_tokens:
        return Verdict("not enough data", f"not enough data: {n} uncertain test tokens, fewer than the {min_tokens} a "
                       "verdict needs; use more text (or a larger threshold)", acc, p)
    where = f"on uncertain tokens (p = {p:.2g}, {n} test tokens)"
    if report.delta_corr > 0 and p < alpha:
        return Verdict("helps", f"helps: {acc:+.1f} points {where}", acc, p)
    if report.delta_corr < 0 and p < alpha:
        return Verdict("harmful", f"harmful: {acc:+.1f} points {where}: leave it off", acc, p)
    return Verdict("no significant gain", f"no significant gain: leave it off ({acc:+.1f} points {where})", acc, p)
