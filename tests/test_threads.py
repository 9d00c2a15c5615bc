"""One model object shared by several threads: focus calls never change what the others see.

A web server runs one model under a thread pool. Every focused call (enable, the custom_generate
callable, a bare FocusLogitsProcessor, FocusClassifier, evaluate_next_token) must leave the model's
parameters, attributes and hooks alone even while it runs, so plain calls in other threads give
bitwise what they give alone, and concurrent focused calls give their serial results.
The step runs at threshold 1.0 (every position refined) so the refinement code is busy all the time.
"""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import LogitsProcessorList

from conftest import run_in_threads

import focus_decoding
from focus_decoding import FocusConfig
from focus_decoding.text import ways_in as decoding
from focus_decoding.text.ways_in import enable, focus_generate, last_focus_stats
from focus_decoding.text.processor import FocusLogitsProcessor

ROUTES = ["enable", "processor"] + (["callable"] if decoding.TRANSFORMERS >= decoding.CALLABLE_FLOOR else [])
PROMPTS = torch.tensor([[1, 5, 7, 9, 11], [0, 0, 4, 8, 6]])
MASK = (PROMPTS != 0).long()
CFG = FocusConfig(threshold=1.0, lr=1.0)
GEN = dict(attention_mask=MASK, max_new_tokens=4, min_new_tokens=4, pad_token_id=0, do_sample=False,
           return_dict_in_generate=True)


def run_together(*jobs, rounds: int = 3) -> list[list]:
    """Run each job ``rounds`` times, all jobs at once in their own threads; each job's results in order."""
    barrier = threading.Barrier(len(jobs))
    results: list[list] = [[] for _ in jobs]

    def worker(i: int, job) -> None:
        barrier.wait()
        for _ in range(rounds):
            results[i].append(job())

    run_in_threads([lambda i=i, job=job: worker(i, job) for i, job in enumerate(jobs)])
    return results


def during(focused, *plain_jobs, rounds: int = 3) -> tuple[list, list[list]]:
    """Run ``focused`` ``rounds`` times while each plain job runs over and over in its own thread."""
    done = threading.Event()
    plain_results: list[list] = [[] for _ in plain_jobs]

    def repeat(i, job):
        while not done.is_set() or not plain_results[i]:
            plain_results[i].append(job())

    def focus_then_stop():
        try:
            return [focused() for _ in range(rounds)]
        finally:
            done.set()

    results = run_together(focus_then_stop, *[lambda i=i, job=job: repeat(i, job) for i, job in enumerate(plain_jobs)],
                           rounds=1)
    return results[0][0], plain_results


def focused_via(route: str, model):
    """A focused greedy generate through one of the ways in; returns (sequences, stats totals)."""
    def enable_route():
        out = model.generate(PROMPTS, focus_config=CFG, **GEN)
        return out.sequences, out.focus_stats.to_dict()

    def callable_route():
        out = model.generate(PROMPTS, custom_generate=focus_decoding.generate, focus_config=CFG, **GEN)
        return out.sequences, out.focus_stats.to_dict()

    def processor_route():  # the bare processor, each call its own, on plain generate
        proc = FocusLogitsProcessor(model, CFG, attention_mask=MASK)
        out = type(model).generate(model, PROMPTS, logits_processor=LogitsProcessorList([proc]), **GEN)
        return out.sequences, proc.stats.to_dict()

    return {"enable": enable_route, "callable": callable_route, "processor": processor_route}[route]


@pytest.mark.parametrize("route", ROUTES)
def test_plain_calls_during_focused_generates_are_bitwise_unchanged(tiny_lm, assert_untouched, route):
    model = enable(tiny_lm("llama", tied=True)) if route == "enable" else tiny_lm("llama", tied=True)
    check = assert_untouched(model)
    attrs = dict(model.__dict__)
    probe = torch.tensor([[1, 3, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        plain_logits = model(probe).logits
    plain_text = type(model).generate(model, PROMPTS, **GEN).sequences
    focused = focused_via(route, model)
    alone = focused()

    def plain_forward():
        with torch.no_grad():
            return model(probe).logits

    def plain_generate():  # through model.generate: an enabled model must call straight through
        return model.generate(PROMPTS, **GEN).sequences

    focus_runs, (forwards, generates) = during(focused, plain_forward, plain_generate, rounds=4)
    assert all(torch.equal(x, plain_logits) for x in forwards)
    assert all(torch.equal(x, plain_text) for x in generates)
    assert all(torch.equal(seq, alone[0]) and stats == alone[1] for seq, stats in focus_runs)
    assert not torch.equal(alone[0], plain_text)  # the focus runs really refined
    check()
    assert model.__dict__.keys() == attrs.keys() and all(model.__dict__[k] is v for k, v in attrs.items())


@pytest.mark.parametrize("kept", ["last:2", "tail"])
@pytest.mark.parametrize("route", ROUTES)
def test_two_focused_generates_equal_their_serial_results(tiny_lm, assert_untouched, route, kept):
    model = enable(tiny_lm("gpt2", tied=True)) if route == "enable" else tiny_lm("gpt2", tied=True)
    check = assert_untouched(model)
    focused = focused_via(route, model)
    alone = focused()
    sampled_cfg = FocusConfig(threshold=1.0, lr=0.5, params=kept)

    def other():  # beam search, from kept states (the top blocks, or the tail), through focus_generate
        out = focus_generate(model, PROMPTS, focus_config=sampled_cfg, **{**GEN, "num_beams": 2})
        return out.sequences, out.focus_stats.to_dict()

    other_alone = other()
    first, second = run_together(focused, other, rounds=3)
    assert all(torch.equal(seq, alone[0]) and stats == alone[1] for seq, stats in first)
    assert all(torch.equal(seq, other_alone[0]) and stats == other_alone[1] for seq, stats in second)
    check()


def test_stats_are_per_thread(tiny_lm):
    model = tiny_lm("llama")
    seen = {}

    def job(threshold):
        def run():
            out = focus_generate(model, PROMPTS, focus_config=FocusConfig(threshold=threshold, lr=1.0), **GEN)
            seen[threshold] = (out.focus_stats, last_focus_stats())
        return run

    run_together(job(1.0), job(1e-9), rounds=2)
    assert seen[1.0][0] is seen[1.0][1] and seen[1e-9][0] is seen[1e-9][1]
    assert seen[1.0][0].totals["refined"] == 8 and seen[1e-9][0].totals["refined"] == 0


@pytest.mark.parametrize("params", ["all", "head"])
def test_classifier_and_plain_forwards_share_a_model(assert_untouched, params):
    from focus_decoding.vision import DigitsNet, FocusClassifier

    torch.manual_seed(0)
    model = DigitsNet().eval()
    check = assert_untouched(model)
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(images)
    clf = FocusClassifier(model, FocusConfig(threshold=1.0, lr=1e-1, params=params), method="loop")
    alone = clf(images)

    def plain_forward():
        with torch.no_grad():
            return model(images)

    def focused():
        return clf(images), clf.stats.refined

    focus_runs, (forwards,) = during(focused, plain_forward, rounds=5)
    assert all(torch.equal(x, plain) for x in forwards)
    assert all(torch.equal(x, alone) and refined == 6 for x, refined in focus_runs)
    assert not torch.equal(alone, plain)
    check()


@pytest.mark.parametrize("params", ["all", "tail"])
def test_evaluation_and_plain_forwards_share_a_model(tiny_lm, assert_untouched, params):
    from focus_decoding.evaluation import evaluate_next_token

    class Bytes:  # any tokenizer with __call__ -> {"input_ids"} and eos_token_id
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + b % 90 for b in text.encode()]}

    model = tiny_lm("llama")
    check = assert_untouched(model)
    texts = ["the quick brown fox", "jumps over the lazy dog"]
    cfg = FocusConfig(threshold=1.0, lr=1.0 if params == "all" else 30.0, params=params)
    alone = evaluate_next_token(model, Bytes(), texts, cfg, context_length=12, progress=False)
    probe = torch.tensor([[1, 3, 5, 7, 9]])
    with torch.no_grad():
        plain = model(probe).logits

    def plain_forward():
        with torch.no_grad():
            return model(probe).logits

    def evaluate():
        return evaluate_next_token(model, Bytes(), texts, cfg, context_length=12, progress=False)

    reports, (forwards,) = during(evaluate, plain_forward, rounds=3)
    assert all(torch.equal(x, plain) for x in forwards)
    assert all(r.outcomes == alone.outcomes and r.topk_hits == alone.topk_hits for r in reports)
    assert alone.outcomes.count("0") < len(alone.outcomes)  # some refinements changed a prediction
    check()
