"""The paper's experiments on a tiny model: JSON fields, and each shortcut against the plain evaluation."""
import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from focus_decoding import method
from focus_decoding.evaluation import next_token as eval_text
from focus_decoding.cli.common import load_model
from focus_decoding.config import FocusConfig

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs."]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


exp = _load("experiments")
table = _load("table")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def assert_untouched(model, before):
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters()) and not model.training


def test_topk_json_has_every_threshold_and_is_monotone_in_k(tiny, tmp_path):
    model, tok = tiny
    out = exp.exp_topk(model, tok, TEXTS, context_length=8, max_tokens=40, out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "exp_topk.json").read_text())
    assert (tmp_path / "exp_topk.png").stat().st_size > 0
    assert set(saved["topk_accuracy"]) == {"0.01", "0.1", "1.0"} and saved["n_total"] == 40
    assert {"versions", "seed", "device", "date"} <= set(saved["meta"]) and saved["config"]["threshold"] > 0
    for accs in out["topk_accuracy"].values():
        finite = [a for a in accs if a == a]
        assert finite == sorted(finite)
    assert saved["n_below_threshold"]["1.0"] == 40  # every prediction has a gap below 1


def test_threshold_sweep_equals_one_evaluation_per_threshold(tiny, tmp_path):
    model, tok = tiny
    config = FocusConfig(lr=30.0)
    thresholds = (0.003, 0.01)
    reports = exp.threshold_reports(model, tok, TEXTS, config, thresholds, context_length=8, max_tokens=16,
                                    progress=False)
    for t in thresholds:
        plain = eval_text.evaluate_next_token(model, tok, TEXTS, FocusConfig(lr=30.0, threshold=t), context_length=8,
                                              max_tokens=16, progress=False)
        assert (reports[t].outcomes, reports[t].n_total, reports[t].topk_hits) == (plain.outcomes, plain.n_total,
                                                                                 plain.topk_hits)
    assert reports[0.003].n_uncertain < reports[0.01].n_uncertain
    out = exp.exp_threshold(model, tok, TEXTS, config, thresholds=thresholds, context_length=8, max_tokens=10,
                            out_dir=tmp_path, progress=False)
    assert [r["threshold"] for r in out["rows"]] == list(thresholds) and (tmp_path / "exp_threshold.png").exists()
    assert {"delta_corr", "n_uncertain", "p_value"} <= set(out["rows"][0])


def test_lr_sweep_and_params_rows(tiny, tmp_path):
    model, tok = tiny
    out = exp.exp_lr(model, tok, TEXTS, FocusConfig(lr=30.0), lrs=(1e-3, 30.0), context_length=8, max_uncertain=3,
                     out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "exp_lr.json").read_text())
    assert (tmp_path / "exp_lr.png").stat().st_size > 0
    assert {m: [r["lr"] for r in rows] for m, rows in saved["sweep"].items()} == {"ifo": [1e-3, 30.0],
                                                                                  "dofo": [1e-3, 30.0]}
    assert [r["params"] for r in saved["params_rows"]] == ["last:1", "last:2", "last:4", "all"]  # 4 blocks: no 8
    assert all(r["seconds_per_refinement"] > 0 and r["n_uncertain"] == 3 for r in saved["params_rows"])
    assert "| last:2 |" in out["params_table"] and {"p_value", "delta_corr_std"} <= set(saved["sweep"]["ifo"][0])


def test_steps_predictions_match_separate_refinements(tiny):
    model, tok = tiny
    ids = eval_text.tokenize_stream(tok, TEXTS)[None, :12]
    with torch.no_grad():
        logits = model(ids).logits[0]
    config = FocusConfig(lr=30.0, threshold=1.0)
    trainable, frozen = method.split_parameters(model, config.params)
    before = snapshot(model)
    changed = 0
    for t in (5, 11):
        multi, single = exp.steps_predictions(model, ids, t, logits[t], trainable, frozen, config, 30.0, (0, 1, 2))
        fwd = exp.position_forward(model, ids, t)
        for p in (0, 1, 2):
            # the reference: method.focus_step run from scratch for each configuration
            ref_multi = method.focus_step(fwd, logits[t], trainable, frozen, FocusConfig(lr=30.0, threshold=1.0, steps=2 ** p))
            ref_single = method.focus_step(fwd, logits[t], trainable, frozen, FocusConfig(lr=30.0 * 2 ** p, threshold=1.0))
            assert multi[p] == int(ref_multi.logits.argmax()) and single[p] == int(ref_single.logits.argmax())
            changed += int(multi[p] != int(logits[t].argmax()))
    assert changed > 0  # the comparison saw refinements that move the prediction
    assert_untouched(model, before)
    assert exp.relative_gain(3, 1) == pytest.approx(2 / 3) and exp.relative_gain(0, 0) == 0


def test_steps_experiment_json(tiny, tmp_path):
    model, tok = tiny
    out = exp.exp_steps(model, tok, TEXTS, FocusConfig(lr=30.0), lrs=(30.0,), powers=(0, 1), context_length=8,
                        max_uncertain=2, out_dir=tmp_path, progress=False)
    assert out["n_uncertain"] == 2 and len(out["rows"]) == 2 and (tmp_path / "exp_steps.png").exists()
    assert out["rows"][0]["delta_corr_single"] == out["rows"][0]["delta_corr_multi"]  # p = 0: the same step
    assert out["relative"]["lr=30"][0] == 0.0


def test_combination_position_matches_naive_deepcopy_sgd(tiny):
    model, tok = tiny
    ids = eval_text.tokenize_stream(tok, TEXTS)[None, :10]
    t = 9
    with torch.no_grad():
        logits = model(ids).logits[0]
    config = FocusConfig(lr=30.0, threshold=1.0)
    trainable, frozen = method.split_parameters(model, config.params)
    before = snapshot(model)
    logits_in, res = exp.combination_position(model, ids, t, logits[t], trainable, frozen, config, lr_in=1e-1)
    assert_untouched(model, before)

    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=1e-1, momentum=0, weight_decay=0)
    ctx = ids[:, :t + 1]
    loss = torch.nn.functional.cross_entropy(ref(ctx).logits[0, :-1], ctx[0, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        ref_in = ref(ctx).logits[0, -1]
    torch.testing.assert_close(logits_in, ref_in, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits_in, logits[t], atol=1e-3)  # the self-supervised step did something

    focus = ref_in.topk(2).indices
    opt = torch.optim.SGD(ref.parameters(), lr=30.0, momentum=0, weight_decay=0)
    (-ref(ctx).logits[0, -1][focus].mean()).backward()
    opt.step()
    with torch.no_grad():
        ref_opt = ref(ctx).logits[0, -1]
    assert res.uncertain
    torch.testing.assert_close(res.logits, ref_opt, rtol=1e-4, atol=1e-4)


def test_combination_experiment_json(tiny, tmp_path):
    model, tok = tiny
    out = exp.exp_combination(model, tok, TEXTS, FocusConfig(lr=30.0), context_length=8, max_uncertain=3,
                              out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "exp_combination.json").read_text())
    assert saved["n"] == 3 and set(saved["accuracy"]) == {"original f", "self-supervised f_In", "f_In + focus"}
    assert saved["settings"]["lr_in"] == 1e-3 and (tmp_path / "exp_combination.png").exists()
    assert out["delta_acc_focus_on_in"] == pytest.approx(out["accuracy"]["f_In + focus"]
                                                         - out["accuracy"]["self-supervised f_In"])


def test_table_formats_cli_and_experiment_files(tiny, tmp_path, capsys):
    model, tok = tiny
    exp.exp_threshold(model, tok, TEXTS, FocusConfig(lr=30.0), thresholds=(0.01,), context_length=8, max_tokens=6,
                      out_dir=tmp_path, progress=False)
    rep = eval_text.evaluate_next_token(model, tok, TEXTS, FocusConfig(lr=30.0), context_length=8, max_tokens=6,
                                        progress=False, name="bare")
    (tmp_path / "bare.json").write_text(json.dumps(rep.to_dict()))
    assert table.main([str(tmp_path / "exp_threshold.json"), str(tmp_path / "bare.json")]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "data set" not in ln]
    assert len(rows) == 2 and f"| {rep.n_uncertain} |" in rows[1]
