"""Plain vs focus on the local multiple-choice task with the embedded model: accuracy, flips, seconds per request.

Run from the repository root: ``python benchmarks/harness_cost.py [OUT.json]``. The model is
loaded once and handed to the harness's own ``HFLM`` (plain) and to ``FocusLM`` (iFo, doFo), so
only the evaluation is timed. Numbers equal ``python -m focus_decoding.text.harness --model focus-hf
--model_args pretrained=default,... --tasks focus_local_mc --include_path tests/data/lm_eval``.
"""
from __future__ import annotations

import json
import sys
import time

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from focus_decoding.text.harness import FocusLM
from focus_decoding.resources.models import load_default_model

TASK = "focus_local_mc"
RUNS = {"plain (HFLM)": None, "iFo": {"mode": "ifo", "lr": 1e-4, "params": "last:2"},
        "doFo": {"mode": "dofo", "lr": 1e-4, "params": "last:2"}}


def run(lm, tasks: TaskManager) -> tuple[list[list[float]], list[bool], dict, float, float]:
    """(log-likelihoods per choice, correct per question, metrics, wall seconds, CPU seconds) of one evaluation."""
    t0, c0 = time.perf_counter(), time.process_time()  # CPU time: the machine is shared, wall time is noisy
    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tasks, log_samples=True, bootstrap_iters=0)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    scores = [[r[0][0] for r in s["resps"]] for s in samples]
    correct = [max(range(len(r)), key=r.__getitem__) == s["target"] for r, s in zip(scores, samples)]
    return scores, correct, out["results"][TASK], seconds, cpu


def main(path: str | None = None) -> None:
    torch.manual_seed(0)
    model, tok = load_default_model()
    tasks = TaskManager(include_path="tests/data/lm_eval", include_defaults=False)
    rows, base = [], None
    for name, focus in RUNS.items():
        lm = (HFLM(pretrained=model, tokenizer=tok, device="cpu") if focus is None
              else FocusLM(pretrained=model, tokenizer=tok, device="cpu", **focus))
        scores, correct, metrics, seconds, cpu = run(lm, tasks)
        base = (scores, correct) if base is None else base
        n = sum(map(len, scores))
        stats = getattr(lm, "focus_stats", {}).get("loglikelihood", {})
        rows.append({"run": name, "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"],
                     "wrong_to_right": sum(c and not b for c, b in zip(correct, base[1])),
                     "right_to_wrong": sum(b and not c for c, b in zip(correct, base[1])),
                     "mean_abs_delta_loglik": sum(abs(a - b) for r, p in zip(scores, base[0])
                                                  for a, b in zip(r, p)) / n,
                     "positions_scored": stats.get("checked"), "refined": stats.get("refined"),
                     "argmax_changed": stats.get("changed"), "requests": n, "seconds": seconds, "cpu_seconds": cpu,
                     "s_per_request": seconds / n, "cpu_s_per_request": cpu / n, "config": focus})
    print("| run | acc | acc_norm | wrong→right | right→wrong | mean abs Δ log-lik | positions refined / scored "
          "| CPU s / request | wall s / request |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        refined = "—" if r["refined"] is None else f"{r['refined']} / {r['positions_scored']}"
        print(f"| {r['run']} | {r['acc']:.3f} | {r['acc_norm']:.3f} | {r['wrong_to_right']} | {r['right_to_wrong']} "
              f"| {r['mean_abs_delta_loglik']:.4f} | {refined} | {r['cpu_s_per_request']:.3f} "
              f"| {r['s_per_request']:.3f} |")
    if path:
        with open(path, "w") as f:
            json.dump({"task": TASK, "model": "SmolLM2-135M-Instruct (GGUF, fp32)", "rows": rows,
                       "versions": {"lm_eval": lm_eval.__version__, "torch": torch.__version__}}, f, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:])
