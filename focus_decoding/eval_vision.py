"""Evaluate the method on an image classifier: `evaluate_classifier` and the whole job `run_eval_vision`."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import report as rep
from .config import FocusConfig
from .core import top2_gap
from .report import FocusReport
from .report import jsonable as _jsonable
from .vision import FocusClassifier, digits_model, load_classifier, load_image_dataset


def evaluate_classifier(model: nn.Module, dataloader: Iterable, config: FocusConfig | Mapping | None = None, *,
                        thresholds: Sequence[float] = rep.TOPK_THRESHOLDS, max_batch: int = 8, progress: bool = True,
                        name: str = "", method: str = "auto", meta: Mapping[str, Any] | None = None) -> FocusReport:
    """One ``FocusReport`` for ``model`` on (images, labels) batches: top-k table and outcomes of uncertain rows.

    Example:
        >>> import torch
        >>> from focus_decoding import FocusConfig
        >>> from focus_decoding.vision import DigitsNet
        >>> batches = [(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))]
        >>> r = evaluate_classifier(DigitsNet(), batches, FocusConfig(threshold=1.0), progress=False)
        >>> (r.n_total, r.n_uncertain)
        (4, 4)
    """
    from tqdm.auto import tqdm

    clf = FocusClassifier(model, config, max_batch=max_batch, method=method)
    cfg = clf.config
    thresholds = [float(t) for t in thresholds]
    report = FocusReport(name=name, topk_thresholds=thresholds, topk_counts=[0] * len(thresholds),
                         topk_hits=[[0] * rep.MAX_K for _ in thresholds], config=cfg.to_dict(),
                         meta={"model": type(model).__name__, "task": "image classification", **(meta or {})})
    device = next(model.parameters(), torch.empty(0)).device
    start = time.perf_counter()
    bar = tqdm(dataloader, desc=f"focus {name or report.meta['model']}", unit="batch", disable=not progress)
    for i, batch in enumerate(bar):
        images, labels = _unpack(batch, i)
        base, out, gate = clf.classify(images.to(device))
        labels = _check_labels(labels.to(base.device), base, i)
        report.add_predictions(base, labels, top2_gap(base))
        report.add_outcomes(labels[gate], base.argmax(-1)[gate], out.argmax(-1)[gate])
        report.nonfinite += clf.stats.nonfinite
        bar.set_postfix(uncertain=report.n_uncertain, d_corr=report.delta_corr, refresh=False)
    report.seconds = time.perf_counter() - start
    report.meta["vectorized"] = clf.vectorized
    return report


def _unpack(batch: Any, index: int) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[0], Tensor):
        kind = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise ValueError(f"the dataloader must yield (images, labels) pairs with images a tensor; batch {index} is a {kind}")
    images, labels = batch
    labels = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer class indices of shape [{images.shape[0]}] matching the images; "
                         f"batch {index} has {labels.dtype} labels of shape {tuple(labels.shape)}")
    return images, labels.long()


def _check_labels(labels: Tensor, logits: Tensor, index: int) -> Tensor:
    n_classes = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes - 1}] (the model has {n_classes} logits); batch {index} "
                         f"has labels in [{int(labels.min())}, {int(labels.max())}]")
    return labels


# ----------------------------------------------------------------------------- the whole job
def run_eval_vision(model: nn.Module | str | None = None, data: Any = None,
                    config: FocusConfig | Mapping | Sequence | None = None, *, checkpoint: str | os.PathLike | None = None,
                    batch_size: int = 64, max_samples: int | None = None, out_dir: str | os.PathLike | None = None,
                    progress: bool = True, weights: Any = None, root: str | os.PathLike | None = None,
                    max_batch: int = 8, method: str = "auto", device: str | torch.device | None = None) -> list[FocusReport]:
    """Evaluate ``model`` (default: the digits CNN, trained if no checkpoint) on ``data`` (default: digits test).

    ``model``: an ``nn.Module``, ``"digits"`` or a torchvision model name (``weights`` passed through).
    ``data``: a Dataset, a DataLoader, or a ``load_image_dataset`` spec (with ``root``).
    ``config``: one config, a list of them, or ``None`` for iFo and doFo at the method's vision defaults.
    ``device``: where to run a model loaded here by name; a module you pass stays where it is.
    Writes ``vision_reports.json``, ``vision_table.md`` and ``vision_topk.png`` into ``out_dir`` when given.
    """
    from torch.utils.data import DataLoader, Dataset, Subset

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be None or an integer >= 1, got {max_samples!r}")
    model_name = model if isinstance(model, str) else "digits" if model is None else type(model).__name__
    if not isinstance(model, nn.Module):  # loaded here, so ours to move; a caller's module is never touched
        model = digits_model(checkpoint, progress=progress) if model in (None, "digits") else \
            load_classifier(model, weights=weights, checkpoint=checkpoint)
        model = model if device is None else model.to(device)
    data_name = str(data) if isinstance(data, (str, os.PathLike)) else "digits" if data is None else type(data).__name__
    if data is None or isinstance(data, (str, os.PathLike)):
        transform = _weights_transform(model_name, weights) if data not in (None, "digits") else None
        data = load_image_dataset(data or "digits", root=root, transform=transform)
    if isinstance(data, Dataset):
        if max_samples is not None:
            data = Subset(data, range(min(len(data), max_samples)))
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    configs = [FocusConfig(mode="ifo"), FocusConfig(mode="dofo")] if config is None else \
        [config] if isinstance(config, (FocusConfig, Mapping)) else list(config)
    meta = {"model": model_name, "dataset": data_name}
    reports = [evaluate_classifier(model, data, c, max_batch=max_batch, progress=progress, method=method, meta=meta,
                                   name=f"{model_name}/{data_name}/{FocusConfig.coerce(c).mode}") for c in configs]
    if out_dir is not None:
        write_outputs(reports, out_dir)
    return reports


def _weights_transform(model_name: str, weights: Any):
    """The preprocessing that ``weights`` were trained with (None without weights)."""
    if weights is None or model_name == "digits":
        return None
    import torchvision

    if isinstance(weights, str):
        weights = torchvision.models.get_model_weights(model_name)[weights]
    return weights.transforms()


def write_outputs(reports: Sequence[FocusReport], out_dir: str | os.PathLike, stem: str = "vision") -> dict[str, Path]:
    """``<stem>_reports.json`` (reports + summaries; NaN as null), ``<stem>_table.md`` and top-k PNGs in ``out_dir``."""
    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}_reports.json", "table": out / f"{stem}_table.md"}
    payload = [{"report": r.to_dict(), "summary": r.summary()} for r in reports]
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=2))
    paths["table"].write_text(rep.markdown_table(reports) + "\n")
    panels = {}  # the top-k table comes from the unmodified pass: one figure per (model, data set)
    for r in reports:
        panels.setdefault((r.meta.get("model", r.name), r.meta.get("dataset", "")), r)
    for i, ((model, data), r) in enumerate(panels.items()):
        key = "png" if i == 0 else f"png_{model}_{data}"
        name = f"{stem}_topk.png" if i == 0 else f"{stem}_topk_{_slug(model)}_{_slug(data)}.png"
        paths[key] = plots.plot_topk({t: r.topk_accuracy(t) for t in r.topk_thresholds}, out / name,
                                     title=f"Top-k accuracy on uncertain predictions: {model} on {data}",
                                     counts=dict(zip(r.topk_thresholds, r.topk_counts)))
    return paths


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(text))[:40]
