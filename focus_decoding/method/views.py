"""Private module trees: every functional call runs on a *view*, never on the user's model.

A view is a copy of the model's module tree whose modules hold the very same parameter and buffer
tensors (no copy of the weights; a few milliseconds), with their own registries, hook dicts and
train/eval flags. ``torch.func.functional_call``, forward hooks and ``eval()`` on a view never reach
the model, so other threads may use the model meanwhile.
"""
from __future__ import annotations

import collections
import functools
import inspect
import types
import weakref
from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .offload import prepare_view

Forward = Callable[[Mapping[str, Tensor]], Tensor]  # parameter values -> logits of ONE input

_VIEWS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_COPIED = (dict, set, collections.OrderedDict)


def module_view(model: nn.Module, *, eval_mode: bool = True) -> nn.Module:
    """A private copy of ``model``'s module tree that shares (never copies) its parameters and buffers.

    Each module is a new object with its own ``_parameters``/``_buffers``/``_modules``/hook dicts and
    ``training`` flag, holding the very same tensors; everything else (config, code) is shared.
    ``eval_mode``: the view runs with dropout off and BatchNorm reading (never updating) its running
    statistics, as the method's step requires.
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
    prepare_view(view)  # an accelerate-offloaded model: the view loads its own weights (method.offload)
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


def as_view(model: nn.Module) -> nn.Module:
    """``model`` itself when it is a view, else a new view of it (eval mode)."""
    return model if is_view(model) else module_view(model)


def input_device(model: nn.Module) -> torch.device:
    """Where ``model`` expects its input ids: the input embedding's execution device.

    Under accelerate's offload the weights may sit on ``meta`` while a hook moves them in; its
    ``execution_device`` is where the inputs must go. Never ``next(model.parameters())``, which may be
    ``meta`` or another GPU of a split model.
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for module in (embedding, model):
        if module is None:
            continue
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        real = next((p.device for p in module.parameters() if p.device.type != "meta"), None)
        if real is not None:
            return real
    return torch.device("cpu")


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
    from .precision import float32_like

    view = as_view(model)

    def forward(values: Mapping[str, Tensor]) -> Tensor:
        inputs = tuple(float32_like(a, values) if isinstance(a, Tensor) else a for a in args)
        return select(functional_call(view, dict(values), inputs, kwargs, tie_weights=True, strict=False))
    return forward
