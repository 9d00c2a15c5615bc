"""The command line: every subcommand in-process on tiny models, errors, Ctrl-C + --resume, --select-lr, 2 processes."""
import collections
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from focus_decoding import cli, data, eval_text
from focus_decoding.config import FocusConfig
from focus_decoding.report import FocusReport

TINY = ["--model", "tiny-llama", "--no-progress"]
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs."


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def totals(report: FocusReport) -> dict:
    """Everything but wall time and bookkeeping: what an interrupted or sharded run must reproduce."""
    return {"n_total": report.n_total, "outcomes": report.outcomes, "topk_counts": report.topk_counts,
            "topk_hits": report.topk_hits, "nonfinite": report.nonfinite}


def load_report(path: Path) -> FocusReport:
    return FocusReport.from_dict(json.loads(path.read_text())["reports"][-1])


def test_generate_marks_exactly_the_changed_tokens(tmp_path, capsys):
    args = ["generate", "Hello there", *TINY, "--threshold", "1.0", "--lr", "30", "--max-new-tokens", "10",
            "--color", "never", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "generate.json").read_text())
    # the teacher-forced marks agree with the generation adapter's own count of changed argmaxes
    assert sum(record["changed"]) == record["stats"]["totals"]["changed"] > 0
    assert out.count("[[") == sum(record["changed"])
    assert record["plain_ids"] != record["focus_ids"]
    assert record["config"]["lr"] == 30.0 and "versions" in record["meta"]


def test_eval_text_writes_json_markdown_png_equal_to_the_library_call(tmp_path, corpus, capsys):
    args = ["eval-text", *TINY, "--dataset", corpus, "--context-length", "8", "--max-uncertain", "10",
            "--threshold", "0.04", "--lr", "30", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"eval_text.{suffix}").stat().st_size > 0
    saved = json.loads((tmp_path / "eval_text.json").read_text())
    assert {"versions", "seed", "device", "date"} <= set(saved["meta"])
    model, tok = cli.load_model("tiny-llama")
    direct = eval_text.evaluate_next_token(model, tok, [TEXT], FocusConfig(threshold=0.04, lr=30), context_length=8,
                                           max_uncertain=10, progress=False)
    assert totals(load_report(tmp_path / "eval_text.json")) == totals(direct)
    assert "| " in (tmp_path / "eval_text.md").read_text() and "Δ_Corr" in capsys.readouterr().out
    assert not (tmp_path / "partial.json").exists()  # a finished run leaves nothing to resume from


@pytest.mark.parametrize("argv, needle", [
    (["eval-text", "--mode", "sideways"], "invalid choice"),
    (["generate", "--model", "tiny-llama", "--threshold", "2"], "threshold"),
    (["generate", "--model", "tiny-llama", "--n-focus", "0"], "n_focus"),
    (["eval-text", "--model", "tiny-llama", "--params", "last:99", "--max-texts", "1"], "last:99"),
    (["eval-text", "--select-lr", "1e-4,abc"], "select-lr"),
    (["eval-text", "--model", "tiny-llama", "--resume"], "--out"),
])
def test_bad_arguments_exit_2_with_one_line_message(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and "error" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_ctrl_c_then_resume_equals_uninterrupted(tmp_path, corpus, monkeypatch, capsys):
    common = ["eval-text", *TINY, "--dataset", corpus, "--context-length", "4", "--max-uncertain", "12",
              "--threshold", "0.04", "--lr", "30"]
    assert cli.main([*common, "--out", str(tmp_path / "full")]) == 0
    full = load_report(tmp_path / "full" / "eval_text.json")

    real = eval_text.evaluate_next_token

    def interrupted(*args, on_window=None, **kwargs):
        def stop_after_first(index, report):
            on_window(index, report)  # the CLI saves the window first, as a real Ctrl-C would find it
            raise KeyboardInterrupt
        return real(*args, on_window=stop_after_first, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(eval_text, "evaluate_next_token", interrupted)
    assert cli.main([*common, "--out", str(out)]) == 130
    partial = json.loads((out / "partial.json").read_text())
    assert partial["window"] == 0 and 0 < len(partial["report"]["outcomes"]) < full.n_uncertain
    assert not (out / "eval_text.json").exists()
    monkeypatch.setattr(eval_text, "evaluate_next_token", real)
    assert cli.main([*common, "--out", str(out), "--resume"]) == 0
    assert "resuming after window 0" in capsys.readouterr().err
    assert totals(load_report(out / "eval_text.json")) == totals(full)
    assert not (out / "partial.json").exists()


def test_resume_refuses_a_partial_file_from_another_config(tmp_path, corpus, monkeypatch):
    common = ["eval-text", *TINY, "--dataset", corpus, "--context-length", "4", "--max-uncertain", "4",
              "--threshold", "0.04", "--out", str(tmp_path)]
    real = eval_text.evaluate_next_token

    def interrupted(*args, on_window=None, **kwargs):
        return real(*args, on_window=lambda i, r: (on_window(i, r), (_ for _ in ()).throw(KeyboardInterrupt)),
                    **kwargs)

    monkeypatch.setattr(eval_text, "evaluate_next_token", interrupted)
    assert cli.main([*common, "--lr", "30"]) == 130
    monkeypatch.setattr(eval_text, "evaluate_next_token", real)
    assert cli.main([*common, "--lr", "1", "--resume"]) == 2


def test_select_lr_picks_on_dev_and_reports_test(tmp_path, capsys):
    grid = [1e-3, 30.0, 300.0]
    args = ["eval-text", *TINY, "--max-texts", "4", "--context-length", "8", "--max-uncertain", "6",
            "--threshold", "0.04", "--select-lr", ",".join(map(str, grid)), "--out", str(tmp_path)]
    assert cli.main(args) == 0
    saved = json.loads((tmp_path / "select_lr.json").read_text())
    dev_dc = [row["delta_corr"] for row in saved["dev"]]
    assert [row["config"]["lr"] for row in saved["dev"]] == grid
    assert saved["chosen_lr"] == grid[dev_dc.index(max(dev_dc))]
    dev, test = data.split_dev_test(data.load_texts(max_texts=4), dev_fraction=0.5, seed=0)
    assert dev and test and not set(dev) & set(test)
    assert (saved["dev_texts"], saved["test_texts"]) == (len(dev), len(test))
    model, tok = cli.load_model("tiny-llama")
    cfg = FocusConfig(threshold=0.04, lr=saved["chosen_lr"])
    on_test = eval_text.evaluate_next_token(model, tok, test, cfg, context_length=8, max_uncertain=6, progress=False)
    assert totals(load_report(tmp_path / "select_lr.json")) == totals(on_test)
    printed = capsys.readouterr().out
    assert "dev (selection)" in printed and "test (reported)" in printed and (tmp_path / "select_lr_dev.png").exists()


def test_two_accelerate_processes_equal_one(tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text(TEXT[:40])
    common = ["eval-text", *TINY, "--dataset", str(corpus), "--context-length", "8", "--max-uncertain", "0",
              "--threshold", "0.01", "--lr", "30"]
    assert cli.main([*common, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = Path(sys.executable).parent / "accelerate"
    # accelerate's --cpu flag starts ONE process; --multi_gpu starts torchrun, which works on CPU (gloo) too
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "focus_decoding.cli", *common, "--device", "cpu", "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load_report(tmp_path / "one" / "eval_text.json"), load_report(tmp_path / "two" / "eval_text.json")
    assert json.loads((tmp_path / "two" / "eval_text.json").read_text())["meta"]["processes"] == 2
    assert one.n_uncertain > 0
    # windows interleave across ranks, so compare totals and the multiset of outcomes
    assert (two.n_total, two.topk_counts, two.topk_hits) == (one.n_total, one.topk_counts, one.topk_hits)
    assert collections.Counter(two.outcomes) == collections.Counter(one.outcomes)
    assert proc.stdout.count("| data set |") == 1  # only the main process prints and writes


@pytest.mark.vision
def test_eval_vision_writes_reports(tmp_path, capsys):
    pytest.importorskip("torchvision")
    args = ["eval-vision", "--no-progress", "--max-samples", "30", "--mode", "dofo", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    saved = json.loads((tmp_path / "eval_vision.json").read_text())
    assert [s["n_total"] for s in saved["summaries"]] == [30]
    assert saved["config"]["mode"] == "dofo" and saved["config"]["lr"] == FocusConfig(mode="dofo").lr
    assert (tmp_path / "eval_vision.png").stat().st_size > 0 and "| digits |" in capsys.readouterr().out


@pytest.mark.default_model
def test_default_model_generate_uses_its_preset(default_model, monkeypatch, tmp_path, capsys):
    from focus_decoding import models
    from focus_decoding.config import PRESETS

    monkeypatch.setattr(models, "load_default_model", lambda: default_model)  # loaded once per session
    assert cli.main(["generate", "The capital of France is", "--max-new-tokens", "4", "--no-progress",
                     "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "generate.json").read_text())
    assert record["config"]["lr"] == PRESETS["smollm2-135m"]["ifo"]["lr"] and len(record["focus_ids"]) == 4
    assert record["stats"]["totals"]["checked"] == 4 and "plain:" in capsys.readouterr().out
