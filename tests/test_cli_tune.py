"""`focus-decoding tune` on the tiny models: the files, the verdict line, Ctrl-C + --resume, the config in generate."""
import json

import pytest

from focus_decoding import cli
from focus_decoding.evaluation import next_token as eval_text
from focus_decoding.tune import dev as tune_dev
from focus_decoding.cli import common as runs
from focus_decoding.config import FocusConfig

DOCS = ["the cat sat on the mat. the dog sat on the log. a cat and a dog met on the mat. " * 3,
        "Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump! " * 3,
        "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun. " * 3,
        "Sphinx of black quartz, judge my vow. Jackdaws love my big sphinx of quartz. " * 3]
GRID = ["--lrs", "1e-3,30", "--params", "last:2,all"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return str(path)


def tune_args(corpus, out, *extra):
    return ["tune", "--model", "tiny-llama", "--no-progress", "--dataset", corpus, "--context-length", "32",
            "--dev-max-uncertain", "24", "--test-max-uncertain", "16", "--threshold", "0.3", *GRID,
            "--min-test-uncertain", "8", "--out", str(out), *extra]


def stable(path):
    """What an interrupted run must reproduce: every outcome, decision and count, not the clock."""
    d = json.loads((path / "tune.json").read_text())
    return {"outcomes": [c["outcomes"] for c in d["candidates"]], "eliminations": d["eliminations"],
            "choice": d["choice"], "per_candidate": d["spend"]["per_candidate"], "dev_plain": d["dev_plain"]["n_total"],
            "test": {k: d["test_report"][k] for k in ("n_total", "outcomes", "topk_counts", "topk_hits", "nonfinite")},
            "verdict": d["verdict"], "chosen": d["chosen"]}


def test_tune_writes_the_evidence_and_ends_with_the_verdict(tmp_path, corpus, capsys):
    assert cli.main(tune_args(corpus, tmp_path)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert lines[-1] == saved["verdict"]["line"]
    assert saved["verdict"]["kind"] in ("helps", "harmful", "no significant gain")
    spend = saved["spend"]
    assert spend["refinements"] <= 2 * spend["dev_uncertain_tokens"] == 2 * 24
    assert spend["exhaustive_refinements"] == 4 * 24 and spend["ratio_to_final_alone"] <= 2
    assert any(f"ratio {spend['ratio_to_final_alone']:.2f}" in line for line in lines)  # printed by tune itself
    assert saved["test"]["n_uncertain"] == 16 and saved["data"]["dev_uncertain"] == 24
    assert {"versions", "date", "seed"} <= set(saved["meta"])
    assert FocusConfig.from_dict(json.loads((tmp_path / "focus_config.json").read_text())).to_dict() == saved["chosen"]
    assert (tmp_path / "tune.png").stat().st_size > 0 and "off (plain model)" in (tmp_path / "tune.md").read_text()
    assert not (tmp_path / "partial.json").exists()


def test_exhaustive_sweep_reports_the_race_on_the_same_outcomes(tmp_path, corpus, capsys):
    assert cli.main(tune_args(corpus, tmp_path, "--exhaustive")) == 0
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert saved["spend"]["per_candidate"] == [24] * 4 and saved["race"]["exhaustive"]
    assert saved["spend"]["race_refinements"] <= 48
    assert "the stop-early race on the same outcomes" in capsys.readouterr().out


@pytest.mark.parametrize("phase", ["race", "test"])
def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(tmp_path, corpus, monkeypatch, capsys, phase):
    def args(out, *extra):  # 48 test tokens: two test windows
        return tune_args(corpus, out, "--test-max-uncertain", "48", *extra)
    assert cli.main(args(tmp_path / "full")) == 0
    full = stable(tmp_path / "full")
    # mid-token in the dev race, or in the second test window (32 tokens each, all uncertain here)
    stop_at = 7 if phase == "race" else sum(full["per_candidate"]) + 40
    real, calls = eval_text.refine_position, []

    def ctrl_c(*args, **kwargs):  # Ctrl-C in the middle of a refinement, as a real one would land
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    patch_refine(monkeypatch, ctrl_c)
    assert cli.main(args(out)) == 130
    saved = json.loads((out / "partial.json").read_text())["resume"]
    if phase == "race":
        assert 0 < saved["race"]["race"]["n_seen"] < 24 and not saved.get("test")
    else:
        assert saved["race"]["race"]["n_seen"] == 24 and saved["test"]["window"] == 0
    assert not (out / "tune.json").exists()
    patch_refine(monkeypatch, real)
    assert cli.main(args(out, "--resume")) == 0
    assert "resuming" in capsys.readouterr().err
    assert stable(out) == full
    assert not (out / "partial.json").exists()


def patch_refine(monkeypatch, fn) -> None:
    """Replace refine_position where the dev race and the test evaluation call it."""
    for module in (tune_dev, eval_text):
        monkeypatch.setattr(module, "refine_position", fn)


@pytest.mark.parametrize("changed, named, before", [
    (["--alpha", "0.1"], "--alpha", "0.05"),
    (["--context-length", "24"], "--context-length", "32"),
    (["--dev-fraction", "0.25"], "--dev-fraction", "0.5"),
    (["--budget-ratio", "3"], "--budget-ratio", "2.0"),
    (["--exhaustive"], "--exhaustive", "False"),
    (["--dev-max-uncertain", "20"], "--dev-max-uncertain", "24"),
    (["--test-max-uncertain", "12"], "--test-max-uncertain", "16"),
    (["--lrs", "1e-3,10"], "grid (--modes, --params, --lrs", "30"),
    (["--params", "last:1,all"], "grid (--modes, --params, --lrs", "last:2"),
    (["--threshold", "0.25"], "grid (--modes, --params, --lrs", "0.3"),
    (["--min-test-uncertain", "9"], "--min-test-uncertain", "8"),
    (["--seed", "1"], "--seed", "0"),
])
def test_resume_refuses_another_run_and_names_the_field(changed, named, before, tmp_path, corpus, monkeypatch,
                                                        capsys):
    """Every field of the fingerprint guards the resume: change one option, the refusal names it and its old value."""
    real = eval_text.refine_position

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    patch_refine(monkeypatch, ctrl_c)
    assert cli.main(tune_args(corpus, tmp_path)) == 130
    patch_refine(monkeypatch, real)
    capsys.readouterr()
    assert cli.main(tune_args(corpus, tmp_path, "--resume", *changed)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and before in err[0], err
    assert cli.main(tune_args(corpus, tmp_path)) == 2  # neither --resume nor --overwrite: refused, not replaced
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--modes", "sideways"], "--modes"),
    (["--lrs", "1e-4,abc"], "--lrs"),
    (["--budget-ratio", "0.5"], "--budget-ratio"),
    (["--dev-fraction", "1.5"], "--dev-fraction"),
    (["--preset", "gpt2"], "--preset"),
    (["--params", "last:99"], "last:99"),
    (["--threshold", "1e-12"], "no uncertain token"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, corpus, argv, needle, capsys):
    assert cli.main([*tune_args(corpus, tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "error" in err[0]


def test_resume_needs_out(capsys):
    assert cli.main(["tune", "--model", "tiny-llama", "--resume"]) == 2
    assert "--out" in capsys.readouterr().err


def test_the_chosen_config_travels_with_save_pretrained_into_generate(tmp_path, corpus):
    import torch
    from transformers import AutoModelForCausalLM

    import focus_decoding

    assert cli.main([*tune_args(corpus, tmp_path / "tune"), "--threshold", "1.0"]) == 0
    cfg = FocusConfig.from_dict(json.loads((tmp_path / "tune" / "focus_config.json").read_text()))
    model, _ = runs.load_model("tiny-llama")
    focus_decoding.set_focus_config(model.generation_config, cfg)  # the README's recipe
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert FocusConfig.from_dict(reloaded.generation_config.focus_config) == cfg
    ids = torch.tensor([[1, 40, 41, 42]])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    out = focus_decoding.enable(reloaded).generate(ids, **kwargs)  # no focus_config passed: the stored one
    expected = focus_decoding.focus_generate(model, ids, focus_config=cfg, **kwargs)
    assert out.focus_stats.totals["refined"] == 4  # threshold 1.0: every step refined, so focus was on
    assert torch.equal(out.sequences, expected.sequences)
    assert out.focus_stats.totals == expected.focus_stats.totals


def launch(*args, processes=2, wait=True):
    """``accelerate launch`` of the command line on CPU processes (torchrun under --multi_gpu: gloo on CPU)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "focus_decoding.cli", *args, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_tune_over_two_processes_equals_one_and_resumes_with_two(tmp_path, corpus):
    import os
    import signal
    import time

    args = lambda out, *extra: [*tune_args(corpus, out, "--exhaustive", "--test-max-uncertain", "48"), *extra]  # noqa: E731
    assert cli.main(args(tmp_path / "one")) == 0
    two = launch(*args(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert stable(tmp_path / "two") == stable(tmp_path / "one")  # the decisions of one process, token by token
    assert json.loads((tmp_path / "two" / "tune.json").read_text())["meta"]["processes"] == 2
    assert two.stdout.count("wrote ") == 1  # one process speaks and writes
    # stopped part-way (SIGTERM, as a scheduler would), then --resume with two processes: the same results
    job = launch(*args(tmp_path / "cut"), wait=False)
    partial = tmp_path / "cut" / "partial.json"
    deadline = time.monotonic() + 300
    while not partial.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGTERM)
    job.communicate(timeout=120)
    assert partial.exists() and not (tmp_path / "cut" / "tune.json").exists()  # stopped part-way (it takes seconds)
    resumed = launch(*args(tmp_path / "cut", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert stable(tmp_path / "cut") == stable(tmp_path / "one")
    refused = launch(*args(tmp_path / "two"), processes=2)  # finished results are kept: the same run is complete
    assert refused.returncode == 0 and "already complete" in refused.stdout
