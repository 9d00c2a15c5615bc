"""Models dispatched by accelerate with offloaded weights (``device_map`` with ``"cpu"``/``"disk"`` entries,
``cpu_offload``, ``dispatch_model``, ``load_checkpoint_and_dispatch``).

Such a model keeps its weights on the ``meta`` device and an ``AlignDevicesHook`` writes the stored
weights into each module just before it runs, which would both break a functional call (it cannot
wrap a plain tensor as a parameter) and silently replace the step's values. On a *view*
(``views.module_view`` calls ``prepare_view``) each offloading hook is swapped for a copy that only
moves inputs and outputs, and a forward pre-hook of our own loads the module's stored weights
(``weights_map``, onto its execution device) where nothing was substituted, putting ``meta`` back
after the module ran. The user's model, its hooks and the offload files are never written. The
selected parameters of an offloaded module are loaded once, for the step to update
(``materialize``): ``params="all"`` on an offloaded model therefore holds the whole model on the
execution device while a refinement runs.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def _hooks(module: nn.Module) -> list:
    """accelerate hooks on ``module`` (one, or the parts of a SequentialHook)."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", None) or [hook])


def _offloading(hook) -> bool:
    return bool(getattr(hook, "offload", False)) and getattr(hook, "weights_map", None) is not None


SOURCES = "_focus_offload_sources"  # where a prepared view keeps them (its own hooks no longer offload)


def is_offloaded(model: nn.Module) -> bool:
    """Whether accelerate offloads any of ``model``'s weights (they sit on ``meta`` between forwards)."""
    return bool(_sources(model))


def _sources(model: nn.Module) -> dict[str, tuple[object, str, object]]:
    """Module name -> (weights_map, key prefix inside it, execution device) of the hook that stores its weights."""
    if SOURCES in model.__dict__:
        return model.__dict__[SOURCES]
    owners = [(name, h) for name, m in model.named_modules() for h in _hooks(m) if _offloading(h)]
    out = {}
    for name, _ in model.named_modules():
        for owner, hook in owners:
            inside = name == owner or (getattr(hook, "place_submodules", False)
                                       and (owner == "" or name.startswith(owner + ".")))
            if inside:
                rel = name[len(owner) + 1:] if owner and name != owner else ("" if name == owner else name)
                out[name] = (hook.weights_map, f"{rel}." if rel else "", hook.execution_device)
    return out


def _device(device) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def prepare_view(view: nn.Module) -> None:
    """Make a view of an offloaded model load its own weights (see the module docstring); nothing if not offloaded."""
    sources = _sources(view)
    if not sources or SOURCES in view.__dict__:  # not offloaded, or a view of a prepared view (its hooks came along)
        return
    view.__dict__[SOURCES] = sources
    for module in view.modules():
        hooks = _hooks(module)
        if any(_offloading(h) for h in hooks):
            quiet = []
            for h in hooks:
                h = copy.copy(h)
                if _offloading(h):
                    h.offload = False  # moves inputs and outputs, never writes weights
                quiet.append(h)
            if len(quiet) == 1:
                module.__dict__["_hf_hook"] = quiet[0]
            else:
                hook = copy.copy(module._hf_hook)
                hook.hooks = quiet
                module.__dict__["_hf_hook"] = hook
    for name, module in view.named_modules():
        if name in sources and any(t.is_meta for t in (*module._parameters.values(), *module._buffers.values())
                                   if t is not None):
            _load_around(module, *sources[name])


def _load_around(module: nn.Module, weights_map, prefix: str, device) -> None:
    """Forward hooks on ``module`` (a view's): load its stored tensors that are still ``meta`` before, restore after."""
    put_back: list[tuple[dict, str, Tensor]] = []

    def load(mod, args):
        for registry in (mod._parameters, mod._buffers):
            for key, tensor in list(registry.items()):
                if tensor is not None and tensor.is_meta and f"{prefix}{key}" in weights_map:
                    put_back.append((registry, key, tensor))
                    registry[key] = weights_map[f"{prefix}{key}"].to(_device(device))

    def restore(mod, args, output):
        while put_back:
            registry, key, tensor = put_back.pop()
            registry[key] = tensor

    module.register_forward_pre_hook(load)
    module.register_forward_hook(restore)


def materialize(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` (canonical parameter names) with every ``meta`` one loaded from its offload store (read, never written)."""
    if not any(t.is_meta for t in tensors.values()):
        return tensors
    sources = _sources(model)
    out = {}
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        if tensor.is_meta and owner in sources:
            weights_map, prefix, device = sources[owner]
            tensor = weights_map[f"{prefix}{leaf}"].to(_device(device))
        out[name] = tensor
    return out
