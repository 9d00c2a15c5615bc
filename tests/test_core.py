"""The core step against a naive reference written straight from the method."""
import pytest
import torch
from torch import nn

from focus_decoding import FocusConfig, focus_classes, focus_loss, focus_step, is_uncertain, split_parameters, top2_gap
from focus_decoding.core import model_forward, refine
from focus_decoding.models import tiny_causal_lm
from reference import naive_refine


# --------------------------------------------------------------------- gate, focus set, loss
def test_gap_and_gate_on_hand_made_distributions():
    # probabilities 0.5/0.48/0.02: a 0.02 gap is uncertain at 0.04 but not at 0.01
    logits = torch.tensor([0.5, 0.48, 0.02]).log()
    assert top2_gap(logits).item() == pytest.approx(0.02, abs=1e-6)
    assert bool(is_uncertain(logits, 0.04)) and not bool(is_uncertain(logits, 0.01))
    # a confident row next to a tie: the gate is per row
    batch = torch.stack([torch.tensor([0.9, 0.05, 0.05]).log(), torch.tensor([0.4, 0.4, 0.2]).log()])
    assert is_uncertain(batch, 0.04).tolist() == [False, True]


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


# --------------------------------------------------------------------- the step vs the reference
@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("gpt2", True)])
@pytest.mark.parametrize("mode,lr", [("ifo", 0.05), ("dofo", 5.0)])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("params", ["all", "last:2"])
def test_refine_equals_naive_sgd(arch, tied, mode, lr, steps, params):
    model = tiny_causal_lm(arch, tied=tied)
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    cfg = FocusConfig(mode=mode, lr=lr, steps=steps, params=params)
    with torch.no_grad():
        base = model(ids).logits[0, -1]
    focus = focus_classes(base, cfg.n_focus)
    trainable, frozen = split_parameters(model, cfg.params)
    ours = refine(model_forward(model, ids, select=lambda o: o.logits[0, -1]), trainable, frozen, focus, cfg)
    ref = naive_refine(model, lambda m: m(ids).logits[0, -1], focus, cfg.mode, cfg.lr, cfg.steps,
                       select=lambda name: name in trainable)
    assert (ref - base).abs().max() > 1e-3  # the step really moved the logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


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
    ids = torch.randint(3, 96, (1, 8))
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    trainable, frozen = split_parameters(model, "all")
    res = focus_step(model_forward(model, ids, select=lambda o: o.logits[0, -1]), logits, trainable, frozen,
                     FocusConfig(threshold=1.0, lr=0.1))
    assert res.refined
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not model.training


def test_step_under_inference_mode_matches_plain():
    model = tiny_causal_lm("llama")
    cfg = FocusConfig(threshold=1.0, lr=0.1)
    trainable, frozen = split_parameters(model, "all")

    def run():
        ids = torch.arange(3, 11)[None]
        logits = model(ids).logits[0, -1]
        from focus_decoding.core import as_normal_tensor
        fwd = model_forward(model, as_normal_tensor(ids), select=lambda o: o.logits[0, -1])
        return focus_step(fwd, logits, trainable, frozen, cfg).logits

    with torch.no_grad():
        plain = run()
    with torch.inference_mode():
        inf = run()
    torch.testing.assert_close(inf, plain)


def test_nonfinite_refinement_falls_back():
    # a linear model overflows to inf at a huge rate (normalised transformers may not)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gets_a_real_update(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(16, 5).to(dtype)
    x = torch.randn(16, dtype=dtype)
    logits = lin(x).detach()
    trainable, frozen = split_parameters(lin, "all")
    cfg = FocusConfig(threshold=1.0, lr=1e-1)
    fwd = model_forward(lin, x)
    res = focus_step(fwd, logits, trainable, frozen, cfg)
    # the fp32 reference, rounded to the model dtype at the end
    ref = nn.Linear(16, 5)
    ref.load_state_dict({k: v.float() for k, v in lin.state_dict().items()})
    focus = focus_classes(logits.float(), 2)
    loss = -ref(x.float())[focus].mean()
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_((p - 0.1 * p.grad).to(dtype).float())
        expected = ref(x.float())
    assert not torch.equal(res.logits, logits)
    torch.testing.assert_close(res.logits.float(), expected, rtol=2e-2, atol=2e-2)


def test_tiny_lr_in_bf16_warns_once(recwarn):
    import focus_decoding.core as core

    core._warned_no_change = False
    lin = nn.Linear(8, 4).to(torch.bfloat16)
    x = torch.ones(8, dtype=torch.bfloat16)
    trainable, frozen = split_parameters(lin, "all")
    cfg = FocusConfig(threshold=1.0, lr=1e-12)
    for _ in range(3):
        focus_step(model_forward(lin, x), lin(x).detach(), trainable, frozen, cfg)
    msgs = [w for w in recwarn.list if "changed no parameter" in str(w.message)]
    assert len(msgs) == 1
