"""The gate and the focus set: which predictions the method refines, and toward which classes.

Example:
    >>> import torch
    >>> from focus_decoding import FocusConfig
    >>> from focus_decoding.method import focus_classes, gate
    >>> logits = torch.tensor([[2.0, 2.01, -1.0], [5.0, 0.0, 0.0]])
    >>> gate(logits, FocusConfig()).tolist()  # the first row's top two are 0.2 % apart; the second is sure
    [True, False]
    >>> focus_classes(logits[0], 2).tolist()
    [1, 0]
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ..config import FocusConfig


def widen(t: Tensor) -> Tensor:
    """float16/bfloat16 as float32; float32 and float64 as they are (the reference runs in float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def top2_gap(logits: Tensor) -> Tensor:
    """p(top1) - p(top2) of softmax(logits) along the last dimension."""
    top2 = torch.softmax(widen(logits), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def gate(logits: Tensor, config: FocusConfig | float) -> Tensor:
    """True where the method refines: the top-1/top-2 probability gap is below ``config.threshold``.

    The one non-finite policy: a row holding NaN or +inf (an overflowed forward, a NaN image) is never
    refined; -inf entries are classes masked out (by a logits processor, say) and the row stays gateable.
    ``config`` may also be the threshold itself (the form of earlier versions).
    """
    threshold = config if isinstance(config, numbers.Real) else config.threshold
    broken = (torch.isnan(logits) | torch.isposinf(logits)).any(-1)
    return (top2_gap(logits) < threshold) & ~broken


is_uncertain = gate  # the name earlier versions exported


def focus_classes(logits: Tensor, n_focus: int) -> Tensor:
    """Indices of the ``n_focus`` most likely classes (the focus set F), along the last dimension."""
    n_classes = logits.shape[-1]
    if not 1 <= n_focus < n_classes:
        raise ValueError(
            f"FocusConfig.n_focus must be >= 1 and < the number of classes ({n_classes}), got {n_focus}"
        )
    return logits.topk(n_focus, dim=-1).indices
