"""The evaluate metric loads offline from the package and reports FocusReport's measures, checked by hand."""
import math
import random

import pytest
import torch

from conftest import need
from focus_decoding.evaluation.report import FocusReport


def hand_made():
    """Predictions with known counts: 5 wr->co, 2 co->wr, 3 co->co, 4 wr->same wr, 1 wr->other, 6 certain."""
    labels, base, focus, unc = [], [], [], []
    for kind, n in [("wc", 5), ("cw", 2), ("cc", 3), ("ws", 4), ("wo", 1), ("certain", 6)]:
        for _ in range(n):
            y = len(labels) + 10
            b = y if kind in ("cc", "cw", "certain") else y + 1
            f = {"wc": y, "cw": y + 2, "cc": y, "ws": b, "wo": y + 3, "certain": b}[kind]
            labels.append(y), base.append(b), focus.append(f), unc.append(kind != "certain")
    return labels, base, focus, unc


def test_report_measures_by_hand():
    labels, base, focus, unc = hand_made()
    mask = torch.tensor(unc)
    report = FocusReport(n_total=len(labels))
    report.add_outcomes(torch.tensor(labels)[mask], torch.tensor(base)[mask], torch.tensor(focus)[mask])
    assert (report.n_uncertain, report.wrong_to_correct, report.correct_to_wrong, report.wrong_to_other_wrong) == \
        (15, 5, 2, 1)
    assert report.base_accuracy == pytest.approx(100 * 5 / 15)  # cc + cw were right before
    assert report.focus_accuracy == pytest.approx(100 * 8 / 15)  # cc + wc are right after
    assert report.delta_corr == 3 and report.delta_acc == pytest.approx(20.0)
    assert report.fraction_uncertain == pytest.approx(15 / 21)
    # exact McNemar: two-sided binomial on 7 discordant pairs, min count 2
    explicit = min(1.0, 2 * sum(math.comb(7, i) for i in range(3)) / 2 ** 7)
    assert report.p_value == pytest.approx(explicit)
    # an independent implementation of the same exact test (scipy is in the test extra; never skipped under CI)
    scipy_stats = need("scipy.stats")
    assert report.p_value == pytest.approx(scipy_stats.binomtest(5, 7, 0.5).pvalue)


def test_metric_loads_and_computes_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from focus_decoding.evaluation.metric import METRIC_PATH, load

    assert METRIC_PATH.is_file()
    metric = load()
    labels, base, focus, unc = hand_made()
    out = metric.compute(labels=labels, base_predictions=base, focus_predictions=focus, uncertain=unc)
    assert out["n_total"] == 21 and out["n_uncertain"] == 15 and out["delta_corr"] == 3
    assert out["flips"] == 8  # 5 wr->co + 2 co->wr + 1 wr->other
    assert out["base_accuracy"] == pytest.approx(100 * 5 / 15) and out["focus_accuracy"] == pytest.approx(100 * 8 / 15)
    assert out["p_value"] == pytest.approx(min(1.0, 2 * sum(math.comb(7, i) for i in range(3)) / 2 ** 7))
    # batched add_batch gives the same as one compute
    rng = random.Random(0)
    order = list(range(len(labels)))
    rng.shuffle(order)
    for i in range(0, len(order), 4):
        idx = order[i:i + 4]
        metric.add_batch(labels=[labels[j] for j in idx], base_predictions=[base[j] for j in idx],
                         focus_predictions=[focus[j] for j in idx], uncertain=[unc[j] for j in idx])
    again = metric.compute()
    assert {k: again[k] for k in ("n_total", "n_uncertain", "delta_corr", "flips", "p_value")} == \
        {k: out[k] for k in ("n_total", "n_uncertain", "delta_corr", "flips", "p_value")}
