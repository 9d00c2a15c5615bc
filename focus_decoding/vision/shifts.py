"""Distribution shifts of MNIST at two severities, from torchvision's maintained transforms where it has one.

Every shift maps float images [N, C, H, W] in [0, 1] to the same shape and range. The random ones
draw from ``torch.Generator().manual_seed(SEED + 100 * shift index + 10 * severity + split index)``
(splits train 0, validation 1, test 2), so every run and process sees the same images and each split
its own draw. Severity 1 is mild, 2 strong; the levels follow MNIST-C (Mu & Gilmer, 2019) where it
has the corruption, scaled so MNISTNet keeps most of its accuracy at 1 and clearly loses at 2.

=========  ==========================================================  =========================
shift      what                                                        severity 1 / 2
=========  ==========================================================  =========================
noise      additive Gaussian noise (``v2.functional.gaussian_noise``)  sigma 0.25 / 0.4
blur       Gaussian blur (``v2.functional.gaussian_blur``, kernel      sigma 1.0 / 1.5 pixels
           2 ceil(3 sigma) + 1, reflect padding)
contrast   x -> m + c (x - m), m the image mean                        c 0.4 / 0.25
           (``v2.functional.adjust_contrast``)
shot       Poisson (shot) noise: poisson(lambda x) / lambda            lambda 3 / 1.5
impulse    salt and pepper: a share of pixels set to 0 or 1            0.04 / 0.1
motion     horizontal motion blur: the mean of a line of pixels        length 5 / 9
rotate     rotation by +-angle, the sign drawn per image               20 / 40 degrees
           (``v2.functional.rotate``, bilinear)
shear      horizontal shear by +-angle, the sign drawn per image       20 / 35 degrees
           (``v2.functional.affine``, bilinear)
=========  ==========================================================  =========================
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SHIFTS = {"noise": (0.25, 0.4), "blur": (1.0, 1.5), "contrast": (0.4, 0.25), "shot": (3.0, 1.5),
          "impulse": (0.04, 0.1), "motion": (5, 9), "rotate": (20.0, 40.0), "shear": (20.0, 35.0)}
SPLITS = ("train", "validation", "test")
SEED = 20_240


def generator(shift: str, severity: int, split: str) -> torch.Generator:
    """The seeded random source of one (shift, severity, split): the same images in every run."""
    return torch.Generator().manual_seed(SEED + 100 * list(SHIFTS).index(shift) + 10 * severity
                                         + SPLITS.index(split))


def shift_images(images: Tensor, shift: str, severity: int, split: str) -> Tensor:
    """``images`` under ``shift`` at ``severity`` 1 or 2 (see the module docstring); ``split`` seeds the random ones."""
    from torchvision.transforms.v2 import functional as F

    if shift not in SHIFTS or severity not in (1, 2):
        raise ValueError(f"shift must be one of {tuple(SHIFTS)} with severity 1 or 2, got {shift!r}, {severity!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    level, gen = SHIFTS[shift][severity - 1], generator(shift, severity, split)
    if shift == "noise":
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator: seed a private copy
            torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=gen)))
            return F.gaussian_noise(images, sigma=level, clip=True)
    if shift == "blur":
        size = 2 * math.ceil(3 * level) + 1
        return F.gaussian_blur(images, [size, size], [level, level])
    if shift == "contrast":
        return F.adjust_contrast(images, level)
    if shift == "shot":
        return (torch.poisson(images * level, generator=gen) / level).clamp_(0.0, 1.0)
    if shift == "impulse":
        u = torch.rand(images.shape, generator=gen)
        return torch.where(u < level / 2, 0.0, torch.where(u > 1 - level / 2, 1.0, images))
    if shift == "motion":
        kernel = torch.full((images.shape[1], 1, 1, level), 1.0 / level, dtype=images.dtype)
        padded = nn.functional.pad(images, (level // 2, level // 2, 0, 0), mode="replicate")
        return nn.functional.conv2d(padded, kernel, groups=images.shape[1]).clamp_(0.0, 1.0)
    signs = torch.randint(0, 2, (len(images),), generator=gen) * 2 - 1
    out = torch.empty_like(images)
    for sign in (-1, 1):
        idx = (signs == sign).nonzero().flatten()
        if shift == "rotate":
            out[idx] = F.rotate(images[idx], sign * level, interpolation=F.InterpolationMode.BILINEAR)
        else:
            out[idx] = F.affine(images[idx], angle=0.0, translate=[0, 0], scale=1.0, shear=[sign * level, 0.0],
                                interpolation=F.InterpolationMode.BILINEAR)
    return out.clamp_(0.0, 1.0)
