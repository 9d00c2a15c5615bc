"""The method's experiments on a causal LM: each writes exp_<name>.json (every number) and exp_<name>.png.

    python benchmarks/experiments.py all --out runs/exp                # embedded SmolLM2 + bundled sample
    python benchmarks/experiments.py lr --dataset openwebtext --max-uncertain 2000 --out runs/owt
    python benchmarks/experiments.py combination --model tiny-llama --max-uncertain 8
    python benchmarks/experiments.py lr --scale paper --dataset ~/.cache/focus_decoding/assets/wiki.jsonl \
        --params last:2 --lrs 1e-4,1e-3,1e-2 --taus 0.3,1,3,10 --modes ifo   # >= 10,000 uncertain per point

3 lr also takes --taus (the normalized step rule, same positions); --scale paper sets >= 10,000 uncertain
tokens per point (topk/threshold scan 200,000 tokens); the quick defaults stay small.

1 topk: top-k accuracy of the unmodified model on the uncertain subset vs k (thresholds 0.01, 0.1, 1.0).
2 threshold: Δ_Corr and |D_te,1,2| vs threshold (one refinement per position, shared by all thresholds).
3 lr: Δ_Corr vs learning rate (iFo and doFo, ±std/3 band, p-values) + params rows last:N / all with time.
4 steps: one step with lr·2^p vs 2^p steps with lr (relative Δ_Corr), p = 0..3 (T = 8).
5 combination: a self-supervised next-token step (lr 1e-3) on the context first, then focus on that model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from focus_decoding.cli import figures as plots
from focus_decoding import method as core
from focus_decoding.evaluation import next_token as eval_text
from focus_decoding.cli.common import DEFAULT_MODEL, load_model, run_metadata
from focus_decoding.evaluation.report import jsonable as _jsonable
from focus_decoding.config import FocusConfig
from focus_decoding.evaluation.report import FocusReport

EXPERIMENTS = ("topk", "threshold", "lr", "steps", "combination")
# Default budgets. "paper": the method's experiments used 70k-270k uncertain tokens; >= 10,000 per point is
# the least that separates gains of +0.5 to +2.5 points from chance (McNemar, p < 0.05).
SCALES = {"quick": {"max_uncertain": None, "max_tokens": None},
          "paper": {"max_uncertain": 10_000, "max_tokens": 200_000}}


# ----------------------------------------------------------------------------- shared pieces
def scan_positions(model, tokenizer, texts: Sequence[str], *, context_length: int = 128,
                   max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]]:
    """Every scored position in ``evaluate_next_token``'s order: (window ids, local t, logits at t, label)."""
    device = next(model.parameters()).device
    stream = eval_text.tokenize_stream(tokenizer, texts).to(device)
    n = 0
    for s, lo, hi in eval_text.window_bounds(stream.numel(), context_length, context_length):
        ids = stream[s:hi - 1][None]
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[0].float()
        for t in range(lo - 1 - s, hi - 1 - s):
            if max_tokens is not None and n >= max_tokens:
                return
            n += 1
            yield ids, t, logits[t], stream[s + 1 + t]


def position_forward(model, ids: torch.Tensor, t: int) -> core.Forward:
    """Logits of the prediction at local position ``t`` (context = ids[:, :t + 1]), as in ``eval_text``."""
    return core.model_forward(model, ids[:, :t + 1], use_cache=False, select=lambda o: o.logits[0, -1])


def _save(out_dir, name: str, payload: dict) -> dict:
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"exp_{name}.json").write_text(json.dumps(_jsonable(payload), indent=2))
    return payload


def _header(name: str, config: FocusConfig, settings: dict, device) -> dict[str, Any]:
    return {"experiment": name, "config": config.to_dict(), "settings": settings,
            "meta": run_metadata(settings.get("seed"), device)}


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- 1 top-k
def exp_topk(model, tokenizer, texts, *, thresholds=(0.01, 0.1, 1.0), context_length=128, max_tokens=2000,
             out_dir=None, progress=True, settings=None) -> dict:
    """Top-k accuracy (k = 1..5) of the unmodified model on predictions with gap < threshold."""
    # a gate nothing passes: this experiment needs the unmodified predictions only
    config = FocusConfig(threshold=1e-12)
    report = eval_text.evaluate_next_token(model, tokenizer, texts, config, context_length=context_length,
                                           max_tokens=max_tokens, thresholds=list(thresholds), progress=progress,
                                           name="topk")
    topk = {t: report.topk_accuracy(t) for t in thresholds}
    counts = {t: report.topk_counts[i] for i, t in enumerate(report.topk_thresholds)}
    payload = {**_header("topk", config, {**(settings or {}), "context_length": context_length,
                                          "max_tokens": max_tokens, "thresholds": list(thresholds)}, _device(model)),
               "n_total": report.n_total, "topk_accuracy": {str(t): v for t, v in topk.items()},
               "n_below_threshold": {str(t): c for t, c in counts.items()}, "report": report.to_dict()}
    if out_dir is not None:
        plots.plot_topk(topk, Path(out_dir) / "exp_topk.png", counts=counts,
                        title=f"Top-k accuracy of the unmodified model ({report.n_total} predictions)")
    return _save(out_dir, "topk", payload)


# ----------------------------------------------------------------------------- 2 threshold
def threshold_reports(model, tokenizer, texts, config: FocusConfig, thresholds: Sequence[float], *,
                      context_length=128, max_tokens=100, progress=True) -> dict[float, FocusReport]:
    """One report per threshold over the same first ``max_tokens`` positions (== one eval per threshold)."""
    top = dataclasses.replace(config, threshold=max(thresholds))
    trainable, frozen = core.split_parameters(model, top.params)
    reports = {t: FocusReport(name=f"threshold {t:g}", config=dataclasses.replace(config, threshold=t).to_dict())
               for t in thresholds}
    model = core.module_view(model)  # eval mode on a private view: the caller's model is never touched
    for ids, t, logits_t, label in tqdm(scan_positions(model, tokenizer, texts, context_length=context_length,
                                                       max_tokens=max_tokens), total=max_tokens,
                                        desc="threshold sweep", unit="position", disable=not progress):
        gap = float(core.top2_gap(logits_t))
        for rep in reports.values():
            rep.add_predictions(logits_t[None], label[None], torch.tensor([gap]))
        if gap >= top.threshold:
            continue
        # the refinement does not depend on the threshold, only whether it runs: do it once
        res = core.focus_step(position_forward(model, ids, t), logits_t, trainable, frozen, top)
        for th, rep in reports.items():
            if gap < th:
                rep.add_outcomes(label[None].cpu(), logits_t.argmax()[None].cpu(), res.logits.argmax()[None].cpu())
                rep.nonfinite += int(res.nonfinite)
    return reports


def exp_threshold(model, tokenizer, texts, config: FocusConfig, *, thresholds=(0.005, 0.01, 0.02, 0.04, 0.1, 0.2, 0.5),
                  context_length=128, max_tokens=100, out_dir=None, progress=True, settings=None) -> dict:
    """Δ_Corr and |D_te,1,2| vs the uncertainty threshold on the same positions."""
    reports = threshold_reports(model, tokenizer, texts, config, thresholds, context_length=context_length,
                                max_tokens=max_tokens, progress=progress)
    rows = [{"threshold": t, "delta_corr": r.delta_corr, "n_uncertain": r.n_uncertain, "p_value": r.p_value,
             "base_accuracy": r.base_accuracy, "focus_accuracy": r.focus_accuracy} for t, r in reports.items()]
    payload = {**_header("threshold", config, {**(settings or {}), "context_length": context_length,
                                               "max_tokens": max_tokens, "thresholds": list(thresholds)},
                         _device(model)),
               "rows": rows, "summaries": [r.summary() for r in reports.values()],
               "reports": [r.to_dict() for r in reports.values()]}
    if out_dir is not None:
        plots.plot_threshold_sweep(list(thresholds), [r["delta_corr"] for r in rows], [r["n_uncertain"] for r in rows],
                                   Path(out_dir) / "exp_threshold.png",
                                   title=f"{config.mode} lr={config.lr:g}: Δ_Corr and |D_te,1,2| vs threshold")
    return _save(out_dir, "threshold", payload)


# ----------------------------------------------------------------------------- 3 learning rate (+ params rows)
def exp_lr(model, tokenizer, texts, config: FocusConfig, *, lrs=(1e-7, 1e-6, 1e-5, 1e-4, 1e-3), modes=("ifo", "dofo"),
           blocks=(1, 2, 4, 8), taus=(), context_length=128, max_uncertain=8, max_tokens=None, out_dir=None,
           progress=True, settings=None) -> dict:
    """Δ_Corr vs lr per mode (and vs tau of the normalized rule, when ``taus`` are given, on the same
    positions); then, at ``config``'s step, one row per params selector with time per refinement."""
    def run(cfg: FocusConfig, name: str) -> FocusReport:
        return eval_text.evaluate_next_token(model, tokenizer, texts, cfg, context_length=context_length,
                                             max_uncertain=max_uncertain, max_tokens=max_tokens, progress=False,
                                             name=name)

    grid = [(m, lr) for m in modes for lr in lrs]
    sweep: dict[str, list[dict]] = {m: [] for m in modes}
    reports = []
    for mode, lr in tqdm(grid, desc="lr sweep", unit="run", disable=not progress):
        rep = run(dataclasses.replace(config, mode=mode, step_rule="fixed", lr=lr, tau=None), f"{mode} lr={lr:g}")
        sweep[mode].append({"lr": lr, **_row(rep)})
        reports.append(rep)
    tau_sweep: dict[str, list[dict]] = {m: [] for m in modes} if taus else {}
    for mode, tau in tqdm([(m, t) for m in modes for t in taus], desc="tau sweep", unit="run", disable=not progress):
        rep = run(dataclasses.replace(config, mode=mode, step_rule="normalized", lr=None, tau=tau), f"{mode} tau={tau:g}")
        tau_sweep[mode].append({"tau": tau, **_row(rep)})
        reports.append(rep)
    n_blocks = len(core.find_blocks(model)[1])
    selectors = [f"last:{n}" for n in blocks if n <= n_blocks] + ["all"]
    params_rows = []
    for sel in tqdm(selectors, desc="params rows", unit="run", disable=not progress):
        rep = run(dataclasses.replace(config, params=sel), f"params={sel}")
        reports.append(rep)
        params_rows.append({"params": sel, "lr": config.lr, "step": config.step_size_label, "mode": config.mode, **_row(rep),
                            "seconds_per_refinement": rep.meta["refine_seconds"] / max(rep.n_uncertain, 1)})
    payload = {**_header("lr", config, {**(settings or {}), "context_length": context_length, "lrs": list(lrs),
                                        "taus": list(taus), "modes": list(modes), "max_uncertain": max_uncertain,
                                        "max_tokens": max_tokens}, _device(model)),
               "sweep": sweep, "tau_sweep": tau_sweep, "params_rows": params_rows,
               "params_table": params_table(params_rows),
               "reports": [r.to_dict() for r in reports]}
    if out_dir is not None:
        plots.plot_lr_sweep(sweep, Path(out_dir) / "exp_lr.png",
                            title=f"Δ_Corr vs learning rate ({max_uncertain or 'all'} uncertain per point; "
                                  "band ±std/3 over units)")
    return _save(out_dir, "lr", payload)


def _row(rep: FocusReport) -> dict:
    return {"delta_corr": rep.delta_corr, "delta_corr_std": rep.delta_corr_std, "p_value": rep.p_value,
            "n_uncertain": rep.n_uncertain, "n_total": rep.n_total, "base_accuracy": rep.base_accuracy,
            "focus_accuracy": rep.focus_accuracy, "wrong_to_correct": rep.wrong_to_correct,
            "correct_to_wrong": rep.correct_to_wrong, "unit_delta_corr": rep.unit_delta_corr}


def params_table(rows: Sequence[dict]) -> str:
    """Markdown: Δ_Corr, p-value and time per refinement for each params selector."""
    lines = ["| params | step | n uncertain | Δ corr | p-value | s / refinement |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['params']} | {r.get('step', 'lr=%g' % r['lr'])} | {r['n_uncertain']} | {r['delta_corr']:+d} | {r['p_value']:.3g} | "
              f"{r['seconds_per_refinement']:.3f} |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 4 one step vs many
def steps_predictions(model, ids, t: int, logits_t, trainable, frozen, config: FocusConfig, lr: float,
                      powers: Sequence[int]) -> tuple[dict[int, int], dict[int, int]]:
    """Top-1 after 2^p steps with ``lr`` (one run, read at each 2^p) and after one step with lr·2^p."""
    forward = position_forward(model, ids, t)
    focus = core.focus_classes(logits_t, config.n_focus)
    loss_fn = lambda v: core.focus_loss(forward(v), focus, config.mode).sum()  # noqa: E731  (same loss as core.refine)

    def top1(values) -> int:
        with torch.no_grad():
            new = forward({**frozen, **values})
        # as core.focus_step: an overflowing refinement keeps the unrefined prediction
        return int((new if torch.isfinite(new).all() else logits_t).argmax())

    multi, single, current, done = {}, {}, dict(trainable), 0
    for p in sorted(powers):
        current = (core.sgd_steps(loss_fn, current, frozen, dataclasses.replace(config, lr=lr, steps=2 ** p - done))
                   if 2 ** p > done else current)
        done = max(done, 2 ** p)
        multi[p] = top1(current)
        single[p] = multi[p] if p == 0 else top1(
            core.sgd_steps(loss_fn, trainable, frozen, dataclasses.replace(config, lr=lr * 2 ** p, steps=1)))
    return multi, single


def exp_steps(model, tokenizer, texts, config: FocusConfig, *, lrs=(1e-5, 1e-4), powers=(0, 1, 2, 3),
              context_length=128, max_uncertain=8, max_tokens=None, out_dir=None, progress=True, settings=None) -> dict:
    """Relative Δ_Corr of one step with lr·2^p vs 2^p steps with lr on the same uncertain positions."""
    trainable, frozen = core.split_parameters(model, config.params)
    multi = {(lr, p): FocusReport(name=f"{2 ** p} steps lr={lr:g}") for lr in lrs for p in powers}
    single = {(lr, p): FocusReport(name=f"1 step lr={lr * 2 ** p:g}") for lr in lrs for p in powers}
    bar = tqdm(total=max_uncertain, desc="steps sweep", unit="refinement", disable=not progress)
    n = 0
    model = core.module_view(model)  # eval mode on a private view: the caller's model is never touched
    for ids, t, logits_t, label in scan_positions(model, tokenizer, texts, context_length=context_length,
                                                  max_tokens=max_tokens):
        if not bool(core.is_uncertain(logits_t, config.threshold)):
            continue
        for lr in lrs:
            mu, si = steps_predictions(model, ids, t, logits_t, trainable, frozen, config, lr, powers)
            for p in powers:
                base = logits_t.argmax()[None].cpu()
                multi[lr, p].add_outcomes(label[None].cpu(), base, torch.tensor([mu[p]]))
                single[lr, p].add_outcomes(label[None].cpu(), base, torch.tensor([si[p]]))
        n += 1
        bar.update(1)
        if max_uncertain is not None and n >= max_uncertain:
            break
    bar.close()
    relative = {f"lr={lr:g}": [relative_gain(single[lr, p].delta_corr, multi[lr, p].delta_corr) for p in powers]
                for lr in lrs}
    rows = [{"lr": lr, "power": p, "steps_multi": 2 ** p, "lr_single": lr * 2 ** p,
             "delta_corr_multi": multi[lr, p].delta_corr, "delta_corr_single": single[lr, p].delta_corr,
             "relative": relative_gain(single[lr, p].delta_corr, multi[lr, p].delta_corr),
             "p_value_multi": multi[lr, p].p_value, "p_value_single": single[lr, p].p_value} for lr in lrs for p in powers]
    payload = {**_header("steps", config, {**(settings or {}), "context_length": context_length, "lrs": list(lrs),
                                           "powers": list(powers), "max_uncertain": max_uncertain}, _device(model)),
               "n_uncertain": n, "rows": rows, "relative": relative,
               "relative_definition": "(dc_single - dc_multi) / max(|dc_single|, |dc_multi|, 1)",
               "reports": [r.to_dict() for pair in zip(multi.values(), single.values()) for r in pair]}
    if out_dir is not None:
        plots.plot_steps(relative, list(powers), Path(out_dir) / "exp_steps.png",
                         title=f"{config.mode}: one step lr·2^p vs 2^p steps lr ({n} uncertain)")
    return _save(out_dir, "steps", payload)


def relative_gain(single: int, multi: int) -> float:
    """(Δ_single − Δ_multi) / max(|Δ_single|, |Δ_multi|, 1): +1 = only the single step gains."""
    return (single - multi) / max(abs(single), abs(multi), 1)


# ----------------------------------------------------------------------------- 5 combination
def self_supervised_values(model, ids: torch.Tensor, trainable, frozen, lr: float = 1e-3) -> dict[str, torch.Tensor]:
    """Parameter values after one SGD step on next-token cross-entropy over the context ``ids`` [1, L]."""
    if ids.shape[1] < 2:
        raise ValueError("the self-supervised step needs a context of at least 2 tokens")
    forward = core.model_forward(model, ids, use_cache=False, select=lambda o: o.logits[0])

    def loss_fn(values):
        logits = forward(values).float()
        return torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])

    return core.sgd_steps(loss_fn, trainable, frozen, FocusConfig(lr=lr))  # plain SGD: the same update rule


def combination_position(model, ids, t: int, logits_t, trainable, frozen, config: FocusConfig,
                         lr_in: float = 1e-3) -> tuple[torch.Tensor, core.StepResult]:
    """(logits of f_In, Algorithm 1 applied on f_In) for the prediction at local position ``t``."""
    adapted = self_supervised_values(model, ids[:, :t + 1], trainable, frozen, lr_in)
    forward = position_forward(model, ids, t)
    with torch.no_grad():
        logits_in = forward({**frozen, **adapted}).float()
    # the adapted parameters are the starting point of the focus step
    return logits_in, core.focus_step(forward, logits_in, adapted, frozen, config)


def exp_combination(model, tokenizer, texts, config: FocusConfig, *, lr_in=1e-3, context_length=128,
                    max_uncertain=12, max_tokens=None, out_dir=None, progress=True, settings=None) -> dict:
    """Accuracy of f, f_In (self-supervised step) and f_In + focus on positions uncertain under f."""
    trainable, frozen = core.split_parameters(model, config.params)
    f_vs_in, in_vs_opt, f_vs_opt = (FocusReport(name=n, config=config.to_dict())
                                    for n in ("f -> f_In", "f_In -> f_In+focus", "f -> f_In+focus"))
    gated_on_in = 0
    bar = tqdm(total=max_uncertain, desc="combination", unit="position", disable=not progress)
    model = core.module_view(model)  # eval mode on a private view: the caller's model is never touched
    for ids, t, logits_t, label in scan_positions(model, tokenizer, texts, context_length=context_length,
                                                  max_tokens=max_tokens):
        if t < 1 or not bool(core.is_uncertain(logits_t, config.threshold)):
            continue  # t < 1: a one-token context has no next-token target to train on
        logits_in, res = combination_position(model, ids, t, logits_t, trainable, frozen, config, lr_in)
        y, b, i, o = (label[None].cpu(), logits_t.argmax()[None].cpu(), logits_in.argmax()[None].cpu(),
                      res.logits.argmax()[None].cpu())
        f_vs_in.add_outcomes(y, b, i)
        in_vs_opt.add_outcomes(y, i, o)
        f_vs_opt.add_outcomes(y, b, o)
        gated_on_in += int(res.uncertain)
        bar.update(1)
        if max_uncertain is not None and f_vs_in.n_uncertain >= max_uncertain:
            break
    bar.close()
    acc = {"original f": f_vs_in.base_accuracy, "self-supervised f_In": f_vs_in.focus_accuracy,
           "f_In + focus": in_vs_opt.focus_accuracy}
    payload = {**_header("combination", config, {**(settings or {}), "context_length": context_length,
                                                 "lr_in": lr_in, "max_uncertain": max_uncertain}, _device(model)),
               "n": f_vs_in.n_uncertain, "accuracy": acc,
               "delta_acc_focus_on_in": acc["f_In + focus"] - acc["self-supervised f_In"],
               "delta_acc_in_vs_f": acc["self-supervised f_In"] - acc["original f"],
               "uncertain_under_f_In": gated_on_in,
               "summaries": {r.name: r.summary() for r in (f_vs_in, in_vs_opt, f_vs_opt)},
               "reports": [r.to_dict() for r in (f_vs_in, in_vs_opt, f_vs_opt)]}
    if out_dir is not None:
        plots.plot_combination(acc, Path(out_dir) / "exp_combination.png", n=f_vs_in.n_uncertain,
                               title=f"Self-supervised step (lr {lr_in:g}), then {config.mode} (lr {config.lr:g})")
    return _save(out_dir, "combination", payload)


# ----------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """Run one experiment or all of them with small default budgets."""
    from focus_decoding.resources import corpora as data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=(*EXPERIMENTS, "all"))
    p.add_argument("--model", default=None, help="HF id/path, tiny-llama|tiny-gpt2|tiny-qwen2; default: SmolLM2-135M")
    p.add_argument("--dataset", default=None, help="bundled sample (default), a path, or e.g. openwebtext")
    p.add_argument("--max-texts", type=int, default=None)
    p.add_argument("--mode", choices=("ifo", "dofo"), default="ifo")
    p.add_argument("--lr", type=float, default=None, help="default: the smollm2-135m preset (or the method's)")
    p.add_argument("--threshold", type=float, default=0.04)
    p.add_argument("--params", default="all")
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=None, help="positions scanned (topk: 2000, threshold: 100)")
    p.add_argument("--max-uncertain", type=int, default=None, help="refined positions per run (lr/steps: 8, combination: 12)")
    p.add_argument("--lrs", default=None, help="comma-separated lr grid (lr: 1e-7..1e-3; steps: 1e-5,1e-4)")
    p.add_argument("--modes", default="ifo,dofo", help="lr experiment: the modes swept")
    p.add_argument("--taus", default=None, help="lr experiment: also a tau grid of the normalized step rule, "
                   "on the same positions (e.g. 0.3,1,3,10)")
    p.add_argument("--scale", choices=sorted(SCALES), default="quick",
                   help="default budgets: quick (minutes on 2 CPU cores) or paper (>= 10,000 uncertain tokens per "
                        "point: days on a CPU); --max-tokens / --max-uncertain override")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/experiments")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        if args.lr is None and args.model in (None, DEFAULT_MODEL):
            config = FocusConfig.preset(DEFAULT_MODEL, args.mode, threshold=args.threshold, params=args.params)
        else:
            config = FocusConfig(mode=args.mode, lr=args.lr, threshold=args.threshold, params=args.params)
    except ValueError as exc:
        print(f"experiments: error: {exc}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model, device=args.device, seed=args.seed)
    texts = data.load_texts(args.dataset, max_texts=args.max_texts)
    settings = {"model": args.model or DEFAULT_MODEL, "dataset": args.dataset or "bundled-sample", "seed": args.seed}
    lrs = {"lrs": [float(x) for x in args.lrs.split(",")]} if args.lrs else {}
    common = dict(context_length=args.context_length, out_dir=args.out, settings=settings)
    scale = SCALES[args.scale]
    budget = {k: v for k, v in (("max_tokens", args.max_tokens),
                                ("max_uncertain", args.max_uncertain or scale["max_uncertain"])) if v is not None}
    scan = lambda default: args.max_tokens or scale.get("max_tokens") or default  # noqa: E731
    chosen = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    for name in chosen:
        if name == "topk":
            out = exp_topk(model, tokenizer, texts, max_tokens=scan(2000), **common)
            print("top-k accuracy (%):", json.dumps(_jsonable(out["topk_accuracy"])))
        elif name == "threshold":
            out = exp_threshold(model, tokenizer, texts, config, max_tokens=scan(100), **common)
            print(*(f"threshold {r['threshold']:g}: Δ_Corr {r['delta_corr']:+d} of {r['n_uncertain']}" for r in out["rows"]), sep="\n")
        elif name == "lr":
            taus = {"taus": [float(x) for x in args.taus.split(",")]} if args.taus else {}
            modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
            out = exp_lr(model, tokenizer, texts, config, **lrs, **taus, modes=modes, **budget, **common)
            for rule, sweep in (("lr", out["sweep"]), ("tau", out["tau_sweep"])):
                for mode, rows in sweep.items():
                    print(*(f"{mode} {rule}={r[rule]:g}: Δ_Corr {r['delta_corr']:+d} of {r['n_uncertain']}, "
                            f"p={r['p_value']:.3g}" for r in rows), sep="\n")
            print(out["params_table"])
        elif name == "steps":
            out = exp_steps(model, tokenizer, texts, config, **lrs, **budget, **common)
            print("relative Δ_Corr (single - multi) per p:", json.dumps(out["relative"]))
        else:
            out = exp_combination(model, tokenizer, texts, config, **budget, **common)
            print("accuracy (%):", json.dumps(_jsonable(out["accuracy"])), f"n={out['n']}")
    print(f"wrote {args.out}/exp_*.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
