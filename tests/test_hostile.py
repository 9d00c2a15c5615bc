"""The inputs a hostile but realistic user tries (issue 19): results are never lost, nothing is silently wrong,
and every bad input ends in one line naming the problem (exit status 2 on the command line), never a traceback.

Cases covered elsewhere: the option parser and files (test_cli_errors), resume fingerprints (test_cli,
test_cli_tune), the harness's model_args (test_harness), config fields (test_config).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from focus_decoding import FocusConfig, cli, focus_generate, set_focus_config
from focus_decoding.resources.models import tiny_causal_lm

TINY = ["--model", "tiny-llama", "--no-progress"]
TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog met on the mat. " * 6


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def one_line(argv, capsys, *needles, status=2):
    """Run the CLI: the exit status, one stderr line holding every needle, no traceback; returns that line."""
    assert cli.main(argv) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


# ----------------------------------------------------------------------------- results are never lost
EVAL = ["eval-text", *TINY, "--context-length", "8", "--max-uncertain", "6", "--threshold", "0.5", "--lr", "30"]


def test_finished_eval_text_is_kept_refused_or_replaced_on_request(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    args = [*EVAL, "--dataset", corpus, "--out", str(out)]
    assert cli.main(args) == 0
    result = out / "eval_text.json"
    before = result.read_bytes()
    capsys.readouterr()
    assert cli.main(args) == 0  # the same run again: already complete, nothing recomputed or rewritten
    assert "already complete" in capsys.readouterr().out and result.read_bytes() == before
    one_line([*args, "--lr", "10"], capsys, "--lr", "30", "10")  # another run into finished results: refused
    one_line([*args, "--lr", "10", "--resume"], capsys, "--lr")  # resuming into it too
    assert result.read_bytes() == before
    assert cli.main([*args, "--lr", "10", "--overwrite"]) == 0  # asked for: replaced
    assert json.loads(result.read_text())["config"]["lr"] == 10


def test_finished_tune_is_kept_refused_or_replaced_on_request(tmp_path, corpus, capsys):
    out = tmp_path / "tune"
    args = ["tune", *TINY, "--dataset", corpus, "--context-length", "8", "--threshold", "0.5", "--lrs", "1e-3,30",
            "--dev-max-uncertain", "12", "--test-max-uncertain", "10", "--min-test-uncertain", "5", "--out", str(out)]
    assert cli.main(args) == 0
    before = (out / "tune.json").read_bytes()
    capsys.readouterr()
    assert cli.main(args) == 0 and "already complete" in capsys.readouterr().out
    one_line([*args, "--alpha", "0.1", "--resume"], capsys, "--alpha", "0.05")  # was: "starting from the beginning"
    one_line([*args, "--alpha", "0.1"], capsys, "--alpha")
    assert (out / "tune.json").read_bytes() == before
    assert cli.main([*args, "--alpha", "0.1", "--overwrite"]) == 0
    assert json.loads((out / "tune.json").read_text())["alpha"] == 0.1


# ----------------------------------------------------------------------------- silently wrong, no more
@pytest.mark.parametrize("params, needles", [
    ("all+lm_head", ["'all' selects on its own and cannot be combined"]),
    ("lm_head+nomatch", ["pattern 'nomatch' matches no parameter"]),
    ("model.layers.3+model.layers.9", ["pattern 'model.layers.9' matches no parameter"]),
])
def test_every_pattern_of_a_joined_selector_must_match(params, needles, corpus, capsys):
    one_line([*EVAL, "--dataset", corpus, "--params", params], capsys, *needles)


def test_a_config_pattern_that_matches_nothing_is_an_error_in_python():
    model = tiny_causal_lm("llama", layers=4)
    with pytest.raises(ValueError, match="pattern 'nomatch' matches no parameter of LlamaForCausalLM"):
        focus_generate(model, torch.tensor([[1, 2, 3]]), focus_config=FocusConfig(params=["lm_head", "nomatch"]),
                       max_new_tokens=2, pad_token_id=0)


@pytest.mark.parametrize("extra, needles", [
    (["--step-rule", "normalized", "--lrs", "1e-3"], ["--step-rule normalized searches --taus", "--lrs"]),
    (["--step-rule", "fixed", "--taus", "0.3"], ["--step-rule fixed", "--taus"]),
])
def test_tune_refuses_contradictory_step_options(extra, needles, corpus, capsys):
    one_line(["tune", *TINY, "--dataset", corpus, *extra], capsys, *needles)


def test_tune_on_whitespace_only_text_is_refused(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("   \n\n \t \n")
    one_line(["tune", *TINY, "--dataset", str(tmp_path / "blank.txt")], capsys, "holds no text")


def test_tune_below_the_minimum_of_test_tokens_is_not_enough_data(tmp_path, corpus, capsys):
    out = tmp_path / "tune"
    line = one_line(["tune", *TINY, "--dataset", corpus, "--context-length", "8", "--threshold", "0.5", "--lrs",
                     "1e-3,30", "--dev-max-uncertain", "12", "--test-max-uncertain", "7", "--out", str(out)],
                    capsys, "not enough data", "7 uncertain test tokens", "fewer than the 100")
    assert "significant" not in line  # no verdict on too few tokens
    assert json.loads((out / "tune.json").read_text())["verdict"]["kind"] == "not enough data"  # the evidence is kept


@pytest.mark.vision
def test_a_mistyped_checkpoint_is_an_error_unless_asked_to_train(tmp_path, capsys):
    pytest.importorskip("torchvision")
    typo = tmp_path / "typo.pt"
    one_line(["eval-vision", "--no-progress", "--checkpoint", str(typo)], capsys, "no digits checkpoint at",
             str(typo), "--train")
    assert not typo.exists()  # nothing trained and written there


@pytest.mark.vision
def test_torchvision_weights_on_the_digits_model_are_refused(capsys):
    pytest.importorskip("torchvision")
    one_line(["eval-vision", "--no-progress", "--weights", "DEFAULT"], capsys, "--weights", "--model digits",
             "--checkpoint")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gemma3"])
@pytest.mark.parametrize("target", ["model", "generation_config"])
def test_set_focus_config_survives_save_pretrained_on_every_test_model(arch, target, tmp_path):
    """The model itself or its generation config: stored on the generation config either way, and reloaded."""
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm(arch)
    config = FocusConfig(mode="dofo", lr=0.25, params="last:1", threshold=0.3)
    attributes = set(vars(model))
    set_focus_config(model if target == "model" else model.generation_config, config)
    assert set(vars(model)) == attributes  # nothing set on the model object itself
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert FocusConfig.coerce(reloaded.generation_config.focus_config) == config


def test_a_tune_file_with_a_field_deleted_is_refused_naming_it(tmp_path):
    written = FocusConfig(mode="dofo", lr=1e-3).to_file_dict("focus-decoding tune")
    del written["lr"]
    with pytest.raises(ValueError, match="lr"):
        FocusConfig.from_dict(written)
    hand = FocusConfig(mode="dofo", lr=1e-3).to_dict()
    del hand["lr"]  # a hand-written dict (no "written_by") may keep the defaults, as the docstring says
    assert FocusConfig.from_dict(hand).lr == FocusConfig(mode="dofo").lr


# ----------------------------------------------------------------------------- tracebacks, no more
@pytest.mark.vision
@pytest.mark.parametrize("argv, needles", [
    (["--model", "resnet18", "--data", "digits"], ["--model resnet18 does not accept the images of --data digits",
                                                    "[1, 8, 8]", "3 channels"]),
    (["--model", "vit_b_16", "--data", "digits", "--gradcam", "2", "--out", "OUT"],
     ["--model vit_b_16 does not accept the images of --data digits", "Expected 224"]),
])
def test_eval_vision_model_and_data_that_do_not_fit(argv, needles, tmp_path, capsys):
    pytest.importorskip("torchvision")
    argv = [str(tmp_path) if a == "OUT" else a for a in argv]
    one_line(["eval-vision", "--no-progress", *argv], capsys, *needles)
    assert not list(tmp_path.iterdir())  # refused before any work


@pytest.mark.vision
def test_the_digits_cnn_on_mnist_images_is_named(capsys):
    pytest.importorskip("torchvision")
    from conftest import need

    need("ccexam")
    one_line(["eval-vision", "--no-progress", "--data", "mnist"], capsys,
             "--model digits does not accept the images of --data mnist (shape [1, 28, 28])")


@pytest.mark.vision
@pytest.mark.parametrize("method", ["loop", "vmap"])
@pytest.mark.parametrize("params", ["all", "head"])
def test_an_empty_batch_gives_an_empty_result(method, params):
    pytest.importorskip("torchvision")
    from focus_decoding.vision import DigitsNet, FocusClassifier

    net = DigitsNet().eval()
    clf = FocusClassifier(net, FocusConfig(params=params), method=method)
    out = clf(torch.rand(0, 1, 8, 8))
    assert out.shape == net(torch.rand(0, 1, 8, 8)).shape == (0, 10)
    assert clf.stats.checked == 0 and clf.stats.uncertain == 0


def test_a_broken_partial_file_with_a_matching_fingerprint_is_named(tmp_path, corpus, monkeypatch, capsys):
    from focus_decoding.evaluation import next_token
    from focus_decoding.tune import dev

    out = tmp_path / "tune"
    args = ["tune", *TINY, "--dataset", corpus, "--context-length", "8", "--threshold", "0.5", "--lrs", "1e-3,30",
            "--dev-max-uncertain", "12", "--test-max-uncertain", "10", "--min-test-uncertain", "5", "--out", str(out)]

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    for module in (dev, next_token):
        monkeypatch.setattr(module, "refine_position", ctrl_c)
    assert cli.main(args) == 130
    monkeypatch.undo()
    partial = out / "partial.json"
    state = json.loads(partial.read_text())
    state["resume"]["race"] = {"outcomes": "garbage"}  # the fingerprint still matches
    partial.write_text(json.dumps(state))
    capsys.readouterr()
    one_line([*args, "--resume"], capsys, str(partial))
    assert json.loads(partial.read_text()) == state  # nothing lost


def _launch(argv, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "focus_decoding.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kwargs)


def test_ctrl_c_while_importing_is_one_line_and_130(corpus):
    """The handler is in place before torch loads: an interrupt in the first second is one line, 130, always."""
    # SIGINT as a terminal's Ctrl-C delivers it: under a runner started in the background (SIGINT ignored, which
    # the CLI respects on purpose) the child would inherit the ignore, so it starts with the default disposition
    proc = _launch(["eval-text", *TINY, "--dataset", corpus], start_new_session=True,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # torch's library is mapped: the package is loading, its handler in place
        try:
            # the CLI itself (not the forked runner before exec, which has torch mapped too) is loading torch
            started = b"focus_decoding.cli" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            if proc.poll() is not None or started and "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                break
        except OSError:  # not there yet, or already gone
            pass
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["focus-decoding: interrupted while starting; "
                                                                   "nothing was done"], err


def test_a_launcher_that_started_one_process_of_two_is_refused_once(corpus):
    """``accelerate launch --cpu --num_processes 2`` starts one process: refused saying why, once, exit 2. (The
    launcher then raises its own CalledProcessError, traceback and exit 1: that part is accelerate's.)"""
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "focus_decoding.cli", "eval-text", *TINY, "--dataset", corpus]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ours = [line for line in proc.stderr.splitlines() if line.startswith("focus-decoding")]
    assert ours and len(ours) == 1, proc.stderr[-2000:]
    assert "asked for 2 processes but started one" in ours[0] and "--multi_gpu" in ours[0]
    assert "returned non-zero exit status 2" in proc.stderr and proc.returncode != 0
