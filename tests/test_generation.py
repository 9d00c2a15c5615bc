"""The transformers adapter: FocusLogitsProcessor, enable/disable, statistics, unsupported modes."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList

from focus_decoding import FocusConfig
from focus_decoding import method
from focus_decoding.text.ways_in import disable, enable, focus_generate, is_enabled, last_focus_stats
from focus_decoding.text.processor import FocusLogitsProcessor, FocusStats
from reference import naive_refine

PROMPT = [1, 5, 7, 9, 11]
EOS = 2  # the tiny models' eos: min_new_tokens masks it to -inf in generate's scores
LR = {"ifo": 0.3, "dofo": 30.0, "entropy": 30.0}  # visible changes on the tiny models (their logits are ~0.3)


# ----------------------------------------------------------------------------- naive reference
def naive_refined(model, ids, mode, lr, steps=1, n_focus=2, select=lambda name: True):
    """(unrefined, refined) last-position logits, the refined ones from the naive reference."""
    with torch.no_grad():
        base = model(ids).logits[0, -1]
    focus = base.topk(n_focus).indices
    return base, naive_refine(model, lambda m: m(ids).logits[0, -1], focus, mode, lr, steps, select)


def last_two_llama(name):
    return name.startswith(("model.layers.2.", "model.layers.3.", "model.norm."))


def apply_processor(model, ids, config, mask=None, **kw):
    """Run the processor directly on the model's own next-token logits of ``ids``."""
    with torch.no_grad():
        scores = model(ids, attention_mask=mask).logits[:, -1]
    proc = FocusLogitsProcessor(model, config, attention_mask=mask, **kw)
    return scores, proc(ids, scores.clone()), proc


def eos_masked(logits):
    """``logits`` as generate reports them under ``min_new_tokens`` (eos at -inf)."""
    return logits.clone().index_fill_(-1, torch.tensor([EOS]), float("-inf"))


def max_diff(a, b):
    """Largest |a - b| over entries finite in both (generate's processors put -inf in places)."""
    both = torch.isfinite(a) & torch.isfinite(b)
    return (a - b)[both].abs().max()


def greedy(model, ids=PROMPT, n=6, **kw):
    ids = torch.tensor([ids]) if isinstance(ids, list) else ids
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)


class Spy:
    """Records what a FocusLogitsProcessor received and emitted."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = FocusLogitsProcessor.__call__

        def spy(proc, input_ids, scores):
            received = scores.clone()
            out = original(proc, input_ids, scores)
            self.calls.append((input_ids.clone(), received, out.clone(), proc))
            return out
        monkeypatch.setattr(FocusLogitsProcessor, "__call__", spy)


# ----------------------------------------------------------------------------- the step itself
@pytest.mark.parametrize("params", ["all", "last:2"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("mode", ["ifo", "dofo", "entropy"])
def test_refined_step_equals_naive_sgd(tiny_lm, assert_untouched, mode, steps, params):
    model = tiny_lm("llama", tied=False)
    check = assert_untouched(model)
    ids = torch.tensor([PROMPT])
    cfg = FocusConfig(mode=mode, threshold=1.0, lr=LR[mode], steps=steps, params=params)
    scores, out, proc = apply_processor(model, ids, cfg)
    base, ref = naive_refined(model, ids, mode, LR[mode], steps,
                              select=(lambda n: True) if params == "all" else last_two_llama)
    assert (ref - base).abs().max() > 1e-2  # the step really moved the logits
    torch.testing.assert_close(out[0], ref, rtol=1e-4, atol=1e-4)
    assert proc.stats.totals == {"checked": 1, "uncertain": 1, "refined": 1, "nonfinite": 0,
                                 "changed": int(ref.argmax() != base.argmax())}
    check()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tied_weights_equal_naive(tiny_lm, assert_untouched, arch):
    model = tiny_lm(arch, tied=True)
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb  # really tied
    check = assert_untouched(model)
    ids = torch.tensor([PROMPT])
    _, out, _ = apply_processor(model, ids, FocusConfig(threshold=1.0, lr=LR["ifo"]))
    base, ref = naive_refined(model, ids, "ifo", LR["ifo"])
    assert (ref - base).abs().max() > 1e-2
    torch.testing.assert_close(out[0], ref, rtol=1e-4, atol=1e-4)
    check()


def test_left_padded_rows_refine_on_their_own_context(tiny_lm):
    model = tiny_lm("llama", tied=False)
    cfg = FocusConfig(threshold=1.0, lr=LR["ifo"])
    prompts = [[1, 8, 9], [1, 5, 7, 9, 11, 13]]
    generated = torch.tensor([[20], [21]])  # one already generated token per row: always attended
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= torch.tensor([[width - len(p)] for p in prompts])).long()
    full = torch.cat([ids, generated], dim=1)
    contexts = [torch.tensor([p + [g]]) for p, g in zip(prompts, generated[:, 0].tolist())]
    with torch.no_grad():
        scores = torch.cat([model(c).logits[:, -1] for c in contexts])
    out = FocusLogitsProcessor(model, cfg, attention_mask=mask)(full, scores.clone())
    for row, ctx in enumerate(contexts):
        torch.testing.assert_close(out[row], naive_refined(model, ctx, "ifo", cfg.lr)[1], rtol=1e-4, atol=1e-4)

    # another prompt in row 1 never changes row 0's refined logits
    other = full.clone()
    other[1, -4:-1] = torch.tensor([30, 31, 32])
    out2 = FocusLogitsProcessor(model, cfg, attention_mask=mask)(other, scores.clone())
    assert torch.equal(out2[0], out[0])
    assert not torch.equal(out2[1], out[1])

    # rows expanded for beams / return sequences use repeat_interleave of the prompt mask
    expanded = full.repeat_interleave(2, dim=0)
    out3 = FocusLogitsProcessor(model, cfg, attention_mask=mask)(expanded, scores.repeat_interleave(2, dim=0))
    for row in range(4):
        assert torch.equal(out3[row], out[row // 2])


# ----------------------------------------------------------------------------- generate modes
def test_greedy_emits_refined_logits(tiny_lm, assert_untouched):
    model = enable(tiny_lm("llama", tied=False))
    check = assert_untouched(model)
    plain = greedy(model)
    out = greedy(model, focus_config=FocusConfig(threshold=1.0, lr=1.0))
    check()
    _, ref = naive_refined(model, torch.tensor([PROMPT]), "ifo", 1.0)
    torch.testing.assert_close(out.scores[0][0], eos_masked(ref), rtol=1e-4, atol=1e-4)
    emitted = torch.stack([s[0].argmax() for s in out.scores])
    assert torch.equal(out.sequences[0, len(PROMPT):], emitted)
    assert not torch.equal(out.sequences, plain.sequences)  # the refinement changed the text


def test_left_padded_batch_generate_matches_single_prompts(tiny_lm, tiny_tokenizer):
    model = enable(tiny_lm("llama", tied=False))
    cfg = FocusConfig(threshold=1.0, lr=1.0)
    texts = ["w8 w9", "w5 w7 w9 w11 w13"]
    batch = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()  # really left padded
    out = greedy(model, batch.input_ids, attention_mask=batch.attention_mask, focus_config=cfg)
    assert out.focus_stats.totals["refined"] == 12
    for row, text in enumerate(texts):
        single = greedy(model, tiny_tokenizer(text, return_tensors="pt").input_ids, focus_config=cfg)
        assert out.sequences[row, -6:].tolist() == single.sequences[0, -6:].tolist()


def test_sampling_focus_runs_first(tiny_lm, monkeypatch):
    model = enable(tiny_lm("llama", tied=False))
    spy = Spy(monkeypatch)
    kw = dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.9, repetition_penalty=1.3, max_new_tokens=5,
              pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    torch.manual_seed(0)
    out = model.generate(torch.tensor([PROMPT]), focus_config=FocusConfig(threshold=1.0, lr=1.0), **kw)
    assert len(spy.calls) == 5
    for (_, received, _, _), raw in zip(spy.calls, out.logits):
        assert torch.equal(received, raw)  # before repetition penalty, temperature, top-k, top-p
    torch.manual_seed(0)
    again = model.generate(torch.tensor([PROMPT]), focus_config=FocusConfig(threshold=1.0, lr=1.0), **kw)
    assert torch.equal(out.sequences, again.sequences)  # the step consumes no randomness
    assert out.focus_stats.totals["refined"] == 5


def test_beam_search_emits_log_probs(tiny_lm, monkeypatch):
    model = enable(tiny_lm("llama", tied=False))
    spy = Spy(monkeypatch)
    out = model.generate(torch.tensor([PROMPT]), num_beams=3, num_return_sequences=2, max_new_tokens=3,
                         min_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         focus_config=FocusConfig(threshold=1.0, lr=1.0))
    assert out.sequences.shape[0] == 2
    assert spy.calls[0][3].scores_are_log_probs
    _, ref = naive_refined(model, torch.tensor([PROMPT]), "ifo", 1.0)
    torch.testing.assert_close(spy.calls[0][2][0], torch.log_softmax(ref, -1), rtol=1e-4, atol=1e-4)
    for _, received, emitted, _ in spy.calls:
        torch.testing.assert_close(received.logsumexp(-1), torch.zeros(3))  # scores came as log-probs
        torch.testing.assert_close(emitted.logsumexp(-1), torch.zeros(3))  # and leave as log-probs
    assert len(out.focus_stats.checked) == 3 and out.focus_stats.totals["refined"] == 9


def test_num_return_sequences_padded_batch_contexts(tiny_lm, tiny_tokenizer, monkeypatch):
    model = enable(tiny_lm("llama", tied=False))
    seen = []
    original = FocusLogitsProcessor._row_context

    def spy(self, ids, mask):  # called for the uncertain rows of each step, in row order
        context = original(self, ids, mask)
        seen.append((len(seen) % 4, context.clone()))
        return context
    monkeypatch.setattr(FocusLogitsProcessor, "_row_context", spy)
    texts = ["w8 w9", "w5 w7 w9 w11"]
    batch = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    prompts = [tiny_tokenizer(t).input_ids for t in texts]
    out = model.generate(**batch, do_sample=True, num_return_sequences=2, max_new_tokens=3, min_new_tokens=3,
                         pad_token_id=0, return_dict_in_generate=True, focus_config=FocusConfig(threshold=1.0))
    assert out.focus_stats.checked == [3, 3, 3, 3]
    assert len(seen) == 12
    for row, ids in seen:
        prompt = prompts[row // 2]
        assert ids[0, :len(prompt)].tolist() == prompt and 0 not in ids[0].tolist()  # no padding inside


GATED_OFF_MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    "beam": dict(num_beams=3, do_sample=False),
    "return_sequences": dict(do_sample=True, num_return_sequences=3),
}


@pytest.mark.parametrize("mode", sorted(GATED_OFF_MODES))
def test_gate_that_never_fires_changes_nothing(tiny_lm, tiny_tokenizer, mode):
    model = enable(tiny_lm("llama", tied=False))
    batch = tiny_tokenizer(["w8 w9", "w5 w7 w9 w11"], return_tensors="pt", padding=True)
    kw = dict(GATED_OFF_MODES[mode], max_new_tokens=5, pad_token_id=0)
    torch.manual_seed(1)
    plain = model.generate(**batch, **kw)
    torch.manual_seed(1)
    focused = model.generate(**batch, focus_config=FocusConfig(threshold=1e-9), **kw)
    assert torch.equal(plain, focused)
    stats = last_focus_stats()
    assert stats.totals["checked"] > 0 and stats.totals["uncertain"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_lm_head_only_ifo_never_changes_argmax(tiny_lm, seed):
    # iFo on the head alone adds lr*|h|^2/|F| to every focus logit equally: the order within F holds
    model = enable(tiny_lm("llama", tied=False, seed=seed))
    prompt = torch.randint(4, 96, (1, 6), generator=torch.Generator().manual_seed(seed)).tolist()[0]
    plain = greedy(model, prompt)
    for lr in (1e-2, 1.0, 100.0):
        out = greedy(model, prompt, focus_config=FocusConfig(threshold=1.0, lr=lr, params=["lm_head"]))
        assert torch.equal(out.sequences, plain.sequences)
        assert out.focus_stats.totals["refined"] == 6 and out.focus_stats.totals["changed"] == 0
        assert max_diff(out.scores[0], plain.scores[0]) > 1e-4  # the head really moved


# ----------------------------------------------------------------------------- safety
def test_model_untouched_when_step_raises(tiny_lm, assert_untouched, monkeypatch):
    model = enable(tiny_lm("llama", tied=False))
    model.train()  # flags must stay as the caller left them
    check = assert_untouched(model)
    before_attrs = set(model.__dict__)
    calls = {"n": 0}
    original = type(model).forward

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # 1: generate's own forward, 2: the step's forward, 3: refined forward
            raise RuntimeError("boom")
        return original(self, *a, **kw)
    monkeypatch.setattr(type(model), "forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        greedy(model, focus_config=FocusConfig(threshold=1.0, lr=1.0))
    check()
    assert set(model.__dict__) == before_attrs  # nothing patched onto the model, not even on error
    monkeypatch.setattr(type(model), "forward", original)
    assert greedy(model, focus_config=FocusConfig(threshold=1.0, lr=1.0)).focus_stats.totals["refined"] == 6
    check()


def test_nonfinite_refinement_falls_back(tiny_lm, assert_untouched):
    model = enable(tiny_lm("gpt2", tied=True))
    check = assert_untouched(model)
    plain = greedy(model)
    out = greedy(model, focus_config=FocusConfig(threshold=1.0, lr=1e30))
    stats = out.focus_stats.totals
    assert stats["nonfinite"] == stats["uncertain"] == 6 and stats["refined"] == 0
    assert torch.equal(out.sequences, plain.sequences)
    for emitted, raw in zip(out.scores, out.logits):
        assert not torch.isnan(emitted).any() and torch.equal(emitted, eos_masked(raw))
    check()


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_inside_no_grad_and_inference_mode(tiny_lm, context):
    model = enable(tiny_lm("llama", tied=False))
    cfg = FocusConfig(threshold=1.0, lr=1.0)
    expected = greedy(model, focus_config=cfg)
    with getattr(torch, context)():
        out = greedy(model, focus_config=cfg)
    assert torch.equal(out.sequences, expected.sequences)
    assert out.focus_stats.totals["refined"] == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(tiny_lm, assert_untouched, monkeypatch, dtype):
    model = enable(tiny_lm("llama", tied=False).to(dtype))
    check = assert_untouched(model)
    out = greedy(model, n=3, focus_config=FocusConfig(threshold=1.0, lr=1.0))
    assert out.focus_stats.totals["refined"] == 3
    assert max_diff(out.scores[0], out.logits[0]) > 0.5  # a real update, not lost to rounding
    monkeypatch.setattr(method.step, "_warned_no_change", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny = greedy(model, n=2, focus_config=FocusConfig(threshold=1.0, lr=1e-12))
    assert [str(w.message) for w in caught if w.category is RuntimeWarning and "changed no parameter" in str(w.message)]
    assert len([w for w in caught if "changed no parameter" in str(w.message)]) == 1  # once, not per token
    assert torch.equal(tiny.sequences, greedy(model, n=2).sequences)
    check()


# ----------------------------------------------------------------------------- integration
UNSUPPORTED = {
    "assistant_model": ("assistant_model", dict(assistant_model="MODEL")),
    "prompt_lookup": ("prompt_lookup_num_tokens", dict(prompt_lookup_num_tokens=2)),
    "contrastive": ("contrastive search", dict(penalty_alpha=0.6, top_k=4)),
    "dola": ("DoLa", dict(dola_layers="high")),
    "constraints": ("constrained beam search", dict(constraints=[object()], num_beams=2)),
    "force_words": ("constrained beam search", dict(force_words_ids=[[5]], num_beams=2)),
    "group_beam": ("num_beam_groups", dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0)),
    "custom_generate": ("custom_generate", dict(custom_generate=lambda *a, **k: None)),
    "inputs_embeds": ("inputs_embeds", dict(inputs_embeds=torch.zeros(1, 5, 32))),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_modes_raise(tiny_lm, name):
    model = enable(tiny_lm("llama", tied=False))
    match, kw = UNSUPPORTED[name]
    kw = {k: (tiny_lm("llama", layers=1) if isinstance(v, str) and v == "MODEL" else v) for k, v in kw.items()}
    before_attrs = set(model.__dict__)
    with pytest.raises(ValueError, match=match):
        model.generate(torch.tensor([PROMPT]), max_new_tokens=2, focus_config=FocusConfig(), **kw)
    assert set(model.__dict__) == before_attrs


def test_unsupported_model_and_duplicate_processor(tiny_lm):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        enable(t5)
    with pytest.raises(ValueError, match="encoder-decoder"):
        FocusLogitsProcessor(t5, FocusConfig())
    model = enable(tiny_lm("llama"))
    own = LogitsProcessorList([FocusLogitsProcessor(model, FocusConfig())])
    with pytest.raises(ValueError, match="FocusLogitsProcessor"):
        model.generate(torch.tensor([PROMPT]), max_new_tokens=2, logits_processor=own, focus_config=FocusConfig())
    with pytest.raises(ValueError, match="attention_mask"):
        FocusLogitsProcessor(model, FocusConfig(), attention_mask=torch.ones(3))
    with pytest.raises(ValueError, match="threshold"):
        FocusLogitsProcessor(model, {"threshold": 0.0})


def test_pipeline_passes_focus_config(tiny_lm, tiny_tokenizer):
    from transformers import pipeline

    model = enable(tiny_lm("llama", tied=False))
    cfg = FocusConfig(threshold=1.0, lr=1.0)
    pipe = pipeline("text-generation", model=model, tokenizer=tiny_tokenizer)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, return_full_text=False)
    text = pipe("w5 w7 w9", focus_config=cfg, **kw)[0]["generated_text"]
    assert last_focus_stats().totals == {**last_focus_stats().totals, "checked": 4, "refined": 4}
    ids = tiny_tokenizer("w5 w7 w9", return_tensors="pt").input_ids
    direct = greedy(model, ids, n=4, focus_config=cfg).sequences[0, ids.shape[1]:]
    assert text.split() == tiny_tokenizer.decode(direct, skip_special_tokens=True).split()
    assert text != pipe("w5 w7 w9", **kw)[0]["generated_text"]  # and plain differs


def test_generation_config_attribute(tiny_lm, tmp_path):
    model = enable(tiny_lm("llama", tied=False))
    cfg = FocusConfig(threshold=1.0, lr=1.0)
    expected = greedy(model, focus_config=cfg).sequences
    gc = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    gc.focus_config = cfg.to_dict()
    gc.save_pretrained(tmp_path)  # serialises: it is a plain dict
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert FocusConfig.coerce(loaded.focus_config) == cfg
    assert torch.equal(model.generate(torch.tensor([PROMPT]), generation_config=loaded), expected)
    assert last_focus_stats().totals["refined"] == 6

    enable(model, cfg)  # stores it on model.generation_config
    assert model.generation_config.focus_config == cfg.to_dict()
    assert torch.equal(greedy(model).sequences, expected)
    seen = last_focus_stats()
    plain = greedy(model, focus_config=None)  # an explicit None switches it off
    assert last_focus_stats() is seen and not torch.equal(plain.sequences, expected)


def test_enable_is_idempotent_and_disable_restores(tiny_lm):
    model = tiny_lm("llama", tied=False)
    before = greedy(model).sequences
    assert enable(enable(model)) is model and is_enabled(model)
    assert torch.equal(greedy(model).sequences, before)  # no focus_config: untouched call-through
    assert set(model.__dict__) - set(tiny_lm("llama", tied=False).__dict__) == {"generate", "_focus_previous_generate"}
    twin = copy.deepcopy(model)
    assert twin.generate.__self__ is twin  # a copy generates with its own weights
    disable(model)
    assert not is_enabled(model) and "generate" not in model.__dict__
    assert torch.equal(greedy(model).sequences, before)


def test_statistics_with_threshold_one(tiny_lm, tiny_tokenizer, monkeypatch):
    model = enable(tiny_lm("llama", tied=False))
    spy = Spy(monkeypatch)
    batch = tiny_tokenizer(["w8 w9", "w5 w7 w9 w11"], return_tensors="pt", padding=True)
    out = greedy(model, batch.input_ids, attention_mask=batch.attention_mask, n=5,
                 focus_config=FocusConfig(threshold=1.0, lr=1.0))
    stats = out.focus_stats
    assert isinstance(stats, FocusStats) and last_focus_stats() is stats
    assert stats.checked == stats.uncertain == stats.refined == [5, 5] and stats.nonfinite == [0, 0]
    for row in range(2):  # changed = positions whose emitted argmax differs from the model's own
        assert stats.changed[row] == sum(int(e[row].argmax() != r[row].argmax()) for _, r, e, _ in spy.calls)
    assert stats.to_dict()["totals"] == stats.totals and stats.totals["changed"] > 0


def test_finished_rows_are_not_refined(tiny_lm):
    model = enable(tiny_lm("llama", tied=False))
    plain = greedy(model, n=8)
    eos = int(plain.sequences[0, len(PROMPT) + 1])  # pretend the second new token ends the text
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                         eos_token_id=eos, focus_config=FocusConfig(threshold=1e-9))
    assert out.shape[1] == len(PROMPT) + 2 and last_focus_stats().checked == [2]


# ----------------------------------------------------------------------------- the real model
@pytest.mark.default_model
def test_default_model_is_the_real_model(default_model):
    # The GGUF file stores the embedding only (tied head). transformers 4.46 leaves the head randomly
    # initialised on load; the loader must tie it, or every result on the embedded model is noise.
    model, tok = default_model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"


@pytest.mark.default_model
def test_default_model_greedy(default_model, assert_untouched, monkeypatch):
    model, tok = default_model
    spy = Spy(monkeypatch)
    enable(model)
    try:
        check = assert_untouched(model)
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        plain = greedy(model, ids, n=4)
        out = greedy(model, ids, n=4, focus_config=FocusConfig.preset("smollm2-135m", threshold=1.0))
        stats = out.focus_stats.totals
        assert stats["checked"] == stats["uncertain"] == stats["refined"] == 4 and stats["nonfinite"] == 0
        assert stats["changed"] == sum(int(e[0].argmax() != r[0].argmax()) for _, r, e, _ in spy.calls)
        # first position: same context, so the refined scores differ from plain by the step alone
        assert 0 < max_diff(out.scores[0], plain.scores[0]) < 50
        check()
    finally:
        disable(model)


def test_a_step_where_nothing_is_uncertain_costs_one_host_sync(tiny_lm, monkeypatch):
    """Counting every device->host read (.item, .tolist, .cpu, bool/int of a tensor): with a gate that never fires,
    each decoding step of focused generation makes exactly one more than plain generate (the one bool that says
    whether any row needs the step), whatever the batch size; the counts stay on the device until the end."""
    model = tiny_lm("llama")
    prompt = torch.tensor([[3, 5, 7, 9]] * 4)
    calls = {"n": 0}
    for name in ("item", "tolist", "cpu", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            calls["n"] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def syncs(**kw):
        calls["n"] = 0
        out = focus_generate(model, prompt, **kw) if kw.get("focus_config") else model.generate(prompt, **kw)
        return calls["n"], out
    extra = {}
    for steps in (6, 12):
        common = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
        plain, _ = syncs(**common)
        focused, _ = syncs(**common, focus_config=FocusConfig(threshold=1e-9))
        extra[steps] = focused - plain
    assert extra[12] - extra[6] == 6, extra  # six more steps: six more reads, one each
