"""The command line: every subcommand in-process on tiny models, errors, Ctrl-C + --resume, 2 processes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from focus_decoding import cli
from focus_decoding.evaluation import next_token as eval_text
from focus_decoding.cli import common as runs
from focus_decoding.cli import parser as cli_parser
from focus_decoding.config import FocusConfig
from focus_decoding.evaluation.report import FocusReport

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
    model, tok = runs.load_model("tiny-llama")
    direct = eval_text.evaluate_next_token(model, tok, [TEXT], FocusConfig(threshold=0.04, lr=30), context_length=8,
                                           max_uncertain=10, progress=False)
    assert totals(load_report(tmp_path / "eval_text.json")) == totals(direct)
    assert "| " in (tmp_path / "eval_text.md").read_text() and "Δ_Corr" in capsys.readouterr().out
    assert not (tmp_path / "partial.json").exists()  # a finished run leaves nothing to resume from


@pytest.mark.parametrize("argv, expected", [
    (["generate"], dict(step_rule="fixed", lr=1e-4, tau=None)),  # the embedded model's preset
    (["generate", "--lr", "3e-3"], dict(step_rule="fixed", lr=3e-3, tau=None)),
    (["generate", "--tau", "0.5"], dict(step_rule="normalized", lr=None, tau=0.5)),  # --tau implies the rule
    (["generate", "--step-rule", "normalized"], dict(step_rule="normalized", lr=None, tau=1.0)),  # preset lr gives way
    (["generate", "--preset", "gpt2", "--mode", "dofo"], dict(mode="dofo", lr=6.25e-8)),
    (["generate", *TINY], dict(step_rule="fixed", lr=FocusConfig().lr)),  # no preset for other models
    (["generate", *TINY, "--tau", "2", "--params", "last:1", "--n-focus", "3"],
     dict(step_rule="normalized", tau=2.0, params="last:1", n_focus=3)),
    (["eval-text", "--params", "lm_head + model.norm"], dict(params=("lm_head", "model.norm"))),
    (["eval-text", "--params", "last:02"], dict(params="last:2")),
    (["generate", "--precision", "model"], dict(precision="model")),
    (["generate"], dict(precision="float32")),
])
def test_config_from_args(argv, expected):
    config = cli_parser.config_from_args(cli_parser.build_parser().parse_args(argv))
    assert {k: getattr(config, k) for k in expected} == expected


def test_tune_candidates_take_the_shared_precision():
    from focus_decoding.cli import tune as cli_tune

    args = cli_parser.build_parser().parse_args(["tune", "--precision", "model", "--lrs", "1e-4", "--taus", "1"])
    grid = cli_tune.grid_from_args(args, cli_parser.config_from_args(args))
    assert len(grid) == 2 and {c.precision for c in grid} == {"model"}


@pytest.mark.parametrize("argv, needle", [
    (["eval-text", "--mode", "sideways"], "invalid choice"),
    (["generate", "--model", "tiny-llama", "--threshold", "2"], "threshold"),
    (["generate", "--model", "tiny-llama", "--n-focus", "0"], "n_focus"),
    (["eval-text", "--model", "tiny-llama", "--params", "last:99", "--max-texts", "1"], "last:99"),
    (["eval-text", "--select-lr", "1e-4,abc"], "select-lr"),
    (["eval-text", "--model", "tiny-llama", "--params", "lm_head,model.norm"], "join the patterns"),
    (["eval-text", "--model", "tiny-llama", "--resume"], "--out"),
])
def test_bad_arguments_exit_2_with_one_line_message(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "error" in err[0]
    assert "Traceback" not in "\n".join(err)


def stop_after_first_window(monkeypatch, how=lambda: (_ for _ in ()).throw(KeyboardInterrupt)):
    """Make the next evaluation stop right after its first window is saved, the way ``how`` stops a process."""
    real = eval_text.evaluate_next_token

    def interrupted(*args, on_window=None, **kwargs):
        def stop(index, report):
            on_window(index, report)  # the CLI saves the window first, as a real Ctrl-C would find it
            how()
            # Python runs a signal's handler at its next check, not inside os.kill: a C call such as the
            # AssertionError below may come first. A sleep is such a check (the handler's exception ends it).
            for _ in range(100):
                time.sleep(0.05)
            raise AssertionError("the interrupt did not stop the run")
        return real(*args, on_window=stop, **kwargs)

    monkeypatch.setattr(eval_text, "evaluate_next_token", interrupted)
    return lambda: monkeypatch.setattr(eval_text, "evaluate_next_token", real)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_then_resume_equals_uninterrupted(signum, tmp_path, corpus, monkeypatch, capsys, request):
    # SIGINT as a terminal's Ctrl-C delivers it: a job a shell starts in the background inherits SIGINT
    # *ignored*, and Python then never raises KeyboardInterrupt (the CLI installs its own SIGTERM handler)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    common = ["eval-text", *TINY, "--dataset", corpus, "--context-length", "4", "--max-uncertain", "12",
              "--threshold", "0.04", "--lr", "30"]
    assert cli.main([*common, "--out", str(tmp_path / "full")]) == 0
    full = load_report(tmp_path / "full" / "eval_text.json")

    out = tmp_path / "resumed"
    restore = stop_after_first_window(monkeypatch, lambda: os.kill(os.getpid(), signum))  # a real signal
    assert cli.main([*common, "--out", str(out)]) == 130
    assert f"partial results in {out / 'partial.json'}; rerun with --resume" in capsys.readouterr().err
    partial = json.loads((out / "partial.json").read_text())
    assert partial["window"] == 0 and 0 < len(partial["report"]["outcomes"]) < full.n_uncertain
    assert not (out / "eval_text.json").exists()
    restore()
    assert cli.main([*common, "--out", str(out), "--resume"]) == 0
    assert "resuming after window 0" in capsys.readouterr().err
    assert totals(load_report(out / "eval_text.json")) == totals(full)
    assert not (out / "partial.json").exists()


KILL_AFTER_FIRST_WINDOW = """
import os, signal, sys
from focus_decoding import cli
from focus_decoding.evaluation import next_token as eval_text
real = eval_text.evaluate_next_token
def killed(*args, on_window=None, **kwargs):
    def stop(index, report):
        on_window(index, report)  # the window is saved; then the process dies without any cleanup
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, on_window=stop, **kwargs)
eval_text.evaluate_next_token = killed
sys.exit(cli.main(sys.argv[1:]))
"""


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, corpus):
    # kill -9 runs no handler at all: only the atomic per-window partial file can save the run
    common = ["eval-text", *TINY, "--dataset", corpus, "--context-length", "4", "--max-uncertain", "12",
              "--threshold", "0.04", "--lr", "30"]
    assert cli.main([*common, "--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_WINDOW, *common, "--out", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((out / "partial.json").read_text())["window"] == 0
    assert cli.main([*common, "--out", str(out), "--resume"]) == 0
    assert totals(load_report(out / "eval_text.json")) == totals(load_report(tmp_path / "full" / "eval_text.json"))


RESUME_BASE = {"--model": "tiny-llama", "--context-length": "4", "--lr": "30", "--split": "train", "--mode": "ifo"}


@pytest.mark.parametrize("option, value, old, new", [
    ("--context-length", "8", "4", "8"),
    ("--stride", "2", "4", "2"),
    ("--model", "tiny-gpt2", "tiny-llama", "tiny-gpt2"),
    ("--seed", "1", "0", "1"),
    ("--split", "test", "train", "test"),
    ("--max-texts", "1", "none", "1"),
    ("--lr", "1", "30.0", "1.0"),
    ("--mode", "dofo", "ifo", "dofo"),
    ("--threshold", "0.5", "0.04", "0.5"),
    ("--dataset", "OTHER", "CORPUS", "OTHER"),
])
def test_resume_refuses_another_run_and_names_the_field(option, value, old, new, tmp_path, corpus, monkeypatch,
                                                         capsys):
    other = tmp_path / "other.txt"
    other.write_text("A different corpus altogether.")
    paths = {"CORPUS": str(Path(corpus).resolve()), "OTHER": str(other.resolve())}
    out = tmp_path / "out"
    base = {**RESUME_BASE, "--dataset": corpus, "--out": str(out)}
    argv = lambda opts: ["eval-text", "--no-progress", "--max-uncertain", "6", *sum(opts.items(), ())]  # noqa: E731
    restore = stop_after_first_window(monkeypatch)
    assert cli.main(argv(base)) == 130
    restore()
    before = (out / "partial.json").read_bytes()
    capsys.readouterr()
    assert cli.main([*argv({**base, option: paths.get(value, value)}), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = f"was written with {option} {paths.get(old, old)}, this run has {paths.get(new, new)}"
    assert len(err) == 1 and expected in err[0] and str(out / "partial.json") in err[0]
    assert (out / "partial.json").read_bytes() == before  # nothing lost: the refused run wrote nothing
    assert cli.main([*argv(base), "--resume"]) == 0  # the same settings still continue it


def test_resume_refuses_changed_file_contents(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    common = ["eval-text", *TINY, "--dataset", str(corpus), "--context-length", "4", "--lr", "30",
              "--out", str(tmp_path / "out")]
    restore = stop_after_first_window(monkeypatch)
    assert cli.main(common) == 130
    restore()
    corpus.write_text(TEXT.replace("fox", "cat"))  # same path, same length, other tokens
    capsys.readouterr()
    assert cli.main([*common, "--resume"]) == 2
    assert "was written with data (token stream sha256)" in capsys.readouterr().err


def test_rerun_without_resume_refuses_to_replace_partial_results(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "out"
    common = ["eval-text", *TINY, "--dataset", corpus, "--context-length", "4", "--lr", "30", "--max-uncertain", "12",
              "--out", str(out)]
    restore = stop_after_first_window(monkeypatch)
    assert cli.main(common) == 130
    restore()
    before = (out / "partial.json").read_bytes()
    capsys.readouterr()
    assert cli.main(common) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "partial.json" in err[0] and "--resume" in err[0] and "--overwrite" in err[0]
    assert (out / "partial.json").read_bytes() == before
    # --overwrite discards the old windows at the start: interrupted before its first window, nothing old is left
    def interrupted_at_once(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(eval_text, "evaluate_next_token", interrupted_at_once)
    assert cli.main([*common, "--overwrite"]) == 130
    assert not (out / "partial.json").exists()
    monkeypatch.undo()
    assert cli.main([*common, "--overwrite"]) == 0
    assert not (out / "partial.json").exists() and (out / "eval_text.json").exists()
    capsys.readouterr()
    assert cli.main([*common, "--lr", "1"]) == 2  # another run's finished results are never replaced silently
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval_text.json" in err and "--lr 30.0, this run has 1.0" in err


def test_results_that_fail_to_write_keep_the_partial_file(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "out"
    common = ["eval-text", *TINY, "--dataset", corpus, "--context-length", "4", "--lr", "30", "--max-uncertain", "12",
              "--out", str(out)]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs, "write_results", disk_full)
    assert cli.main(common) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert (out / "partial.json").exists()  # every window is still there to resume from
    monkeypatch.undo()
    assert cli.main([*common, "--resume"]) == 0 and not (out / "partial.json").exists()


def test_resume_refuses_the_per_process_partials_of_earlier_versions(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "partial.rank0.json").write_text("{}")
    (out / "partial.rank1.json").write_text("{}")
    assert cli.main(["eval-text", *TINY, "--dataset", corpus, "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "partial.rank0.json, partial.rank1.json" in err and "earlier version" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1


def test_select_lr_is_refused_naming_tune(tmp_path, capsys):
    """The one dev/test selector is tune's race: eval-text's old --select-lr says so, before any work."""
    args = ["eval-text", *TINY, "--select-lr", "1e-3,30", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tune --lrs 1e-3,30 --exhaustive" in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


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
    # the processes agree every round: the very report of one process, outcomes in stream order
    assert (two.n_total, two.outcomes, two.topk_counts, two.topk_hits) == \
        (one.n_total, one.outcomes, one.topk_counts, one.topk_hits)
    assert proc.stdout.count("| data set |") == 1  # only the main process prints and writes
    assert len(json.loads((tmp_path / "two" / "eval_text.json").read_text())["summaries"][0]["meta"][
        "seconds_per_process"]) == 2  # the timing covers every process


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
    from focus_decoding.resources import models
    from focus_decoding.config import PRESETS

    monkeypatch.setattr(models, "load_default_model", lambda: default_model)  # loaded once per session
    assert cli.main(["generate", "The capital of France is", "--max-new-tokens", "4", "--no-progress",
                     "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "generate.json").read_text())
    assert record["config"]["lr"] == PRESETS["smollm2-135m"]["ifo"]["lr"] and len(record["focus_ids"]) == 4
    assert record["stats"]["totals"]["checked"] == 4 and "plain:" in capsys.readouterr().out


@pytest.mark.default_model
def test_gguf_file_as_model(default_model, tmp_path, monkeypatch):
    from focus_decoding.resources import models

    gguf = models.default_model_path()
    real, loaded = models.load_causal_lm, []
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    assert cli.main(["generate", "The capital of France is", "--model", str(gguf), "--max-new-tokens", "2",
                     "--no-progress", "--out", str(tmp_path)]) == 0
    assert [len(call) for call in loaded] == [2]  # load_causal_lm(the file): weights and tokenizer both from it
    (model, tok), (ref_model, ref_tok) = loaded[0], default_model
    ids = ref_tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert tok("The capital of France is", return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_model(ids).logits)
    assert tok.padding_side == "left" and not model.training
    record = json.loads((tmp_path / "generate.json").read_text())
    expected = ref_model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=ref_tok.pad_token_id)
    assert record["plain_ids"] == expected[0, ids.shape[1]:].tolist()


def test_eval_text_with_the_normalized_step_writes_its_table(tmp_path, corpus):
    # the table and figure name the step by its rule: a normalized config has no lr to print
    args = ["eval-text", *TINY, "--dataset", corpus, "--context-length", "8", "--max-uncertain", "4",
            "--threshold", "1.0", "--tau", "0.5", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert "tau=0.5" in (tmp_path / "eval_text.md").read_text()
    assert json.loads((tmp_path / "eval_text.json").read_text())["config"]["step_rule"] == "normalized"
