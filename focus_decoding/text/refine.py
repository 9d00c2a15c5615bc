"""Refining the next-token prediction at one position of a teacher-forced window: exactly what generation does.

Next-token evaluation, ``tune`` and the lm-eval backend score windows with one forward and refine
their uncertain positions here: the context is the window up to and including the position, and the
step is ``method.focus_step``, through the full model or (``last:N``) through the top blocks only
from the window's kept states.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from .. import method
from ..config import FocusConfig
from ..method import prefix, tail


def refine_position(model, ids: Tensor, logits_t: Tensor, t: int, trainable, frozen, config: FocusConfig,
                    kept: tuple[int | str, Tensor] | None = None) -> method.StepResult:
    """The method's step for the prediction at local position ``t`` of ``ids`` [1, T], exactly as in generation.

    ``kept = (n, states entering block L-n for the window)`` runs the step through the top n blocks
    only (``method.prefix``; valid for last:N); ``("tail", residuals after the last block's attention)``
    through the position-wise tail (``params="tail"``); None runs the full model.
    """
    if kept is not None and kept[0] == tail.TAIL:
        state = kept[1][0, t]
        return method.focus_step(tail.tail_forward(model, state), logits_t, trainable, frozen, config,
                                 loss_forward=tail.tail_loss_forward(model, state, trainable, config))
    if kept is not None:
        n, states = kept
        hidden = method.as_normal_tensor(states[:, :t + 1].detach())
        top = prefix.top_logits(model, n, hidden)
        return method.focus_step(lambda values: top(values, hidden), logits_t, trainable, frozen, config,
                                 loss_forward=tail.top_loss_forward(model, top, hidden, trainable, config))
    forward = method.model_forward(model, ids[:, :t + 1], use_cache=False, select=lambda o: o.logits[0, -1],
                                   **method.last_logits_kwargs(model))
    return method.focus_step(forward, logits_t, trainable, frozen, config)


def refine_positions_batched(model, ids: Tensor, logits: Tensor, positions: Sequence[int], trainable, frozen,
                             config: FocusConfig) -> list[method.StepResult]:
    """``refine_position`` for several positions of one window at once, each with its own parameters.

    Causal attention makes the logits at position t independent of later tokens, so every position
    shares the input ids[:, :max(t) + 1] and selects its own row; ``method.refine_batched`` gives each
    position its own gradient and its own updated parameters. Works with eager and sdpa attention;
    under vmap, PyTorch runs sdpa through a slower per-sample loop, so eager is preferable here.
    A low-precision model stepping in float32 (``precision="float32"``) is refined one position at a time:
    the batched step runs in the model's dtype.
    """
    if method.needs_float32(trainable, config):
        return [refine_position(model, ids, logits[t], t, trainable, frozen, config) for t in positions]
    view = method.as_view(model)
    ctx = ids[:, :max(positions) + 1]
    rows = torch.zeros(len(positions), ctx.shape[1], device=ids.device)
    rows[torch.arange(len(positions)), torch.tensor(positions)] = 1.0
    focus = method.focus_classes(logits[list(positions)], config.n_focus)

    def row_logits(values: Mapping[str, Tensor], row: Tensor) -> Tensor:
        out = functional_call(view, {**frozen, **values}, (ctx,), {"use_cache": False}, tie_weights=True, strict=False)
        return (method.widen(out.logits[0]) * row[:, None]).sum(0)  # one-hot select: vmap-safe

    new = method.refine_batched(row_logits, trainable, focus, config, rows)
    return [method.step_result(logits[t], new[i]) for i, t in enumerate(positions)]
