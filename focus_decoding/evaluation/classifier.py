"""Evaluate the method on an image classifier: `evaluate_classifier` returns a `FocusReport` (files are the job's,
in `cli.eval_vision`)."""
from __future__ import annotations

import time
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..method import input_device, top2_gap
from ..config import FocusConfig
from ..vision.classifier import FocusClassifier
from . import report as rep
from .report import FocusReport


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
    device = input_device(model)
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
