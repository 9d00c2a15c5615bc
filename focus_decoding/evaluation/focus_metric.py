"""`evaluate` metric for the method: accuracy change on the uncertain predictions, flips, exact McNemar p."""
import datasets
import evaluate

from focus_decoding.evaluation import FocusReport

_DESCRIPTION = """
Measures of "focus on the likely" test-time refinement: per prediction, the label, the unmodified
model's top-1 (`base_predictions`), the emitted top-1 after refinement (`focus_predictions`) and
whether the prediction was uncertain (gap p(top1)-p(top2) under the threshold, so it was refined).
Only uncertain predictions enter the accuracies; `n_total` counts all of them (|D|).
"""

_KWARGS_DESCRIPTION = """
Args:
    labels (list of int): true class / next token.
    base_predictions (list of int): top-1 of the unmodified model.
    focus_predictions (list of int): top-1 emitted after refinement (equal to base where not uncertain).
    uncertain (list of bool): the gate fired for this prediction.
Returns:
    n_total, n_uncertain, fraction_uncertain, base_accuracy, focus_accuracy (percent on the uncertain
    predictions), delta_acc (percentage points), delta_corr, wrong_to_correct, correct_to_wrong,
    wrong_to_other_wrong, flips (predictions whose top-1 changed), p_value (two-sided exact McNemar).
Examples:
    >>> from focus_decoding.evaluation.metric import load
    >>> metric = load()
    >>> out = metric.compute(labels=[1, 2, 3, 4], base_predictions=[1, 0, 3, 0],
    ...                      focus_predictions=[1, 2, 3, 5], uncertain=[True, True, False, True])
    >>> out["n_uncertain"], out["delta_corr"], out["flips"]
    (3, 1, 2)
"""

_CITATION = "Focus on the Likely: Test-time Instance-based Uncertainty Removal (the method's paper)."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FocusMetric(evaluate.Metric):
    """The method's measures, computed by `focus_decoding.evaluation.FocusReport`."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "labels": datasets.Value("int64"), "base_predictions": datasets.Value("int64"),
                "focus_predictions": datasets.Value("int64"), "uncertain": datasets.Value("bool"),
            }),
            license="MIT",
        )

    def _compute(self, labels, base_predictions, focus_predictions, uncertain):
        report = to_report(labels, base_predictions, focus_predictions, uncertain)
        keep = ("n_total", "n_uncertain", "fraction_uncertain", "base_accuracy", "focus_accuracy", "delta_acc",
                "delta_corr", "wrong_to_correct", "correct_to_wrong", "wrong_to_other_wrong", "p_value")
        out = {k: v for k, v in report.summary().items() if k in keep}
        # a flip = the emitted top-1 changed: wrong->correct, correct->wrong or wrong->other wrong
        out["flips"] = report.wrong_to_correct + report.correct_to_wrong + report.wrong_to_other_wrong
        return out


def to_report(labels, base_predictions, focus_predictions, uncertain) -> FocusReport:
    """A `FocusReport` holding these predictions (no top-k table: the metric sees no logits)."""
    import torch

    mask = torch.tensor(uncertain, dtype=torch.bool)
    report = FocusReport(n_total=len(labels))
    if mask.any():
        report.add_outcomes(torch.tensor(labels)[mask], torch.tensor(base_predictions)[mask],
                            torch.tensor(focus_predictions)[mask])
    return report
