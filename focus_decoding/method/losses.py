"""The losses of the step, one per ``FocusConfig.mode``, on RAW logits (never probabilities).

Adding a loss: a function here and its entry in ``LOSSES``, the mode's name and default rate in
``config.py``, its naive form in ``tests/reference.py``, a row in the docs. Nothing else names a mode.

Example:
    >>> import torch
    >>> from focus_decoding.method import focus_loss
    >>> logits, focus = torch.tensor([3.0, 1.0, -1.0, 0.0]), torch.tensor([0, 1])
    >>> float(focus_loss(logits, focus, "ifo")), float(focus_loss(logits, focus, "dofo"))
    (-2.0, -0.5)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .gate import widen


def ifo_loss(logits: Tensor, focus: Tensor) -> Tensor:
    """iFo: -mean of the focus logits (raise the likely classes)."""
    return -logits.gather(-1, focus).mean(-1)


def dofo_loss(logits: Tensor, focus: Tensor) -> Tensor:
    """doFo: +mean of the logits outside the focus set (lower the unlikely classes)."""
    in_focus = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, focus, True)  # out of place: vmap has a rule
    n_other = logits.shape[-1] - focus.shape[-1]
    return logits.masked_fill(in_focus, 0.0).sum(-1) / n_other


def entropy_loss(logits: Tensor, focus: Tensor) -> Tensor:
    """Entropy minimisation (TENT's objective, on one input): the softmax entropy; the focus set is unused.

    A class masked to -inf has p = 0 and adds 0 log 0 = 0 (the clamp keeps 0 * -inf, and its gradient, out).
    """
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ifo": ifo_loss, "dofo": dofo_loss, "entropy": entropy_loss}


HEAD_INPUT_MODES = ("ifo", "dofo")  # the losses linear in the logits: computable from a linear head's input


def head_input_loss(x: Tensor, weight: Tensor, focus: Tensor, mode: str, column_sum: Tensor) -> Tensor:
    """``focus_loss(x @ weight.T, focus, mode)`` for a bias-free linear head, from its input ``x`` [H].

    Both losses are linear in the logits: iFo needs the focus rows of ``weight`` only, doFo those and
    ``column_sum`` (``weight.sum(0)``, the sum of every row). Neither the [V] logits nor a gradient through all V
    rows is computed, which is what a language model's tail step would otherwise spend most of its time on.
    """
    rows = weight[focus.to(weight.device)].to(x.dtype)  # [k, H]
    x = x.to(weight.device)
    focus_logits = rows @ x
    if mode == "ifo":
        return -focus_logits.mean(-1)
    if mode == "dofo":
        return (column_sum.to(x.dtype) @ x - focus_logits.sum(-1)) / (weight.shape[0] - focus.shape[-1])
    raise ValueError(f"head_input_loss has the modes {HEAD_INPUT_MODES}, got {mode!r}")


def focus_loss(logits: Tensor, focus: Tensor, mode: str) -> Tensor:
    """Per-input loss of ``mode`` (see ``LOSSES``); an unknown mode raises ``ValueError`` naming the allowed ones."""
    try:
        loss = LOSSES[mode]
    except KeyError:
        raise ValueError(f"unknown FocusConfig.mode {mode!r}; allowed: {tuple(LOSSES)}") from None
    return loss(widen(logits), focus.to(logits.device))  # a model split over devices: logits on the head's
