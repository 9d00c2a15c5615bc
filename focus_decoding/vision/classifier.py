"""`FocusClassifier`: an image classifier whose uncertain rows each get their own focus step.

Where the selected parameters all live in the classifier's head (``params="head"``), the step runs
through the head alone from its input kept during the first forward (``method.tail``), all uncertain
rows of a batch at once, each with its own step.

The step runs in eval mode (BatchNorm reads its running statistics and never updates them, dropout
is off) and purely functionally, on a private view of the model's module tree (``method.module_view``),
so the wrapped model is never modified, not even while a call runs: other threads may use it. Uncertain rows are
refined in chunks of ``max_batch``: ``method.refine_batched`` (``vmap`` over the per-sample ``grad`` of the
loss, a per-sample SGD update and a vmapped forward with per-sample parameters).
A chunk holds ``max_batch`` copies of the updated parameters and of their gradients plus the
activations of ``max_batch`` single-image passes, so memory grows linearly in ``max_batch``.
Modules that ``vmap`` cannot trace (data-dependent control flow, ``.item()``...) fall back, with
one warning, to a per-row loop over ``method.focus_step``; both paths give the same logits.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .. import method
from ..config import FocusConfig
from ..method import tail

METHODS = ("auto", "vmap", "loop")


def logits_of(output: Any) -> Tensor:
    """The [B, C] logits of a classifier's output (a tensor, or an object with ``.logits``)."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[-1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return 2-D logits [batch, classes>=2] (or an object with .logits); got {shape}")
    return logits


@dataclass
class ClassifierStats:
    """What the last ``FocusClassifier`` call did, in generation's vocabulary (``FocusStats``)."""

    checked: int = 0  # rows in the batch (every row is gated)
    uncertain: int = 0  # rows the gate fired for
    refined: int = 0  # uncertain rows whose finite refined logits were emitted
    changed: int = 0  # refined rows whose argmax changed
    nonfinite: int = 0  # uncertain rows whose refinement overflowed (original logits kept)
    nonfinite_inputs: int = 0  # images holding NaN/inf (never refined; warned once per classifier)
    intended: float = 0.0  # the loss decrease the steps asked for (first order), summed over the refined rows
    achieved: float = 0.0  # the loss decrease they made (see FocusStats.decrease)
    vectorized: bool = True  # the uncertain rows were refined together (False: one by one)
    head: bool = False  # the step ran through the head alone, from its kept inputs

    @property
    def total(self) -> int:
        """``checked`` (the name of earlier versions)."""
        return self.checked

    @property
    def gated(self) -> int:
        """``uncertain`` (the name of earlier versions)."""
        return self.uncertain

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _vmap_pays_off(device: torch.device) -> bool:
    """Whether ``method="auto"`` vectorises: on accelerators, not on CPU.

    On CPU (1 thread) vmap refined 0.50-1.02x as many images per second as the loop on the pretrained
    ccexam CNNs (MNISTNet, USPSNet, SVHNNet) at B = 1..64, the one exception USPSNet (151k parameters,
    16x16) at B >= 32 (1.4-1.5x), while holding 2-47x the loop's extra memory; ResNet-18 at 32x32:
    0.45x (``benchmarks/speed_vision.py``, docs/results/vision/speed_vision.md). The rule stays by device:
    no parameter count or batch size separates the one win from the losses well enough to be worth it.
    """
    return device.type != "cpu"


class FocusClassifier:
    """Wrap an image classifier so that uncertain rows get their own focus step.

    Args:
        model: any ``nn.Module`` mapping images [B, ...] to logits [B, C].
        config: a ``FocusConfig`` (or its dict); ``None`` = iFo with the method's vision defaults.
        max_batch: uncertain images refined together; bounds memory (see the module docstring).
        method: ``"auto"`` (vmap on CUDA, falling back to the loop once if vmap fails; the loop on
            CPU, where it measured faster: ``benchmarks/speed_vision.py``), ``"vmap"`` or ``"loop"``.
            The head path (below) refines all uncertain rows together unless ``"loop"``.
        through_head: when every parameter ``config.params`` selects lives in one submodule whose output
            is the model's output (``params="head"``, ``"classifier"``, ``"fc"``...), keep that
            submodule's input from the first forward and run the step through it alone: the same
            logits, a fraction of the cost. Checked on every batch (else the whole model, with one
            warning naming why). ``False`` always runs the whole model.

    Example:
        >>> import torch
        >>> from focus_decoding import FocusConfig
        >>> from focus_decoding.vision import DigitsNet, FocusClassifier
        >>> clf = FocusClassifier(DigitsNet(), FocusConfig(threshold=1.0, lr=1e-3), max_batch=4)
        >>> clf(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
        >>> clf.stats.uncertain
        3
    """

    def __init__(self, model: nn.Module, config: FocusConfig | Mapping | None = None, *,
                 max_batch: int = 8, method: str = "auto", through_head: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.model = model
        self.config = FocusConfig() if config is None else FocusConfig.coerce(config)
        self.max_batch = max_batch
        self.method = method
        self.vectorized = method != "loop"  # becomes False for good after one failed vmap under "auto"
        self.through_head = bool(through_head)
        self._head: str | bool | None = None  # the head the step runs through; False: the whole model (decided)
        self._local = threading.local()  # stats per thread: one classifier may serve several threads
        self._warned_nonfinite = False

    @property
    def stats(self) -> ClassifierStats:
        """What this thread's last call did."""
        return getattr(self._local, "stats", None) or ClassifierStats()

    def __call__(self, images: Tensor) -> Tensor:
        """Logits [B, C]: refined for rows under the threshold, unchanged for the others."""
        return self.classify(images)[1]

    def classify(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(unmodified logits, emitted logits, gate mask), all from one unmodified pass. A float16/bfloat16 model's
        emitted logits are float32 (as transformers' generation scores are)."""
        if not isinstance(images, Tensor) or images.dim() < 1:
            raise ValueError(f"images must be a tensor [batch, ...], got {type(images).__name__}")
        images = method.as_normal_tensor(images)
        cfg = self.config
        view = method.module_view(self.model)  # eval mode, private: the caller's model is never touched
        heads = self._heads_of(view) if self.through_head else []
        capture = tail.HeadCapture(view, heads) if heads else None
        with torch.no_grad(), capture or contextlib.nullcontext():  # the hook sits on the view only
            base = logits_of(view(images))
        if base.shape[0] != images.shape[0]:
            raise ValueError(f"the model returned {base.shape[0]} rows of logits for {images.shape[0]} images")
        flat = images.flatten(1) if images.dim() > 1 else images[:, None]  # flatten(1): an empty batch stays [0, n]
        bad_inputs = int((~torch.isfinite(flat)).any(-1).sum()) if images.is_floating_point() else 0
        if bad_inputs and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(f"FocusClassifier: {bad_inputs} image(s) hold NaN or inf values; their logits are not "
                          "refined and may be NaN (counted in stats.nonfinite_inputs; warned once)",
                          RuntimeWarning, stacklevel=3)
        gate = method.gate(base, cfg)
        out = method.widen(base).clone()  # float32 for a float16/bfloat16 model: a small change must not round away
        rows = gate.nonzero().flatten()
        stats = ClassifierStats(checked=base.shape[0], uncertain=int(rows.numel()), nonfinite_inputs=bad_inputs)
        if rows.numel():
            focus = method.focus_classes(base[rows], cfg.n_focus)  # validates n_focus vs classes
            trainable, frozen = method.split_parameters(view, cfg.params)
            one, inputs, closed = self._row_forward(view, images, base, capture, trainable, frozen)
            stats.head = inputs is not images
            together = not method.needs_float32(trainable, cfg)  # low precision in float32: one by one
            for start in range(0, rows.numel(), self.max_batch):
                idx = rows[start:start + self.max_batch]
                chunk, asked = focus[start:start + self.max_batch], []
                new = closed(inputs[idx], chunk, asked) if closed and together and self.method != "loop" else None
                if new is None:
                    asked = []
                    new = self._refine_chunk(one, inputs[idx], base[idx], chunk, trainable, asked,
                                             batched=together and (stats.head or self._vectorises(images.device)))
                ok = torch.isfinite(new).all(-1)
                out[idx[ok]] = new[ok].to(out.dtype)
                stats.nonfinite += int((~ok).sum())
                if ok.any():  # the decrease asked for and made, on the rows whose refinement was emitted
                    before = method.focus_loss(method.widen(base[idx[ok]]), chunk[ok], cfg.mode)
                    after = method.focus_loss(method.widen(new[ok]), chunk[ok], cfg.mode)
                    stats.achieved += float((before - after).sum())
                    stats.intended += float(sum(step.to(torch.float64) for step in asked)[ok.cpu()].sum())
        stats.refined = stats.uncertain - stats.nonfinite
        stats.changed = int((out.argmax(-1) != base.argmax(-1)).sum())
        stats.vectorized = stats.head or (self.vectorized and self._vectorises(images.device))
        self._local.stats = stats
        return base, out, gate

    # ------------------------------------------------------------------ where the step runs
    def _heads_of(self, view: nn.Module) -> list[str]:
        """The submodules the step may run through alone, smallest first ([]: the whole model), from the selection."""
        if self._head is False:
            return []
        trainable, _ = method.split_parameters(view, self.config.params)
        names = [self._head] if isinstance(self._head, str) else tail.owning_modules(view, trainable)
        if not names:
            self._head = False  # no proper submodule holds the selection: the whole model, always
        return names

    def _row_forward(self, view, images, base, capture, trainable, frozen):
        """(one-row forward ``one(values, x)``, the rows it takes, the closed-form refinement of many rows or None):
        the head from its kept inputs, or the whole model."""
        if capture is not None:
            name, kept, why = capture.choose(base)
            if name is not None:
                self._head, head, prefix = name, view.get_submodule(name), name + "."
                layers = tail.linear_layers(head, trainable, prefix)
                closed = None if layers is None else (lambda x, focus, asked: tail.refine_linear_head(
                    head, layers, trainable, prefix, x, focus, self.config, intended=asked))
                return tail.head_forward(view, name, base.shape[-1], frozen), kept, closed
            self._head = False
            warnings.warn(f"FocusClassifier: the step cannot run through {capture.names[-1]!r} alone ({why}); "
                          "using the whole model from now on", RuntimeWarning, stacklevel=4)
        frozen = dict(frozen)

        def one(values, xi):  # logits [C] of one image under its own parameter values
            xi = method.float32_like(xi, values)
            out = functional_call(view, dict(method.merged(values, frozen)), (xi.unsqueeze(0),), strict=False,
                                  tie_weights=True)
            return logits_of(out)[0]
        return one, images, None

    def _vectorises(self, device: torch.device) -> bool:
        return self.vectorized and (self.method == "vmap" or _vmap_pays_off(device))

    def _refine_chunk(self, one, x: Tensor, base: Tensor, focus: Tensor, trainable, asked: list,
                      batched: bool) -> Tensor:
        """Refined logits [k, C] of k rows: all at once (``method.refine_batched``), or one by one; ``asked``
        receives the rows' first-order decreases."""
        if batched and self.method != "loop":
            try:
                return method.refine_batched(one, trainable, focus, self.config, x, intended=asked)
            except Exception as err:  # noqa: BLE001 - any vmap limitation; a real bug re-raises in the loop
                if self.method == "vmap":
                    raise
                self.vectorized = False
                warnings.warn(f"FocusClassifier: torch.func.vmap cannot run {type(self.model).__name__} "
                              f"({type(err).__name__}: {str(err)[:200]}); using a per-sample loop from now on",
                              RuntimeWarning, stacklevel=4)
        rows, intended = [], []
        for i in range(x.shape[0]):
            xi = method.as_normal_tensor(x[i])  # slicing inside inference_mode makes an inference tensor
            step = method.focus_step(lambda values, xi=xi: one(values, xi), base[i], trainable, {}, self.config)
            rows.append(torch.full_like(base[i], float("nan")) if step.nonfinite else step.logits)  # nan: overflowed
            intended.append(step.intended)
        asked.append(torch.tensor(intended, dtype=torch.float64))
        return torch.stack(rows)
