"""The core step against a naive reference written straight from the method.

Every comparison of the step with the reference runs in float64 (``reference.tiny_lm64``) and is held
to 1e-10: in float32 several steps at a large rate amplify rounding that depends on the CPU's
kernels, and a tolerance wide enough for that also hides real bugs. float32/16 runs remain only
where low precision itself is the behaviour under test, and those compare bitwise.
"""
import copy
import math

import pytest
import torch
from torch import nn

from focus_decoding import FocusConfig, focus_classes, focus_loss, focus_step, is_uncertain, split_parameters, top2_gap
from focus_decoding import LOSSES, MODES, method
from focus_decoding.method import model_forward, refine
from focus_decoding.resources.models import tiny_causal_lm
from reference import assert_exact, first_step_eta, naive_loss, naive_refine, normalized_lr, tiny_lm64

F64 = torch.float64


# --------------------------------------------------------------------- gate, focus set, loss
def test_gap_and_gate_on_hand_made_distributions():
    # probabilities 0.5/0.48/0.02: a 0.02 gap is uncertain at 0.04 but not at 0.01
    logits = torch.tensor([0.5, 0.48, 0.02]).log()
    assert top2_gap(logits).item() == pytest.approx(0.02, abs=1e-6)
    assert bool(is_uncertain(logits, 0.04)) and not bool(is_uncertain(logits, 0.01))
    # a confident row next to a tie: the gate is per row
    batch = torch.stack([torch.tensor([0.9, 0.05, 0.05]).log(), torch.tensor([0.4, 0.4, 0.2]).log()])
    assert is_uncertain(batch, 0.04).tolist() == [False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_gate_boundary_is_strict_on_exact_distributions(dtype):
    # The method refines when p1 - p2 < threshold, strictly. These softmaxes are exact in every dtype
    # (exp(0) = 1, exp(-inf) = 0), so the gap equals the threshold exactly and `<=` would fire here.
    certain = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf, 0.0, -math.inf]], dtype=dtype)  # p = one-hot
    assert top2_gap(certain).tolist() == [1.0, 1.0]
    assert is_uncertain(certain, 1.0).tolist() == [False, False]  # threshold 1.0 spares exact certainty
    tie = torch.tensor([0.0, 0.0, -math.inf], dtype=dtype)  # p = (1/2, 1/2, 0): gap 0
    assert float(top2_gap(tie)) == 0.0
    assert bool(is_uncertain(tie, 1e-30))  # any positive threshold (representable in the dtype) fires on a tie


def test_gate_boundary_at_an_arbitrary_gap():
    # The gap computed here independently (sort instead of top-k) from the same float64 softmax;
    # the gate must be off at threshold == gap and on at the next float above it.
    logits = torch.tensor([2.0, 1.0, 0.25, -1.0], dtype=F64)
    p = torch.softmax(logits, -1).sort(descending=True).values
    gap = float(p[0] - p[1])
    assert not bool(is_uncertain(logits, gap))
    assert bool(is_uncertain(logits, math.nextafter(gap, 1.0)))
    assert not bool(is_uncertain(logits, math.nextafter(gap, 0.0)))


def test_focus_step_does_not_refine_at_the_boundary():
    # Through FocusConfig and focus_step: threshold 1.0 (allowed) with an exactly one-hot softmax
    logits = torch.tensor([0.0, -math.inf, -math.inf, -math.inf])
    never = lambda values: (_ for _ in ()).throw(AssertionError("must not run"))  # noqa: E731
    res = focus_step(never, logits, {}, {}, FocusConfig(threshold=1.0))
    assert not res.uncertain and not res.refined and res.logits is logits


def test_focus_set_is_the_top_n():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.5, 0.0])
    assert sorted(focus_classes(logits, 2).tolist()) == [1, 3]
    assert sorted(focus_classes(logits, 3).tolist()) == [0, 1, 3]
    with pytest.raises(ValueError, match="n_focus"):
        focus_classes(logits, 5)  # must leave at least one class out of focus


def test_losses_on_raw_logits():
    logits = torch.tensor([1.0, 4.0, -2.0, 3.0])
    focus = torch.tensor([1, 3])
    assert focus_loss(logits, focus, "ifo").item() == pytest.approx(-3.5)  # -(4 + 3) / 2
    assert focus_loss(logits, focus, "dofo").item() == pytest.approx(-0.5)  # (1 - 2) / 2
    # raw logits, not log-probabilities: shifting every logit shifts the loss
    assert focus_loss(logits + 10, focus, "ifo").item() == pytest.approx(-13.5)
    # entropy minimisation: a two-way tie carries log 2 nats, certainty none; it ignores the focus set and shifts
    tie = torch.tensor([0.0, 0.0, -math.inf], dtype=F64)
    assert focus_loss(tie, focus[:1], "entropy").item() == pytest.approx(math.log(2), abs=1e-12)
    assert focus_loss(torch.tensor([0.0, -math.inf]), focus[:1], "entropy").item() == 0.0
    shifted, plain = (focus_loss(x, focus, "entropy").item() for x in (logits + 10, logits))
    assert shifted == pytest.approx(plain)
    # the reference's loss is the same function (so the comparisons below compare the step, not the loss)
    for mode in MODES:
        assert focus_loss(logits.double(), focus, mode).item() == pytest.approx(
            naive_loss(logits.double(), focus, mode).item(), rel=1e-14)


def test_every_mode_has_one_loss_and_an_unknown_one_is_refused():
    assert set(LOSSES) == set(MODES)  # config names the modes, method.LOSSES holds their losses: the same set
    with pytest.raises(ValueError, match=r"unknown FocusConfig.mode 'sideways'; allowed: \('ifo', 'dofo', 'entropy'\)"):
        focus_loss(torch.zeros(3), torch.tensor([0]), "sideways")  # never silently run as doFo


# --------------------------------------------------------------------- float64 stays float64
def test_core_keeps_float64():
    t = torch.ones(3, dtype=F64)
    assert method.widen(t) is t  # widen must not narrow the reference precision
    assert method.widen(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    # (1 + 2^-30)^2 = 1 + 2^-29 (+2^-60) in float64 but 1.0 in float32: the step size sees the difference
    cfg = FocusConfig(step_rule="normalized", tau=1.0)
    eta = method.step_size(cfg, [torch.tensor([1 + 2 ** -30], dtype=F64)])
    assert type(eta) is float and eta == 1 / (1 + 2 ** -29) != 1.0
    # parameters, gradients and the update stay float64 through sgd_steps and refine
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).to(F64)
    x = torch.linspace(-1, 1, 4, dtype=F64)
    trainable, frozen = split_parameters(lin, "all")
    fwd = model_forward(lin, x)
    out = method.sgd_steps(lambda v: focus_loss(fwd(v), torch.tensor([0, 1]), "ifo"), trainable, frozen,
                         FocusConfig(lr=0.1, steps=2))
    assert {v.dtype for v in out.values()} == {F64}
    assert refine(fwd, trainable, frozen, torch.tensor([0, 1]), cfg).dtype == F64


# --------------------------------------------------------------------- the step vs the reference
def _setup(arch, tied, config):
    model = tiny_lm64(arch, tied=tied)
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits[0, -1]
    focus = focus_classes(base, config.n_focus)
    trainable, frozen = split_parameters(model, config.params)
    fast = model_forward(model, ids, select=lambda o: o.logits[0, -1])
    run = lambda m: m(ids).logits[0, -1]  # noqa: E731
    return model, base, focus, trainable, frozen, fast, run


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("gpt2", True)])
@pytest.mark.parametrize("mode,lr", [("ifo", 0.05), ("dofo", 5.0), ("entropy", 5.0)])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("params", ["all", "last:2"])
def test_refine_equals_naive_sgd(arch, tied, mode, lr, steps, params):
    # three steps at lr 5 is where float32 used to differ by 4e-4 between CPUs (issue 8): here 1e-10
    cfg = FocusConfig(mode=mode, lr=lr, steps=steps, params=params)
    model, base, focus, trainable, frozen, fast, run = _setup(arch, tied, cfg)
    ours = refine(fast, trainable, frozen, focus, cfg)
    ref = naive_refine(model, run, focus, cfg.mode, cfg.lr, cfg.steps, select=lambda name: name in trainable)
    assert (ref - base).abs().max() > 1e-3  # the step really moved the logits
    assert_exact(ours, ref, f"{arch} tied={tied} {cfg}")


# Patterns that pick a part of a block and the head: on a tied model "lm_head" IS the input embedding.
PATTERNS = {"llama": ["lm_head", "model.layers.1.mlp*"], "gpt2": ["lm_head", "transformer.h.1.mlp*"]}


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("gpt2", True)])
@pytest.mark.parametrize("params", ["all", "last:2", "patterns"])
@pytest.mark.parametrize("steps", [1, 3])
def test_normalized_step_equals_naive_sgd_with_hand_computed_rate(arch, tied, params, steps):
    # eta = tau / ||g||^2, ||g|| over the selected parameters, a tied tensor once, recomputed every step
    mode = {"all": "ifo", "last:2": "entropy", "patterns": "dofo"}[params] if steps == 1 else "dofo"
    cfg = FocusConfig(mode=mode, step_rule="normalized", tau=0.5, steps=steps,
                      params=PATTERNS[arch] if params == "patterns" else params)
    model, base, focus, trainable, frozen, fast, run = _setup(arch, tied, cfg)
    select = lambda name: name in trainable  # noqa: E731
    ours = refine(fast, trainable, frozen, focus, cfg)
    if steps == 1:  # the rate by hand: plain autograd on a deep copy, squared norm, then plain SGD
        eta = first_step_eta(model, run, focus, mode, cfg.tau, select)
        assert not math.isclose(eta, cfg.tau, rel_tol=1e-2)  # a step using tau as the rate would not pass
        ref = naive_refine(model, run, focus, mode, eta, 1, select=select)
    else:  # each step's own rate from that step's gradient
        ref = naive_refine(model, run, focus, mode, normalized_lr(cfg.tau), steps, select=select)
        stale = naive_refine(model, run, focus, mode, first_step_eta(model, run, focus, mode, cfg.tau, select),
                             steps, select=select)
        assert (stale - ref).abs().max() > 1e-6  # reusing the first step's rate would not pass
    assert (ref - base).abs().max() > 1e-3
    assert_exact(ours, ref, f"{arch} tied={tied} {cfg}")


def test_step_size_on_hand_made_gradients():
    fixed = FocusConfig(lr=0.125)
    assert method.step_size(fixed, [torch.full((3,), 7.0)]) == 0.125  # the fixed rule ignores the gradient
    cfg = FocusConfig(step_rule="normalized", tau=2.0)
    # 3^2 + 4^2 + 12^2 = 169; a parameter without a gradient (None) adds nothing
    grads = [torch.tensor([3.0, 4.0], dtype=F64), None, torch.tensor([[12.0]], dtype=F64)]
    eta = method.step_size(cfg, grads)
    assert type(eta) is float and eta == 2.0 / 169
    # nothing to follow: eta 0, never inf or nan
    assert method.step_size(cfg, [torch.zeros(4, dtype=F64), None]) == 0.0
    assert method.step_size(cfg, [None]) == 0.0
    # per input (dimension 0), each with its own norm; a zero row gets 0 without touching the others
    g1 = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=F64)
    g2 = torch.tensor([[[12.0]], [[0.0]], [[0.0]]], dtype=F64)
    assert method.step_size(cfg, [g1, None, g2], batched=True).tolist() == [2.0 / 169, 0.0, 2.0]
    # float16 gradients: 300^2 overflows float16 (max 65504); the norm is taken in float32
    half = method.step_size(cfg, [torch.tensor([300.0], dtype=torch.float16)])
    assert half == pytest.approx(2.0 / 90000, rel=1e-6)


class TiedPair(nn.Module):
    """Two layers sharing one weight (as a head tied to an input embedding): one tensor, used twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_normalized_step_counts_a_tied_weight_once():
    torch.manual_seed(0)
    model = TiedPair().to(F64)
    x = torch.tensor([0.3, -1.2, 0.7], dtype=F64)
    focus = torch.tensor([0])
    trainable, frozen = split_parameters(model, "all")
    assert list(trainable) == ["a.weight"]  # one tensor, under its first name
    cfg = FocusConfig(step_rule="normalized", tau=0.5)
    new = method.sgd_steps(lambda v: focus_loss(model_forward(model, x)(v), focus, "ifo"), trainable, frozen, cfg)
    # by hand: the gradient of the one shared tensor sums both uses; its squared norm is counted once
    clone = copy.deepcopy(model)
    (g,) = torch.autograd.grad(naive_loss(clone(x), focus, "ifo"), [clone.a.weight])
    w = model.a.weight.detach()
    assert_exact(new["a.weight"], w - 0.5 / g.pow(2).sum() * g)
    # counting it once per use would be another step (so this test can tell the two apart)
    assert (new["a.weight"] - (w - 0.5 / (2 * g.pow(2).sum()) * g)).abs().max() > 1e-3


def test_zero_gradient_gives_no_step_and_one_warning(monkeypatch, recwarn):
    monkeypatch.setattr(method.step, "_warned_no_change", False)  # restored after the test: no order dependence
    w = torch.tensor([1.0, -2.0], dtype=F64)
    cfg = FocusConfig(step_rule="normalized", tau=1.0, steps=2)
    out = method.sgd_steps(lambda v: (v["w"] * 0.0).sum(), {"w": w}, {}, cfg)
    assert torch.equal(out["w"], w)  # eta = 0: not nan (0 / 0) and not inf (tau / 0)
    assert sum("changed no parameter" in str(r.message) for r in recwarn.list) == 1


def test_last_n_selects_top_blocks_and_final_norm_only():
    model = tiny_causal_lm("llama", layers=4)
    trainable, frozen = split_parameters(model, "last:2")
    assert all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm.")) for n in trainable)
    assert "model.norm.weight" in trainable and "model.embed_tokens.weight" in frozen
    gpt = tiny_causal_lm("gpt2", layers=4)
    assert "transformer.ln_f.weight" in split_parameters(gpt, "last:1")[0]
    with pytest.raises(ValueError, match="allowed N: 1..4"):
        split_parameters(model, "last:5")


def test_tied_head_pattern_selects_the_shared_tensor():
    model = tiny_causal_lm("llama", tied=True)
    trainable, _ = split_parameters(model, ("lm_head",))
    # the head is the embedding: one tensor, listed under its canonical name
    assert list(trainable) == ["model.embed_tokens.weight"]
    with pytest.raises(ValueError, match="matches no parameter"):
        split_parameters(model, ("decoder.nothing",))


def test_model_left_bitwise_untouched():
    model = tiny_causal_lm("llama", tied=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    trainable, frozen = split_parameters(model, "all")
    for cfg in (FocusConfig(threshold=1.0, lr=0.1), FocusConfig(threshold=1.0, step_rule="normalized", steps=2)):
        res = focus_step(model_forward(model, ids, select=lambda o: o.logits[0, -1]), logits, trainable, frozen, cfg)
        assert res.refined
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not model.training


@pytest.mark.parametrize("rule", [dict(lr=0.1), dict(step_rule="normalized", tau=0.5)])
def test_step_under_inference_mode_matches_plain(rule):
    model = tiny_lm64("llama")
    cfg = FocusConfig(threshold=1.0, **rule)
    trainable, frozen = split_parameters(model, "all")

    def run():
        ids = torch.arange(3, 11)[None]
        logits = model(ids).logits[0, -1]
        fwd = model_forward(model, method.as_normal_tensor(ids), select=lambda o: o.logits[0, -1])
        return focus_step(fwd, logits, trainable, frozen, cfg).logits

    with torch.no_grad():
        plain = run()
    with torch.inference_mode():
        inf = run()
    assert_exact(inf, plain)


def test_nonfinite_refinement_falls_back():
    # a linear model overflows to inf at a huge rate (normalised transformers may not); float32 on purpose
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    x = torch.full((8,), 10.0)
    logits = lin(x).detach()
    trainable, frozen = split_parameters(lin, "all")
    res = focus_step(model_forward(lin, x), logits, trainable, frozen, FocusConfig(threshold=1.0, lr=1e37))
    assert res.uncertain and res.nonfinite and not res.refined
    assert torch.equal(res.logits, logits)


def test_confident_input_is_not_refined():
    model = nn.Linear(4, 3)
    logits = torch.tensor([10.0, 0.0, 0.0])
    trainable, frozen = split_parameters(model, "all")
    res = focus_step(lambda v: (_ for _ in ()).throw(AssertionError("must not run")), logits, trainable, frozen,
                     FocusConfig())
    assert not res.uncertain and res.logits is logits


# --------------------------------------------------------------------- low precision: one rounding
LOW = [torch.bfloat16, torch.float16]


def _grid(generator, *shape):
    """Values with |v| in [0.5, 2): in these ranges p - lr * g is exact in float32 (and float64) for lr
    with few mantissa bits, so the correct update is that exact value rounded once to the dtype."""
    magnitude = 0.5 + 1.5 * torch.rand(*shape, generator=generator, dtype=F64)
    sign = torch.where(torch.rand(*shape, generator=generator) < 0.5, -1.0, 1.0).to(F64)
    return magnitude * sign


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("in_place", [True, False, "chunked"])
def test_low_precision_update_is_rounded_once(dtype, in_place, monkeypatch):
    if in_place == "chunked":  # the in-place update widens a few entries at a time: the same bits
        monkeypatch.setattr("focus_decoding.method.step.UPDATE_CHUNK", 7)
    gen = torch.Generator().manual_seed(0)
    p, g = _grid(gen, 256).to(dtype), _grid(gen, 256).to(dtype)
    lr = 0.3125  # 5/16: lr * g is exact
    once = (p.double() - lr * g.double()).to(dtype)  # the exact update, rounded once
    twice = p + (g.double() * -lr).to(dtype)  # lr * g rounded to the dtype, then the sum rounded again
    assert int((twice != once).sum()) >= 8  # so this data tells one rounding from two
    if in_place:
        buf = g.clone()
        out = method.sgd_update_(p, buf, lr)
        assert out.data_ptr() == buf.data_ptr()  # written into the gradient buffer: no new memory
    else:
        out = method.sgd_update(p, g, lr)
    assert out.dtype == dtype and torch.equal(out, once)
    # per-input rates (the normalized rule, batched): a [B] eta against [B, N] gradients; param broadcasts
    rows = torch.tensor([0.3125, 0.6875, 1.5])
    gb = torch.stack([_grid(gen, 256) for _ in rows]).to(dtype)
    expected = (p.double() - rows.double()[:, None] * gb.double()).to(dtype)
    if in_place:
        out = method.sgd_update_(p.expand_as(gb).clone(), gb.clone(), rows)
    else:
        out = method.sgd_update(p, gb, rows)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_step_end_to_end(dtype):
    # A linear layer in the low dtype whose iFo gradient is exact: d(-mean focus logits)/dW = -x/2 on
    # the focus rows (and -1/2 on their biases), so the correct step is computable by hand, bitwise.
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(16, 5).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(_grid(gen, 5, 16))
        lin.bias.copy_(_grid(gen, 5))
    xs = _grid(gen, 4, 16).to(dtype)
    cfg = FocusConfig(threshold=1.0, lr=0.3125, precision="model")  # in the model's dtype (float32: test_precision)
    trainable, frozen = split_parameters(lin, "all")

    def by_hand(x, focus):
        """(the step rounded once, the step with lr * g rounded first) from the exact gradient."""
        gw, gb = torch.zeros(5, 16, dtype=F64), torch.zeros(5, dtype=F64)
        gw[focus], gb[focus] = -x.double() / 2, -0.5
        once = {"weight": (lin.weight.detach().double() - cfg.lr * gw).to(dtype),
                "bias": (lin.bias.detach().double() - cfg.lr * gb).to(dtype)}
        return once, lin.weight.detach() + (-cfg.lr * gw).to(dtype)

    expected, focuses, differs = [], [], 0
    for x in xs:
        logits = lin(x).detach()
        focus = focus_classes(logits, cfg.n_focus)
        want, twice = by_hand(x, focus)
        differs += int((twice != want["weight"]).sum())
        fwd = model_forward(lin, x)
        got = method.sgd_steps(lambda v: focus_loss(fwd(v), focus, cfg.mode), trainable, frozen, cfg)
        assert torch.equal(got["weight"], want["weight"]) and torch.equal(got["bias"], want["bias"])
        res = focus_step(fwd, logits, trainable, frozen, cfg)  # the emitted logits: the forward with those values
        assert res.refined and torch.equal(res.logits, nn.functional.linear(x, want["weight"], want["bias"]))
        expected.append(want)
        focuses.append(focus)
    assert differs > 0  # two roundings would give other weights for these inputs
    # the batched (vmap) path: every input its own parameters, same bitwise result
    view = method.module_view(lin)
    loss = lambda values, xi, fi: focus_loss(torch.func.functional_call(view, values, (xi,)), fi, cfg.mode)  # noqa: E731
    batched = method.batched_sgd_steps(loss, trainable, cfg, xs, torch.stack(focuses))
    for i, want in enumerate(expected):
        assert torch.equal(batched["weight"][i], want["weight"]) and torch.equal(batched["bias"][i], want["bias"])


def test_tiny_lr_in_bf16_warns_once(monkeypatch, recwarn):
    monkeypatch.setattr(method.step, "_warned_no_change", False)  # restored after the test: no order dependence
    lin = nn.Linear(8, 4).to(torch.bfloat16)
    x = torch.ones(8, dtype=torch.bfloat16)
    trainable, frozen = split_parameters(lin, "all")
    cfg = FocusConfig(threshold=1.0, lr=1e-12, precision="model")
    for _ in range(3):
        focus_step(model_forward(lin, x), lin(x).detach(), trainable, frozen, cfg)
    msgs = [w for w in recwarn.list if "changed no parameter" in str(w.message)]
    assert len(msgs) == 1
