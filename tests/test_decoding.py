"""The ways into generate: the custom_generate callable, focus_generate, enable, the Hub-style folder.

They are one code path, so in every supported mode they give the same tokens and statistics; with
a gate that never fires they give plain ``generate``'s output; none of them changes the model.
Routes a transformers version cannot run are refused with a message naming the version floor.
"""
from __future__ import annotations

import copy
import warnings

import re

import pytest
import torch
from packaging.version import Version
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import focus_decoding
from focus_decoding import FocusConfig
from focus_decoding.text import ways_in as decoding
from focus_decoding.text.folder import FOLDER_FLOOR, export_generate
from focus_decoding.text.ways_in import enable, focus_generate, last_focus_stats

CALLABLE = decoding.TRANSFORMERS >= decoding.CALLABLE_FLOOR
FOLDER = decoding.TRANSFORMERS >= FOLDER_FLOOR
PROMPTS = torch.tensor([[0, 0, 1, 5, 7], [1, 9, 11, 13, 4]])  # row 0 left-padded
MASK = (PROMPTS != 0).long()
CFG = FocusConfig(threshold=1.0, lr=1.0)
MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam_sample": dict(do_sample=True, num_beams=2),
    "return_sequences": dict(do_sample=True, num_return_sequences=3),
}


def run(how, model, mode, folder=None, **kw):
    """One generate call through ``how`` with a fixed seed; the ModelOutput."""
    args = dict(attention_mask=MASK, max_new_tokens=4, min_new_tokens=4, pad_token_id=0,
                return_dict_in_generate=True, **MODES[mode], **kw)
    torch.manual_seed(3)
    if how == "plain":
        return model.generate(PROMPTS, **args)
    if how == "callable":
        return model.generate(PROMPTS, custom_generate=focus_decoding.generate, **args)
    if how == "focus_generate":
        return focus_generate(model, PROMPTS, **args)
    if how == "enable":
        return enable(copy.deepcopy(model)).generate(PROMPTS, **args)
    if how == "folder":
        return model.generate(PROMPTS, custom_generate=folder, trust_remote_code=True, **args)
    raise ValueError(how)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(export_generate(tmp_path_factory.mktemp("hub") / "focus"))


def routes():
    return ["focus_generate", "enable"] + (["callable"] if CALLABLE else [])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_route_gives_the_same_tokens_and_statistics(tiny_lm, assert_untouched, mode):
    model = tiny_lm("llama", tied=False)
    check = assert_untouched(model)
    outs = {how: run(how, model, mode, focus_config=CFG) for how in routes()}
    first = outs["focus_generate"]
    for how, out in outs.items():
        assert torch.equal(out.sequences, first.sequences), how
        assert out.focus_stats.to_dict() == first.focus_stats.to_dict(), how
    assert first.focus_stats.totals["refined"] > 0
    assert not torch.equal(first.sequences, run("plain", model, mode).sequences)  # the refinement shows
    check()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_gate_that_never_fires_is_plain_generate(tiny_lm, mode):
    model = tiny_lm("gpt2")
    plain = run("plain", model, mode, output_scores=True)
    for how in routes():
        out = run(how, model, mode, focus_config=FocusConfig(threshold=1e-9), output_scores=True)
        assert torch.equal(out.sequences, plain.sequences), how
        assert all(torch.equal(a, b) for a, b in zip(out.scores, plain.scores)), how  # scores too, bitwise
        assert out.focus_stats.totals["checked"] > 0 and out.focus_stats.totals["uncertain"] == 0


@pytest.mark.parametrize("how", ["focus_generate", "enable", "callable"])
def test_the_decoding_mode_is_checked_once_per_call(tiny_lm, monkeypatch, how):
    if how == "callable" and not CALLABLE:
        pytest.skip(f"the callable needs transformers >= {decoding.CALLABLE_FLOOR}")  # the floor envs run it
    calls = []
    real = decoding.check_mode
    monkeypatch.setattr(decoding, "check_mode", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    run(how, tiny_lm("llama"), "beam", focus_config=CFG)
    assert len(calls) == 1


@pytest.mark.skipif(not FOLDER, reason=f"custom_generate folders need transformers >= {FOLDER_FLOOR}")
@pytest.mark.parametrize("config", [CFG, CFG.to_dict()], ids=["FocusConfig", "dict"])
def test_the_exported_folder_is_the_same_method(tiny_lm, assert_untouched, folder, config, fresh_hf_modules):
    model = tiny_lm("llama")
    check = assert_untouched(model)
    expected = run("focus_generate", model, "greedy", focus_config=CFG)
    out = run("folder", model, "greedy", focus_config=config, folder=folder)
    assert torch.equal(out.sequences, expected.sequences)
    assert out.focus_stats.to_dict() == expected.focus_stats.to_dict()
    assert list(fresh_hf_modules.rglob("generate.py"))  # the folder's code was copied into this test's own cache
    check()


def test_export_refuses_to_overwrite(tmp_path, capsys):
    from focus_decoding import cli

    assert cli.main(["export-generate", str(tmp_path / "x")]) == 0  # the command writes what export_generate does
    assert cli.main(["export-generate", str(tmp_path / "x")]) == 2  # and refuses to overwrite: one line, status 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert cli.main(["export-generate", str(tmp_path / "x"), "--overwrite"]) == 0
    export_generate(tmp_path / "x", overwrite=True)
    assert (tmp_path / "x" / "custom_generate" / "generate.py").is_file()
    assert "custom_generate" in (tmp_path / "x" / "README.md").read_text()  # the Hub tag
    with pytest.raises(FileExistsError, match="generate.py|README.md"):
        export_generate(tmp_path / "x")
    export_generate(tmp_path / "x", overwrite=True)


class Collect:
    """A streamer that records what it is given."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


class Ban(LogitsProcessor):
    """A user processor: bans one token, and records the scores it receives."""

    def __init__(self, token):
        self.token, self.seen = token, []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores.index_fill(-1, torch.tensor([self.token]), float("-inf"))


class StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kw):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


@pytest.mark.parametrize("how", routes())
def test_streamer_processors_and_stopping_criteria_pass_through(tiny_lm, how):
    model = tiny_lm("llama")
    prompt = PROMPTS[1:]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, focus_config=CFG)
    reference = focus_generate(model, prompt, **kw).sequences[0]
    ban = int(reference[-3])  # a token the refined greedy text uses
    streamer, user, stop = Collect(), Ban(ban), StopAfter(prompt.shape[1] + 3)
    call = dict(kw, streamer=streamer, logits_processor=LogitsProcessorList([user]),
                stopping_criteria=StoppingCriteriaList([stop]))
    if how == "callable":
        out = model.generate(prompt, custom_generate=focus_decoding.generate, **call)
    elif how == "enable":
        out = enable(copy.deepcopy(model)).generate(prompt, **call)
    else:
        out = focus_generate(model, prompt, **call)
    assert out.sequences.shape[1] == prompt.shape[1] + 3  # the user's stopping criterion ended it
    assert ban not in out.sequences[0, prompt.shape[1]:].tolist()  # the user's processor ran
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks])
    assert torch.equal(streamed, out.sequences[0]) and streamer.ended  # prompt, then every token, then end()
    # the user's processor ran AFTER focus: the first scores it saw are the refined ones
    assert torch.equal(user.seen[0].argmax(-1), reference[prompt.shape[1]:prompt.shape[1] + 1])


UNSUPPORTED = {
    "prompt_lookup": ("prompt-lookup", dict(prompt_lookup_num_tokens=2)),
    "contrastive": ("contrastive search", dict(penalty_alpha=0.6, top_k=4)),
    "dola": ("DoLa", dict(dola_layers="high")),
    "group_beam": ("group", dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0)),
    "assistant": ("assisted", "ASSISTANT"),
    "inputs_embeds": ("inputs_embeds", dict(inputs_embeds=torch.zeros(1, 5, 32))),
}


@pytest.mark.parametrize("how", routes())
@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_modes_raise_naming_the_mode(tiny_lm, how, name):
    model = tiny_lm("llama")
    match, kw = UNSUPPORTED[name]
    if kw == "ASSISTANT":
        kw = dict(assistant_model=tiny_lm("llama", layers=1))
    kw = dict(kw, max_new_tokens=2, pad_token_id=0, focus_config=FocusConfig())
    ids = None if "inputs_embeds" in kw else torch.tensor([[1, 5, 7]])
    with pytest.raises(ValueError, match=match):
        generate_by(how, model, ids, **kw)


@pytest.mark.parametrize("how", routes())
@pytest.mark.parametrize("shape", [(1, 0), (0, 3)])
def test_empty_input_ids_are_named(tiny_lm, how, shape):
    """No token, or no row: a message saying so (plain generate fails inside the attention's reshape)."""
    model = tiny_lm("llama")
    ids, kw = torch.zeros(shape, dtype=torch.long), dict(max_new_tokens=2, pad_token_id=0, focus_config=FocusConfig())
    with pytest.raises(ValueError, match=rf"input_ids is empty \(shape {re.escape(str(shape))}\)"):
        generate_by(how, model, ids, **kw)


def generate_by(how: str, model, ids, **kw):
    """``generate`` through one way in: the callable, ``enable`` or ``focus_generate``."""
    if how == "callable":
        return model.generate(ids, custom_generate=focus_decoding.generate, trust_remote_code=True, **kw)
    if how == "enable":
        return enable(model).generate(ids, **kw)
    return focus_generate(model, ids, **kw)


def test_callable_refuses_old_transformers(tiny_lm, monkeypatch):
    monkeypatch.setattr(decoding, "TRANSFORMERS", Version("4.56.2"))
    with pytest.raises(ValueError, match=r"transformers >= 4\.57"):
        decoding.generate(tiny_lm("llama"), torch.tensor([[1, 2]]), LogitsProcessorList(), StoppingCriteriaList(),
                          None)


def test_config_comes_from_the_generation_config_and_stats_per_call(tiny_lm):
    from transformers import GenerationConfig

    model = tiny_lm("llama")
    gc = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    gc.focus_config = CFG.to_dict()
    out = focus_generate(model, PROMPTS, attention_mask=MASK, generation_config=gc)
    assert out.focus_stats.totals["refined"] == 6 and last_focus_stats() is out.focus_stats
    ids_only = focus_generate(model, PROMPTS, attention_mask=MASK, generation_config=gc, return_dict_in_generate=False)
    assert torch.equal(ids_only, out.sequences) and last_focus_stats() is not out.focus_stats  # a tensor: stats here
    assert last_focus_stats().to_dict() == out.focus_stats.to_dict()
    with pytest.raises(ValueError, match="custom_generate"):
        focus_generate(model, PROMPTS, custom_generate=lambda *a, **k: None)


def test_fully_padded_row_generates_like_plain(tiny_lm):
    # a row with no prompt token at all: plain generate copes, so focus must too (that row waits for a context)
    model = tiny_lm("llama")
    ids = torch.tensor([[0, 0, 0], [1, 5, 7]])
    kw = dict(attention_mask=(ids != 0).long(), max_new_tokens=3, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True)
    out = focus_generate(model, ids, focus_config=FocusConfig(threshold=1e-9), **kw)
    assert torch.equal(out.sequences, model.generate(ids, **kw).sequences)
    with warnings.catch_warnings():  # row 0's first context is the pad token, whose embedding is zero: no gradient
        warnings.simplefilter("ignore", RuntimeWarning)
        refined = focus_generate(model, ids, focus_config=CFG, **kw)
    assert refined.focus_stats.refined[0] == 2 and refined.focus_stats.refined[1] == 3  # row 0 from its 2nd token


@pytest.mark.default_model
@pytest.mark.skipif(not FOLDER, reason=f"custom_generate folders need transformers >= {FOLDER_FLOOR}")
def test_embedded_model_through_the_folder_and_the_callable(default_model, assert_untouched, folder):
    model, tok = default_model
    check = assert_untouched(model)
    ids = tok(["The capital of France is"], return_tensors="pt")
    cfg = {"threshold": 1.0, "lr": 1e-4, "params": "last:2"}  # every position refined, cached path
    kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    expected = focus_generate(model, **ids, focus_config=cfg, **kw)
    via_folder = model.generate(**ids, custom_generate=folder, trust_remote_code=True, focus_config=cfg, **kw)
    assert torch.equal(via_folder.sequences, expected.sequences)
    assert via_folder.focus_stats.to_dict() == expected.focus_stats.to_dict()
    assert expected.focus_stats.totals["refined"] == 3
    if CALLABLE:
        via_callable = model.generate(**ids, custom_generate=focus_decoding.generate, focus_config=cfg, **kw)
        assert torch.equal(via_callable.sequences, expected.sequences)
    check()


def test_a_stored_config_survives_save_and_load(tiny_lm, tmp_path):
    # a generation config derived from the model config drops unknown keys on reload unless it is marked as its own
    from transformers import AutoModelForCausalLM

    model = tiny_lm("llama", tied=False)
    assert model.generation_config._from_model_config  # the case that loses keys
    expected = focus_generate(model, PROMPTS, attention_mask=MASK, focus_config=CFG, max_new_tokens=3, pad_token_id=0)
    focus_decoding.set_focus_config(model.generation_config, CFG)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert FocusConfig.coerce(reloaded.generation_config.focus_config) == CFG
    out = enable(reloaded).generate(PROMPTS, attention_mask=MASK, max_new_tokens=3, pad_token_id=0)
    assert torch.equal(out, expected)
