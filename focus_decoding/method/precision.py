"""Low-precision models (bfloat16, float16): the step the config asks for, not one rounded away.

In bfloat16 a parameter of size 1 moves only in steps of 2^-8: a preset-size update changes almost
no entry, and the refined forward, rounded again at every layer, loses most of what remains. With
``FocusConfig.precision="float32"`` (the default) the selected parameters get a float32 copy, the
step and the refined forward run in float32 (the other parameters are read as float32 where the
forward uses them, ``Float32View``), and the emitted logits are the model's own logits plus the change
the step makes to the float32 logits: a step of size zero changes nothing, and the change is the
one asked for. ``precision="model"`` keeps the model's dtype (plain SGD on the model would).

An output head that the step does not update is never copied to float32: ``head_logits`` multiplies
by its low-precision weight in float32 chunks of rows (``ChunkedLinear``), forward and backward.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

import torch
from torch import Tensor, nn

LOW = (torch.float16, torch.bfloat16)
CHUNK_ROWS = 8192  # rows of a low-precision head widened at a time (8192 x 4096 x 4 bytes = 128 MiB at most)


def is_low(t: Tensor) -> bool:
    return t.dtype in LOW


def needs_float32(trainable: Mapping[str, Tensor], config) -> bool:
    """Whether this step runs in float32: a low-precision selection under ``precision="float32"``."""
    return config.precision == "float32" and any(is_low(p) for p in trainable.values())


class Float32View(Mapping):
    """``values`` with every low-precision tensor read as float32, each one only when it is asked for
    (a forward through the top blocks never widens the rest of the model)."""

    def __init__(self, *parts: Mapping[str, Tensor]):
        self.parts = parts

    def __getitem__(self, key: str) -> Tensor:
        for part in self.parts:
            if key in part:
                v = part[key]
                return v.float() if is_low(v) else v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        seen = set()
        for part in self.parts:
            for key in part:
                if key not in seen:
                    seen.add(key)
                    yield key

    def __len__(self) -> int:
        return len(set().union(*(set(p) for p in self.parts)))


def merged(values: Mapping[str, Tensor], frozen: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``values`` over ``frozen``: a ``Float32View`` stays one (lazy, float32), a plain dict merges as ``{**frozen, **values}``."""
    if isinstance(values, Float32View):
        return Float32View(values, frozen)
    return {**frozen, **values}


def float32_like(x: Tensor, values: Mapping[str, Tensor]) -> Tensor:
    """``x`` as float32 when the forward runs on float32 values for a low-precision model, else as it is."""
    if is_low(x) and isinstance(values, Float32View):
        return x.float()
    return x


class ChunkedLinear(torch.autograd.Function):
    """``x @ W.T + b`` for a float32 ``x`` and a low-precision ``W``, in float32, widening ``W`` a chunk of rows at a
    time (forward and backward): no float32 copy of the whole weight, and no gradient for it (it is frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        parts = []
        for start in range(0, weight.shape[0], CHUNK_ROWS):
            w = weight[start:start + CHUNK_ROWS].float()
            b = None if bias is None else bias[start:start + CHUNK_ROWS].float()
            parts.append(nn.functional.linear(x, w, b))
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        gx = None
        for start in range(0, weight.shape[0], CHUNK_ROWS):
            part = grad[..., start:start + CHUNK_ROWS] @ weight[start:start + CHUNK_ROWS].float()
            gx = part if gx is None else gx + part
        return gx, None, None


def head_logits(head: nn.Module, x: Tensor) -> Tensor:
    """``head(x)``; a float32 ``x`` meeting a frozen low-precision ``nn.Linear`` head goes through ``ChunkedLinear``."""
    if isinstance(head, nn.Linear) and x.dtype == torch.float32 and is_low(head.weight):
        return ChunkedLinear.apply(x, head.weight, head.bias)
    return head(x)
