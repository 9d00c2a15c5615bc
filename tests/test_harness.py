"""The lm-evaluation-harness backend ``focus-hf``: local tasks end to end, checked against the package's functions."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not os.environ.get("CI"):  # CI installs the lm-eval extra: a missing one there is a broken set-up
    pytest.importorskip("lm_eval")
import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from focus_decoding import FocusConfig, focus_generate
from focus_decoding import method
from focus_decoding.method import prefix  # noqa: E402
from focus_decoding.text.refine import refine_position  # noqa: E402
from focus_decoding.text.harness import FocusLM, resolve_pretrained  # noqa: E402
from focus_decoding.resources.models import char_tokenizer, tiny_causal_lm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MC = [  # single-letter choices share context + delimiter, so HFLM's one-token logits cache groups them
    {"question": "abc abc ab", "choices": ["c", "a", "bb"], "answer": 0},
    {"question": "1 2 3 4", "choices": ["5", "6 7", "x"], "answer": 0},
    {"question": "the cat sat on the", "choices": ["mat", "hat", "dog"], "answer": 0},
    {"question": "xyz", "choices": ["zz", "y", "xyzxyz"], "answer": 2},
]
GEN = [{"prompt": "abc1 d", "target": "e"}, {"prompt": "hello wo", "target": "rld"},
       {"prompt": "0 1 2", "target": " 3"}]
GEN_KWARGS = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
NEVER = {"threshold": 1e-12}  # a gate that never fires
FOCUS = {"threshold": 1.0, "lr": 10.0}  # every position refined, with a step large enough to move the tiny model


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and a character tokenizer saved as a folder ``pretrained=`` can load."""
    path = tmp_path_factory.mktemp("tiny")
    tok = char_tokenizer()
    tiny_causal_lm("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """(model, tokenizer) loaded independently of the harness, for the direct computations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A multiple-choice and a generation task as YAML over local JSONL files."""
    import yaml

    path = tmp_path_factory.mktemp("tasks")
    cache = str(path / "hf_cache")  # keep the datasets cache out of the user's home
    for name, rows in (("mc", MC), ("gen", GEN)):
        (path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "test_split": "train", "metadata": {"version": 1}}
    mc = {**common, "task": "tiny_mc", "dataset_kwargs": {"data_files": str(path / "mc.jsonl"), "cache_dir": cache},
          "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
          "doc_to_target": "{{answer}}",
          "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    gen = {**common, "task": "tiny_gen", "dataset_kwargs": {"data_files": str(path / "gen.jsonl"), "cache_dir": cache},
           "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
           "generation_kwargs": GEN_KWARGS,
           "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    (path / "mc.yaml").write_text(yaml.safe_dump(mc))
    (path / "gen.yaml").write_text(yaml.safe_dump(gen))
    return path


@pytest.fixture(scope="module")
def tasks(task_dir) -> TaskManager:
    """The local tasks only (indexing lm-eval's built-in tasks takes several seconds)."""
    return TaskManager(include_path=str(task_dir), include_defaults=False)


def evaluate(lm, tasks: TaskManager, names: list[str]) -> dict:
    """``lm_eval.simple_evaluate`` with samples, on our local tasks."""
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tasks, log_samples=True, bootstrap_iters=0,
                                   verbosity="ERROR")


# ----------------------------------------------------------------------------- direct computations
def encode(tok, text: str) -> list[int]:
    # With the tokenizer's own special tokens, as HFLM encodes for scoring: transformers 4.46's GGUF
    # tokenizer of the embedded model adds a BOS token, 5.x's does not, the tiny tokenizers never do.
    return tok(text)["input_ids"]


def direct_loglikelihood(model, context: list[int], continuation: list[int], config: FocusConfig) -> tuple[float, bool]:
    """(summed log-probability, greedy) of ``continuation`` after ``context``, with the package's own functions:
    one forward, then ``refine_position`` (which gates) at every continuation position."""
    view = method.module_view(model)
    trainable, frozen = method.split_parameters(view, config.params)
    n_top = prefix.prefix_blocks(view, config)
    ids = torch.tensor([(context + continuation)[:-1]])
    with torch.no_grad():
        out = view(ids, use_cache=False, output_hidden_states=n_top is not None)
    logits = method.widen(out.logits[0])
    kept = None if n_top is None else (n_top, prefix.window_states(out, view, n_top))
    total, greedy = 0.0, True
    for i, target in enumerate(continuation):
        t = len(context) - 1 + i
        emitted = refine_position(view, ids, logits[t], t, trainable, frozen, config, kept).logits
        total += float(torch.log_softmax(emitted, -1)[target])
        greedy &= int(emitted.argmax()) == target
    return total, greedy


def direct_mc(model, tok, config: FocusConfig, docs=MC) -> tuple[list[list[float]], list[list[bool]], float]:
    """Per-choice log-likelihoods, greedy flags and accuracy of the MC task (context, then " " + choice)."""
    scores, greedy, correct = [], [], 0
    for doc in docs:
        ctx = encode(tok, doc["question"])
        rows = [direct_loglikelihood(model, ctx, encode(tok, doc["question"] + " " + c)[len(ctx):], config)
                for c in doc["choices"]]
        scores.append([s for s, _ in rows])
        greedy.append([g for _, g in rows])
        correct += max(range(len(rows)), key=lambda i: rows[i][0]) == doc["answer"]
    return scores, greedy, correct / len(docs)


def close(got: list[list[float]], want: list[list[float]], tol: float = 1e-5) -> bool:
    """Nested lists of log-likelihoods equal within float32 tolerance (relative, the step makes them large)."""
    return [len(r) for r in got] == [len(r) for r in want] and \
        [x for r in got for x in r] == pytest.approx([x for r in want for x in r], rel=tol, abs=tol)


def harness_mc(samples: list[dict]) -> tuple[list[list[float]], list[list[bool]]]:
    """Per-choice (log-likelihood, is_greedy) from lm-eval's logged samples, in document order."""
    samples = sorted(samples, key=lambda s: s["doc_id"])  # a samples file holds the values as strings
    return ([[float(r[0][0]) for r in s["resps"]] for s in samples],
            [[r[0][1] in (True, "True") for r in s["resps"]] for s in samples])


def direct_generation(model, tok, prompt: str, config: FocusConfig | None) -> str:
    """Greedy text after ``prompt`` (focus_generate, or plain generate when config is None), cut at the stops."""
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    ids = {k: enc[k] for k in ("input_ids", "attention_mask")}  # older tokenizers add token_type_ids
    kwargs = dict(max_new_tokens=GEN_KWARGS["max_gen_toks"], do_sample=False, pad_token_id=tok.pad_token_id)
    if config is None:
        out = model.generate(**ids, **kwargs)
    else:
        out = focus_generate(model, **ids, focus_config=config, **kwargs)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    for stop in GEN_KWARGS["until"]:
        text = text.split(stop)[0]
    return text


# ----------------------------------------------------------------------------- loglikelihood
@pytest.mark.parametrize("focus", [
    {"mode": "ifo", "params": "all", "batch_size": 1},
    {"mode": "dofo", "params": "last:2", "batch_size": 3},  # cached top blocks; right-padded batches of 3
    {"mode": "ifo", "params": "tail", "batch_size": 3},  # the position-wise tail from kept residuals
])
def test_multiple_choice_matches_direct_computation(tiny_dir, tiny, tasks, focus):
    model, tok = tiny
    fields = {k: v for k, v in focus.items() if k != "batch_size"}
    lm = FocusLM(pretrained=str(tiny_dir), device="cpu", batch_size=focus["batch_size"], **FOCUS, **fields)
    result = evaluate(lm, tasks, ["tiny_mc"])
    scores, greedy = harness_mc(result["samples"]["tiny_mc"])
    config = FocusConfig(**FOCUS, **fields)
    want_scores, want_greedy, want_acc = direct_mc(model, tok, config)
    assert close(scores, want_scores)
    assert greedy == want_greedy
    assert result["results"]["tiny_mc"]["acc,none"] == pytest.approx(want_acc)
    plain, _, _ = direct_mc(model, tok, FocusConfig(**NEVER))
    assert max(abs(a - b) for r, p in zip(scores, plain) for a, b in zip(r, p)) > 1e-2  # the refinement counted
    stats = lm.focus_stats["loglikelihood"]
    assert stats["checked"] > 0 and stats["uncertain"] == stats["checked"]
    assert result["config"]["focus_config"] == config.to_dict()


@pytest.mark.parametrize("max_length", [None, 8])  # 8: several rolling windows per text
def test_loglikelihood_rolling_matches_direct_computation(tiny_dir, tiny, max_length):
    model, tok = tiny
    extra = {} if max_length is None else {"max_length": max_length}
    lm = FocusLM(pretrained=str(tiny_dir), device="cpu", mode="ifo", **FOCUS, **extra)
    texts = ["hello world, hello focus", "abc abc abc"]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    config = FocusConfig(mode="ifo", **FOCUS)
    for text, value in zip(texts, got):
        windows = map(make_disjoint_window, get_rolling_token_windows(
            token_list=encode(tok, text), prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length, context_len=1))
        want = sum(direct_loglikelihood(model, ctx, cont, config)[0] for ctx, cont in windows)
        assert value == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_gate_that_never_fires_reproduces_plain_hflm_exactly(tiny_dir, tasks):
    """Same model, same tasks: focus-hf with a silent gate equals the harness's own HFLM bit for bit."""
    plain = HFLM(pretrained=str(tiny_dir), device="cpu", batch_size=3)
    focus = FocusLM(pretrained=str(tiny_dir), device="cpu", batch_size=3, params="last:2", lr=10.0, **NEVER)
    a, b = evaluate(plain, tasks, ["tiny_mc", "tiny_gen"]), evaluate(focus, tasks, ["tiny_mc", "tiny_gen"])
    for task in ("tiny_mc", "tiny_gen"):
        resps = lambda r: [s["resps"] for s in sorted(r["samples"][task], key=lambda s: s["doc_id"])]  # noqa: E731
        assert resps(b) == resps(a)
    texts = [Instance("loglikelihood_rolling", {}, ("hello world, hello focus",), 0)]
    assert focus.loglikelihood_rolling(texts) == plain.loglikelihood_rolling(texts)
    for kind in ("loglikelihood", "generate_until"):
        assert focus.focus_stats[kind]["checked"] > 0 and focus.focus_stats[kind]["uncertain"] == 0


def test_model_object_is_left_untouched(tiny, tasks, assert_untouched):
    """A model passed in (not loaded by the harness) comes back bitwise unchanged, gradients included."""
    model, tok = tiny
    check = assert_untouched(model)
    lm = FocusLM(pretrained=model, tokenizer=tok, device="cpu", params="all", **FOCUS)
    evaluate(lm, tasks, ["tiny_mc"])
    assert lm.focus_stats["loglikelihood"]["refined"] > 0
    check()


# ----------------------------------------------------------------------------- generate_until
def test_generation_matches_focus_generate(tiny_dir, tiny, tasks):
    model, tok = tiny
    lm = FocusLM(pretrained=str(tiny_dir), device="cpu", mode="ifo", params="last:2", **FOCUS)
    result = evaluate(lm, tasks, ["tiny_gen"])
    got = [s["resps"][0][0] for s in sorted(result["samples"]["tiny_gen"], key=lambda s: s["doc_id"])]
    config = FocusConfig(mode="ifo", params="last:2", **FOCUS)
    assert got == [direct_generation(model, tok, d["prompt"], config) for d in GEN]
    assert got != [direct_generation(model, tok, d["prompt"], None) for d in GEN]  # focus changed the text
    stats = lm.focus_stats["generate_until"]
    assert stats["uncertain"] > 0 and stats["changed"] > 0


# ----------------------------------------------------------------------------- model_args
@pytest.mark.parametrize("args, message", [
    ("mdoe=ifo", r"unknown model_args key\(s\) \['mdoe'\]; allowed: focus keys \['pretrained', 'mode'"),
    ("mode=xfo", r"mode must be one of \('ifo', 'dofo', 'entropy'\), got 'xfo'"),
    ("threshold=2", r"threshold must be a number in \(0, 1\]"),
    ("params=last:0", r"params 'last:N' needs an integer N >= 1"),
    ("steps=0", r"steps must be an integer >= 1"),
    ("lr=-1", r"lr must be a finite number > 0"),
    ("preset=gpt3", r"unknown preset 'gpt3'; allowed: \['gemma-2-2b', 'gpt2'"),
])
def test_bad_model_args_raise_value_error_naming_the_key(tiny_dir, args, message):
    with pytest.raises(ValueError, match=message):
        FocusLM.create_from_arg_string(f"pretrained={tiny_dir},{args}", {"device": "cpu"})


def test_model_args_string(tiny_dir):
    """model_args as lm-eval parses them: numbers, ``last:N``, ``|``-separated patterns, presets."""
    lm = FocusLM.create_from_arg_string(f"pretrained={tiny_dir},mode=dofo,lr=1e-4,n_focus=3,steps=2,"
                                        "params=lm_head|model.norm", {"device": "cpu"})
    assert lm.focus_config == FocusConfig(mode="dofo", lr=1e-4, n_focus=3, steps=2, params=["lm_head", "model.norm"])
    lm = FocusLM.create_from_arg_string(f"pretrained={tiny_dir},preset=gpt2,step_rule=normalized,tau=0.5")
    assert lm.focus_config == FocusConfig(step_rule="normalized", tau=0.5)
    lm = FocusLM.create_from_arg_string(f"pretrained={tiny_dir},tau=0.5")  # tau alone selects its rule, as --tau
    assert lm.focus_config == FocusConfig(step_rule="normalized", tau=0.5)
    with pytest.raises(ValueError, match="matches no parameter"):
        FocusLM.create_from_arg_string(f"pretrained={tiny_dir},params=no_such_module", {"device": "cpu"})


def test_pretrained_gguf_file_becomes_folder_and_file(tmp_path):
    """``pretrained=x.gguf`` loads as ``from_pretrained(folder, gguf_file=name)`` (the route ``default`` takes)."""
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_pretrained(str(tmp_path / "m.gguf"), None)
    (tmp_path / "m.gguf").touch()
    assert resolve_pretrained(str(tmp_path / "m.gguf"), None) == (str(tmp_path), "m.gguf", False)
    with pytest.raises(ValueError, match="holds no config.json"):
        resolve_pretrained(tmp_path, None)
    (tmp_path / "config.json").write_text("{}")
    assert resolve_pretrained(tmp_path, None) == (str(tmp_path), None, False)  # a Path is a folder, not a model
    with pytest.raises(ValueError, match="gguf_file='other.gguf' differs"):
        resolve_pretrained(str(tmp_path / "m.gguf"), "other.gguf")


# ----------------------------------------------------------------------------- command line
def run_cli(task: str, model_args: str, include: Path, out: Path, *extra: str, cwd: Path | None = None):
    """``python -m focus_decoding.harness`` (the lm_eval command line with focus-hf registered), offline:
    (results, samples) from the files it writes."""
    cmd = [sys.executable, "-m", "focus_decoding.harness", "--model", "focus-hf", "--tasks", task,
           "--model_args", model_args, "--include_path", str(include), "--device", "cpu",
           "--output_path", str(out), "--log_samples", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "hf_cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = lambda pattern: Path(glob.glob(f"{out}/**/{pattern}", recursive=True)[0])  # noqa: E731
    results = json.loads(found("results_*.json").read_text())
    return results, [json.loads(line) for line in found(f"samples_{task}_*.jsonl").read_text().splitlines()]


def test_command_line_end_to_end(tiny_dir, tiny, task_dir, tmp_path):
    """The command line on the tiny model and the local MC task, against the direct computation."""
    results, samples = run_cli("tiny_mc", f"pretrained={tiny_dir},mode=ifo,threshold=1.0,lr=10,params=last:2",
                               task_dir, tmp_path)
    model, tok = tiny
    want_scores, _, want_acc = direct_mc(model, tok, FocusConfig(mode="ifo", threshold=1.0, lr=10.0, params="last:2"))
    assert close(harness_mc(samples)[0], want_scores)
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(want_acc)
    assert results["config"]["focus_stats"]["loglikelihood"]["refined"] > 0


HARNESS_BAD_INPUTS = [  # (model_args after pretrained=..., what the one line must say)
    ("mdoe=ifo", "unknown model_args key(s) ['mdoe']"),
    ("threshold=2", "threshold must be a number in (0, 1]"),
    ("lr=-1", "lr must be a finite number > 0"),
    ("params=last:x", "params 'last:N' needs an integer N >= 1"),
    ("mode=foo", "mode must be one of ('ifo', 'dofo', 'entropy'), got 'foo'"),
    ("preset=nonexistent", "unknown preset 'nonexistent'; allowed:"),
    ("params=lm_head|no_such", "'no_such' matches no parameter"),
]


@pytest.mark.parametrize("pretrained, args, message", [
    *[("TINY", a, m) for a, m in HARNESS_BAD_INPUTS],
    ("/missing/dir", "mode=ifo", "no such file or folder: '/missing/dir'"),
    ("/missing.gguf", "mode=ifo", "no such file or folder: '/missing.gguf'"),
    ("EMPTY", "mode=ifo", "holds no config.json, so it is not a model folder"),
])
def test_command_line_bad_model_args_are_one_line_exit_2(pretrained, args, message, tiny_dir, task_dir, tmp_path,
                                                        monkeypatch, capsys):
    """``python -m focus_decoding.harness`` (its ``main``) turns every bad focus-hf input into one stderr line naming
    it, exit status 2: no traceback, no hub address built from a path."""
    from focus_decoding.text.harness import main

    (tmp_path / "empty").mkdir()
    pretrained = {"TINY": str(tiny_dir), "EMPTY": str(tmp_path / "empty")}.get(pretrained, pretrained)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main sets sys.argv as lm_eval's parser reads it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "focus-hf", "--tasks", "tiny_mc", "--include_path", str(task_dir), "--device", "cpu",
              "--model_args", f"pretrained={pretrained},{args}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err and err[-1].startswith("python -m focus_decoding.harness: error: focus-hf")
    assert message in err[-1]  # (in-process, lm_eval's logging may complain about pytest's closed streams)


def test_command_line_bad_input_in_a_fresh_process(tiny_dir, task_dir):
    """The same from a real ``python -m`` process: stderr ends in the one line, exit 2, nothing else of ours."""
    cmd = [sys.executable, "-m", "focus_decoding.harness", "--model", "focus-hf", "--tasks", "tiny_mc",
           "--include_path", str(task_dir), "--device", "cpu", "--model_args", f"pretrained={tiny_dir},threshold=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m focus_decoding.harness: error: focus-hf")


# ----------------------------------------------------------------------------- the embedded model
@pytest.mark.default_model
def test_default_model_from_the_command_line(default_model, tmp_path):
    """The README command: ``pretrained=default`` (the GGUF file) on the committed local task, from the
    command line, against the direct computation on the same model."""
    # a step given replaces the preset's step only: the embedded model keeps its last:2, as on the package CLI
    results, samples = run_cli("focus_local_mc", "pretrained=default,lr=1e-4", REPO / "tests/data/lm_eval",
                               tmp_path, "--limit", "4", cwd=REPO)  # the task names its data relative to the repo
    config = FocusConfig(lr=1e-4, params="last:2")
    assert config == FocusConfig.preset("smollm2-135m")
    assert results["config"]["focus_config"] == config.to_dict()
    docs = [json.loads(line) for line in (REPO / "tests/data/lm_eval/local_mc.jsonl").read_text().splitlines()[:4]]
    model, tok = default_model
    scores, greedy = harness_mc(samples)
    want_scores, want_greedy, want_acc = direct_mc(model, tok, config, docs)
    assert close(scores, want_scores, 1e-4)
    assert greedy == want_greedy
    assert results["results"]["focus_local_mc"]["acc,none"] == pytest.approx(want_acc)
    assert results["config"]["focus_stats"]["loglikelihood"]["refined"] > 0
