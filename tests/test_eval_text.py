"""evaluate_next_token against a naive reference written straight from the method, plus its bookkeeping.

Comparisons with the reference (and batched vs one-by-one) run on float64 models (``reference.tiny_lm64``)
with thresholds placed between two gaps, so that no outcome can flip on float32 rounding: their
verdict does not depend on the CPU or the thread count.
"""
import copy

import pytest
import torch

from focus_decoding import FocusConfig
from focus_decoding import method
from focus_decoding.evaluation import evaluate_next_token, tokenize_stream, window_bounds
from focus_decoding.text.refine import refine_position, refine_positions_batched
from focus_decoding.resources.models import tiny_causal_lm
from focus_decoding.evaluation.report import MAX_K, FocusReport
from conftest import run_as_processes
from reference import assert_exact, config_rate, naive_refine, tiny_lm64

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
         "How vexingly quick daft zebras jump."]
NORMALIZED = dict(step_rule="normalized", tau=0.5)


class ByteTokenizer:
    """A tokenizer for the tiny models (vocab 96): one token per byte, EOS = 2."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b % 90 for b in text.encode()]}


TOK = ByteTokenizer()


def snapshot(model):
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def assert_untouched(model, before, requires_grad, training):
    now = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert set(now) == set(before)
    for name, t in now.items():
        assert torch.equal(t, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad
    assert {n: m.training for n, m in model.named_modules()} == training


def _gaps(model, texts, context_length):
    stream = tokenize_stream(TOK, texts)
    with torch.no_grad():
        return method.top2_gap(model(stream[None, :context_length]).logits[0]).sort().values


def gap_quantile_threshold(model, texts, context_length, q=0.3):
    """A threshold that gates about a fraction ``q`` of this model's positions (so both branches run),
    half-way between two neighbouring gaps: no gap lies on it, so rounding cannot move a position across."""
    gaps = _gaps(model, texts, context_length)
    i = min(max(int(q * len(gaps)), 1), len(gaps) - 1)
    return float(gaps[i - 1] + gaps[i]) / 2


def model_text(model, n_tokens, first=40):
    """A text the model itself predicts (greedy, never the previous token again), so that most labels are
    among its top-ranked tokens: scoring labels one position off then shows in the top-k hits."""
    ids = [first]
    for _ in range(n_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids[-16:]])).logits[0, -1]
        ids.append(next(int(t) for t in logits.argsort(descending=True) if 3 <= t <= 92 and t != ids[-1]))
    return "".join(chr(t - 3) for t in ids)  # ByteTokenizer maps byte b < 90 back to token 3 + b


def naive_reference(model, texts, config, context_length, stride, thresholds):
    """The method written out: slide windows, score unseen labels, deepcopy + SGD per uncertain position;
    and the top-k table counted label by label from each window's logits."""
    ids = []
    for i, text in enumerate(texts):
        ids += ([TOK.eos_token_id] if i else []) + TOK(text)["input_ids"]
    stream = torch.tensor(ids)
    n_total, outcomes, scored = 0, [], set()
    counts, hits = [0] * len(thresholds), [[0] * MAX_K for _ in thresholds]
    for s in range(0, len(ids), stride):
        window = stream[s:s + context_length]
        if s + 1 >= len(ids) or window.numel() < 1:
            break
        with torch.no_grad():
            logits = model(window[None]).logits[0]
        for t in range(window.numel()):
            label_index = s + t + 1
            if label_index >= len(ids) or label_index in scored:
                continue
            scored.add(label_index)
            n_total += 1
            label = stream[label_index].item()
            probs = torch.softmax(logits[t], -1).sort(descending=True).values
            gap = float(probs[0] - probs[1])
            rank = int((logits[t] > logits[t, label]).sum())  # 0 = the label is the top prediction
            for i, threshold in enumerate(thresholds):
                if gap < threshold:
                    counts[i] += 1
                    for k in range(MAX_K):
                        hits[i][k] += int(rank <= k)
            if gap >= config.threshold:
                continue
            focus = logits[t].topk(config.n_focus).indices
            ctx = window[None, :t + 1]
            run = lambda m: m(ctx).logits[0, -1]  # noqa: E731
            new = naive_refine(model, run, focus, config.mode, config_rate(model, run, focus, config),
                               config.steps).argmax().item()
            outcomes.append((label, logits[t].argmax().item(), new))
    return n_total, outcomes, counts, hits


@pytest.mark.parametrize("arch,tied,mode,steps,context_length,stride,rule", [
    ("llama", True, "ifo", 1, 16, None, {}),
    ("gpt2", False, "dofo", 2, 16, 8, {}),
    ("llama", False, "ifo", 1, 16, 8, NORMALIZED),
    ("gpt2", True, "dofo", 2, 16, None, NORMALIZED),
])
def test_matches_naive_reference(arch, tied, mode, steps, context_length, stride, rule):
    model = tiny_lm64(arch, tied=tied, layers=2)
    texts = [model_text(model, 60), TEXTS[1]]
    step = rule or dict(lr=0.5 if mode == "ifo" else 20.0)  # large enough that refinement changes predictions
    config = FocusConfig(mode=mode, steps=steps, threshold=gap_quantile_threshold(model, texts, context_length),
                         **step)
    thresholds = [gap_quantile_threshold(model, texts, context_length, q) for q in (0.2, 0.6)] + [1.0]
    report = evaluate_next_token(model, TOK, texts, config, context_length=context_length, stride=stride,
                                 thresholds=thresholds, progress=False)
    n_total, outcomes, counts, hits = naive_reference(model, texts, config, context_length,
                                                      stride or context_length, thresholds)
    expected = FocusReport()
    expected.add_outcomes(*(torch.tensor(col) for col in zip(*outcomes)))
    assert report.n_total == n_total == len(tokenize_stream(TOK, texts)) - 1
    assert 0 < report.n_uncertain < report.n_total
    assert report.outcomes == expected.outcomes
    assert any(b != f for _, b, f in outcomes), "refinement never changed a prediction: test is vacuous"
    # the top-k table (unmodified model), label by label
    assert report.topk_thresholds == thresholds
    assert report.topk_counts == counts and report.topk_hits == hits
    assert 0 < counts[0] < counts[1] < counts[2] == n_total  # three different sets of positions
    # model_text puts most labels in the model's top 5 (at various ranks): the table has something to get wrong
    assert hits[-1][0] < hits[-1][-1] < n_total and hits[-1][-1] > n_total // 3


@pytest.mark.parametrize("n,length,stride", [(2, 4, 4), (10, 4, 4), (11, 4, 4), (12, 4, 4), (30, 8, 3), (9, 8, 1)])
def test_window_bounds_score_every_token_once(n, length, stride):
    seen = []
    for s, lo, hi in window_bounds(n, length, stride):
        assert s < lo <= hi - 1 < s + length + 1  # labels lie inside the window's reach
        assert hi - 1 - s <= length  # the input never exceeds context_length
        seen += range(lo, hi)
    assert seen == list(range(1, n))


def _two():
    from focus_decoding.evaluation.group import Group

    group = Group()
    group.world = 2
    return group


def test_limits_and_resume_and_processes():
    model = tiny_causal_lm(layers=2)
    config = FocusConfig(threshold=gap_quantile_threshold(model, TEXTS, 12), lr=0.5)
    kwargs = dict(context_length=12, progress=False)
    saved = {}
    full = evaluate_next_token(model, TOK, TEXTS, config, **kwargs,
                               on_window=lambda w, r: saved.__setitem__(w, FocusReport.from_dict(copy.deepcopy(r.to_dict()))))
    assert full.n_total == len(tokenize_stream(TOK, TEXTS)) - 1
    assert sorted(saved) == list(range(len(saved))) and len(saved) > 3
    # max_uncertain / max_tokens stop early and give a prefix of the full run
    few = evaluate_next_token(model, TOK, TEXTS, config, max_uncertain=5, **kwargs)
    assert few.n_uncertain == 5 and full.outcomes.startswith(few.outcomes)
    assert few.n_total < full.n_total
    short = evaluate_next_token(model, TOK, TEXTS, config, max_tokens=20, **kwargs)
    assert short.n_total == 20 and full.outcomes.startswith(short.outcomes)
    # resume after window k: saved partial report + the rest == one run
    k = 1
    rest = evaluate_next_token(model, TOK, TEXTS, config, start_window=k + 1, **kwargs)
    resumed = saved[k].merge(rest)
    assert (resumed.n_total, resumed.outcomes, resumed.topk_counts, resumed.topk_hits) == \
        (full.n_total, full.outcomes, full.topk_counts, full.topk_hits)
    # two processes (threads here): every process ends with the single-process report, in stream order, and a
    # budget cuts at the very token it cuts at alone (the processes agree on it every round)
    for budget in (None, 5, 13):
        alone = evaluate_next_token(model, TOK, TEXTS, config, max_uncertain=budget, **kwargs)
        both = run_as_processes(2, lambda group: evaluate_next_token(model, TOK, TEXTS, config, max_uncertain=budget,
                                                                     group=group, **kwargs))
        for r in both:
            assert (r.n_total, r.outcomes, r.topk_counts, r.topk_hits) == \
                (alone.n_total, alone.outcomes, alone.topk_counts, alone.topk_hits), budget
        assert both[0].meta["processes"] == 2 and len(both[0].meta["seconds_per_process"]) == 2


def test_model_untouched_also_after_errors(monkeypatch):
    model = tiny_causal_lm(layers=2)
    model.train()  # flags must come back as they were
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before, rg = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}
    training = {n: m.training for n, m in model.named_modules()}
    config = FocusConfig(threshold=1.0, lr=0.5)
    report = evaluate_next_token(model, TOK, TEXTS[:1], config, context_length=16, progress=True, max_uncertain=6)
    assert report.n_uncertain == 6 and report.meta["model"] and report.meta["uncertain_per_second"] > 0
    assert_untouched(model, before, rg, training)

    def stop(w, r):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_next_token(model, TOK, TEXTS, config, context_length=8, progress=False, on_window=stop)
    assert_untouched(model, before, rg, training)
    calls = []

    def failing_loss(*args):  # raises inside the SGD step, after the forward ran with grad
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(method.step, "focus_loss", failing_loss)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_next_token(model, TOK, TEXTS, config, context_length=8, progress=False)
    assert calls
    assert_untouched(model, before, rg, training)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over sdpa runs a per-sample loop
@pytest.mark.parametrize("arch,steps,params,rule", [
    ("gpt2", 1, "all", dict(lr=0.5)), ("llama", 2, "last:1", dict(lr=0.5)),
    ("llama", 1, "all", NORMALIZED), ("gpt2", 3, "last:1", NORMALIZED)])
def test_batched_positions_equal_one_by_one(arch, steps, params, rule):
    # float64 (tiny_lm64: sdpa for llama, whose eager attention takes its softmax in float32): the
    # batched path runs every position on the longest context, the single path on its own, so float32
    # kernels would round them differently
    model = tiny_lm64(arch, layers=2)
    config = FocusConfig(threshold=1.0, steps=steps, params=params, **rule)
    ids = tokenize_stream(TOK, TEXTS[:1])[None, :16]
    with torch.no_grad():
        logits = model(ids).logits[0]
    trainable, frozen = method.split_parameters(model, config.params)
    names = set(trainable)
    positions = [3, 7, 8, 15]
    batched = refine_positions_batched(model, ids, logits, positions, trainable, frozen, config)
    for t, res in zip(positions, batched):
        single = refine_position(model, ids, logits[t], t, trainable, frozen, config)
        assert not torch.allclose(single.logits, logits[t], atol=1e-3)  # the step did something
        assert_exact(res.logits, single.logits, f"position {t}")
        assert res.changed == single.changed
        # and both equal the reference, each position with its own rate under the normalized rule
        ctx, focus = ids[:, :t + 1], logits[t].topk(config.n_focus).indices
        run = lambda m: m(ctx).logits[0, -1]  # noqa: E731
        rate = config_rate(model, run, focus, config, lambda n: n in names)  # config.steps == steps
        ref = naive_refine(model, run, focus, config.mode, rate, steps, select=lambda n: n in names)
        assert_exact(res.logits, ref, f"position {t} vs reference")
    one = evaluate_next_token(model, TOK, TEXTS[:2], config, context_length=16, progress=False, max_uncertain=12)
    four = evaluate_next_token(model, TOK, TEXTS[:2], config, context_length=16, progress=False, max_uncertain=12,
                               batch_positions=4)
    assert one.outcomes == four.outcomes and one.n_total == four.n_total


@pytest.mark.parametrize("kwargs,field", [
    (dict(context_length=0), "context_length"), (dict(stride=0), "stride"), (dict(stride=200), "stride"),
    (dict(max_uncertain=0), "max_uncertain"), (dict(max_tokens=-1), "max_tokens"),
    (dict(batch_positions=0), "batch_positions"), (dict(start_window=-1), "start_window"),
    (dict(group=(0, 2)), "group"), (dict(start_window=1, group=_two()), "multiple of the 2"), (dict(thresholds=[0.0]), "thresholds"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    model = tiny_causal_lm(layers=1)
    with pytest.raises(ValueError, match=field):
        evaluate_next_token(model, TOK, TEXTS, FocusConfig(), progress=False, **kwargs)
    with pytest.raises(ValueError, match="list of strings"):
        evaluate_next_token(model, TOK, "one string", FocusConfig(), progress=False)


@pytest.mark.default_model
def test_default_model_on_bundled_sample(default_model):
    from focus_decoding.resources.corpora import load_texts

    model, tokenizer = default_model  # loaded once per session (conftest)
    before = {n: p.detach().clone() for n, p in list(model.named_parameters())[-3:]}
    config = FocusConfig.preset("smollm2-135m")
    texts = load_texts(max_texts=3)
    report = evaluate_next_token(model, tokenizer, texts, config, context_length=24, max_uncertain=2,
                                 progress=False, name="jargon")
    assert report.n_uncertain == 2 and 2 <= report.n_total
    assert report.meta["dataset"] == "jargon" and report.meta["context_length"] == 24
    assert report.topk_counts[-1] == report.n_total  # threshold 1.0 counts every prediction
    for n, p in list(model.named_parameters())[-3:]:
        assert torch.equal(p, before[n]) and p.grad is None
    # the first uncertain position matches deepcopy + torch.optim.SGD on the real model
    stream = tokenize_stream(tokenizer, texts)[None, :24]
    with torch.no_grad():
        logits = model(stream).logits[0]
    t = int(torch.nonzero(method.is_uncertain(logits, config.threshold))[0])
    ctx = stream[:, :t + 1]
    assert config.params == "last:2"  # the preset: the cached path through the top two of 30 blocks
    top2 = lambda name: name.startswith(("model.layers.28.", "model.layers.29.", "model.norm."))  # noqa: E731
    expected = naive_refine(model, lambda m: m(ctx).logits[0, -1], logits[t].topk(config.n_focus).indices, config.mode,
                            config.lr, config.steps, select=top2)
    trainable, frozen = method.split_parameters(model, config.params)
    got = refine_position(model, stream, logits[t], t, trainable, frozen, config)
    torch.testing.assert_close(got.logits, expected, rtol=1e-3, atol=1e-3)  # float32 on a real model: one small step
    top2 = expected.topk(2).values
    if top2[0] - top2[1] > 1e-2:  # a near tie may go either way in float32; otherwise the same prediction
        assert got.logits.argmax() == expected.argmax()
