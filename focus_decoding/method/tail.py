"""Refining through the tail only: the step runs through the part of the network after the last layer it updates.

Two tails, both exactly the method restricted to the parameters they hold:

- **A classifier's head** (``HeadCapture``, ``head_forward``): when every selected parameter lives in
  one submodule (``owning_module``) whose output is the model's output (``model.fc``,
  ``model.classifier``...), that submodule's input is kept from the first forward and the step and
  the refined forward run through the submodule alone. Checked on every batch, never assumed.
- **A language model's position-wise tail** (``params="tail"``: ``tail_modules``, ``TailCapture``,
  ``tail_forward``): the last block's MLP with its norms and the final norm act on each position
  alone, so with only those updated the refined logits at a position depend only on that position's
  residual stream after the last block's attention, which the first forward already computed. The
  refinement is then a few matrix-vector products, whatever the context length. An output head tied
  to the input embedding is never part of it (it would change every position).
"""
from __future__ import annotations

import weakref
from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..config import FocusConfig
from . import prefix
from .losses import HEAD_INPUT_MODES, head_input_loss
from .params import MLP_PARTS, find_blocks, final_norm_names
from .precision import float32_like, head_logits, merged, needs_float32

TAIL = "tail"  # the kept-state path of params="tail" (beside N, the top blocks of last:N)

# ----------------------------------------------------------------------------- which module
def owning_modules(model: nn.Module, trainable: Mapping[str, Tensor]) -> list[str]:
    """The proper submodules holding every selected parameter, smallest first, leaving out any whose selected
    parameters are also used outside it (a tied weight would make its kept input stale)."""
    parts = [name.split(".")[:-1] for name in trainable]
    common = parts[0] if parts else []
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    ids = {id(p) for p in trainable.values()}
    owners = []
    for depth in range(len(common), 0, -1):
        owner = ".".join(common[:depth])
        inside = lambda name: name == owner or name.startswith(owner + ".")  # noqa: E731
        if not any(not inside(name) and any(id(p) in ids for p in m.parameters(recurse=False))
                   for name, m in model.named_modules()):
            owners.append(owner)
    return owners


def shortcut(model: nn.Module, config: FocusConfig, *, warn: bool = False) -> int | str | None:
    """How a language model's refinement may start from kept states: ``"tail"`` (``params="tail"``), N (the top
    N blocks, ``method.prefix``) or None (the full model on the context)."""
    if config.params == TAIL:
        return TAIL
    return prefix.prefix_blocks(model, config, warn=warn)


# ----------------------------------------------------------------------------- a classifier's head
class HeadCapture:
    """Keeps the input and output of ``view``'s candidate heads during one forward (hooks on the view only);
    ``choose(logits)`` then names the smallest whose output is the model's."""

    def __init__(self, view: nn.Module, names: list[str]):
        self.view, self.names = view, list(names)
        self.kept: dict[str, tuple[tuple, dict, object]] = {}

    def __enter__(self) -> "HeadCapture":
        def keep(name):
            def hook(module, args, kwargs, output):
                self.kept[name] = (args, kwargs, output)
            return hook
        self._handles = [self.view.get_submodule(n).register_forward_hook(keep(n), with_kwargs=True)
                         for n in self.names]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def choose(self, logits: Tensor) -> tuple[str | None, Tensor | None, str]:
        """(the head, its kept input [B, ...], "") for the smallest candidate whose output is ``logits`` (the same
        tensor, or bitwise equal); else (None, None, why not)."""
        why = "it did not run"
        for name in self.names:
            args, kwargs, out = self.kept.get(name, ((), {}, None))
            if out is None:
                continue
            if not isinstance(out, Tensor) or len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
                why = "it takes more than one tensor input or returns no tensor"
            elif out is logits or (out.numel() == logits.numel() and torch.equal(out.reshape(logits.shape), logits)):
                return name, args[0], ""
            else:
                why = "its output is not the model's output (the model computes something after it)"
        return None, None, why


def head_forward(view: nn.Module, name: str, n_classes: int,
                 frozen: Mapping[str, Tensor]) -> Callable[[Mapping[str, Tensor], Tensor], Tensor]:
    """``forward(values, x)``: logits [C] of the head ``name`` on one kept input ``x``, the selected parameters
    (canonical names) at ``values`` and the head's other parameters at ``frozen``."""
    head = view.get_submodule(name)
    cut = len(name) + 1
    own = {k: v for k, v in frozen.items() if k.startswith(name + ".")}

    def forward(values: Mapping[str, Tensor], x: Tensor) -> Tensor:
        both = merged(values, own)
        local = {k[cut:]: both[k] for k in both if k.startswith(name + ".")}
        x = float32_like(x, values)
        return functional_call(head, local, (x.unsqueeze(0),), strict=False, tie_weights=True).reshape(n_classes)
    return forward


# ----------------------------------------------------------------------------- a language model's tail
class TailCapture:
    """Keeps the residual stream entering the last block's MLP part (after its attention), during forwards of ``view``.

    ``states`` is the latest forward's ``[B, T, H]``; ``positions`` (None: all) keeps only those of each forward.
    """

    def __init__(self, view: nn.Module):
        pre, _, _ = MLP_PARTS[view.config.model_type]
        prefix, blocks = find_blocks(view)
        self.module = view.get_submodule(f"{prefix}.{len(blocks) - 1}.{pre}")
        self.states: Tensor | None = None

    def __enter__(self) -> "TailCapture":
        def keep(module, args):
            self.states = args[0].detach()
        self._handle = self.module.register_forward_pre_hook(keep)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def tail_forward(view: nn.Module, state: Tensor) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """A ``Forward`` for one position from its residual ``state`` [H] after the last block's attention:
    the rest of the last block (norm, MLP, norm), the final norm and the head. ``forward(values)`` -> logits [V]."""
    return lambda values: tail_logits(view, values, state)


def tail_logits(view: nn.Module, values: Mapping[str, Tensor], state: Tensor) -> Tensor:
    """Logits [V] of one position from its post-attention residual ``state`` [H], the tail's parameters at ``values``."""
    logits = head_logits(view.get_output_embeddings(), tail_hidden(view, values, state).reshape(1, 1, -1))[0, -1]
    softcap = getattr(view.config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


_TAIL_NAMES: "weakref.WeakKeyDictionary[nn.Module, tuple[str, str, str | None, str]]" = weakref.WeakKeyDictionary()


def tail_names(view: nn.Module) -> tuple[str, str, str | None, str]:
    """(the last block's pre-MLP norm, its MLP, its post-MLP norm or None, the final norm): module names, found once
    per module tree (finding them walks the whole tree, which a refinement would otherwise do three times)."""
    names = _TAIL_NAMES.get(view)
    if names is None:
        pre, mlp, post = MLP_PARTS[view.config.model_type]
        prefix, blocks = find_blocks(view)
        last = f"{prefix}.{len(blocks) - 1}"
        names = (f"{last}.{pre}", f"{last}.{mlp}", None if post is None else f"{last}.{post}", final_norm_names(view)[0])
        _TAIL_NAMES[view] = names
    return names


def tail_hidden(view: nn.Module, values: Mapping[str, Tensor], state: Tensor) -> Tensor:
    """The head's input [H] at one position: the rest of the last block and the final norm on ``state`` [H]."""
    pre, mlp, post, norm = tail_names(view)

    def run(name: str, x: Tensor) -> Tensor:
        cut = len(name) + 1
        local = {k[cut:]: v for k, v in values.items() if k.startswith(name + ".")}
        return functional_call(view.get_submodule(name), local, (x,), strict=False)

    h = float32_like(state, values).reshape(1, 1, -1)
    out = run(mlp, run(pre, h))
    if post is not None:
        out = run(post, out)
    return run(norm, h + out).reshape(-1)


# id(head weight) -> (a weak reference to it, its version, its column sum); a tensor's == is elementwise, so the
# tensor itself cannot be a dictionary key
_COLUMN_SUMS: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def tail_loss_forward(view: nn.Module, state: Tensor, trainable: Mapping[str, Tensor],
                      config: FocusConfig) -> Callable[[Mapping[str, Tensor], Tensor], Tensor] | None:
    """The tail's loss from the head's input, for ``step.refine``'s ``loss_forward`` (see ``head_loss_forward``)."""
    return head_loss_forward(view, lambda values: tail_hidden(view, values, state), trainable, config)


def top_loss_forward(view: nn.Module, top: prefix.TopLogits, hidden: Tensor, trainable: Mapping[str, Tensor],
                     config: FocusConfig) -> Callable[[Mapping[str, Tensor], Tensor], Tensor] | None:
    """The top blocks' (``last:N``) loss from the head's input, for ``step.refine``'s ``loss_forward``."""
    return head_loss_forward(view, lambda values: top.pre_head(values, hidden), trainable, config)


def head_loss_forward(view: nn.Module, pre_head: Callable[[Mapping[str, Tensor]], Tensor],
                      trainable: Mapping[str, Tensor],
                      config: FocusConfig) -> Callable[[Mapping[str, Tensor], Tensor], Tensor] | None:
    """``loss_forward(values, focus)`` from the head's input ``pre_head(values)`` [H] (``losses.head_input_loss``):
    iFo / doFo through a frozen bias-free linear head without softcapping, stepped in the model's dtype; else None
    (the loss then comes from the full [V] logits). doFo's column sum is computed once per head weight (and again
    only when the weight changes in place)."""
    head = view.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if (config.mode not in HEAD_INPUT_MODES or type(head) is not nn.Linear or head.bias is not None
            or weight is None or weight.is_meta or getattr(view.config, "final_logit_softcapping", None)
            or needs_float32(trainable, config) or any(v is weight for v in trainable.values())):
        return None
    column_sum = None
    if config.mode == "dofo":
        cached = _COLUMN_SUMS.get(id(weight))
        if cached is None or cached[0]() is not weight or cached[1] != weight._version:
            with torch.no_grad():
                cached = (weakref.ref(weight, lambda _, key=id(weight): _COLUMN_SUMS.pop(key, None)),
                          weight._version, weight.detach().sum(0))
            _COLUMN_SUMS[id(weight)] = cached
        column_sum = cached[2]
    return lambda values, focus: head_input_loss(pre_head(values), weight.detach(), focus, config.mode, column_sum)


# ----------------------------------------------------------------------------- linear heads, in closed form
def linear_layers(head: nn.Module, trainable: Mapping[str, Tensor], prefix: str) -> dict[str, nn.Linear] | None:
    """The head's ``nn.Linear`` layers holding selected parameters (local names), when every selected parameter
    is such a layer's weight or bias; else None (the batched ``vmap`` path runs instead)."""
    layers: dict[str, nn.Linear] = {}
    for name, module in head.named_modules():
        own = [f"{prefix}{name}.{p}" if name else f"{prefix}{p}" for p, _ in module.named_parameters(recurse=False)]
        if any(n in trainable for n in own):
            if not isinstance(module, nn.Linear):
                return None
            layers[name] = module
    return layers or None


def refine_linear_head(head: nn.Module, layers: Mapping[str, nn.Linear], trainable: Mapping[str, Tensor],
                       prefix: str, x: Tensor, focus: Tensor, config,
                       intended: list[Tensor] | None = None) -> Tensor | None:
    """Refined logits [B, C] of B inputs [B, ...] of a head whose selected parameters are Linear layers, each input
    with its own SGD steps, without a per-input copy of any weight.

    One input's gradient of a Linear layer's weight is the outer product delta x^T (delta: the loss's
    gradient at the layer's output, x: its input), so after the step the layer computes
    W x' + b - eta delta (x . x' + 1) on a new input x'. Every delta of the batch comes from one
    ordinary backward (the inputs never meet in the head), ||g||^2 = sum |delta|^2 (|x|^2 + 1), and
    every refined forward is a shared matrix product plus rank-one terms. None when a layer runs more
    than once per forward or on inputs that are not [B, features] (the batched ``vmap`` path runs instead).
    """
    from .gate import widen
    from .losses import focus_loss
    from .step import grad_enabled

    kinds = {name: (f"{prefix}{name}.weight" in trainable if name else f"{prefix}weight" in trainable,
                    f"{prefix}{name}.bias" in trainable if name else f"{prefix}bias" in trainable)
             for name in layers}
    updates: dict[str, list[tuple[Tensor, Tensor, Tensor]]] = {name: [] for name in layers}  # (x, delta, eta)
    seen: dict[str, tuple[Tensor, Tensor]] = {}  # this forward: each layer's (input, output)

    def hook(name):
        def correct(module, args, out):
            x_new = args[0]
            if x_new.dim() != 2:
                raise _NotLinear
            use_w, use_b = kinds[name]
            if torch.is_grad_enabled() and not out.requires_grad:  # a weight that asks for no gradient (offloaded)
                out = out.detach().requires_grad_(True)
            for x_old, delta, eta in updates[name]:
                dot = (x_old * x_new).sum(1, keepdim=True) if use_w else 0.0
                out = out - eta[:, None] * delta * (dot + (1.0 if use_b else 0.0))
            if name in seen:
                raise _NotLinear  # the layer ran twice in one forward: its gradient is no longer one outer product
            seen[name] = (x_new, out)
            return out.clone()  # what follows may act in place (ReLU(inplace=True)): the kept output stays the layer's
        return correct

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    try:
        with grad_enabled():
            for _ in range(config.steps):
                seen.clear()
                logits = widen(head(x.detach()).reshape(x.shape[0], -1))
                loss = focus_loss(logits, focus, config.mode).sum()
                outs = {name: seen[name] for name in layers if name in seen}
                grads = torch.autograd.grad(loss, [o for _, o in outs.values()], allow_unused=True)
                sq = torch.zeros(x.shape[0], dtype=logits.dtype, device=logits.device)
                pending = {}
                for (name, (x_in, _)), g in zip(outs.items(), grads):
                    if g is None:
                        continue
                    use_w, use_b = kinds[name]
                    g, x_in = g.detach(), x_in.detach()
                    sq = sq + g.pow(2).sum(1) * ((x_in.pow(2).sum(1) if use_w else 0.0) + (1.0 if use_b else 0.0))
                    pending[name] = (x_in, g)
                if config.step_rule == "fixed":
                    eta = torch.full_like(sq, config.lr)
                else:
                    eta = torch.where(sq > 0, config.tau / sq, torch.zeros_like(sq))
                for name, (x_in, g) in pending.items():
                    updates[name].append((x_in, g, eta.to(g.dtype)))
                if intended is not None:
                    intended.append((eta * sq).detach().double().cpu())
        with torch.no_grad():
            seen.clear()
            return head(x).reshape(x.shape[0], -1)
    except _NotLinear:
        return None
    finally:
        for handle in handles:
            handle.remove()


class _NotLinear(Exception):
    """The closed form does not apply to this head (it falls back to vmap)."""
