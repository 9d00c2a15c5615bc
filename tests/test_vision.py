"""FocusClassifier / evaluate_classifier against a naive deepcopy + torch.optim.SGD reference.

Comparisons with the reference (and vmap vs loop) run in float64 and are held to 1e-10, so their
verdict cannot depend on the CPU's float32 kernels or the thread count.
"""
import copy
import fnmatch
import json
import warnings

import pytest
import torch
from torch import nn

from focus_decoding import FocusConfig
from focus_decoding.evaluation.report import CO_CO, CO_WR, MAX_K, WR_CO, WR_OTHER, WR_SAME
from conftest import need
from reference import assert_exact, config_rate, first_step_eta, naive_refine

torchvision = need("torchvision", "(the vision extra)", module_level=True)  # CI installs it: never skipped there
from focus_decoding.cli.eval_vision import run_eval_vision  # noqa: E402
from focus_decoding.evaluation.classifier import evaluate_classifier  # noqa: E402
from focus_decoding.vision import (DigitsNet, FocusClassifier, digits_arrays, load_classifier,  # noqa: E402
                                   load_image_dataset, train_digits)

pytestmark = pytest.mark.vision


# --------------------------------------------------------------------- helpers
NORMALIZED = dict(step_rule="normalized", tau=0.5)


def _problem(model, x, cfg):
    """(focus set, run, select) of ONE image x [1, ...] for the naive reference."""
    with torch.no_grad():
        base = copy.deepcopy(model).eval()(x)[0]
    select = lambda n: cfg.params == "all" or any(  # noqa: E731
        n == pat or n.startswith(pat + ".") or fnmatch.fnmatchcase(n, pat) for pat in cfg.params)
    return base.topk(cfg.n_focus).indices, (lambda m: m(x)[0]), select


def naive_refined(model, x, cfg):
    """Algorithm 1 for ONE image x [1, ...] through the naive reference (deepcopy, eval, plain SGD);
    under the normalized rule with this image's own rate, tau / ||g||^2, computed by hand."""
    focus, run, select = _problem(model, x, cfg)
    return naive_refine(model, run, focus, cfg.mode, config_rate(model, run, focus, cfg, select), cfg.steps, select)


def rate_of(model, x, cfg):
    """The first step's tau / ||g||^2 for one image (by hand), to check that images get their own."""
    focus, run, select = _problem(model, x, cfg)
    return first_step_eta(model, run, focus, cfg.mode, cfg.tau, select)


def snapshot(model):
    """Everything the step must leave alone: values, flags, grads."""
    return ({k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [m.training for m in model.modules()])


def assert_untouched(model, snap):
    state, req, training = snap
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k, v in state.items():  # bitwise, BatchNorm running stats and num_batches_tracked included
        assert torch.equal(v, now[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == req
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == training


def digits_net(seed=0, spread=1.0):
    """A random DigitsNet with non-trivial BatchNorm running stats (so eval mode matters)."""
    torch.manual_seed(seed)
    net = DigitsNet()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    with torch.no_grad():
        net.classifier[-1].weight.mul_(spread)
    return net.eval()


def between(gaps, q):
    """A threshold gating about a fraction ``q`` of rows, half-way between two neighbouring gaps (never on
    one: computed in other batch shapes, a gap equal to the threshold could land on either side)."""
    gaps = gaps.flatten().sort().values
    i = min(max(int(q * len(gaps)), 1), len(gaps) - 1)
    return float(gaps[i - 1] + gaps[i]) / 2


def images(n, shape=(1, 8, 8), seed=1, dtype=torch.float32):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits") / "digits.pt"
    model, acc = train_digits(epochs=6, checkpoint=path)
    return model, acc, path


# --------------------------------------------------------------------- the step vs the reference
@pytest.mark.parametrize("mode,rule", [("ifo", dict(lr=0.05)), ("dofo", dict(lr=0.5)), ("ifo", NORMALIZED),
                                       ("dofo", NORMALIZED), ("entropy", dict(lr=0.5)),
                                       ("entropy", dict(step_rule="normalized", tau=0.05))])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("params", ["all", ["classifier.*", "features.1"]])
def test_vmap_equals_loop_equals_naive(mode, rule, steps, params):
    model = digits_net().double()
    x = images(5, dtype=torch.float64)
    cfg = FocusConfig(mode=mode, steps=steps, params=params, threshold=1.0, **rule)
    snap = snapshot(model)
    fast = FocusClassifier(model, cfg, max_batch=2, method="vmap")  # 3 chunks: 2 + 2 + 1
    loop = FocusClassifier(model, cfg, method="loop")
    out_fast, out_loop = fast(x), loop(x)
    ref = torch.stack([naive_refined(model, x[i:i + 1], cfg) for i in range(5)])
    with torch.no_grad():
        base = model(x)
    assert (ref - base).abs().max() > 1e-3  # the step really moved the logits
    assert_exact(out_fast, ref, "vmap")
    assert_exact(out_loop, ref, "loop")
    if cfg.step_rule == "normalized":  # each image its own rate (one rate per chunk would not pass)
        rates = [rate_of(model, x[i:i + 1], cfg) for i in range(5)]
        assert max(rates) > 1.1 * min(rates)
    assert fast.stats.gated == fast.stats.refined == 5 and fast.stats.vectorized
    assert fast.stats.changed == int((ref.argmax(-1) != base.argmax(-1)).sum())
    assert_untouched(model, snap)


ARCHS = [  # (name, input size, lr, params): BatchNorm, hard-swish + squeeze-excite, plain VGG, LayerNorm
    ("resnet18", 32, 1e-2, "all"), ("mobilenet_v3_small", 32, 1.0, "all"), ("vgg11", 32, 1e-2, ["features.*"]), ("convnext_tiny", 32, 1e-2, "all")]


@pytest.mark.parametrize("name,size,lr,params", ARCHS)
def test_torchvision_architectures(name, size, lr, params):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10)
    if name == "vgg11":  # VGG's own head, narrower: its 120M weights in float64 took ~5 GB over the copies
        model.classifier[0], model.classifier[3] = nn.Linear(512 * 7 * 7, 64), nn.Linear(64, 64)
        model.classifier[6] = nn.Linear(64, 10)
    model.double().train()  # the wrapper must still run in eval mode and restore this flag
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = FocusConfig(lr=lr, threshold=1.0, params=params)  # VGG: the head stays frozen
    snap = snapshot(model)
    out_fast = FocusClassifier(model, cfg, method="vmap")(x)
    out_loop = FocusClassifier(model, cfg, method="loop")(x)
    assert_untouched(model, snap)
    ref = torch.stack([naive_refined(model, x[i:i + 1], cfg) for i in range(2)])
    with torch.no_grad():
        base = copy.deepcopy(model).eval()(x)
    assert (ref - base).abs().max() > 1e-4
    assert_exact(out_fast, ref, "vmap")
    assert_exact(out_loop, ref, "loop")


def test_confident_rows_pass_through_and_threshold_gates():
    model = digits_net(spread=30.0)  # spread logits: some rows confident, some not
    x = images(16)
    with torch.no_grad():
        base = model(x)
    p = base.softmax(-1).sort(-1, descending=True).values
    gaps = p[:, 0] - p[:, 1]
    threshold = between(gaps, 0.5)
    clf = FocusClassifier(model, FocusConfig(lr=0.05, threshold=threshold))
    out = clf(x)
    gated = gaps < threshold
    assert 0 < int(gated.sum()) < 16
    assert torch.equal(out[~gated], base[~gated])  # untouched rows are the original logits, bitwise
    assert (out[gated] - base[gated]).abs().amax(-1).min() > 0
    assert clf.stats.gated == int(gated.sum()) and clf.stats.total == 16


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_threshold_exactly_at_an_images_gap_does_not_gate_it(method):
    """The gate is gap < threshold: an image whose gap equals the threshold is kept as it is, one below is refined.
    An identity linear model in float64 makes the logits the inputs themselves, so the gap is the same number
    wherever it is computed."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3, bias=False)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3, dtype=torch.float64))
    x = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.75, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    p = x.softmax(-1).sort(-1, descending=True).values
    at = float(p[0, 0] - p[0, 1])  # image 0's gap is the threshold; image 1's is smaller, image 2's larger
    assert p[1, 0] - p[1, 1] < at < p[2, 0] - p[2, 1]
    clf = FocusClassifier(model, FocusConfig(lr=0.5, threshold=at), method=method)
    out = clf(x)
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert (out[1] - x[1]).abs().max() > 1e-3
    assert clf.stats.uncertain == 1 and clf.stats.checked == 3


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_per_sample_independence_with_batchnorm(method):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double().train()  # train-mode BN would couple rows
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clf = FocusClassifier(model, FocusConfig(threshold=1.0, **NORMALIZED), method=method)  # rate per image too
    a = clf(x)
    y = x.clone()
    y[2] = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    b = clf(y)
    assert_exact(a[:2], b[:2])  # rows 0 and 1 do not see that row 2 changed
    assert (a[2] - b[2]).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_model_untouched_after_exception_mid_step(method):
    model = digits_net().train()
    model.features[0].weight.requires_grad_(False)  # flags must come back exactly as they were
    snap = snapshot(model)
    calls = {"n": 0}

    def boom(module, args, output):  # the 1st call is the unmodified pass; fail inside the step
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("simulated failure")

    handle = model.features[3].register_forward_hook(boom)
    with pytest.raises(KeyError, match="simulated"):
        FocusClassifier(model, FocusConfig(threshold=1.0, lr=0.1), method=method)(images(3))
    handle.remove()
    assert_untouched(model, snap)
    # and the wrapper still works afterwards
    FocusClassifier(model, FocusConfig(threshold=1.0, lr=0.1), method=method)(images(3))
    assert_untouched(model, snap)


class Picky(nn.Module):
    """Data-dependent Python control flow: vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        self.net = digits_net()

    def forward(self, x):
        if x.abs().max() > 1e6:
            raise ValueError("input out of range")
        return self.net(x)


def test_auto_uses_the_loop_on_cpu():
    clf = FocusClassifier(digits_net(), FocusConfig(threshold=1.0, lr=0.05))
    clf(images(2))
    assert clf.stats.gated == 2 and not clf.stats.vectorized  # measured faster there


def test_vmap_failure_falls_back_once_with_same_results(monkeypatch):
    import focus_decoding.vision as vision

    monkeypatch.setattr(vision.classifier, "_vmap_pays_off", lambda device: True)  # "auto" as on an accelerator
    model = Picky().double().eval()
    cfg = FocusConfig(threshold=1.0, lr=0.05, steps=2)
    x = images(4, dtype=torch.float64)
    clf = FocusClassifier(model, cfg, max_batch=2, through_head=False)  # (through Picky.net the step would not see it)
    with pytest.warns(RuntimeWarning, match="per-sample loop") as record:
        out = clf(x)
        out2 = clf(x)  # remembered: no second warning
    assert sum("per-sample loop" in str(w.message) for w in record) == 1
    assert not clf.vectorized and not clf.stats.vectorized
    ref = torch.stack([naive_refined(model, x[i:i + 1], cfg) for i in range(4)])
    assert_exact(out, ref)
    assert torch.equal(out, out2)
    # forcing vmap surfaces vmap's own error (data-dependent control flow), not a wrapper's or another one
    with pytest.raises(RuntimeError, match="vmap: .*data-dependent control flow"):
        FocusClassifier(model, cfg, method="vmap", through_head=False)(x)


def test_inference_mode_and_nonfinite_fallback():
    model64, x64 = digits_net().double(), images(3, dtype=torch.float64)
    with torch.inference_mode():
        out = FocusClassifier(model64, FocusConfig(threshold=1.0, lr=0.05))(x64)
    ref = torch.stack([naive_refined(model64, x64[i:i + 1], FocusConfig(threshold=1.0, lr=0.05)) for i in range(3)])
    assert_exact(out, ref)
    model, x = digits_net(), images(3)  # overflow is float32 behaviour
    for method in ("vmap", "loop"):  # an absurd lr overflows: the original logits are kept and counted
        clf = FocusClassifier(model, FocusConfig(threshold=1.0, lr=1e38, steps=3), method=method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = clf(x)
        with torch.no_grad():
            base = model(x)
        bad = clf.stats.nonfinite
        assert bad > 0 and clf.stats.refined == 3 - bad
        assert torch.isfinite(out).all()
        assert int((out == base).all(-1).sum()) >= bad  # an overflowed row emits its unrefined logits


# --------------------------------------------------------------------- evaluate_classifier
def hand_report(model, x, y, cfg, thresholds):
    """Counts straight from the definitions, one image at a time."""
    outcomes, counts, hits = "", [0] * len(thresholds), [[0] * MAX_K for _ in thresholds]
    for i in range(len(y)):
        with torch.no_grad():
            logits = model(x[i:i + 1])[0]
        p = logits.softmax(-1).sort(descending=True).values
        gap = float(p[0] - p[1])
        rank = int((logits.argsort(descending=True) == y[i]).nonzero())
        for t, th in enumerate(thresholds):
            if gap < th:
                counts[t] += 1
                for k in range(MAX_K):
                    hits[t][k] += int(rank <= k)
        if gap < cfg.threshold:
            b, f, lab = int(logits.argmax()), int(naive_refined(model, x[i:i + 1], cfg).argmax()), int(y[i])
            outcomes += (CO_CO if f == lab else CO_WR) if b == lab else WR_CO if f == lab else \
                WR_SAME if f == b else WR_OTHER
    return outcomes, counts, hits


def test_evaluate_classifier_counts_match_hand_computed():
    model = digits_net(spread=30.0).double()  # float64: no outcome can flip on rounding between the two
    x, y = images(23, seed=3, dtype=torch.float64), torch.randint(0, 10, (23,), generator=torch.Generator().manual_seed(4))
    y[:8] = model(x[:8]).argmax(-1).detach()  # some correct predictions too
    with torch.no_grad():
        p = model(x).softmax(-1).sort(-1, descending=True).values
    median = between(p[:, 0] - p[:, 1], 0.5)  # about half the rows are uncertain
    thresholds = (between(p[:, 0] - p[:, 1], 0.15), median, 1.0)
    cfg = FocusConfig(threshold=median, lr=0.5)
    batches = [(x[i:i + 7], y[i:i + 7]) for i in range(0, 23, 7)]
    r = evaluate_classifier(model, batches, cfg, thresholds=thresholds, max_batch=3, progress=False, name="t")
    outcomes, counts, hits = hand_report(model, x, y, cfg, thresholds)
    assert 0 < len(outcomes) < 23 and len(set(outcomes)) > 1
    assert (r.n_total, r.outcomes, r.topk_counts, r.topk_hits) == (23, outcomes, counts, hits)
    assert r.config == cfg.to_dict() and r.name == "t"


@pytest.mark.parametrize("batch,match", [
    ({"x": 1}, "pairs"), ((images(2), torch.tensor([1, 2]), 0), "pairs"), (([1, 2], torch.tensor([1, 2])), "pairs"),
    ((images(2), torch.tensor([1.0, 2.0])), "integer class"), ((images(2), torch.tensor([1])), "integer class"),
    ((images(2), torch.tensor([1, 10])), r"\[0, 9\]"), ((images(2), torch.tensor([-1, 0])), r"\[0, 9\]")])
def test_evaluate_classifier_rejects_bad_batches(batch, match):
    with pytest.raises(ValueError, match=match):
        evaluate_classifier(digits_net(), [batch], FocusConfig(), progress=False)


def test_bad_model_output_and_arguments():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)

        def forward(self, x):
            return self.lin(x.flatten(1)).unsqueeze(1)  # [B, 1, C]: not 2-D logits

    with pytest.raises(ValueError, match="2-D logits"):
        evaluate_classifier(Flat(), [(images(2), torch.tensor([0, 1]))], FocusConfig(), progress=False)
    with pytest.raises(ValueError, match="max_batch"):
        FocusClassifier(digits_net(), max_batch=0)
    with pytest.raises(ValueError, match="method"):
        FocusClassifier(digits_net(), method="fast")
    with pytest.raises(ValueError, match="n_focus"):
        FocusClassifier(digits_net(), FocusConfig(n_focus=10, threshold=1.0))(images(2))
    with pytest.raises(ValueError, match="resnet18"):
        load_classifier("resnet-eighteen")
    with pytest.raises(ValueError, match="allowed"):
        load_image_dataset("mnist-ish")
    with pytest.raises(FileNotFoundError, match="root"):
        load_image_dataset("cifar100", root=None)


def test_pretrained_weights_unavailable_gives_clear_error(monkeypatch, tmp_path):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="not cached"):
        load_classifier("resnet18", weights="IMAGENET1K_V1")


# --------------------------------------------------------------------- a trained digits model
def test_trained_digits_report_is_sensible(trained_digits, tmp_path):
    model, acc, path = trained_digits
    assert acc > 0.9  # a few epochs of a small CNN on 8x8 digits
    x, y = digits_arrays("test")
    loaded = load_classifier("digits", checkpoint=path)
    with torch.no_grad():  # in the evaluation's batches of 128: the same kernels, so the same float32 gaps
        logits = torch.cat([loaded(xb) for xb in x.split(128)])
    assert (logits.argmax(-1) == y).float().mean().item() == pytest.approx(acc)
    cfg = FocusConfig(threshold=0.3, lr=1e-2)
    reports = run_eval_vision(None, "digits", [cfg, cfg.to_dict() | {"mode": "dofo", "lr": None}],
                              checkpoint=path, out_dir=tmp_path, progress=False, batch_size=128)
    r = reports[0]
    p = logits.softmax(-1).sort(-1, descending=True).values
    assert r.n_total == len(y) and r.n_uncertain == int((p[:, 0] - p[:, 1] < 0.3).sum()) > 0
    assert r.base_accuracy < 100 * acc  # uncertain predictions are the hard ones
    top = r.topk_accuracy(1.0)
    assert top == sorted(top) and top[0] > 80  # gap < 1.0 drops only rows with a saturated softmax
    assert reports[1].config["mode"] == "dofo" and reports[1].n_total == len(y)
    saved = json.loads((tmp_path / "vision_reports.json").read_text())
    assert saved[0]["summary"]["n_uncertain"] == r.n_uncertain
    assert "| digits | digits |" in (tmp_path / "vision_table.md").read_text()
    assert (tmp_path / "vision_topk.png").stat().st_size > 1000


def test_run_eval_vision_with_own_module_and_dataset():
    from torch.utils.data import TensorDataset

    model = digits_net()
    snap = snapshot(model)
    data = TensorDataset(images(9), torch.arange(9) % 10)
    reports = run_eval_vision(model, data, FocusConfig(threshold=1.0, lr=0.05), max_samples=5, batch_size=2,
                              progress=False, method="loop")
    assert len(reports) == 1 and reports[0].n_total == 5 and reports[0].n_uncertain == 5
    assert reports[0].meta["vectorized"] is False
    assert_untouched(model, snap)
    with pytest.raises(ValueError, match="batch_size"):
        run_eval_vision(model, data, batch_size=0, progress=False)
    train, test = load_image_dataset("digits", split="train"), load_image_dataset("digits")
    assert len(train) + len(test) == 1797 and test[0][0].shape == (1, 8, 8)


def test_nonfinite_images_are_counted_and_warned_once():
    # a NaN or inf pixel makes that image's logits NaN: never gated or refined, counted, and said once
    torch.manual_seed(0)
    clf = FocusClassifier(DigitsNet().eval(), FocusConfig(threshold=1.0, lr=1e-2), method="loop")
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images[1, 0, 3, 3] = float("nan")
    images[2, 0, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="2 image") as caught:
        out = clf(images)
        clf(images)
    assert len([w for w in caught if "NaN or inf" in str(w.message)]) == 1  # once per classifier, not per call
    assert clf.stats.nonfinite_inputs == 2 and clf.stats.gated == clf.stats.refined == 2
    assert torch.isfinite(out[[0, 3]]).all()
