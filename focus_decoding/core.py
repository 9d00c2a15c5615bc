"""The method itself: uncertainty gate, focus set, focus loss and a functional SGD step.

Every adapter (generation, vision, evaluation) feeds this module; nothing else computes the gate,
the focus set, the loss or the update. The model is never modified: the step computes new
parameter values into the gradient buffers and runs the refined forward through
``torch.func.functional_call``, so no second copy of the model exists and nothing needs restoring.
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .config import FocusConfig

Forward = Callable[[Mapping[str, Tensor]], Tensor]  # parameter values -> logits of ONE input
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")


# ----------------------------------------------------------------------------- gate and focus set
def top2_gap(logits: Tensor) -> Tensor:
    """p(top1) - p(top2) of softmax(logits) along the last dimension."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def is_uncertain(logits: Tensor, threshold: float) -> Tensor:
    """True where the top-1/top-2 probability gap is below ``threshold`` (the method's gate)."""
    return top2_gap(logits) < threshold


def focus_classes(logits: Tensor, n_focus: int) -> Tensor:
    """Indices of the ``n_focus`` most likely classes (the focus set F), along the last dimension."""
    n_classes = logits.shape[-1]
    if not 1 <= n_focus < n_classes:
        raise ValueError(
            f"FocusConfig.n_focus must be >= 1 and < the number of classes ({n_classes}), got {n_focus}"
        )
    return logits.topk(n_focus, dim=-1).indices


def focus_loss(logits: Tensor, focus: Tensor, mode: str) -> Tensor:
    """Per-input loss on RAW logits: iFo = -mean(focus logits); doFo = +mean(other logits)."""
    logits = logits.float()
    if mode == "ifo":
        return -logits.gather(-1, focus).mean(-1)
    in_focus = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, focus, True)  # out of place: vmap has a rule
    n_other = logits.shape[-1] - focus.shape[-1]
    return logits.masked_fill(in_focus, 0.0).sum(-1) / n_other


# ----------------------------------------------------------------------------- parameter selection
def split_parameters(model: nn.Module, selector) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(parameters the step updates, the rest), by canonical name; tied weights appear once."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    if not canonical:
        raise ValueError("the model has no parameters, so there is nothing to refine")
    if selector == "all":
        chosen = set(canonical.values())
    else:
        patterns = _last_blocks_patterns(model, int(selector[5:])) if isinstance(selector, str) else selector
        chosen = {
            canonical[id(p)]
            for alias, p in model.named_parameters(remove_duplicate=False)
            if any(_name_matches(alias, pat) for pat in patterns)
        }
        if not chosen:
            raise ValueError(
                f"FocusConfig.params={selector!r} matches no parameter of {type(model).__name__}; "
                f"use 'all', 'last:N' or patterns such as {sorted(canonical.values())[:3]}"
            )
    params = dict(model.named_parameters())
    trainable = {n: params[n] for n in params if n in chosen}
    frozen = {n: params[n].detach() for n in params if n not in chosen}
    return trainable, frozen


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer's stack of blocks: the ModuleList of identical modules with most parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise ValueError(f"FocusConfig.params='last:N' needs a stack of blocks; none found in {type(model).__name__}")
    return best


def _last_blocks_patterns(model: nn.Module, n: int) -> list[str]:
    prefix, blocks = find_blocks(model)
    if n > len(blocks):
        raise ValueError(f"FocusConfig.params='last:{n}' but the model has {len(blocks)} blocks; allowed N: 1..{len(blocks)}")
    parent = prefix.rpartition(".")[0]
    norms = [f"{parent}.{nm}" if parent else nm for nm in FINAL_NORM_NAMES]
    modules = dict(model.named_modules())
    return [f"{prefix}.{i}" for i in range(len(blocks) - n, len(blocks))] + [m for m in norms if m in modules]


def _name_matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


# ----------------------------------------------------------------------------- the step
@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Autograd on, even when the caller is inside ``torch.no_grad()`` or ``torch.inference_mode()``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def as_normal_tensor(t: Tensor) -> Tensor:
    """A tensor autograd may save: inference-mode tensors are cloned outside inference mode."""
    if t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run with every module in eval mode (BatchNorm frozen, dropout off); restore flags after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was_training in flags:
            m.training = was_training


def sgd_update_(param: Tensor, grad: Tensor, lr: float) -> Tensor:
    """theta - lr * g written into ``grad``'s buffer (no new memory); low precision computed in fp32."""
    if param.dtype in (torch.float16, torch.bfloat16):
        return grad.copy_(param.float().sub_(grad.float(), alpha=lr))
    return grad.mul_(-lr).add_(param)


def sgd_update(param: Tensor, grad: Tensor, lr: float) -> Tensor:
    """Out-of-place ``sgd_update_`` (same formula, vmap-safe; ``param`` broadcasts over per-sample ``grad``)."""
    if param.dtype in (torch.float16, torch.bfloat16):
        return param.float().sub(grad.float(), alpha=lr).to(param.dtype)
    return grad.mul(-lr).add(param)


_warned_no_change = False


def sgd_steps(loss_fn: Callable[[Mapping[str, Tensor]], Tensor], trainable: Mapping[str, Tensor],
              frozen: Mapping[str, Tensor], lr: float, steps: int = 1) -> dict[str, Tensor]:
    """Parameter values after ``steps`` plain SGD steps on ``loss_fn`` (no momentum, no decay)."""
    current = dict(trainable)
    with grad_enabled():
        for _ in range(steps):
            leaves = {n: p.detach().requires_grad_(True) for n, p in current.items()}
            loss = loss_fn({**frozen, **leaves})
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            del loss
            current = {n: p.detach() if g is None else sgd_update_(p.detach(), g, lr)
                       for (n, p), g in zip(current.items(), grads)}
    _warn_if_unchanged(trainable, current)
    return current


def refine(forward: Forward, trainable: Mapping[str, Tensor], frozen: Mapping[str, Tensor],
           focus: Tensor, config: FocusConfig) -> Tensor:
    """``config.steps`` SGD steps on ``trainable`` for the focus loss; return the refined logits."""
    focus = as_normal_tensor(focus)  # gather saves the index for backward
    loss_fn = lambda values: focus_loss(forward(values), focus, config.mode).sum()  # noqa: E731
    updated = sgd_steps(loss_fn, trainable, frozen, config.lr, config.steps)
    with torch.no_grad():
        return forward({**frozen, **updated})


def _warn_if_unchanged(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> None:
    global _warned_no_change
    if _warned_no_change:
        return
    for name, p in before.items():  # stops at the first changed tensor: cheap in the usual case
        if not torch.equal(p, after[name]):
            return
    _warned_no_change = True
    dtypes = sorted({str(p.dtype) for p in before.values()})
    warnings.warn(
        f"focus step changed no parameter: lr * grad is below the resolution of {dtypes}; "
        "raise FocusConfig.lr or run the model in float32 (warned once)", RuntimeWarning, stacklevel=3)


@dataclass
class StepResult:
    """What one gated step did to one input."""

    logits: Tensor  # logits to emit: refined, or the original ones
    uncertain: bool  # the gate fired
    refined: bool  # a finite refinement was emitted
    nonfinite: bool  # the refinement overflowed and the original logits were kept
    changed: bool  # the emitted argmax differs from the original argmax


def focus_step(forward: Forward, logits: Tensor, trainable: Mapping[str, Tensor],
               frozen: Mapping[str, Tensor], config: FocusConfig) -> StepResult:
    """Algorithm 1 for one input whose unrefined logits are ``logits`` (shape ``[C]``)."""
    if not bool(is_uncertain(logits, config.threshold)):
        return StepResult(logits, False, False, False, False)
    focus = focus_classes(logits, config.n_focus)
    new = refine(forward, trainable, frozen, focus, config).reshape(logits.shape).to(logits.dtype)
    if not bool(torch.isfinite(new).all()):
        return StepResult(logits, True, False, True, False)
    return StepResult(new, True, True, False, bool(new.argmax() != logits.argmax()))


def model_forward(model: nn.Module, *args, select: Callable[[object], Tensor] = lambda out: out, **kwargs) -> Forward:
    """A ``Forward`` that calls ``model`` with substituted parameters and picks the logits."""
    def forward(values: Mapping[str, Tensor]) -> Tensor:
        return select(functional_call(model, dict(values), args, kwargs, tie_weights=True, strict=False))
    return forward
