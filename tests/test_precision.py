"""Low-precision models take the step the config asks for (issue 16): float32 updates and forward, the model's
own logits plus the step's change; ``precision="model"`` rounds the update to the model's dtype (and says so)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from focus_decoding import FocusConfig, method
from focus_decoding.method import precision, tail

LOW = [torch.bfloat16, torch.float16]


def toy(seed: int = 0) -> nn.Module:
    """Weights of order 1 (as a trained model's): a small step is far below bfloat16's resolution there."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def decrease(model: nn.Module, x: torch.Tensor, cfg: FocusConfig) -> tuple[float, float, method.StepResult]:
    """(achieved, intended) loss decrease of one focus step on one input, and the result."""
    dtype = next(model.parameters()).dtype
    trainable, frozen = method.split_parameters(model, cfg.params)
    with torch.no_grad():
        base = model(x.to(dtype))
    result = method.focus_step(method.model_forward(model, x.to(dtype)), base, trainable, frozen, cfg)
    return result.achieved, result.intended, result


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("tau", [0.01, 0.1])
def test_the_float32_step_achieves_the_intended_decrease(dtype, tau):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    cfg = FocusConfig(step_rule="normalized", tau=tau, threshold=1.0)
    low = toy().to(dtype)
    model = copy.deepcopy(low).float()  # the float32 model: the same (rounded) weights, widened
    for xi in x:
        want, intended, _ = decrease(model, xi, cfg)
        assert intended == pytest.approx(tau) and want == pytest.approx(tau, rel=0.05)  # float32: the first order holds
        got, _, _ = decrease(low, xi, cfg)
        assert got == pytest.approx(want, rel=0.05)  # within 5 % of the float32 model on the same input
        rounded, _, _ = decrease(low, xi, FocusConfig(step_rule="normalized", tau=tau, threshold=1.0,
                                                      precision="model"))
        if dtype == torch.bfloat16:
            assert rounded < 0.9 * want  # what the model's own dtype keeps of it: the reason for float32
    assert all(p.dtype == dtype for p in low.parameters())  # the model itself stays as it was


@pytest.mark.parametrize("dtype", LOW)
def test_a_zero_step_emits_the_models_own_logits(dtype):
    low = toy().to(dtype)
    x = torch.randn(64, generator=torch.Generator().manual_seed(2))
    _, _, result = decrease(low, x, FocusConfig(lr=1e-30, threshold=1.0))
    with torch.no_grad():
        base = low(x.to(dtype))
    assert result.refined and result.logits.dtype == torch.float32  # emitted wide: a small change stays
    assert torch.equal(result.logits, base.float())


@pytest.mark.parametrize("params", ["all", "last:2", "tail"])
@pytest.mark.parametrize("dtype", LOW)
def test_language_model_paths_in_low_precision(tiny_lm, params, dtype):
    """Full model, cached top blocks and the tail take the float32 step on a low-precision model: the decrease of the
    same weights in float32 (the model's rounded weights, widened), within 5 %."""
    from focus_decoding.text.ways_in import focus_generate

    low = tiny_lm("llama", layers=3).to(dtype)
    same_in_float32 = copy.deepcopy(low).float()
    prompt = torch.tensor([[3, 5, 7, 9, 11]])
    cfg = FocusConfig(threshold=1.0, step_rule="normalized", tau=0.05, params=params)
    stats = {}
    for name, model in (("low", low), ("float32", same_in_float32)):
        out = focus_generate(model, prompt, max_new_tokens=1, do_sample=False, pad_token_id=0, focus_config=cfg,
                             return_dict_in_generate=True)
        stats[name] = out.focus_stats
    assert stats["low"].totals["refined"] == 1 and stats["low"].intended[0] == pytest.approx(0.05)
    assert stats["low"].achieved[0] == pytest.approx(stats["float32"].achieved[0], rel=0.05)
    assert all(p.dtype == dtype for p in low.parameters())


def test_batched_positions_take_the_float32_step_too(tiny_lm):
    """``batch_positions > 1`` (``refine_positions_batched``) on a bf16 model takes the float32 step, as one position
    at a time does: the same refined logits, not the batched step rounded to bf16 (which loses part of it)."""
    from focus_decoding.text.refine import refine_position, refine_positions_batched

    low = tiny_lm("llama", layers=3).to(torch.bfloat16)
    view = method.module_view(low)
    ids = torch.tensor([[3, 5, 7, 9, 11, 13, 17, 19]])
    with torch.no_grad():
        logits = view(ids, use_cache=False).logits[0].float()
    cfg = FocusConfig(threshold=1.0, step_rule="normalized", tau=0.3, params="all")
    trainable, frozen = method.split_parameters(view, cfg.params)
    positions = [3, 5, 7]
    together = refine_positions_batched(view, ids, logits, positions, trainable, frozen, cfg)
    alone = [refine_position(view, ids, logits[t], t, trainable, frozen, cfg) for t in positions]
    for a, b, t in zip(together, alone, positions):
        assert (b.logits - logits[t]).abs().max() > 0.05  # the step moved the logits
        assert torch.allclose(a.logits, b.logits, atol=1e-5, rtol=0), (a.logits - b.logits).abs().max()


def test_the_chunked_head_equals_the_widened_weight(monkeypatch):
    monkeypatch.setattr(precision, "CHUNK_ROWS", 3)  # several chunks, the last one short
    torch.manual_seed(0)
    head = nn.Linear(6, 10).to(torch.bfloat16)
    x = torch.randn(2, 6, requires_grad=True)
    got = precision.head_logits(head, x)
    want = nn.functional.linear(x.double(), head.weight.double(), head.bias.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    (gx,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(gx.double(), head.weight.double().sum(0).expand(2, 6), rtol=1e-6, atol=1e-6)
    assert head.weight.grad is None  # the frozen head gets no gradient


def test_statistics_show_a_step_that_did_almost_nothing():
    from focus_decoding.vision import FocusClassifier

    low = toy().to(torch.bfloat16)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    kept = FocusClassifier(low, FocusConfig(step_rule="normalized", tau=0.01, threshold=1.0, precision="model"))
    kept(x)
    assert kept.stats.intended == pytest.approx(0.04) and kept.stats.achieved < 0.5 * kept.stats.intended
    full = FocusClassifier(low, FocusConfig(step_rule="normalized", tau=0.01, threshold=1.0))
    full(x)
    assert full.stats.achieved == pytest.approx(full.stats.intended, rel=0.05)


@pytest.mark.default_model
def test_the_embedded_model_in_bfloat16(default_model):
    """SmolLM2-135M in bfloat16, last:2 and tau 1 at real uncertain tokens: float32 keeps the float32 model's decrease."""
    from focus_decoding.evaluation import tokenize_stream

    model32, tok = default_model
    low = copy.deepcopy(model32).to(torch.bfloat16)
    ids = tokenize_stream(tok, ["The quick brown fox jumps over the lazy dog because it"])[None]
    cfg = FocusConfig(params="last:2", step_rule="normalized", tau=1.0, threshold=1.0)
    ratios = {}
    for name, model, config in (("float32", model32, cfg), ("bf16", low, cfg),
                                ("bf16 in dtype", low, FocusConfig(**{**cfg.to_dict(), "precision": "model"}))):
        view = method.module_view(model)
        trainable, frozen = method.split_parameters(view, config.params)
        with torch.no_grad():
            out = view(ids, use_cache=False, output_hidden_states=True)
        states = method.prefix.window_states(out, view, 2)
        got = []
        for t in (4, 7, 10):
            fwd = method.prefix.top_forward(view, 2, states[:, :t + 1])
            got.append(method.focus_step(fwd, out.logits[0, t], trainable, frozen, config).achieved)
        ratios[name] = sum(got)
    assert ratios["bf16"] == pytest.approx(ratios["float32"], rel=0.05)
    assert ratios["bf16 in dtype"] < 0.9 * ratios["float32"]
    assert tail.TAIL == "tail"


def float64_sgd(model: nn.Module, x: torch.Tensor, focus: torch.Tensor, cfg: FocusConfig):
    """Reference: plain SGD in float64 from the (rounded) low-precision weights: parameters and each step's eta*||g||^2."""
    params = {n: p.detach().double().clone().requires_grad_(True) for n, p in model.named_parameters()}
    ref = copy.deepcopy(model).double()
    intended = []
    for _ in range(cfg.steps):
        loss = method.focus_loss(torch.func.functional_call(ref, params, (x.double(),)), focus, cfg.mode)
        grads = torch.autograd.grad(loss, list(params.values()))
        intended.append(cfg.lr * sum(float((g * g).sum()) for g in grads))
        params = {n: (p - cfg.lr * g).detach().requires_grad_(True) for (n, p), g in zip(params.items(), grads)}
    return {n: p.detach() for n, p in params.items()}, intended


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", ["ifo", "dofo"])
@pytest.mark.parametrize("steps", [1, 2])
def test_the_fixed_rule_float32_step_equals_the_float64_step(dtype, mode, steps):
    """The fixed rule's float32 copies (updated tensor by tensor during the backward) end where float64 SGD from the
    same weights ends, and the intended decrease is float64's eta * ||g||^2 at each step."""
    low = toy(3).to(dtype)
    x = torch.randn(64, generator=torch.Generator().manual_seed(4))
    cfg = FocusConfig(mode=mode, lr=2e-3, steps=steps, threshold=1.0)
    focus = torch.tensor([1, 6])
    trainable, frozen = method.split_parameters(low, "all")
    forward = method.model_forward(low, x.to(dtype))
    intended: list[float] = []
    got = method.sgd_steps(lambda v: method.focus_loss(forward(v), focus, mode), trainable, frozen, cfg,
                           intended=intended)
    want, want_intended = float64_sgd(low, x.to(dtype), focus, cfg)  # the input the model sees
    for name, p in trainable.items():
        assert got[name].dtype == torch.float32
        moved, want_moved = got[name].double() - p.double(), want[name] - p.double()
        assert want_moved.abs().max() > 1e-4  # far above that spacing: a missing update fails
        torch.testing.assert_close(moved, want_moved, rtol=1e-3, atol=1e-6)  # atol: float32 spacing of theta
    assert intended == pytest.approx(want_intended, rel=1e-4)
    assert all(p.dtype == dtype for p in low.parameters())


class MixedToy(nn.Module):
    """A low-precision model with one float32 parameter (as loaders keep norms or scales in float32)."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(5)
        self.inner, self.outer = nn.Linear(16, 32).to(dtype), nn.Linear(32, 6).to(dtype)
        self.scale = nn.Parameter(torch.rand(32) + 0.5)  # float32

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        return self.outer(h * self.scale.to(h.dtype))


@pytest.mark.parametrize("rule", [{"lr": 5e-2}, {"step_rule": "normalized", "tau": 1.0}])
def test_a_float32_parameter_of_a_low_precision_model_is_never_changed(rule):
    model = MixedToy(torch.bfloat16).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(16, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    cfg = FocusConfig(threshold=1.0, **rule)
    trainable, frozen = method.split_parameters(model, cfg.params)
    with torch.no_grad():
        base = model(x)
    result = method.focus_step(method.model_forward(model, x), base, trainable, frozen, cfg)
    assert result.intended > 0 and not torch.equal(result.logits, base.float())  # the step did move the logits
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name  # the float32 scale included: stepped on a copy, never in place


@pytest.mark.parametrize("rule", [{"lr": 1e-2}, {"step_rule": "normalized", "tau": 0.1}])
def test_the_float32_step_runs_under_inference_mode(rule):
    """Callers often decode under torch.inference_mode(): the float32 copies are still made where autograd works."""
    low = toy(7).to(torch.bfloat16)
    x = torch.randn(64, generator=torch.Generator().manual_seed(8))
    cfg = FocusConfig(threshold=1.0, **rule)
    _, _, outside = decrease(low, x, cfg)
    with torch.inference_mode():
        _, _, inside = decrease(low, x, cfg)
    assert inside.refined and torch.equal(inside.logits, outside.logits)
