"""GradCAM before/after the focus step on a tiny CNN: shapes, the refined parameters, the model left alone."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from focus_decoding import FocusConfig

try:  # the optional grad-cam extra; CI installs it
    import pytorch_grad_cam  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("needs the grad-cam package: pip install 'focus-decoding[gradcam]'", allow_module_level=True)

from focus_decoding import method  # noqa: E402
from focus_decoding.vision.gradcam import (bound_view, class_activation_maps, default_target_layer,  # noqa: E402
                                    gradcam_pairs, refined_parameters)
from focus_decoding.cli.figures import write_gradcam  # noqa: E402
from focus_decoding.vision import FocusClassifier  # noqa: E402

pytestmark = pytest.mark.vision
STEP = FocusConfig(threshold=1.0, lr=0.5)  # every image refined, a step that moves the logits


class TinyCNN(nn.Module):
    """Conv-BN-ReLU-Conv-ReLU, global pooling, linear head: 10 classes on 1x8x8 images."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    model.features[1].running_mean.uniform_(-0.2, 0.2)  # eval-mode BatchNorm must matter
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([0, 1, 2, 3])


def test_maps_have_the_image_shape_and_follow_the_step(tiny, assert_untouched):
    model, x, y = tiny
    check = assert_untouched(model)
    pairs = gradcam_pairs(model, [(x, y)], STEP, n=4)
    check()
    assert [p.index for p in pairs] == [0, 1, 2, 3]
    for p in pairs:
        assert p.cam_before.shape == p.cam_after.shape == x.shape[-2:]
        assert p.before != p.after  # the step changed the probabilities ...
        assert not np.allclose(p.cam_before, p.cam_after, atol=1e-3)  # ... and where the network looks


def test_a_null_step_gives_the_same_map(tiny):
    model, x, y = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "focus step changed no parameter"
        pairs = gradcam_pairs(model, [(x, y)], FocusConfig(threshold=1.0, lr=1e-30), n=2)
    for p in pairs:
        np.testing.assert_array_equal(p.cam_before, p.cam_after)


def test_refined_parameters_are_the_classifiers(tiny):
    """The after-map's module computes the very logits FocusClassifier emits (loop: bitwise; vmap: fp32)."""
    model, x, _ = tiny
    for path, exact in (("loop", True), ("vmap", False)):
        base, out, _ = FocusClassifier(model, STEP, method=path).classify(x)
        for i in range(x.shape[0]):
            view = bound_view(model, refined_parameters(method.module_view(model), x[i:i + 1], base[i], STEP))
            with torch.no_grad():
                mine = view(x[i:i + 1])[0]
            if exact:
                assert torch.equal(mine, out[i])
            else:
                torch.testing.assert_close(mine, out[i], rtol=1e-5, atol=1e-5)


def test_model_grads_and_hooks_survive(tiny):
    """GradCAM calls zero_grad and backward on its module: neither may reach the model's own tensors."""
    model, x, y = tiny
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    hooks = [dict(m._forward_hooks) for m in model.modules()]
    with torch.inference_mode():  # a caller without autograd
        gradcam_pairs(model, [(x, y)], STEP, n=2)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert [dict(m._forward_hooks) for m in model.modules()] == hooks


def test_bound_view_shares_storage_and_keeps_ties():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight  # tied
    value = torch.randn(5, 3)
    view = bound_view(model, {"0.weight": value})
    assert view[0].weight is view[1].weight and view[0].weight.data_ptr() == value.data_ptr()
    assert not view[0].weight.requires_grad and model[0].weight is model[1].weight
    assert not torch.equal(model[0].weight, value)


def test_class_activation_maps_on_a_given_class(tiny):
    model, x, _ = tiny
    layer = default_target_layer(model)
    assert layer == "features.3"
    maps = class_activation_maps(bound_view(model), x, [0, 1, 2, 3], layer)
    assert maps.shape == (4, 8, 8) and 0.0 <= maps.min() and maps.max() <= 1.0


def test_write_gradcam_files(tiny, tmp_path):
    model, x, y = tiny
    paths = write_gradcam(model, [(x, y)], STEP, tmp_path, n=3)
    assert paths["png"].stat().st_size > 1000
    info = json.loads(paths["json"].read_text())
    assert len(info["images"]) == 3 and info["target_layer"] == "features.3"
    assert info["images"][0]["label"] == 0 and len(info["images"][0]["before"]) == 2
    with pytest.warns(RuntimeWarning, match="no uncertain image"):
        paths = write_gradcam(model, [(x, y)], FocusConfig(threshold=1e-9), tmp_path / "none", n=3)
    assert "png" not in paths and json.loads(paths["json"].read_text())["images"] == []
    with pytest.raises(ValueError, match="n must be"):
        gradcam_pairs(model, [(x, y)], STEP, n=0)


def test_missing_grad_cam_says_how_to_install(tiny, monkeypatch):
    import sys

    model, x, _ = tiny
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # as if not installed
    with pytest.raises(ImportError, match=r"focus-decoding\[gradcam\]"):
        class_activation_maps(bound_view(model), x, [0, 1, 2, 3], "features.3")


def test_picks_the_images_the_classifier_gates(tiny):
    """Only gated images, in data order, indices counted across batches."""
    model, _, _ = tiny
    x = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gaps = method.top2_gap(model(x))
    cfg = FocusConfig(threshold=float(gaps.median()), lr=0.5)  # about half the images gated
    _, _, gate = FocusClassifier(model, cfg).classify(x)
    expected = gate.nonzero().flatten().tolist()
    assert 2 <= len(expected) < 12
    batches = [(x[:5], torch.zeros(5, dtype=torch.long)), (x[5:], torch.ones(7, dtype=torch.long))]
    pairs = gradcam_pairs(model, batches, cfg, n=12)
    assert [p.index for p in pairs] == expected
    assert [p.label for p in pairs] == [int(i >= 5) for i in expected]
    assert [p.index for p in gradcam_pairs(model, batches, cfg, n=2)] == expected[:2]
