"""Cached-prefix refinement: the top-blocks forward equals the uncached one; the recorder keeps the right states.

Comparisons of the cached path with the uncached path or the naive reference run in float64
(``reference.tiny_lm64``) and are held to 1e-10, so that their verdict cannot depend on the CPU's
float32 kernels or the thread count, and a real difference cannot hide in a float32 tolerance.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import LogitsProcessor, LogitsProcessorList

from focus_decoding import FocusConfig
from focus_decoding import method
from focus_decoding.method import prefix
from focus_decoding.resources.models import tiny_causal_lm
from reference import assert_exact, config_rate, naive_refine, tiny_lm64
from focus_decoding.method.prefix import (HiddenRecorder, input_states, kept_state_bytes, prefix_blocks, supports_prefix,
                                   top_forward, window_states)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread, above all on a loaded 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Gemma-3 came with transformers 4.50: its cases are skipped on older versions, where the model does not exist
NO_GEMMA3 = pytest.mark.skipif(Version(transformers.__version__) < Version("4.50"), reason="Gemma-3 needs 4.50")
ARCHS = [("llama", True), ("llama", False), ("qwen2", True), ("gpt2", True), ("gpt2", False),
         pytest.param("gemma3", True, marks=NO_GEMMA3)]
ATOL = 2e-5  # float32 hidden states of the recorder vs a fresh forward (same values, other batch shapes)
NORMALIZED = dict(step_rule="normalized", tau=0.5)


def assert_same_scores(a, b):
    """generate hands processors float32 scores even for a float64 model; the refined float64 logits,
    equal to ~1e-14 on both paths, are rounded to float32 there, so they may differ by one float32 ulp."""
    torch.testing.assert_close(a, b, rtol=2.5e-7, atol=1e-12)


def _ids(seed=0, length=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (1, length), generator=g)


def _uncached(model, ids):
    return method.model_forward(model, ids, use_cache=False, select=lambda o: o.logits[0, -1])


def _spy(monkeypatch, name, owner=prefix):
    """Count calls of ``owner.<name>`` (still calling the real one)."""
    calls, real = [], getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, spy)
    return calls


def _spy_full(monkeypatch):
    """Count the refinements that ran the full model on their context (``method.model_forward``)."""
    return _spy(monkeypatch, "model_forward", method)


def _naive(model, ids, focus, config):
    """The naive reference on the parameters ``config.params`` selects; for the normalized rule the rate
    is computed by hand: one step, tau / ||g||^2 from plain autograd; several, each step's own."""
    names = set(method.split_parameters(model, config.params)[0])
    run, select = (lambda m: m(ids, use_cache=False).logits[0, -1]), (lambda name: name in names)
    return naive_refine(model, run, focus, config.mode, config_rate(model, run, focus, config, select), config.steps,
                        select=select)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch,tied", ARCHS)
def test_top_forward_unchanged_params_equal_full_logits(arch, tied, attn):
    model, ids = tiny_lm64(arch, tied=tied, layers=4, attn=attn), _ids()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[0, -1]
        for n in (1, 2, 4):
            assert_exact(top_forward(model, n, input_states(model, n, ids))({}), full, f"n={n}")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch,tied", ARCHS)
def test_refine_with_kept_states_equals_uncached(arch, tied, attn, assert_untouched):
    model, ids = tiny_lm64(arch, tied=tied, layers=4, attn=attn), _ids(1)
    check = assert_untouched(model)
    slow = _uncached(model, ids)
    with torch.no_grad():
        focus = method.focus_classes(slow({}), 2)
    for n in (1, 2, 4):
        hidden = input_states(model, n, ids)
        # Every mode x steps combination at n=2, and the normalized rule (its ||g|| is over the top
        # blocks only); three combinations at the other n keep the file fast.
        combos = [("ifo", 1, {}), ("ifo", 3, {}), ("dofo", 1, {}), ("dofo", 3, {}), ("ifo", 1, NORMALIZED),
                  ("dofo", 3, NORMALIZED)] if n == 2 else [("ifo", 1, {}), ("dofo", 3, {}), ("dofo", 3, NORMALIZED)]
        for mode, steps, rule in combos:
            step = rule or dict(lr=0.05 if mode == "ifo" else 0.5)
            config = FocusConfig(mode=mode, steps=steps, params=f"last:{n}", **step)
            assert prefix_blocks(model, config) == n
            trainable, frozen = method.split_parameters(model, config.params)
            fast = method.refine(top_forward(model, n, hidden), trainable, frozen, focus, config)
            ref = method.refine(slow, trainable, frozen, focus, config)
            assert not torch.allclose(ref, slow({}), atol=1e-3)  # the step really moved the logits
            assert_exact(fast, ref, f"n={n} {config}")
    check()


@pytest.mark.parametrize("arch,tied,mode,steps,rule", [
    ("llama", True, "ifo", 3, dict(lr=0.05)), ("gpt2", False, "dofo", 3, dict(lr=0.5)),
    ("llama", True, "ifo", 1, NORMALIZED), ("llama", False, "dofo", 3, NORMALIZED), ("gpt2", True, "ifo", 3, NORMALIZED),
    ("qwen2", True, "dofo", 1, NORMALIZED), ("llama", True, "entropy", 3, dict(lr=5.0)),
    ("gpt2", False, "entropy", 1, NORMALIZED)])
def test_refine_with_kept_states_equals_naive_sgd(arch, tied, mode, steps, rule):
    model, ids = tiny_lm64(arch, tied=tied, layers=4), _ids(2)
    config = FocusConfig(mode=mode, steps=steps, params="last:2", **rule)
    with torch.no_grad():
        base = model(ids).logits[0, -1]
    focus = method.focus_classes(base, 2)
    trainable, frozen = method.split_parameters(model, config.params)
    fast = method.refine(top_forward(model, 2, input_states(model, 2, ids)), trainable, frozen, focus, config)
    ref = _naive(model, ids, focus, config)
    assert (ref - base).abs().max() > 1e-3  # the step really moved the logits
    assert_exact(fast, ref, str(config))


def test_pattern_lists_and_the_tied_head_rule():
    tied, untied = tiny_lm64("llama", tied=True), tiny_lm64("llama", tied=False)
    # last:N never selects the head, so the tied embedding stays fixed and the kept states stay valid.
    assert prefix_blocks(tied, FocusConfig(params="last:2")) == 2
    # The head of a tied model IS the embedding: updating it changes every kept state -> uncached.
    assert prefix_blocks(tied, FocusConfig(params=["lm_head"])) is None
    assert prefix_blocks(untied, FocusConfig(params=["lm_head"])) == 1
    assert prefix_blocks(untied, FocusConfig(params=["model.layers.2.mlp*"])) == 2
    for model in (tied, untied):
        assert prefix_blocks(model, FocusConfig(params="all")) is None
        assert prefix_blocks(model, FocusConfig(params=["model.embed_tokens"])) is None
    # An untied head alone: the fast path with one block equals the uncached path and the reference.
    ids = _ids(3)
    slow = _uncached(untied, ids)
    with torch.no_grad():
        focus = method.focus_classes(slow({}), 2)
    for config in (FocusConfig(params=["lm_head"], lr=0.05, steps=2),
                   FocusConfig(params=["lm_head"], steps=2, **NORMALIZED)):
        trainable, frozen = method.split_parameters(untied, config.params)
        fast = method.refine(top_forward(untied, 1, input_states(untied, 1, ids)), trainable, frozen, focus, config)
        assert_exact(fast, method.refine(slow, trainable, frozen, focus, config), str(config))
        assert_exact(fast, _naive(untied, ids, focus, config), str(config))


def _tiny_opt():
    """A causal LM of an architecture prefix.py does not support."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def test_unsupported_models_fall_back_with_one_warning():
    opt, plain = _tiny_opt(), torch.nn.Sequential(torch.nn.Linear(4, 4))
    for model in (opt, plain):
        assert not supports_prefix(model)
        assert prefix_blocks(model, FocusConfig(params="last:1")) is None
        with pytest.raises(ValueError, match="not supported"):
            HiddenRecorder(model, 1)
    assert supports_prefix(tiny_causal_lm("gpt2")) and supports_prefix(tiny_causal_lm("llama"))
    prefix._warned.clear()
    config = FocusConfig(params="last:1")
    with pytest.warns(RuntimeWarning, match="uncached"):
        prefix.warn_fallback(opt, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefix.warn_fallback(opt, config)  # warned once


def test_bad_input_raises_value_error():
    model, ids = tiny_causal_lm("llama"), _ids()
    hidden = input_states(model, 2, ids)
    with pytest.raises(ValueError, match="hidden"):
        top_forward(model, 2, hidden[0])
    with pytest.raises(ValueError, match="n must be in 1..4"):
        top_forward(model, 5, hidden)
    with pytest.raises(ValueError, match="attention_mask"):
        top_forward(model, 2, hidden, attention_mask=torch.zeros(1, ids.shape[1], dtype=torch.long))
    with pytest.raises(ValueError, match="n must be in 1..4"):
        HiddenRecorder(model, 0)


class _Check(LogitsProcessor):
    """Files each step's states and compares every row's with an uncached forward on its unpadded context."""

    def __init__(self, recorder, prompt_mask):
        self.recorder, self.mask, self.rows = recorder, prompt_mask, 0

    def __call__(self, input_ids, scores):
        self.recorder.observe(input_ids)
        mask = self.mask.repeat_interleave(input_ids.shape[0] // self.mask.shape[0], dim=0)
        generated = torch.ones(input_ids.shape[1] - mask.shape[1], dtype=torch.bool)
        for row in range(input_ids.shape[0]):
            kept = self.recorder.hidden_for(row, input_ids[row], mask[row])
            context = input_ids[row][torch.cat([mask[row].bool(), generated])][None]
            ref = input_states(self.recorder.model, self.recorder.n, context)  # not recorded: uncached
            assert kept is not None and kept.shape == ref.shape
            assert torch.allclose(kept, ref, atol=ATOL), (row, (kept - ref).abs().max())
            self.rows += 1
        return scores


@pytest.mark.parametrize("arch,attn", [("llama", "eager"), ("qwen2", "sdpa"), ("gpt2", "eager"), ("gpt2", "sdpa"),
                                       pytest.param("gemma3", "eager", marks=NO_GEMMA3)])
def test_recorder_states_match_uncached_forward_in_every_decoding_mode(arch, attn, assert_untouched):
    model = tiny_causal_lm(arch, layers=4, attn=attn)
    check = assert_untouched(model)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])  # batch 2, row 0 left-padded
    mask = (prompt != 0).long()
    modes = [dict(do_sample=False), dict(do_sample=True, top_k=20, temperature=0.9, num_return_sequences=2),
             dict(num_beams=3, num_return_sequences=2, do_sample=False)]
    for kwargs in modes:
        torch.manual_seed(0)
        with HiddenRecorder(model, 2) as recorder:
            checker = _Check(recorder, mask)
            out = model.generate(prompt, attention_mask=mask, max_new_tokens=5, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([checker]), **kwargs)
        per_step = 2 * kwargs.get("num_beams", kwargs.get("num_return_sequences", 1))  # rows the forward runs
        assert checker.rows >= per_step and checker.rows % per_step == 0 and recorder.valid
        assert recorder.nbytes >= kept_state_bytes(out.shape[0], out.shape[1] - 1, model.config.hidden_size, torch.float32)
    assert not model._forward_pre_hooks and not method.find_blocks(model)[1][2]._forward_pre_hooks  # hooks removed
    check()


def test_recorder_refuses_rather_than_guesses():
    model = tiny_causal_lm("llama")
    with HiddenRecorder(model, 1) as recorder:
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, pad_token_id=0)  # never observed
        recorder.observe(torch.tensor([[3, 4, 5, 6, 7, 8]]))
        assert not recorder.valid and recorder.hidden_for(0, torch.tensor([3, 4, 5, 6, 7, 8])) is None
    recorder.reset()
    with recorder:
        with torch.no_grad():
            model(torch.tensor([[3, 4, 5]]), use_cache=True)
        recorder.observe(torch.tensor([[3, 4, 5]]))
        assert recorder.hidden_for(0, torch.tensor([3, 4, 9])) is None  # other tokens: not these states
        assert recorder.hidden_for(0, torch.tensor([3, 4, 5])).shape == (1, 3, model.config.hidden_size)


def test_window_states_and_memory_report():
    model, ids = tiny_causal_lm("gpt2"), _ids(4, 12)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
    for n in (1, 3):
        assert torch.equal(window_states(out, model, n), input_states(model, n, ids))
    hidden = window_states(out, model, 2)
    assert kept_state_bytes(1, 12, 32, torch.float32) == hidden.numel() * hidden.element_size()
    assert kept_state_bytes(3, 12, 32, torch.bfloat16, layers=2) == 2 * torch.empty(3, 12, 32, dtype=torch.bfloat16).nbytes


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_inside_no_grad_and_inference_mode(context):
    model, ids = tiny_lm64("qwen2"), _ids(5)
    config = FocusConfig(params="last:2", lr=0.05)
    trainable, frozen = method.split_parameters(model, config.params)
    focus = torch.tensor([3, 4])
    with context():
        fast = method.refine(top_forward(model, 2, input_states(model, 2, ids)), trainable, frozen, focus, config)
    assert_exact(fast, method.refine(_uncached(model, ids), trainable, frozen, focus, config))


def test_model_untouched_when_the_step_raises(assert_untouched):
    model, ids = tiny_causal_lm("llama"), _ids()
    check = assert_untouched(model)
    config = FocusConfig(params="last:2", steps=3, lr=0.1)
    forward = top_forward(model, 2, input_states(model, 2, ids))
    calls = []

    def flaky(values):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return forward(values)
    trainable, frozen = method.split_parameters(model, config.params)
    with pytest.raises(RuntimeError, match="boom"):
        method.refine(flaky, trainable, frozen, torch.tensor([3, 4]), config)
    check()


@pytest.mark.default_model
def test_default_model_last2_matches_uncached(default_model):
    model, tok = default_model
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    config = FocusConfig(params="last:2", lr=1e-3)
    slow = _uncached(model, ids)
    with torch.no_grad():
        logits = slow({})
    focus = method.focus_classes(logits, 2)
    trainable, frozen = method.split_parameters(model, config.params)
    fast_forward = top_forward(model, prefix_blocks(model, config), input_states(model, 2, ids))
    with torch.no_grad():
        assert torch.allclose(fast_forward({}), logits, atol=1e-4)
    fast = method.refine(fast_forward, trainable, frozen, focus, config)
    ref = method.refine(slow, trainable, frozen, focus, config)
    assert not torch.allclose(ref, logits, atol=1e-4)
    assert torch.allclose(fast, ref, atol=1e-4)


# ----------------------------------------------------------------------------- integration: evaluate_next_token
class _Bytes:
    """One token per byte for the tiny models (vocab 96), EOS = 2."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b % 90 for b in text.encode()]}


@pytest.mark.parametrize("arch,tied,mode,rule", [("llama", True, "ifo", {}), ("gpt2", False, "dofo", {}),
                                               ("qwen2", True, "dofo", {}), ("llama", False, "ifo", NORMALIZED),
                                               pytest.param("gemma3", True, "ifo", NORMALIZED, marks=NO_GEMMA3)])
def test_evaluate_next_token_cached_equals_uncached(arch, tied, mode, rule, monkeypatch, assert_untouched):
    from focus_decoding.evaluation import evaluate_next_token
    from focus_decoding.evaluation.report import CO_WR, WR_CO, WR_OTHER

    model = tiny_lm64(arch, tied=tied, layers=4)  # float64: no argmax can flip on rounding between the paths
    check = assert_untouched(model)
    texts = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!"]
    step = rule or dict(lr=0.5 if mode == "ifo" else 20.0)
    config = FocusConfig(mode=mode, threshold=0.3, params="last:2", **step)
    kwargs = dict(context_length=24, stride=12, progress=False)
    cached = _spy(monkeypatch, "top_logits")
    fast = evaluate_next_token(model, _Bytes(), texts, config, **kwargs)
    assert len(cached) == fast.n_uncertain > 0  # every refinement took the cached path
    monkeypatch.setattr(prefix, "prefix_blocks", lambda model, config, warn=False: None)  # force the uncached path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = evaluate_next_token(model, _Bytes(), texts, config, **kwargs)
    assert len(cached) == fast.n_uncertain
    assert fast.outcomes == slow.outcomes and fast.n_total == slow.n_total
    assert fast.topk_counts == slow.topk_counts and fast.topk_hits == slow.topk_hits
    assert fast.delta_corr == slow.delta_corr
    assert set(fast.outcomes) & {CO_WR, WR_CO, WR_OTHER}, "no refinement changed a prediction: test is vacuous"
    check()


# ----------------------------------------------------------------------------- integration: generate
DECODING = {"greedy": dict(do_sample=False),
            "sample": dict(do_sample=True, top_k=20, temperature=0.9, num_return_sequences=2),
            "beam": dict(num_beams=3, num_return_sequences=2, do_sample=False)}


@pytest.mark.parametrize("mode", ["ifo", "dofo", "normalized"])
@pytest.mark.parametrize("decoding", list(DECODING))
@pytest.mark.parametrize("arch", ["llama", "gpt2", pytest.param("gemma3", marks=NO_GEMMA3)])
def test_generate_cached_equals_uncached(arch, decoding, mode, monkeypatch, assert_untouched):
    from focus_decoding.text.ways_in import enable

    model = enable(tiny_lm64(arch, layers=4))  # float64: sequences cannot differ by a rounding-level tie
    check = assert_untouched(model)
    prompt = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])  # batch 2, row 0 left-padded
    step = {"ifo": dict(mode="ifo", lr=0.05), "dofo": dict(mode="dofo", lr=0.5), "normalized": NORMALIZED}[mode]
    config = FocusConfig(threshold=1.0, steps=2, params="last:2", **step)

    def generate():
        torch.manual_seed(0)
        return model.generate(prompt, attention_mask=(prompt != 0).long(), max_new_tokens=5, pad_token_id=0,
                              focus_config=config, output_scores=True, return_dict_in_generate=True,
                              **DECODING[decoding])
    full = _spy_full(monkeypatch)
    fast = generate()
    assert not full and fast.focus_stats.totals["uncertain"] > 0  # every refinement took the cached path
    monkeypatch.setattr(prefix, "prefix_blocks", lambda model, config, warn=False: None)  # force the uncached path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = generate()
    assert len(full) == slow.focus_stats.totals["uncertain"]  # the uncached run ran the full model each time
    assert fast.focus_stats.totals["refined"] == slow.focus_stats.totals["refined"] > 0
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.scores, slow.scores):
        assert_same_scores(a, b)
    assert not model._forward_pre_hooks and not model._forward_hooks  # the recorder is gone
    check()


def test_generate_without_kv_cache_falls_back_to_uncached(monkeypatch):
    from focus_decoding.text.ways_in import enable

    model = enable(tiny_lm64("llama"))
    config = FocusConfig(lr=0.05, threshold=1.0, params="last:1")
    full = _spy_full(monkeypatch)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, focus_config=config, output_scores=True,
                  return_dict_in_generate=True)
    nocache = model.generate(torch.tensor([[3, 4, 5]]), use_cache=False, **kwargs)
    assert len(full) == 4  # nothing recorded without a KV cache: never a guess, the full model every time
    fast = model.generate(torch.tensor([[3, 4, 5]]), **kwargs)
    assert len(full) == 4 and torch.equal(nocache.sequences, fast.sequences)
    for a, b in zip(nocache.scores, fast.scores):
        assert_same_scores(a, b)


def test_generate_tied_head_selector_uses_uncached_path_with_one_warning(monkeypatch):
    from focus_decoding.text.ways_in import enable

    model = enable(tiny_causal_lm("llama", tied=True))
    full = _spy_full(monkeypatch)
    prefix._warned.clear()
    kwargs = dict(max_new_tokens=2, do_sample=False, pad_token_id=0, focus_config=FocusConfig(
        lr=0.05, threshold=1.0, params=["lm_head"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pattern list is not last:N: silently uncached
        model.generate(torch.tensor([[3, 4, 5]]), **kwargs)
    assert len(full) == 2  # both steps on the full model
    unsupported = enable(_tiny_opt())
    kwargs["focus_config"] = FocusConfig(lr=0.05, threshold=1.0, params="last:1")
    with pytest.warns(RuntimeWarning, match="uncached"):
        unsupported.generate(torch.tensor([[3, 4, 5]]), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unsupported.generate(torch.tensor([[3, 4, 5]]), **kwargs)  # warned once
    assert len(full) == 6


@pytest.mark.parametrize("decoding", ["greedy", "beam"])
def test_rows_of_one_length_refined_together_equal_one_at_a_time(decoding, monkeypatch):
    from focus_decoding.text import processor
    from focus_decoding.text.ways_in import focus_generate

    model = tiny_lm64("llama", layers=4)
    prompt = torch.tensor([[3, 4, 5, 6, 7], [9, 8, 7, 6, 5], [4, 4, 6, 6, 8]])  # one length: one group per step
    config = FocusConfig(threshold=1.0, lr=0.5, params="last:2")
    kw = {"greedy": dict(do_sample=False), "beam": dict(num_beams=2, do_sample=False)}[decoding]
    batched_calls = _spy(monkeypatch, "refine_batched", method)

    def generate():
        return focus_generate(model, prompt, max_new_tokens=4, pad_token_id=0, focus_config=config,
                              output_scores=True, return_dict_in_generate=True, **kw)
    together = generate()
    assert batched_calls  # the rows really went through one batched step
    real = processor.FocusLogitsProcessor.__init__
    monkeypatch.setattr(processor.FocusLogitsProcessor, "__init__",
                        lambda self, *a, **k: real(self, *a, **{**k, "max_batch": 1}))
    alone = generate()
    assert torch.equal(together.sequences, alone.sequences)
    for a, b in zip(together.scores, alone.scores):
        assert_same_scores(a, b)
