"""Refining through the tail only (issue 17): a classifier's head from its kept input, a language model's
position-wise tail from its kept residual. Every path is held against the naive reference in float64."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from focus_decoding import FocusConfig, method
from focus_decoding.method import tail
from focus_decoding.vision import DigitsNet, FocusClassifier
from reference import assert_exact, config_rate, naive_refine, tiny_lm64

F64 = torch.float64
NORMALIZED = dict(step_rule="normalized", tau=0.5)


# ----------------------------------------------------------------------------- classifiers
class PlainNet(nn.Module):
    """A trunk without BatchNorm (as ccexam's MNISTNet) and a two-layer head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(64, 16), nn.ReLU(inplace=True), nn.Linear(16, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class NormHeadNet(PlainNet):
    """A head with a LayerNorm: not linear layers only, so the batched (vmap) head path runs."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 10))


class ScaledNet(PlainNet):
    """Computes something after its head: the head's output is not the model's."""

    def forward(self, x):
        return 2.0 * self.classifier(self.features(x))


def net(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = {"bn": DigitsNet, "plain": PlainNet, "norm": NormHeadNet, "scaled": ScaledNet}[kind]()
    for m in model.modules():  # BatchNorm statistics that matter in eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.to(F64).eval()


def naive_image(model, x, cfg):
    """Algorithm 1 for ONE image [1, ...]: deep copy, SGD on the selected parameters, the full model re-run."""
    with torch.no_grad():
        base = model(x)[0]
    focus, run = base.topk(cfg.n_focus).indices, (lambda m: m(x)[0])
    names = set(method.split_parameters(model, cfg.params)[0])
    select = lambda n: n in names  # noqa: E731
    return naive_refine(model, run, focus, cfg.mode, config_rate(model, run, focus, cfg, select), cfg.steps, select)


HEAD_CASES = [("bn", "head"), ("plain", "head"), ("plain", ["classifier.2"]), ("plain", ["classifier.0.bias"]),
              ("norm", "head")]


@pytest.mark.parametrize("kind, params", HEAD_CASES)
@pytest.mark.parametrize("mode, rule", [("ifo", dict(lr=0.5)), ("dofo", dict(lr=5.0)), ("entropy", dict(lr=5.0)),
                                        ("ifo", NORMALIZED), ("dofo", NORMALIZED)])
@pytest.mark.parametrize("steps", [1, 3])
def test_the_head_path_equals_the_naive_reference(kind, params, mode, rule, steps):
    model = net(kind)
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        gaps = method.top2_gap(model(x)).sort().values
    threshold = float(gaps[3] + gaps[4]) / 2  # four uncertain images, three certain ones: a mixed batch
    cfg = FocusConfig(mode=mode, steps=steps, params=params, threshold=threshold, **rule)
    before = copy.deepcopy(model.state_dict())
    clf = FocusClassifier(model, cfg, max_batch=3)  # chunks of 3 + 1
    base, out, gate = clf.classify(x)
    assert clf.stats.head and clf.stats.uncertain == int(gate.sum()) == 4
    expected = torch.stack([naive_image(model, x[i:i + 1], cfg) if gate[i] else base[i] for i in range(7)])
    assert (expected[gate] - base[gate]).abs().max() > 1e-3  # the step really moved the logits
    assert_exact(out, expected, f"{kind} {params} {cfg}")
    assert torch.equal(out[~gate], base[~gate])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_head_path_costs_no_full_forward_and_falls_back_once_where_it_does_not_hold(monkeypatch):
    x = torch.rand(5, 1, 8, 8, dtype=F64)
    cfg = FocusConfig(params="head", threshold=1.0, lr=0.5)
    # the head path runs the trunk once (the first forward) and never again for the refinements
    model, calls = net("plain"), []
    model.features.register_forward_hook(lambda *a: calls.append(1))
    FocusClassifier(model, cfg)(x)
    assert len(calls) == 1
    # a model that computes after its head: the whole model, one warning naming why, the same numbers
    scaled = net("scaled")
    clf = FocusClassifier(scaled, cfg)
    with pytest.warns(RuntimeWarning, match="not the model's output"):
        out = clf(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clf(x)  # once
    assert not clf.stats.head
    assert_exact(out, FocusClassifier(scaled, cfg, through_head=False)(x), "fallback")


def test_params_head_is_resolved_or_refused_naming_the_candidates():
    assert method.split_parameters(net("plain"), "head")[0].keys() == set(dict(net("plain").classifier.named_parameters(
        prefix="classifier")).keys())

    class TwoHeads(PlainNet):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(10, 10)

    with pytest.raises(ValueError, match=r"has \['classifier', 'fc'\]"):
        method.split_parameters(TwoHeads(), "head")
    with pytest.raises(ValueError, match="has none of them"):
        method.split_parameters(nn.Sequential(nn.Linear(3, 3)), "head")


def test_an_empty_batch_returns_an_empty_result():
    for params in ("all", "head"):
        out = FocusClassifier(DigitsNet(), FocusConfig(params=params))(torch.rand(0, 1, 8, 8))
        assert out.shape == (0, 10)


# ----------------------------------------------------------------------------- language models
ARCHS = ["llama", "gpt2", "qwen2", "gemma3"]


def lm(arch):
    if arch == "gemma3":
        pytest.importorskip("transformers", minversion="4.50")  # Gemma-3 came with 4.50
    return tiny_lm64(arch, layers=3)


def naive_position(model, ids, t, cfg):
    """The naive reference for the prediction at position t: deep copy, SGD on the tail, the full model re-run."""
    run = lambda m: m(ids[:, :t + 1], use_cache=False).logits[0, -1]  # noqa: E731
    with torch.no_grad():
        focus = run(model).topk(cfg.n_focus).indices
    names = set(method.split_parameters(model, cfg.params)[0])
    select = lambda n: n in names  # noqa: E731
    return naive_refine(model, run, focus, cfg.mode, config_rate(model, run, focus, cfg, select), cfg.steps, select)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_tail_is_the_last_mlp_its_norms_and_the_final_norm_never_the_head(arch):
    model = lm(arch)
    trainable, _ = method.split_parameters(model, "tail")
    prefix, blocks = method.find_blocks(model)
    last = f"{prefix}.{len(blocks) - 1}."
    head = model.get_output_embeddings().weight
    assert all(id(p) != id(head) for p in trainable.values())
    assert {n for n in trainable if not n.startswith(last)} == {n for n in trainable if "norm" in n or "ln_f" in n} - {
        n for n in trainable if n.startswith(last)}
    assert not any("attn" in n or "input_layernorm" in n or "ln_1" in n for n in trainable)  # attention changes others


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode, rule, steps", [("ifo", dict(lr=2.0), 1), ("dofo", dict(lr=50.0), 3),
                                               ("entropy", dict(lr=50.0), 1), ("ifo", NORMALIZED, 3)])
def test_the_tail_from_kept_residuals_equals_the_naive_reference(arch, mode, rule, steps):
    model = lm(arch)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    cfg = FocusConfig(mode=mode, steps=steps, params="tail", **rule)
    trainable, frozen = method.split_parameters(model, cfg.params)
    view = method.module_view(model)
    with torch.no_grad(), tail.TailCapture(view) as kept:
        base = view(ids, use_cache=False).logits[0]
    for t in (2, 8):
        forward = tail.tail_forward(view, kept.states[0, t])
        assert_exact(forward({}), base[t], "unrefined")
        focus = base[t].topk(2).indices
        ours = method.refine(forward, trainable, frozen, focus, cfg)
        ref = naive_position(model, ids, t, cfg)
        assert (ref - base[t]).abs().max() > 1e-3
        assert_exact(ours, ref, f"{arch} t={t} {cfg}")
        # the loss from the head's input (iFo/doFo, a linear head without softcapping): the same step
        cheap = tail.tail_loss_forward(view, kept.states[0, t], trainable, cfg)
        assert (cheap is not None) == (mode in ("ifo", "dofo") and arch != "gemma3")
        if cheap is not None:
            assert_exact(method.refine(forward, trainable, frozen, focus, cfg, loss_forward=cheap), ref,
                         f"{arch} t={t} {cfg} from the head's input")


@pytest.mark.parametrize("mode", ["ifo", "dofo"])
def test_the_loss_from_a_linear_heads_input_equals_the_loss_of_its_logits(mode):
    """Hand-made: 5 classes, a 3-wide head; iFo reads two rows, doFo the column sum minus them (float64)."""
    weight = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 3.0, 1.0], [-2.0, 0.5, 0.5], [1.0, 1.0, -1.0]],
                          dtype=torch.float64)
    x = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64, requires_grad=True)
    focus = torch.tensor([2, 0])
    logits = weight @ x  # [2.5, 0.85, -1.0, -0.4, -1.5]: the focus logits are -1.0 and 2.5
    want = {"ifo": -(-1.0 + 2.5) / 2, "dofo": (0.85 - 0.4 - 1.5) / 3}[mode]
    assert float(method.focus_loss(logits, focus, mode)) == pytest.approx(want, abs=1e-12)
    got = method.head_input_loss(x, weight, focus, mode, weight.sum(0))
    assert float(got) == pytest.approx(want, abs=1e-12)
    (g_cheap,) = torch.autograd.grad(got, x)
    (g_full,) = torch.autograd.grad(method.focus_loss(weight @ x, focus, mode), x)
    assert torch.allclose(g_cheap, g_full, atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="modes .'ifo', 'dofo'., got 'entropy'"):
        method.head_input_loss(x, weight, focus, "entropy", weight.sum(0))


def test_dofo_from_the_heads_input_follows_a_weight_changed_in_place():
    """The column sum is kept per head weight: a weight edited in place (its version moves) gets a new one."""
    model = lm("llama")
    view = method.module_view(model)
    cfg = FocusConfig(mode="dofo", lr=1.0, params="tail")
    trainable, frozen = method.split_parameters(view, cfg.params)
    state, focus = torch.randn(model.config.hidden_size, dtype=torch.float64), torch.tensor([3, 7])
    values = {**frozen, **trainable}
    weight = model.get_output_embeddings().weight

    def both():
        cheap = tail.tail_loss_forward(view, state, trainable, cfg)(values, focus)
        full = method.focus_loss(tail.tail_logits(view, values, state), focus, "dofo")
        return float(cheap), float(full)
    first = both()
    assert first[0] == pytest.approx(first[1], abs=1e-12)
    with torch.no_grad():
        weight.mul_(1.5)  # the embedding the head is tied to, edited by its owner
    second = both()
    assert second[0] == pytest.approx(second[1], abs=1e-12) and abs(second[1] - first[1]) > 1e-6


def test_the_tail_is_refused_naming_the_model_type():
    from transformers import OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(OPTConfig(vocab_size=32, hidden_size=8, ffn_dim=16, num_hidden_layers=1,
                                   num_attention_heads=2, word_embed_proj_dim=8, max_position_embeddings=16))
    with pytest.raises(ValueError, match="this model's is 'opt'.*use 'last:N' instead"):
        method.split_parameters(opt, "tail")


GEN = {"greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=20, num_return_sequences=2),
       "beam": dict(num_beams=3, num_return_sequences=2, do_sample=False)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("decoding", list(GEN))
def test_generation_through_the_tail_equals_the_full_model(arch, decoding, monkeypatch):
    from focus_decoding.text import processor, ways_in

    model = lm(arch)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])  # a batch, row 0 left-padded
    cfg = FocusConfig(threshold=1.0, lr=2.0, params="tail")

    def generate(**kw):
        torch.manual_seed(0)
        return ways_in.focus_generate(model, prompt, attention_mask=(prompt != 0).long(), max_new_tokens=4,
                                      pad_token_id=0, focus_config=cfg, output_scores=True,
                                      return_dict_in_generate=True, **GEN[decoding], **kw)
    fast = generate()
    monkeypatch.setattr(tail, "shortcut", lambda *a, **k: None)  # force the full model on each row's context
    slow = generate()
    assert torch.equal(fast.sequences, slow.sequences)
    counts = lambda s: {k: getattr(s, k) for k in processor.STAT_FIELDS}  # noqa: E731 - the floats: below
    assert counts(fast.focus_stats) == counts(slow.focus_stats) and fast.focus_stats.totals["refined"] > 0
    assert fast.focus_stats.achieved == pytest.approx(slow.focus_stats.achieved, rel=1e-9, abs=1e-12)
    for a, b in zip(fast.scores, slow.scores):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-9, atol=1e-9)
    monkeypatch.undo()
    monkeypatch.setattr(processor.FocusLogitsProcessor, "__init__", _one_row_at_a_time(processor))
    one_by_one = generate()  # the batched rows give what the row-by-row path gives
    assert torch.equal(fast.sequences, one_by_one.sequences)


def _one_row_at_a_time(processor):
    real = processor.FocusLogitsProcessor.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **{**kwargs, "max_batch": 1})
    return init


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_next_token_evaluation_through_the_tail(arch, monkeypatch):  # the harness: test_harness.py
    from focus_decoding.evaluation import evaluate_next_token

    class Bytes:
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + b % 90 for b in text.encode()]}

    model = lm(arch)
    texts = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!"]
    cfg = FocusConfig(threshold=0.3, lr=20.0, params="tail")
    fast = evaluate_next_token(model, Bytes(), texts, cfg, context_length=24, progress=False)
    monkeypatch.setattr(tail, "shortcut", lambda *a, **k: None)
    slow = evaluate_next_token(model, Bytes(), texts, cfg, context_length=24, progress=False)
    assert fast.outcomes == slow.outcomes and fast.n_uncertain > 0
    assert set(fast.outcomes) - {"0", "3"}, "no refinement changed a prediction: the test would be vacuous"
