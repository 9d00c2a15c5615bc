"""Matplotlib figures of the method's experiments (Agg backend: files only, no display needed).

Example:
    >>> import tempfile, os
    >>> from focus_decoding.evaluation import FocusReport
    >>> path = os.path.join(tempfile.mkdtemp(), "r.png")
    >>> plot_report(FocusReport(name="empty"), path).exists()
    True
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: works on servers and in CI without a display
import matplotlib.pyplot as plt  # noqa: E402

from ..config import MODE_LABELS, FocusConfig  # noqa: E402
from ..evaluation.outcomes import CO_WR, WR_CO  # noqa: E402
from ..evaluation.report import FocusReport  # noqa: E402



def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finite(xs: Sequence[float]) -> list[float]:
    return [x if x is not None and math.isfinite(x) else float("nan") for x in xs]


def plot_topk(topk: Mapping[float, Sequence[float]], path, *, title: str = "Top-k accuracy on uncertain predictions",
              counts: Mapping[float, int] | None = None) -> Path:
    """Experiment 1: top-k accuracy (%) of the unmodified model vs k, one line per threshold d_1,2."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for t, accs in sorted(topk.items()):
        n = f", n={counts[t]}" if counts and t in counts else ""
        ax.plot(range(1, len(accs) + 1), _finite(accs), marker="o", label=f"$d_{{1,2}}$ < {t:g}{n}")
    ax.set_xlabel("k")
    ax.set_ylabel("top-k accuracy (%)")
    ax.set_xticks(range(1, 1 + max((len(a) for a in topk.values()), default=1)))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="uncertainty threshold")
    return _save(fig, path)


def plot_report(report: FocusReport, path) -> Path:
    """One evaluation: top-k accuracy per threshold (left) and what the refinement did (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for t in report.topk_thresholds:
        left.plot(range(1, 6), _finite(report.topk_accuracy(t)), marker="o", label=f"$d_{{1,2}}$ < {t:g}")
    left.set_xlabel("k")
    left.set_xticks(range(1, 6))
    left.set_ylabel("top-k accuracy (%) of the unmodified model")
    left.set_title("Top-k accuracy on uncertain predictions")
    left.grid(alpha=0.3)
    left.legend()
    labels = ["wrong→correct", "correct→wrong", "wrong→other wrong"]
    values = [report.wrong_to_correct, report.correct_to_wrong, report.wrong_to_other_wrong]
    bars = right.bar(labels, values, color=["tab:green", "tab:red", "tab:gray"])
    right.bar_label(bars)
    right.set_ylabel("predictions")
    step = FocusConfig.from_dict(report.config).step_size_label if report.config else ""
    right.set_title(f"{report.name or 'refinement'}: Δ_Corr {report.delta_corr:+d} of {report.n_uncertain} uncertain\n"
                    f"(p = {report.p_value:.3g}{f', {step}' if step else ''})", fontsize=10)
    return _save(fig, path)


def plot_threshold_sweep(thresholds: Sequence[float], delta_corr: Sequence[int], n_uncertain: Sequence[int], path,
                         *, title: str = "Δ_Corr and |D_te,1,2| vs uncertainty threshold") -> Path:
    """Experiment 2: Δ_Corr (left axis) and number of refined predictions (right axis) vs threshold."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(thresholds, delta_corr, marker="o", color="tab:blue", label="Δ_Corr")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("uncertainty threshold $d_{1,2}$ (log scale)")
    ax.set_ylabel("Δ_Corr (correct predictions gained)", color="tab:blue")
    twin = ax.twinx()
    twin.plot(thresholds, n_uncertain, marker="s", ls="--", color="tab:orange", label="|D_te,1,2|")
    twin.set_ylabel("|D_te,1,2| (refined predictions)", color="tab:orange")
    lines = ax.get_lines()[:1] + twin.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_lr_sweep(rows: Mapping[str, Sequence[Mapping[str, float]]], path, *,
                  title: str = "Δ_Corr vs learning rate (band: ±1/3 std over units)") -> Path:
    """Experiment 3: Δ_Corr vs lr per mode with a ±std/3 band (as the method's Figure 5) and p-values."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, pts in rows.items():
        pts = sorted(pts, key=lambda r: r["lr"])
        lrs = [r["lr"] for r in pts]
        dc = [r["delta_corr"] for r in pts]
        std = [0.0 if r.get("delta_corr_std") is None or not math.isfinite(r["delta_corr_std"]) else r["delta_corr_std"]
               for r in pts]
        line, = ax.plot(lrs, dc, marker="o", label=MODE_LABELS.get(mode, mode))
        ax.fill_between(lrs, [d - s / 3 for d, s in zip(dc, std)], [d + s / 3 for d, s in zip(dc, std)],
                        color=line.get_color(), alpha=0.2)
        for x, y, r in zip(lrs, dc, pts):
            if r.get("p_value") is not None and r["p_value"] < 0.05:  # mark the significant points
                ax.annotate(f"p={r['p_value']:.2g}", (x, y), textcoords="offset points", xytext=(0, 7),
                            ha="center", fontsize=7, color=line.get_color())
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate η (log scale)")
    ax.set_ylabel("Δ_Corr (correct predictions gained)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="mode (p < 0.05 annotated)", fontsize=8, title_fontsize=8)
    return _save(fig, path)


def plot_steps(relative: Mapping[str, Sequence[float]], powers: Sequence[int], path, *,
               title: str = "Single step (lr·2^p) vs 2^p steps (lr)") -> Path:
    """Experiment 4: relative Δ_Corr difference (single − multi) per power p, one line per base lr."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, rel in relative.items():
        ax.plot(powers, _finite(rel), marker="o", label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(powers))
    ax.set_xlabel("p  (single step with lr·2^p  vs  2^p steps with lr)")
    ax.set_ylabel("(Δ_Corr,single − Δ_Corr,multi) / max(|·|, 1)")
    ax.set_ylim(-1.1, 1.1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="base learning rate", fontsize=8)
    return _save(fig, path)


def plot_combination(accuracies: Mapping[str, float], path, *, n: int | None = None,
                     title: str = "Self-supervised step, then focus refinement") -> Path:
    """Experiment 5: accuracy (%) of original, self-supervised (f_In) and f_In + focus on the same positions."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = list(accuracies)
    bars = ax.bar(names, _finite(list(accuracies.values())), color=["tab:gray", "tab:blue", "tab:green"][:len(names)])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("accuracy (%) on uncertain positions")
    ax.set_title(title + (f" (n = {n})" if n is not None else ""))
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


# ----------------------------------------------------------------------------- GradCAM before / after the step
def _display(image):
    """An image [C, H, W] as a matplotlib array scaled to [0, 1] (normalised inputs look right too)."""
    x = image.float()
    x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-8)
    return (x[0].numpy(), "gray") if x.shape[0] == 1 else (x[:3].permute(1, 2, 0).numpy(), None)


def gradcam_figure(pairs: list, path: str | os.PathLike, *, title: str = "") -> Path:
    """One row per image (``vision.gradcam.CamPair``): the image, the map of the top class before the step, after it."""
    if not pairs:
        raise ValueError("no uncertain images to draw")
    fig, axes = plt.subplots(len(pairs), 3, figsize=(7.5, 2.5 * len(pairs)), squeeze=False)
    for row, p in zip(axes, pairs):
        img, cmap = _display(p.image)
        (b1, pb1), (b2, pb2) = p.before
        (a1, pa1), (a2, pa2) = p.after
        texts = [f"#{p.index}  true {p.label}", f"before: {b1} ({pb1:.2f}), {b2} ({pb2:.2f})",
                 f"after: {a1} ({pa1:.2f}), {a2} ({pa2:.2f})"]
        colors = ["black", *("green" if top == p.label else "red" for top in (b1, a1))]  # top class right / wrong
        for ax, cam, text, color in zip(row, (None, p.cam_before, p.cam_after), texts, colors):
            ax.imshow(img, cmap=cmap)
            if cam is not None:
                ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            ax.set_title(text, fontsize=9, color=color)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_gradcam(model, data: Any, config: FocusConfig | Mapping | None, out_dir: str | os.PathLike, *,
                  n: int = 8, target_layer: str | None = None, batch_size: int = 64, stem: str = "gradcam",
                  title: str | None = None) -> dict[str, Path]:
    """``<stem>.png`` (the figure; absent when ``data`` holds no uncertain image) and ``<stem>.json`` in ``out_dir``."""
    from ..vision.gradcam import default_target_layer, gradcam_pairs

    cfg = FocusConfig() if config is None else FocusConfig.coerce(config)
    layer = target_layer or default_target_layer(model)
    pairs = gradcam_pairs(model, data, cfg, n=n, target_layer=layer, batch_size=batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json"}
    label = title if title is not None else f"GradCAM of the top class before / after the focus step ({cfg.mode}, " \
        f"{cfg.step_size_label}, threshold {cfg.threshold:g}; layer {layer})"
    if pairs:
        paths["png"] = gradcam_figure(pairs, out / f"{stem}.png", title=label)
    else:
        warnings.warn(f"write_gradcam: no uncertain image (gap < {cfg.threshold:g}) in the data; no figure written",
                      RuntimeWarning, stacklevel=2)
    paths["json"].write_text(json.dumps({"config": cfg.to_dict(), "target_layer": layer, "requested": n,
                                         "images": [p.summary() for p in pairs]}, indent=2))
    return paths


# ----------------------------------------------------------------------------- tune
def plot_race(result, path) -> Path:
    """Each candidate's dev Δ_Corr against the uncertain tokens seen; drops marked x (significance) or o (budget)."""
    race = result.race.race
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, cfg in enumerate(result.race.candidates):
        steps = [1 if c == WR_CO else -1 if c == CO_WR else 0 for c in race.outcomes[i]]
        curve = [0]
        for s in steps:
            curve.append(curve[-1] + s)
        chosen = i == result.race.choice
        line, = ax.plot(range(len(curve)), curve, lw=2.5 if chosen else 1.0,
                        label=cfg.label + (" (chosen)" if chosen else ""))
        for e in (e for e in race.eliminated if e["candidate"] == i):
            ax.plot([e["at"]], [curve[-1]], marker="x" if e["reason"] == "worse" else "o", color=line.get_color(),
                    markersize=8, fillstyle="none")
    for look in race.looks:  # where the significance rule compares each candidate with the leader
        ax.axvline(look, color="grey", lw=0.6, ls=":")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("uncertain dev tokens seen (dotted: looks)")
    ax.set_ylabel("Δ_Corr vs the plain model")
    ax.set_title(f"dev race (x: clearly worse, o: budget cut); test: {result.verdict.kind}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
