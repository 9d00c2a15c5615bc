"""Every bad input a user can give the command line: one line on stderr naming it, exit status 2, in seconds.

Each case runs ``cli.main`` in-process on the tiny models, with no network. Where the issue asks for a
check *before* the slow part, the test makes loading the model (or the data) fail loudly if it is reached.
"""
import json
import os
import sys
import time

import pytest

from focus_decoding import cli
from focus_decoding.resources import models
from focus_decoding.cli import common as runs

TINY = ["--model", "tiny-llama", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs.")
    return str(path)


@pytest.fixture
def no_hub(monkeypatch):
    """No hub: the endpoint refuses connections and the offline flags are unset (the slow case before the fix)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def model_not_loaded(monkeypatch):
    """Fail the test if the job reaches the model load (the check must come first)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(runs, "load_model", forbidden)


def one_line_error(argv, capsys, *needles, status=2, seconds=10.0):
    """Run the CLI; assert the exit status, exactly one line on stderr, no traceback, each needle in it, fast."""
    t0 = time.perf_counter()
    assert cli.main(argv) == status
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert elapsed < seconds, f"took {elapsed:.1f}s"
    return lines[0]


# ----------------------------------------------------------------------------- data
def test_empty_model_folder_is_named(capsys, corpus, tmp_path):
    """A folder without config.json is not a model: say so (not a tokenizer library's message)."""
    one_line_error(["eval-text", "--model", str(tmp_path), "--dataset", corpus], capsys,
                   "holds no config.json, so it is not a model folder", seconds=5)


@pytest.mark.parametrize("offline", ["flag", "unreachable"])
def test_hub_corpus_offline_fails_in_seconds_before_the_model_loads(offline, monkeypatch, no_hub, model_not_loaded,
                                                                   capsys):
    if offline == "flag":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(["eval-text", *TINY, "--dataset", "openwebtext"], capsys,
                          "eval-text: error:", "openwebtext", "--dataset path/to/file.txt", seconds=6)
    assert ("HF_HUB_OFFLINE" in line) == (offline == "flag")


def test_missing_absolute_path_is_not_taken_for_a_hub_id(no_hub, model_not_loaded, capsys):
    one_line_error(["eval-text", *TINY, "--dataset", "/no/such/file.txt"], capsys,
                   "'/no/such/file.txt'", "no such file", "allowed", seconds=3)


@pytest.mark.parametrize("content, needle", [(b"abc\x00\x01\x02def", "binary file"),
                                             (b"caf\xe9 latin-1, not UTF-8", "not UTF-8")])
def test_binary_dataset_names_the_file(content, needle, tmp_path, model_not_loaded, capsys):
    path = tmp_path / "blob.txt"
    path.write_bytes(content)
    one_line_error(["eval-text", *TINY, "--dataset", str(path)], capsys, str(path), needle)


@pytest.mark.parametrize("name, content, needle", [("empty.txt", "", "holds no text"),
                                                   ("table.csv", "a,b\n", "unsupported file type"),
                                                   ("rows.jsonl", '{"body": "x"}\n', "text field"),
                                                   ("cut.jsonl", '{"text": "a"}\n{"text": "b', "not valid JSON")])
def test_unusable_dataset_files(name, content, needle, tmp_path, model_not_loaded, capsys):
    (tmp_path / name).write_text(content)
    one_line_error(["eval-text", *TINY, "--dataset", str(tmp_path / name)], capsys, needle, name)


# ----------------------------------------------------------------------------- model
def test_missing_model_path(capsys, corpus):
    one_line_error(["eval-text", "--model", "/nonexistent", "--dataset", corpus], capsys,
                   "--model: no such file or folder: '/nonexistent'", "tiny-llama", seconds=5)


@pytest.mark.parametrize("offline", ["flag", "unreachable"])
def test_unknown_model_name_fails_fast_offline(offline, monkeypatch, no_hub, corpus, capsys):
    if offline == "flag":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained was called for a model that cannot be fetched")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", never)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", never)
    one_line_error(["generate", "--model", "nonexistent_name"], capsys,
                   "'nonexistent_name'", "nor in the Hugging Face cache", "allowed", seconds=6)


def test_a_text_file_is_not_a_model(corpus, capsys):
    one_line_error(["generate", "--model", corpus], capsys, "not a .gguf model", corpus)


def test_ctrl_c_while_the_model_loads(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(models, "tiny_causal_lm", interrupted)
    one_line_error(["generate", *TINY], capsys, "generate: interrupted", status=130)


@pytest.mark.parametrize("model, limit, field", [("tiny-gpt2", 256, "n_positions"),
                                                 ("tiny-llama", 256, "max_position_embeddings")])
def test_context_longer_than_the_model_positions(model, limit, field, tmp_path, capsys):
    corpus = tmp_path / "long.txt"
    corpus.write_text("abcdefghij" * 60)  # one character per token: the first window fills every position
    common = ["eval-text", "--model", model, "--no-progress", "--dataset", str(corpus)]
    one_line_error([*common, "--context-length", str(limit + 1)], capsys, f"--context-length {limit + 1}",
                   f"has {limit}", field, f"at most {limit}")
    assert cli.main([*common, "--context-length", str(limit), "--max-uncertain", "1", "--max-tokens", "4"]) == 0


def test_prompt_plus_new_tokens_longer_than_the_model_positions(capsys):
    one_line_error(["generate", "abc", *TINY, "--max-new-tokens", "254"], capsys,
                   "the prompt (3 tokens) plus --max-new-tokens 254", "has 256")


# ----------------------------------------------------------------------------- --out
def test_out_is_an_existing_file(tmp_path, corpus, model_not_loaded, capsys):
    target = tmp_path / "results.json"
    target.write_text("keep me")
    one_line_error(["eval-text", *TINY, "--dataset", corpus, "--out", str(target)], capsys,
                   "is an existing file", "allowed: a folder")
    assert target.read_text() == "keep me"


def test_out_in_a_read_only_place(tmp_path, corpus, model_not_loaded, capsys):
    if os.geteuid() != 0:
        place = tmp_path / "ro"
        place.mkdir()
        place.chmod(0o500)
    else:  # root writes through file modes; sysfs refuses new files even to root
        place = "/sys"
        if sys.platform != "linux" or os.access(place, os.W_OK) and not os.path.ismount(place):
            pytest.skip("no read-only place to test with")
    one_line_error(["eval-text", *TINY, "--dataset", corpus, "--out", f"{place}/results"], capsys,
                   "cannot be written", "allowed: a writable folder")


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("argv, needles", [
    (["eval-text", "--max-uncertain", "-3"], ["--max-uncertain", ">= 0", "'-3'"]),
    (["eval-text", "--context-length", "0"], ["--context-length", ">= 1"]),
    (["eval-text", "--max-texts", "two"], ["--max-texts", "'two'"]),
    (["tune", "--dev-fraction", "1.5"], ["--dev-fraction", "(0, 1)"]),
    (["tune", "--lrs", "1e-4,-1"], ["--lrs", "> 0"]),
    (["generate", "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["generate", "--seed", "-1"], ["--seed", ">= 0"]),
    (["generate", "--step-rule", "adam"], ["--step-rule", "'fixed', 'normalized'"]),
    (["generate", "--mode", "sideways"], ["--mode", "'ifo', 'dofo'"]),
    (["generate", "--lr", "fast"], ["--lr", "'fast'"]),
    (["eval-vision", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["frobnicate"], ["invalid choice", "generate"]),
    ([], ["required", "command"]),
])
def test_argparse_errors_are_one_line(argv, needles, model_not_loaded, capsys):
    one_line_error(argv, capsys, *needles, "(see focus-decoding", seconds=3)


@pytest.mark.parametrize("extra, needles", [
    (["--lr", "-1"], ["FocusConfig.lr", "> 0"]),
    (["--lr", "nan"], ["FocusConfig.lr", "finite"]),
    (["--threshold", "0"], ["FocusConfig.threshold", "(0, 1]"]),
    (["--steps", "0"], ["FocusConfig.steps", ">= 1"]),
    (["--params", "last:0"], ["last:N", "N >= 1"]),
    (["--tau", "0.5", "--lr", "1e-3"], ["lr", "normalized"]),
    (["--step-rule", "fixed", "--tau", "0.5"], ["tau", "normalized"]),
    (["--tau", "-2"], ["FocusConfig.tau", "> 0"]),
])
def test_bad_method_settings_are_refused_before_loading(extra, needles, model_not_loaded, capsys):
    one_line_error(["generate", *TINY, *extra], capsys, *needles, seconds=3)


@pytest.mark.parametrize("extra, needles", [
    (["--n-focus", "100"], ["--n-focus 100", "100 classes", "allowed: 1..99"]),
    (["--params", "no.such.layer"], ["no.such.layer"]),
    (["--params", "last:9"], ["last:9", "4 blocks"]),
    (["--device", "gpu"], ["--device 'gpu'", "allowed"]),
])
def test_settings_the_model_or_machine_cannot_run(extra, needles, capsys):
    one_line_error(["generate", *TINY, "--max-new-tokens", "2", *extra], capsys, *needles)


@pytest.mark.parametrize("count, device, needles", [
    (0, "cuda", ["--device 'cuda'", "no cuda device", "allowed: auto, cpu"]),
    (1, "cuda:3", ["--device 'cuda:3'", "has 1 cuda device(s)", "allowed: cuda:0..cuda:0"]),
])
def test_device_this_machine_does_not_have(count, device, needles, monkeypatch, model_not_loaded, capsys):
    monkeypatch.setattr("torch.cuda.device_count", lambda: count)  # the same answer on machines with and without GPUs
    one_line_error(["generate", *TINY, "--device", device], capsys, *needles, seconds=3)


@pytest.mark.parametrize("extra, needles", [
    (["--stride", "16"], ["--stride 16", "--context-length 8", "allowed: 1..8"]),
    (["--resume"], ["--resume needs --out"]),
    (["--resume", "--overwrite", "--out", "x"], ["--resume", "--overwrite", "pass one"]),
    (["--resume", "--select-lr", "1,2", "--out", "x"], ["--select-lr was replaced by tune"]),
    (["--select-lr", "1e-4,-1"], ["--select-lr", "replaced by tune"]),
    (["--step-rule", "normalized", "--select-lr", "1,2"], ["--select-lr", "tune --lrs 1,2 --exhaustive"]),
])
def test_eval_text_option_combinations(extra, needles, corpus, model_not_loaded, capsys):
    one_line_error(["eval-text", *TINY, "--dataset", corpus, "--context-length", "8", *extra], capsys, *needles,
                   seconds=3)


# ----------------------------------------------------------------------------- partial files
def test_truncated_partial_file_is_named(tmp_path, corpus, capsys):
    partial = tmp_path / "partial.json"
    partial.write_text('{"fingerprint": {"--model": "tiny-ll')
    one_line_error(["eval-text", *TINY, "--dataset", corpus, "--out", str(tmp_path), "--resume"], capsys,
                   str(partial), "not a readable partial-results file")
    assert partial.read_text() == '{"fingerprint": {"--model": "tiny-ll'  # nothing lost


def test_partial_file_without_a_fingerprint_is_refused(tmp_path, corpus, capsys):
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"window": 0, "config": {}, "report": {}}))  # what older versions wrote
    one_line_error(["eval-text", *TINY, "--dataset", corpus, "--out", str(tmp_path), "--resume"], capsys,
                   str(partial), "no fingerprint")


@pytest.mark.vision
def test_eval_vision_checkpoint_that_is_not_one(tmp_path, capsys):
    pytest.importorskip("torchvision")
    checkpoint = tmp_path / "digits.pt"
    checkpoint.write_text("not a checkpoint")
    one_line_error(["eval-vision", "--no-progress", "--checkpoint", str(checkpoint)], capsys,
                   "--model 'digits' with --checkpoint", str(checkpoint), "cannot be loaded")


def test_missing_gguf_file_is_not_taken_for_a_hub_id(no_hub, capsys):
    one_line_error(["generate", "--model", "missing.gguf"], capsys, "no such file or folder: 'missing.gguf'",
                   seconds=3)


@pytest.mark.vision
def test_eval_vision_weights_name_the_model_does_not_have(model_not_loaded, capsys):
    pytest.importorskip("torchvision")
    one_line_error(["eval-vision", "--no-progress", "--model", "resnet18", "--weights", "BOGUS"], capsys,
                   "--weights 'BOGUS'", "resnet18", "allowed: IMAGENET1K_V1, DEFAULT", seconds=5)
