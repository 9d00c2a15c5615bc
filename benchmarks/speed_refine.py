"""Where one full-parameter (``params="all"``) refinement of SmolLM2-135M spends its time, on CPU.

    python benchmarks/speed_refine.py [--repeats 7] [--threads 1] [--profile] [--out speed_refine.json]

Times, interleaved and as medians over ``--repeats`` rounds, on one 128-token context of the
bundled sample (iFo, the smollm2-135m preset's lr):
  phases   the forward with autograd, the backward (``torch.autograd.grad``), the SGD update over
           every parameter, the no-change check and the refined forward, as ``core.sgd_steps`` runs them;
  refine   ``core.refine`` end to end, and the same forward asked for the last position's logits
           only (``logits_to_keep=1``), which is what a caller could pass: same logits, less head work;
  update   the update alone: ``grad.mul_(-lr).add_(param)`` (two passes) vs the fused
           ``torch.add(param, grad, alpha=-lr, out=grad)`` (one pass), with their largest difference.
``--profile`` adds the ``torch.profiler`` table of the ops with the most self CPU time.
With ``--threads 1`` (the default here) every time is the CPU time of the calling thread, so other jobs
on a shared machine do not count; with more threads it is wall time. Ratios are only compared within one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from focus_decoding import FocusConfig
from focus_decoding import method as core
from focus_decoding.resources.corpora import load_texts
from focus_decoding.evaluation import tokenize_stream
from focus_decoding.resources.models import load_default_model


def clock() -> float:
    """CPU seconds of this thread: with one torch thread, other jobs on a shared machine do not count."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def context(tokenizer, length: int) -> torch.Tensor:
    """The first ``length`` tokens of the bundled sample, as [1, length] ids."""
    return tokenize_stream(tokenizer, load_texts(max_texts=20))[:length][None]


def forwards(view, ids: torch.Tensor) -> tuple[core.Forward, core.Forward]:
    """(the forward eval_text builds today, the same asking for the last position only)."""
    full = core.model_forward(view, ids, use_cache=False, select=lambda o: o.logits[0, -1])
    last = core.model_forward(view, ids, use_cache=False, logits_to_keep=1, select=lambda o: o.logits[0, -1])
    return full, last


def phases(forward, trainable, frozen, focus, config) -> dict[str, float]:
    """Seconds of each phase of one refinement, run as ``core.sgd_steps`` + ``core.refine`` run them."""
    t = [clock()]
    with core.grad_enabled():
        leaves = {n: p.detach().requires_grad_(True) for n, p in trainable.items()}
        loss = core.focus_loss(forward({**frozen, **leaves}), focus, config.mode).sum()
        t.append(clock())
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        del loss
        t.append(clock())
        lr = core.step_size(config, grads)
        updated = {n: p.detach() if g is None else core.sgd_update_(p.detach(), g, lr)
                   for (n, p), g in zip(trainable.items(), grads)}
        t.append(clock())
    core._warn_if_unchanged(trainable, updated)
    t.append(clock())
    with torch.no_grad():
        forward({**frozen, **updated})
    t.append(clock())
    names = ("forward_with_grad", "backward", "update", "no_change_check", "refined_forward")
    return {n: b - a for n, a, b in zip(names, t, t[1:])}


def update_variants(trainable, config) -> dict[str, float]:
    """Seconds of the two-pass and the fused update over every parameter, and their largest difference."""
    grads = {n: torch.randn_like(p) * 1e-2 for n, p in trainable.items()}
    out = {}
    bufs = {n: g.clone() for n, g in grads.items()}
    t = clock()
    two = {n: bufs[n].mul_(-config.lr).add_(p.detach()) for n, p in trainable.items()}
    out["two_pass"] = clock() - t
    bufs = {n: g.clone() for n, g in grads.items()}
    t = clock()
    one = {n: torch.add(p.detach(), bufs[n], alpha=-config.lr, out=bufs[n]) for n, p in trainable.items()}
    out["fused"] = clock() - t
    out["max_abs_diff"] = max(float((two[n] - one[n]).abs().max()) for n in two)
    return out


def run(repeats: int = 7, length: int = 128, profile: bool = False) -> dict:
    """All timings of the module docstring, interleaved, medians over ``repeats``."""
    model, tokenizer = load_default_model()
    view = core.module_view(model)
    config = FocusConfig.preset("smollm2-135m", params="all")
    trainable, frozen = core.split_parameters(model, config.params)
    ids = context(tokenizer, length)
    full, last = forwards(view, ids)
    with torch.no_grad():
        logits = full({})
        same_logits = float((last({}) - logits).abs().max())
    focus = core.focus_classes(logits, config.n_focus)
    core.refine(full, trainable, frozen, focus, config)  # warm-up
    rows: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, value in phases(full, trainable, frozen, focus, config).items():
            rows.setdefault(f"phase {name}", []).append(value)
        for name, fwd in (("refine (all positions' logits)", full), ("refine (logits_to_keep=1)", last)):
            t = clock()
            core.refine(fwd, trainable, frozen, focus, config)
            rows.setdefault(name, []).append(clock() - t)
        for name, value in update_variants(trainable, config).items():
            rows.setdefault(f"update {name}", []).append(value)
    med = {k: statistics.median(v) for k, v in rows.items()}
    a, b = core.refine(full, trainable, frozen, focus, config), core.refine(last, trainable, frozen, focus, config)
    out = {"context_length": length, "repeats": repeats, "threads": torch.get_num_threads(), "median_s": med,
           "ratio_keep1_over_full": med["refine (logits_to_keep=1)"] / med["refine (all positions' logits)"],
           "ratio_fused_over_two_pass_update": med["update fused"] / med["update two_pass"],
           "logits_to_keep_max_abs_diff_unrefined": same_logits,
           "logits_to_keep_max_abs_diff_refined": float((a - b).abs().max()),
           "parameters": sum(p.numel() for p in trainable.values())}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
            core.refine(full, trainable, frozen, focus, config)
        out["profile"] = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 1 = CPU-time clock")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.repeats, profile=args.profile)
    table = result.pop("profile", None)
    print(json.dumps(result, indent=1))
    if table:
        print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**result, "profile": table}, f, indent=1)


if __name__ == "__main__":
    main()
