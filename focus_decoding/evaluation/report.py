"""`FocusReport`: the method's measures for one (model, data, config) run, text or images alike.

A report keeps one outcome code per uncertain prediction, so every measure (accuracy, flips,
the paired test, the spread over units) is derived, and reports from several processes or from
an interrupted run merge exactly by concatenation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from torch import Tensor

from ..config import FocusConfig
from .outcomes import CO_CO, CO_WR, WR_CO, WR_OTHER, WR_SAME, outcome  # noqa: F401 - WR_SAME: where 0.2 had the codes

TOPK_THRESHOLDS = (0.01, 0.04, 0.1, 1.0)  # the method's Figure 3 uses 0.01, 0.1 and 1.0
MAX_K = 5
METHOD_UNIT = 10_000  # the method reports spread over units of 10k predictions


@dataclass
class FocusReport:
    """Counts from one evaluation; see the properties for the method's measures."""

    name: str = ""
    n_total: int = 0  # predictions scored, |D|
    outcomes: str = ""  # one code per uncertain prediction (see CO_CO ...), in evaluation order
    nonfinite: int = 0  # refinements that overflowed; the unrefined prediction was kept
    topk_thresholds: list[float] = field(default_factory=lambda: list(TOPK_THRESHOLDS))
    topk_counts: list[int] = field(default_factory=lambda: [0] * len(TOPK_THRESHOLDS))
    topk_hits: list[list[int]] = field(default_factory=lambda: [[0] * MAX_K for _ in TOPK_THRESHOLDS])
    seconds: float = 0.0  # wall time spent
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ accumulate
    def add_predictions(self, logits: Tensor, labels: Tensor, gap: Tensor) -> None:
        """Count |D| and the top-k table for unmodified ``logits`` [N, C] with ``labels`` [N]; ``gap`` [N] is
        each prediction's p(top1) - p(top2) (``method.top2_gap``: the caller's, a report computes nothing of the method)."""
        k = min(MAX_K, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit_at = (top == labels[:, None]).int().cumsum(-1).clamp(max=1)  # [N, k]: label within top-j
        self.n_total += int(labels.numel())
        for i, t in enumerate(self.topk_thresholds):
            mask = gap < t
            self.topk_counts[i] += int(mask.sum())
            sums = hit_at[mask].sum(0).tolist() if mask.any() else [0] * k
            for j in range(k):
                self.topk_hits[i][j] += int(sums[j])

    def add_outcomes(self, labels: Tensor, base_pred: Tensor, focus_pred: Tensor) -> None:
        """Record the uncertain predictions: label, unmodified and refined top-1, each [M]."""
        self.outcomes += "".join(outcome(y, b, f) for y, b, f in zip(labels.tolist(), base_pred.tolist(),
                                                                     focus_pred.tolist()))

    def merge(self, other: "FocusReport") -> "FocusReport":
        """This report followed by ``other`` (same config): counts add, outcomes concatenate."""
        if other.topk_thresholds != self.topk_thresholds:
            raise ValueError("cannot merge reports with different top-k thresholds")
        return FocusReport(
            name=self.name or other.name, n_total=self.n_total + other.n_total,
            outcomes=self.outcomes + other.outcomes, nonfinite=self.nonfinite + other.nonfinite,
            topk_thresholds=list(self.topk_thresholds),
            topk_counts=[a + b for a, b in zip(self.topk_counts, other.topk_counts)],
            topk_hits=[[a + b for a, b in zip(x, y)] for x, y in zip(self.topk_hits, other.topk_hits)],
            seconds=self.seconds + other.seconds, config=self.config or other.config,
            meta={**other.meta, **self.meta},
        )

    # ------------------------------------------------------------------ measures
    @property
    def n_uncertain(self) -> int:
        """|D_te,1,2|: predictions under the threshold."""
        return len(self.outcomes)

    @property
    def fraction_uncertain(self) -> float:
        return self.n_uncertain / self.n_total if self.n_total else 0.0

    def count(self, code: str) -> int:
        return self.outcomes.count(code)

    @property
    def wrong_to_correct(self) -> int:
        return self.count(WR_CO)

    @property
    def correct_to_wrong(self) -> int:
        return self.count(CO_WR)

    @property
    def wrong_to_other_wrong(self) -> int:
        return self.count(WR_OTHER)

    @property
    def base_correct(self) -> int:
        return self.count(CO_CO) + self.count(CO_WR)

    @property
    def focus_correct(self) -> int:
        return self.count(CO_CO) + self.count(WR_CO)

    @property
    def base_accuracy(self) -> float:
        """Accuracy (%) of the unmodified model on the uncertain predictions."""
        return 100.0 * self.base_correct / self.n_uncertain if self.n_uncertain else float("nan")

    @property
    def focus_accuracy(self) -> float:
        """Accuracy (%) of the refined model on the uncertain predictions."""
        return 100.0 * self.focus_correct / self.n_uncertain if self.n_uncertain else float("nan")

    @property
    def delta_corr(self) -> int:
        """Δ_Corr: correct predictions gained (wrong→correct minus correct→wrong)."""
        return self.wrong_to_correct - self.correct_to_wrong

    @property
    def delta_acc(self) -> float:
        """Δ_Acc in percentage points on the uncertain predictions."""
        return 100.0 * self.delta_corr / self.n_uncertain if self.n_uncertain else float("nan")

    @property
    def p_value(self) -> float:
        """Two-sided exact McNemar test (binomial on the flips wr→co vs co→wr)."""
        return exact_mcnemar(self.wrong_to_correct, self.correct_to_wrong)

    @property
    def unit_size(self) -> int:
        """10,000 as in the method; a tenth of the uncertain predictions when there are fewer than 20k."""
        n = self.n_uncertain
        return METHOD_UNIT if n >= 2 * METHOD_UNIT else max(1, n // 10)

    @property
    def unit_delta_corr(self) -> list[int]:
        """Δ_Corr of each full unit of ``unit_size`` consecutive uncertain predictions."""
        u = self.unit_size
        chunks = [self.outcomes[i:i + u] for i in range(0, len(self.outcomes) - u + 1, u)]
        return [c.count(WR_CO) - c.count(CO_WR) for c in chunks]

    @property
    def delta_corr_std(self) -> float:
        """Standard deviation of Δ_Corr over units (nan with fewer than two units)."""
        units = self.unit_delta_corr
        if len(units) < 2:
            return float("nan")
        mean = sum(units) / len(units)
        return math.sqrt(sum((x - mean) ** 2 for x in units) / (len(units) - 1))

    @property
    def step_label(self) -> str:
        """The step of the report's config (``FocusConfig.step_size_label``); empty without a config."""
        return FocusConfig.from_dict(self.config).step_size_label if self.config else ""

    def topk_accuracy(self, threshold: float) -> list[float]:
        """Top-k accuracy (%), k = 1..5, of the unmodified model on predictions with gap < threshold."""
        i = self.topk_thresholds.index(threshold)
        n = self.topk_counts[i]
        return [100.0 * h / n if n else float("nan") for h in self.topk_hits[i]]

    # ------------------------------------------------------------------ io
    def summary(self) -> dict[str, Any]:
        """Every measure as a flat JSON-able dict (no outcome string)."""
        return {
            "name": self.name, "n_total": self.n_total, "n_uncertain": self.n_uncertain,
            "fraction_uncertain": self.fraction_uncertain, "base_accuracy": self.base_accuracy,
            "focus_accuracy": self.focus_accuracy, "delta_acc": self.delta_acc, "delta_corr": self.delta_corr,
            "wrong_to_correct": self.wrong_to_correct, "correct_to_wrong": self.correct_to_wrong,
            "wrong_to_other_wrong": self.wrong_to_other_wrong, "nonfinite": self.nonfinite,
            "p_value": self.p_value, "unit_size": self.unit_size, "unit_delta_corr": self.unit_delta_corr,
            "delta_corr_std": self.delta_corr_std,
            "topk_accuracy": {str(t): self.topk_accuracy(t) for t in self.topk_thresholds},
            "seconds": self.seconds, "config": self.config, "meta": self.meta,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FocusReport":
        return cls(**dict(data))


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact binomial p-value for b vs c discordant pairs (1.0 when b + c == 0)."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                 for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2.0 * tail)


def jsonable(x: Any) -> Any:
    """``x`` with NaN/inf floats written as None: JSON has no NaN, and every reader must load our files."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def markdown_table(reports: Sequence[FocusReport]) -> str:
    """The method's table layout: data set, model, fraction uncertain, |D_te,1,2|, step, accuracies, Δ, p."""
    rows = ["| data set | model | uncertain % | n uncertain | step | base acc % | focus acc % | Δ acc (pp) | Δ corr | p-value |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        rows.append(
            f"| {r.meta.get('dataset', '')} | {r.meta.get('model', r.name)} | {100 * r.fraction_uncertain:.1f} | "
            f"{r.n_uncertain} | {r.step_label} | {r.base_accuracy:.2f} | "
            f"{r.focus_accuracy:.2f} | {r.delta_acc:+.2f} | {r.delta_corr:+d} | {r.p_value:.3g} |")
    return "\n".join(rows)
