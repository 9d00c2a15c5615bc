"""What a user would run instead of focus on shifted images: test-time BatchNorm and TENT (Wang et al., ICLR 2021).

Both are batch methods over a test stream (they need many images at once), so they live here and not
in the package's per-input API. The one-input form of TENT's objective is the package's own
``FocusConfig(mode="entropy")``.

- **test-time BN** (``batch_norm_copy``): every BatchNorm layer normalises with the statistics of the
  test batch instead of its running ones; no gradient step.
- **TENT** (``Tent``): online over the stream; for each batch the model predicts with test-batch
  statistics, then takes one Adam step (lr chosen on dev; betas 0.9/0.999, no weight decay, as
  TENT's reference code) on the batch's mean softmax entropy, updating the BatchNorm affine
  parameters only. On a network without BatchNorm (ccexam's MNISTNet) the same with every
  parameter updated ("TENT-all"). Dropout stays off: unlike the reference code (``model.train()``),
  only the BatchNorm layers run in training mode, so predictions are not randomly thinned.

``frozen_copy`` gives the model a batch was predicted with as an eval-mode copy (its parameters and
that batch's statistics), so that a per-image method (focus) can run on top and its unrefined
logits are exactly the batch method's.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

BATCH = 128  # TENT's batch on CIFAR; ImageNet's was 64


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batch_statistics(model: nn.Module, x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per BatchNorm layer, (mean, biased variance) of its input when ``model`` normalises with batch statistics."""
    layers, stats = bn_layers(model), []
    work = copy.deepcopy(model).eval()
    for layer in bn_layers(work):
        layer.train()  # normalise with the batch's statistics (what the hooks read is the same)
        layer.register_forward_pre_hook(lambda m, args: stats.append(
            (args[0].mean(dim=[d for d in range(args[0].dim()) if d != 1]),
             args[0].var(dim=[d for d in range(args[0].dim()) if d != 1], unbiased=False))))
    with torch.no_grad():
        work(x)
    assert len(stats) == len(layers)
    return stats


def batch_norm_copy(model: nn.Module, x: Tensor, stats: list[tuple[Tensor, Tensor]] | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` whose BatchNorm layers hold ``x``'s batch statistics (test-time BN)."""
    stats = batch_statistics(model, x) if stats is None else stats
    out = copy.deepcopy(model).eval()
    for layer, (mean, var) in zip(bn_layers(out), stats):
        layer.running_mean = mean.clone()
        layer.running_var = var.clone()
    return out


class Tent:
    """TENT over a test stream: ``predict(x)`` gives this batch's logits, then adapts on it (one Adam step)."""

    def __init__(self, model: nn.Module, lr: float):
        self.model = copy.deepcopy(model).eval()
        self.has_bn = bool(bn_layers(self.model))
        self.model.requires_grad_(not self.has_bn)  # TENT-all where there is no BatchNorm
        for layer in bn_layers(self.model):
            layer.requires_grad_(True)
            layer.track_running_stats, layer.running_mean, layer.running_var = False, None, None  # batch statistics
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)

    def predict(self, x: Tensor) -> Tensor:
        """Logits of ``x`` with the current parameters (batch statistics), then one entropy step on them."""
        with torch.enable_grad():
            logits = self.model(x)
            logp = torch.log_softmax(logits, -1)
            loss = -(logp.exp() * logp).sum(-1).mean()
            self.opt.zero_grad()
            loss.backward()
        out = logits.detach()
        self.opt.step()
        return out

    def frozen_copy(self, x: Tensor) -> nn.Module:
        """The model ``predict(x)`` is about to use, as an eval-mode copy with ``x``'s batch statistics."""
        frozen = copy.deepcopy(self.model)
        for layer in bn_layers(frozen):
            layer.track_running_stats = True
            layer.register_buffer("running_mean", torch.zeros(layer.num_features, dtype=x.dtype))
            layer.register_buffer("running_var", torch.ones(layer.num_features, dtype=x.dtype))
        frozen.requires_grad_(True)
        return batch_norm_copy(frozen, x)
