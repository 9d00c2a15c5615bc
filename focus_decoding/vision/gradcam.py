"""GradCAM before and after the focus step: where the classifier looks, for its uncertain images.

Needs the optional ``grad-cam`` package (``pip install "focus-decoding[gradcam]"``; import name
``pytorch_grad_cam``). For each uncertain image the class-activation map of the top class is
computed twice: on the model's own parameters, and on the parameters of that image's focus step,
computed by ``method.sgd_steps`` on ``method.focus_loss`` exactly as ``FocusClassifier`` does. GradCAM
needs a module to hook; it gets a ``method.module_view`` of the model whose parameters are new
``nn.Parameter`` objects sharing storage with the chosen values (``requires_grad`` off; only the
input asks for a gradient), so hooks, ``zero_grad`` and ``backward`` stay on the view and the
user's model is never modified.

Example:
    >>> from focus_decoding import FocusConfig
    >>> from focus_decoding.vision import load_classifier, load_image_dataset
    >>> model, data = load_classifier("ccexam-usps"), load_image_dataset("mnist16")  # doctest: +SKIP
    >>> pairs = gradcam_pairs(model, data, FocusConfig(threshold=0.2, lr=2.56e-4), n=6)  # doctest: +SKIP

The figure and its JSON are the command line's (``cli.figures.write_gradcam``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from .. import method
from ..config import FocusConfig
from .classifier import logits_of


def require_gradcam():
    """The ``pytorch_grad_cam`` module, or an ImportError saying how to install it."""
    try:
        import pytorch_grad_cam
    except ImportError as err:
        raise ImportError("GradCAM figures need the grad-cam package: pip install 'focus-decoding[gradcam]' "
                          "(or pip install grad-cam)") from err
    return pytorch_grad_cam


# ----------------------------------------------------------------------------- parameters and views
def refined_parameters(view: nn.Module, image: Tensor, base: Tensor, config: FocusConfig) -> dict[str, Tensor]:
    """Every parameter value (by canonical name) after ``image``'s focus step; ``base`` = its unrefined logits [C].

    ``method.refined_values`` is what ``method.refine`` (which ``FocusClassifier`` runs) steps with.
    """
    trainable, frozen = method.split_parameters(view, config.params)
    forward = method.model_forward(view, method.as_normal_tensor(image), select=lambda out: logits_of(out)[0])
    return {**frozen, **method.refined_values(forward, trainable, frozen, method.focus_classes(base, config.n_focus), config)}


class _Logits(nn.Module):
    """``logits_of(inner(x))``: GradCAM's targets index a plain [B, C] tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.inner(x))


def bound_view(model: nn.Module, values: Mapping[str, Tensor] | None = None) -> nn.Module:
    """A ``module_view`` of ``model`` whose parameters hold ``values`` (default: the model's own).

    Each parameter becomes a new ``nn.Parameter`` sharing the value's storage, with ``requires_grad``
    off, so a library that calls ``zero_grad``/``backward`` on it never reaches ``model``'s tensors.
    Tied weights stay tied (one Parameter for all its names).
    """
    view = method.module_view(model)
    canonical = {id(p): name for name, p in view.named_parameters()}
    values = dict(values or {})
    made: dict[str, nn.Parameter] = {}
    for alias, p in list(view.named_parameters(remove_duplicate=False)):
        name = canonical[id(p)]
        if name not in made:
            made[name] = nn.Parameter(values.get(name, p).detach(), requires_grad=False)
        owner, _, leaf = alias.rpartition(".")
        view.get_submodule(owner)._parameters[leaf] = made[name]  # the view's own registry (module_view copied it)
    return view


def default_target_layer(model: nn.Module) -> str:
    """Name of the last ``nn.Conv2d`` (GradCAM's usual choice: the last spatial feature map)."""
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer; pass target_layer= the name of a module "
                         "whose output is a [B, C, H, W] feature map")
    return convs[-1]


def class_activation_maps(view: nn.Module, images: Tensor, classes: Iterable[int], target_layer: str) -> np.ndarray:
    """GradCAM maps [N, H, W] (each scaled to [0, 1], at the image's size) of ``classes`` on ``view``."""
    require_gradcam()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = view.get_submodule(target_layer)
    with method.grad_enabled(), GradCAM(model=_Logits(view), target_layers=[layer]) as cam:
        # the input is the only leaf asking for a gradient: the hooked activations need one, parameters don't
        x = images.detach().clone().requires_grad_(True)
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])


# ----------------------------------------------------------------------------- uncertain images
@dataclass
class CamPair:
    """One uncertain image, its prediction and GradCAM map before and after its focus step."""

    index: int  # position in the scanned data
    label: int
    before: list[tuple[int, float]]  # top-2 (class, probability) of the unrefined prediction
    after: list[tuple[int, float]]  # top-2 (class, probability) after the step
    image: Tensor = field(repr=False)  # [C, H, W], as fed to the model
    cam_before: np.ndarray = field(repr=False)  # [H, W] in [0, 1]: top class before, original parameters
    cam_after: np.ndarray = field(repr=False)  # [H, W] in [0, 1]: top class after, refined parameters

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields (no arrays)."""
        return {k: v for k, v in asdict(self).items() if k not in ("image", "cam_before", "cam_after")}


def _top2(logits: Tensor) -> list[tuple[int, float]]:
    p = torch.softmax(method.widen(logits.detach()), -1).topk(2)
    return [(int(c), float(v)) for c, v in zip(p.indices, p.values)]


def _batches(data: Any, batch_size: int):
    """(images, labels) batches from a DataLoader / iterable of pairs, or a Dataset of (image, label) items."""
    from torch.utils.data import DataLoader, Dataset

    return DataLoader(data, batch_size=batch_size, shuffle=False) if isinstance(data, Dataset) else data


def gradcam_pairs(model: nn.Module, data: Any, config: FocusConfig | Mapping | None = None, *, n: int = 8,
                  target_layer: str | None = None, batch_size: int = 64) -> list[CamPair]:
    """GradCAM before/after the step for the first ``n`` uncertain images of ``data`` (finite refinements only).

    ``data``: a Dataset of (image, label) or an iterable of (images, labels) batches. ``target_layer``:
    a module name of ``model`` (default: its last Conv2d). ``model`` is never modified.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    cfg = FocusConfig() if config is None else FocusConfig.coerce(config)
    layer = target_layer or default_target_layer(model)
    view, device = method.module_view(model), next(model.parameters()).device
    before_view = bound_view(model)  # one for every image: GradCAM's hooks leave with its context
    pairs, seen = [], 0
    for images, labels in _batches(data, batch_size):
        images = method.as_normal_tensor(images.to(device))
        with torch.no_grad():
            base = logits_of(view(images))
        gate = method.gate(base, cfg)  # FocusClassifier's gate
        for i in gate.nonzero().flatten().tolist():
            pair = _pair(model, view, before_view, images[i:i + 1], int(labels[i]), base[i], cfg, layer, seen + i)
            if pair is not None:  # an overflowed refinement has no map to show (FocusClassifier keeps the base)
                pairs.append(pair)
            if len(pairs) == n:
                return pairs
        seen += images.shape[0]
    return pairs


def _pair(model: nn.Module, view: nn.Module, before_view: nn.Module, image: Tensor, label: int, base: Tensor,
          cfg: FocusConfig, layer: str, index: int) -> CamPair | None:
    """Refine one image (on ``view``) and compute both maps; None if the refined logits overflow."""
    after_view = bound_view(model, refined_parameters(view, image, base, cfg))
    with torch.no_grad():
        after = logits_of(after_view(image))[0]
    if not bool(torch.isfinite(after).all()):
        return None
    before_top, after_top = _top2(base), _top2(after)
    cam_b = class_activation_maps(before_view, image, [before_top[0][0]], layer)[0]
    cam_a = class_activation_maps(after_view, image, [after_top[0][0]], layer)[0]
    return CamPair(index, label, before_top, after_top, image[0].detach().cpu(), cam_b, cam_a)
