"""The step: its size, the functional SGD update, and Algorithm 1 for one input or many.

Nothing here touches a model: a step differentiates the loss of a ``Forward`` (parameter values ->
logits, see ``views.model_forward``) with respect to the selected values and writes
``theta - eta * g`` into the gradient buffers, so no second copy of the weights exists.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.func import grad, vmap

from ..config import FocusConfig
from .gate import focus_classes, gate, widen
from .losses import focus_loss
from .precision import Float32View, is_low, needs_float32
from .views import Forward


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


# ----------------------------------------------------------------------------- the step's size
def squared_norm(grads: Sequence[Tensor | None], batched: bool = False) -> Tensor | None:
    """||g||^2 over the selected tensors (each once); per input when ``batched`` (dimension 0); None if no gradient."""
    # vecdot: one fused pass, no squared temporary of each gradient
    return sum_terms([torch.linalg.vecdot(widen(g).flatten(1), widen(g).flatten(1)) if batched
                      else torch.linalg.vecdot(widen(g).flatten(), widen(g).flatten()) for g in grads if g is not None])


def sum_terms(terms: Sequence[Tensor]) -> Tensor | None:
    """The sum of per-tensor ||g||^2 terms, in their order; None if there are none."""
    if not terms:
        return None
    return sum(t.to(terms[0].device) for t in terms)  # a model split over devices: one sum, on one device


def step_size(config: FocusConfig, grads: Sequence[Tensor | None], batched: bool = False) -> float | Tensor:
    """The step's eta: ``config.lr`` (fixed rule) or ``tau / ||g||^2`` over the selected parameters (normalized).

    ``grads`` holds each selected tensor's gradient once (tied weights once, as SGD sees them);
    ``batched``: dimension 0 indexes inputs, and eta is a tensor with one value per input. A zero
    gradient gives eta = 0 (nothing to follow).
    """
    if config.step_rule == "fixed":
        return config.lr
    sq = squared_norm(grads, batched)
    if sq is None:  # no parameter received a gradient
        return 0.0
    eta = torch.where(sq > 0, config.tau / sq, torch.zeros_like(sq))
    return eta if batched else float(eta)


def _per_row(lr: float | Tensor, like: Tensor) -> float | Tensor:
    """A per-input eta [B] shaped to broadcast over a per-input gradient [B, ...]."""
    return lr.to(like.device).reshape(-1, *[1] * (like.dim() - 1)) if isinstance(lr, Tensor) else lr


UPDATE_CHUNK = 1 << 20  # entries of a low-precision update widened at a time (4 MiB of float32)


def sgd_update_(param: Tensor, grad: Tensor, lr: float | Tensor) -> Tensor:
    """theta - lr * g written into ``grad``'s buffer (no new memory); low precision computed in fp32, rounded once."""
    lr = _per_row(lr, grad)
    if param.dtype in (torch.float16, torch.bfloat16):
        if isinstance(lr, Tensor) or not (grad.is_contiguous() and param.is_contiguous()):
            return grad.copy_(param.float() - grad.float() * lr)
        # elementwise, so chunks give the same bits; float32 temporaries of one chunk, not of the whole tensor
        g, p = grad.view(-1), param.view(-1)
        for start in range(0, g.numel(), UPDATE_CHUNK):
            part = slice(start, start + UPDATE_CHUNK)
            g[part].copy_(p[part].float() - g[part].float() * lr)
        return grad
    return grad.mul_(-lr).add_(param)


def sgd_update(param: Tensor, grad: Tensor, lr: float | Tensor) -> Tensor:
    """Out-of-place ``sgd_update_`` (same formula, vmap-safe; ``param`` broadcasts over per-sample ``grad``)."""
    lr = _per_row(lr, grad)
    if param.dtype in (torch.float16, torch.bfloat16):
        return (param.float() - grad.float() * lr).to(param.dtype)
    return grad.mul(-lr).add(param)


# ----------------------------------------------------------------------------- SGD on one input, or many
def sgd_steps(loss_fn: Callable[[Mapping[str, Tensor]], Tensor], trainable: Mapping[str, Tensor],
              frozen: Mapping[str, Tensor], config: FocusConfig, *,
              intended: list[float] | None = None) -> dict[str, Tensor]:
    """Parameter values after ``config.steps`` plain SGD steps on ``loss_fn`` (no momentum, no decay).

    A low-precision selection under ``precision="float32"`` steps float32 copies (``method.precision``) and
    ``loss_fn`` sees float32 values. ``intended`` (a list) receives each step's first-order loss decrease,
    eta * ||g||^2, to hold against the decrease achieved.
    """
    wide = needs_float32(trainable, config)
    if wide and config.step_rule == "fixed":
        current = streamed_float32_steps(loss_fn, trainable, frozen, config, intended)
        warn_if_unchanged(trainable, current)
        return current
    with grad_enabled():  # float32 copies made here: under an outer inference_mode they could not require grad
        current = {n: p.detach().float() if wide else p for n, p in trainable.items()}
        for _ in range(config.steps):
            leaves = {n: p.detach().requires_grad_(True) for n, p in current.items()}
            loss = loss_fn(Float32View(leaves, frozen) if wide else {**frozen, **leaves})
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            del loss
            lr = step_size(config, grads)
            if intended is not None:
                sq = squared_norm(grads)
                intended.append(0.0 if sq is None else float(lr * sq))
            current = {n: p.detach() if g is None else sgd_update_(p.detach(), g, lr)
                       for (n, p), g in zip(current.items(), grads)}
    warn_if_unchanged(trainable, current)
    return current


def streamed_float32_steps(loss_fn: Callable[[Mapping[str, Tensor]], Tensor], trainable: Mapping[str, Tensor],
                           frozen: Mapping[str, Tensor], config: FocusConfig,
                           intended: list[float] | None) -> dict[str, Tensor]:
    """``sgd_steps`` for float32 copies under the fixed rule, each tensor updated as soon as its gradient is complete.

    The fixed rule's eta is known before the backward, so each copy takes ``theta - lr * g`` in its gradient's hook
    and drops the gradient: the float32 gradients never exist all at once (for ``params="all"`` on a bf16 model they
    would double the float32 copy). Safe because autograd accumulates a leaf's gradient only after every node that
    reads the leaf has run. The same arithmetic as ``sgd_update_`` (bitwise), and each copy is a new tensor: a
    float32 parameter of a mixed model is cloned, never updated where the model holds it.
    """
    lr = config.lr

    def update_hook(name: str, terms: dict[str, Tensor]) -> Callable[[Tensor], None]:
        def apply(leaf: Tensor) -> None:
            g = leaf.grad
            if intended is not None:
                terms[name] = squared_norm([g])  # this tensor's term, summed over tensors in order below
            with torch.no_grad():
                leaf.copy_(sgd_update_(leaf, g, lr))
            leaf.grad = None  # freed now, not at the end of the backward
        return apply

    with grad_enabled():  # the copies too: made under an outer inference_mode they could not require grad
        current = {n: p.detach().float() if is_low(p) else p.detach().clone() for n, p in trainable.items()}
        for _ in range(config.steps):
            terms: dict[str, Tensor] = {}
            for name, leaf in current.items():
                leaf.requires_grad_(True)
                leaf.register_post_accumulate_grad_hook(update_hook(name, terms))
            loss_fn(Float32View(current, frozen)).backward()
            current = {n: p.detach() for n, p in current.items()}  # new leaves (no hooks) for the next step
            if intended is not None:
                sq = sum_terms([terms[n] for n in current if n in terms])
                intended.append(0.0 if sq is None else float(lr * sq))
    return current


def batched_sgd_steps(loss_fn: Callable, trainable: Mapping[str, Tensor], config: FocusConfig,
                      *inputs: Tensor, intended: list[Tensor] | None = None) -> dict[str, Tensor]:
    """``sgd_steps`` for many inputs at once, each with its own parameters (``torch.func.vmap``).

    ``loss_fn(values, *row_inputs)`` is the scalar loss of one input; ``inputs`` are batched on
    dimension 0. Returns per-input parameter values ``[B, ...]``; ``intended`` receives each step's
    per-input eta * ||g||^2 ``[B]``.
    """
    current, dims = {n: p.detach() for n, p in trainable.items()}, None  # shared until the first step
    with grad_enabled():
        for _ in range(config.steps):
            grads = vmap(grad(loss_fn), in_dims=(dims, *[0] * len(inputs)))(current, *inputs)
            lr = step_size(config, list(grads.values()), batched=True)
            if intended is not None:
                sq = squared_norm(list(grads.values()), batched=True)
                intended.append(torch.zeros(len(inputs[0])) if sq is None else (lr * sq).detach().double().cpu())
            current = {n: sgd_update(p, grads[n], lr) for n, p in current.items()}
            dims = 0  # per-input parameter values from here on
    return current


def refined_values(forward: Forward, trainable: Mapping[str, Tensor], frozen: Mapping[str, Tensor],
                   focus: Tensor, config: FocusConfig) -> dict[str, Tensor]:
    """The ``trainable`` values after ``config.steps`` SGD steps on the loss of ``forward``'s logits
    (float32 for a low-precision selection under ``precision="float32"``)."""
    focus = as_normal_tensor(focus)  # gather saves the index for backward
    loss_fn = lambda values: focus_loss(forward(values), focus, config.mode).sum()  # noqa: E731
    return sgd_steps(loss_fn, trainable, frozen, config)


def refine(forward: Forward, trainable: Mapping[str, Tensor], frozen: Mapping[str, Tensor],
           focus: Tensor, config: FocusConfig, *, base: Tensor | None = None,
           intended: list[float] | None = None,
           loss_forward: Callable[[Mapping[str, Tensor], Tensor], Tensor] | None = None) -> Tensor:
    """``config.steps`` SGD steps on ``trainable`` for the loss; return the refined logits.

    Under ``precision="float32"`` a low-precision model's refined logits are ``base`` (the model's own logits)
    plus the change the step makes to the float32 logits (without ``base``: the float32 logits themselves).
    ``loss_forward(values, focus)``, where given, is the same loss computed a cheaper way (a linear head's input,
    ``losses.head_input_loss``); ``forward`` then only runs for the refined logits.
    """
    focus = as_normal_tensor(focus)  # gather saves the index for backward
    first: list[Tensor] = []
    if loss_forward is not None and needs_float32(trainable, config):
        raise ValueError("loss_forward is for steps in the model's dtype: the float32 step adds the change of the "
                         "logits to the model's own, which needs the first forward's logits")

    def loss_fn(values):
        if loss_forward is not None:
            return loss_forward(values, focus).sum()
        logits = forward(values)
        if not first:
            first.append(logits.detach())
        return focus_loss(logits, focus, config.mode).sum()

    updated = sgd_steps(loss_fn, trainable, frozen, config, intended=intended)
    with torch.no_grad():
        if not needs_float32(trainable, config):
            return forward({**frozen, **updated})
        new = forward(Float32View(updated, frozen))
        return new if base is None else widen(base).reshape(new.shape).to(new.device) + (new - first[0])


def refine_batched(forward: Callable[..., Tensor], trainable: Mapping[str, Tensor], focus: Tensor,
                   config: FocusConfig, *inputs: Tensor, intended: list[Tensor] | None = None) -> Tensor:
    """Refined logits [B, C] of B inputs at once, each with its own step (never a shared update).

    ``forward(values, *row_inputs)`` is the logits [C] of one input with the selected parameters at
    ``values`` (the frozen ones closed over); ``inputs`` and ``focus`` are batched on dimension 0.
    ``intended`` receives each step's per-input first-order decrease [B].
    """
    def loss(values, *args):
        *row, row_focus = args
        return focus_loss(forward(values, *row), row_focus, config.mode)

    current = batched_sgd_steps(loss, trainable, config, *inputs, as_normal_tensor(focus), intended=intended)
    with torch.no_grad():
        return vmap(forward, in_dims=(0, *[0] * len(inputs)))(current, *inputs)


_warned_no_change = False


def warn_if_unchanged(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> None:
    """Warn once per process when a step left every selected tensor bitwise as it was."""
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


# ----------------------------------------------------------------------------- Algorithm 1 for one input
@dataclass
class StepResult:
    """What one gated step did to one input."""

    logits: Tensor  # logits to emit: refined (float32 for a float16/bfloat16 model), or the original ones
    uncertain: bool  # the gate fired
    refined: bool  # a finite refinement was emitted
    nonfinite: bool  # the refinement overflowed and the original logits were kept
    changed: bool  # the emitted argmax differs from the original argmax
    intended: float = 0.0  # the loss decrease the step asked for (first order: sum of eta ||g||^2 over steps)
    achieved: float = 0.0  # the loss decrease it made: loss(original logits) - loss(refined logits)


def step_result(original: Tensor, new: Tensor, focus: Tensor | None = None, mode: str | None = None,
                intended: float = 0.0) -> StepResult:
    """The outcome of a refinement of an uncertain input: ``new`` logits, or ``original`` if they overflowed.
    With ``focus`` and ``mode``, the loss decrease it achieved is measured (against ``intended``)."""
    if not bool(torch.isfinite(new).all()):
        return StepResult(original, True, False, True, False)
    achieved = 0.0
    if focus is not None:
        wide = widen(new).reshape(original.shape).to(original.device)
        achieved = float(focus_loss(widen(original), focus, mode) - focus_loss(wide, focus, mode))
    # a bf16/fp16 model's change must not round away; a split model's logits come back where the scores are
    new = new.reshape(original.shape).to(device=original.device, dtype=widen(original).dtype)
    return StepResult(new, True, True, False, bool(new.argmax() != original.argmax()), intended, achieved)


def focus_step(forward: Forward, logits: Tensor, trainable: Mapping[str, Tensor],
               frozen: Mapping[str, Tensor], config: FocusConfig, *,
               loss_forward: Callable[[Mapping[str, Tensor], Tensor], Tensor] | None = None) -> StepResult:
    """Algorithm 1 for one input whose unrefined logits are ``logits`` (shape ``[C]``); ``loss_forward`` as in
    :func:`refine`."""
    if not bool(gate(logits, config)):
        return StepResult(logits, False, False, False, False)
    focus = focus_classes(logits, config.n_focus)
    intended: list[float] = []
    new = refine(forward, trainable, frozen, focus, config, base=logits, intended=intended, loss_forward=loss_forward)
    return step_result(logits, new, focus, config.mode, sum(intended))
