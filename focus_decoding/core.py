"""The method itself: uncertainty gate, focus set, focus loss, step size and a functional SGD step.

Every adapter (generation, vision, evaluation) feeds this module; nothing else computes the gate,
the focus set, the loss, the step size or the update. The user's model is never modified, not even
for the duration of a call: the refined forward runs through ``torch.func.functional_call`` on a
*view*, a private copy of the model's module tree that shares (never copies) its parameter and
buffer tensors. Swapped parameters, hooks and train/eval flags live on the view, so other threads
using the model at the same time see nothing. The updated values are written into the gradient
buffers, so no second copy of the weights exists either.
"""
from __future__ import annotations

import collections
import contextlib
import fnmatch
import functools
import inspect
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .config import FocusConfig

Forward = Callable[[Mapping[str, Tensor]], Tensor]  # parameter values -> logits of ONE input
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")


# ----------------------------------------------------------------------------- gate and focus set
def widen(t: Tensor) -> Tensor:
    """float16/bfloat16 as float32; float32 and float64 as they are (the reference runs in float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def top2_gap(logits: Tensor) -> Tensor:
    """p(top1) - p(top2) of softmax(logits) along the last dimension."""
    top2 = torch.softmax(widen(logits), dim=-1).topk(2, dim=-1).values
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


def ifo_loss(logits: Tensor, focus: Tensor) -> Tensor:
    """iFo: -mean of the focus logits (raise the likely classes)."""
    return -logits.gather(-1, focus).mean(-1)


def dofo_loss(logits: Tensor, focus: Tensor) -> Tensor:
    """doFo: +mean of the logits outside the focus set (lower the unlikely classes)."""
    in_focus = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, focus, True)  # out of place: vmap has a rule
    n_other = logits.shape[-1] - focus.shape[-1]
    return logits.masked_fill(in_focus, 0.0).sum(-1) / n_other


def entropy_loss(logits: Tensor, focus: Tensor) -> Tensor:
    """Entropy minimisation (TENT's objective on one input): softmax entropy; the focus set is not used."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"ifo": ifo_loss, "dofo": dofo_loss, "entropy": entropy_loss}


def focus_loss(logits: Tensor, focus: Tensor, mode: str) -> Tensor:
    """Per-input loss of ``mode`` on RAW logits (see ``LOSSES``); an unknown mode raises ``ValueError``."""
    try:
        loss = LOSSES[mode]
    except KeyError:
        raise ValueError(f"unknown focus mode {mode!r}; allowed: {tuple(LOSSES)}") from None
    return loss(widen(logits), focus)


# ----------------------------------------------------------------------------- a private module tree
_VIEWS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_COPIED = (dict, set, collections.OrderedDict)


def module_view(model: nn.Module, *, eval_mode: bool = True) -> nn.Module:
    """A private copy of ``model``'s module tree that shares (never copies) its parameters and buffers.

    Each module is a new object with its own ``_parameters``/``_buffers``/``_modules``/hook dicts and
    ``training`` flag, holding the very same tensors; everything else (config, code) is shared. So
    ``functional_call``, hooks and ``eval()`` on the view never reach ``model``, and a view costs a few
    milliseconds and no tensor memory. ``eval_mode``: the view runs with dropout off and BatchNorm
    reading (never updating) its running statistics, as the method's step requires.
    """
    memo: dict[int, nn.Module] = {}

    def clone(module: nn.Module) -> nn.Module:
        if id(module) in memo:  # a submodule registered twice stays one module
            return memo[id(module)]
        new = object.__new__(type(module))
        memo[id(module)] = new
        state = dict(module.__dict__)
        for key, value in state.items():
            if key.startswith("_") and type(value) in _COPIED:  # parameter/buffer/module/hook registries
                state[key] = type(value)(value)
            else:
                state[key] = _rebind(value, module, new)
        state["_modules"] = {k: None if c is None else clone(c) for k, c in module._modules.items()}
        new.__dict__.update(state)
        return new

    view = clone(model)
    if eval_mode:
        view.eval()
    _VIEWS.add(view)
    return view


def _rebind(value, old: nn.Module, new: nn.Module):
    """Instance-level methods bound to the original module (accelerate's hooked ``forward``) bound to the copy."""
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    if isinstance(value, functools.partial) and value.args and value.args[0] is old:
        rebound = functools.partial(value.func, new, *value.args[1:], **value.keywords)
        return functools.update_wrapper(rebound, value, assigned=(), updated=("__dict__",))
    return value


def is_view(module: nn.Module) -> bool:
    """Whether ``module`` was made by :func:`module_view` (safe to swap parameters on)."""
    return module in _VIEWS


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


def step_size(config: FocusConfig, grads: Sequence[Tensor | None], batched: bool = False) -> float | Tensor:
    """The step's eta: ``config.lr`` (fixed rule) or ``tau / ||g||^2`` over the selected parameters (normalized).

    ``grads`` holds each selected tensor's gradient once (tied weights once, as SGD sees them);
    ``batched``: dimension 0 indexes inputs, and eta is a tensor with one value per input. A zero
    gradient gives eta = 0 (nothing to follow).
    """
    if config.step_rule == "fixed":
        return config.lr
    grads = [g for g in grads if g is not None]
    if batched:
        sq = sum(widen(g).pow(2).flatten(1).sum(1) for g in grads)
    else:
        sq = sum(widen(g).pow(2).sum() for g in grads)
    if not isinstance(sq, Tensor):  # no parameter received a gradient
        return 0.0
    eta = torch.where(sq > 0, config.tau / sq, torch.zeros_like(sq))
    return eta if batched else float(eta)


def _per_row(lr: float | Tensor, like: Tensor) -> float | Tensor:
    """A per-input eta [B] shaped to broadcast over a per-input gradient [B, ...]."""
    return lr.reshape(-1, *[1] * (like.dim() - 1)) if isinstance(lr, Tensor) else lr


def sgd_update_(param: Tensor, grad: Tensor, lr: float | Tensor) -> Tensor:
    """theta - lr * g written into ``grad``'s buffer (no new memory); low precision computed in fp32, rounded once."""
    lr = _per_row(lr, grad)
    if param.dtype in (torch.float16, torch.bfloat16):
        return grad.copy_(param.float() - grad.float() * lr)
    return grad.mul_(-lr).add_(param)


def sgd_update(param: Tensor, grad: Tensor, lr: float | Tensor) -> Tensor:
    """Out-of-place ``sgd_update_`` (same formula, vmap-safe; ``param`` broadcasts over per-sample ``grad``)."""
    lr = _per_row(lr, grad)
    if param.dtype in (torch.float16, torch.bfloat16):
        return (param.float() - grad.float() * lr).to(param.dtype)
    return grad.mul(-lr).add(param)


_warned_no_change = False


def sgd_steps(loss_fn: Callable[[Mapping[str, Tensor]], Tensor], trainable: Mapping[str, Tensor],
              frozen: Mapping[str, Tensor], config: FocusConfig) -> dict[str, Tensor]:
    """Parameter values after ``config.steps`` plain SGD steps on ``loss_fn`` (no momentum, no decay)."""
    current = dict(trainable)
    with grad_enabled():
        for _ in range(config.steps):
            leaves = {n: p.detach().requires_grad_(True) for n, p in current.items()}
            loss = loss_fn({**frozen, **leaves})
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            del loss
            lr = step_size(config, grads)
            current = {n: p.detach() if g is None else sgd_update_(p.detach(), g, lr)
                       for (n, p), g in zip(current.items(), grads)}
    _warn_if_unchanged(trainable, current)
    return current


def batched_sgd_steps(loss_fn: Callable, trainable: Mapping[str, Tensor], config: FocusConfig,
                      *inputs: Tensor) -> dict[str, Tensor]:
    """``sgd_steps`` for many inputs at once, each with its own parameters (``torch.func.vmap``).

    ``loss_fn(values, *row_inputs)`` is the scalar loss of one input; ``inputs`` are batched on
    dimension 0. Returns per-input parameter values ``[B, ...]``.
    """
    current, dims = {n: p.detach() for n, p in trainable.items()}, None  # shared until the first step
    with grad_enabled():
        for _ in range(config.steps):
            grads = vmap(grad(loss_fn), in_dims=(dims, *[0] * len(inputs)))(current, *inputs)
            lr = step_size(config, list(grads.values()), batched=True)
            current = {n: sgd_update(p, grads[n], lr) for n, p in current.items()}
            dims = 0  # per-input parameter values from here on
    return current


def refined_values(forward: Forward, trainable: Mapping[str, Tensor], frozen: Mapping[str, Tensor],
                   focus: Tensor, config: FocusConfig) -> dict[str, Tensor]:
    """The ``trainable`` values after ``config.steps`` SGD steps on the focus loss of ``forward``'s logits."""
    focus = as_normal_tensor(focus)  # gather saves the index for backward
    loss_fn = lambda values: focus_loss(forward(values), focus, config.mode).sum()  # noqa: E731
    return sgd_steps(loss_fn, trainable, frozen, config)


def refine(forward: Forward, trainable: Mapping[str, Tensor], frozen: Mapping[str, Tensor],
           focus: Tensor, config: FocusConfig) -> Tensor:
    """``config.steps`` SGD steps on ``trainable`` for the focus loss; return the refined logits."""
    updated = refined_values(forward, trainable, frozen, focus, config)
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
        f"focus step changed no parameter: the step is below the resolution of {dtypes} (or the gradient is zero); "
        "raise FocusConfig.lr / tau or run the model in float32 (warned once)", RuntimeWarning, stacklevel=3)


@dataclass
class StepResult:
    """What one gated step did to one input."""

    logits: Tensor  # logits to emit: refined, or the original ones
    uncertain: bool  # the gate fired
    refined: bool  # a finite refinement was emitted
    nonfinite: bool  # the refinement overflowed and the original logits were kept
    changed: bool  # the emitted argmax differs from the original argmax


def step_result(original: Tensor, new: Tensor) -> StepResult:
    """The outcome of a refinement of an uncertain input: ``new`` logits, or ``original`` if they overflowed."""
    if not bool(torch.isfinite(new).all()):
        return StepResult(original, True, False, True, False)
    new = new.reshape(original.shape).to(original.dtype)
    return StepResult(new, True, True, False, bool(new.argmax() != original.argmax()))


def focus_step(forward: Forward, logits: Tensor, trainable: Mapping[str, Tensor],
               frozen: Mapping[str, Tensor], config: FocusConfig) -> StepResult:
    """Algorithm 1 for one input whose unrefined logits are ``logits`` (shape ``[C]``)."""
    if not bool(is_uncertain(logits, config.threshold)):
        return StepResult(logits, False, False, False, False)
    focus = focus_classes(logits, config.n_focus)
    return step_result(logits, refine(forward, trainable, frozen, focus, config))


def last_logits_kwargs(model: nn.Module) -> dict[str, int]:
    """Ask for the last position's logits only, where the model's forward allows it (same values, less work)."""
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("logits_to_keep", "num_logits_to_keep"):  # renamed in transformers 4.50
        if name in names:
            return {name: 1}
    return {}


def model_forward(model: nn.Module, *args, select: Callable[[object], Tensor] = lambda out: out, **kwargs) -> Forward:
    """A ``Forward`` that calls ``model`` with substituted parameters and picks the logits.

    The call runs on ``model`` itself when it is a :func:`module_view`, else on a new view (eval mode)
    made here: adapters that build many forwards make one view and pass it.
    """
    view = model if is_view(model) else module_view(model)

    def forward(values: Mapping[str, Tensor]) -> Tensor:
        return select(functional_call(view, dict(values), args, kwargs, tie_weights=True, strict=False))
    return forward
