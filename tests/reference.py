"""Algorithm 1 written straight from the method, for the tests to compare every fast path against,
and the float64 tiny models those comparisons run on.

Why float64: several steps at a large rate amplify float32 rounding, and the rounding of two correct
implementations depends on the CPU's kernels and the thread count (issue 8). In float64 the same
comparisons agree to ~1e-14, so they can be held to 1e-10 and a real bug (a wrong rate, a parameter
counted twice, a step skipped: differences of 1e-3 or more) cannot hide in the tolerance.
"""
import copy

import torch
from torch import nn

from focus_decoding.resources.models import tiny_causal_lm

RTOL = ATOL = 1e-10  # float64 comparisons of a fast path with the reference


# ----------------------------------------------------------------------------- the method, naively
def naive_loss(logits, focus, mode):
    """The loss on raw logits [C]: iFo = -mean(focus logits), doFo = +mean(all other logits),
    entropy = -sum p log p of softmax(logits)."""
    if mode == "ifo":
        return -logits[focus].mean()
    if mode == "entropy":
        p = torch.softmax(logits, dim=-1)
        p = p[p > 0]  # 0 log 0 = 0
        return -(p * torch.log(p)).sum()
    others = torch.ones_like(logits, dtype=torch.bool)
    others[focus] = False
    return logits[others].mean()


def naive_refine(model, run, focus, mode, lr, steps=1, select=lambda name: True):
    """Deep copy in eval mode, ``torch.optim.SGD(lr, momentum=0, weight_decay=0)`` on the parameters
    whose name passes ``select``, ``steps`` steps on the focus loss over raw logits, then re-run.
    ``run(model)`` returns the logits ``[C]`` of the one input being refined.

    ``lr``: a number, or a function of the updated parameters (their ``.grad`` filled for the step
    about to be taken) returning that step's rate: the normalized rule, see ``normalized_lr``.
    """
    clone = copy.deepcopy(model).eval()
    params = [p for name, p in clone.named_parameters() if select(name)]  # a tied tensor appears once
    opt = torch.optim.SGD(params, lr=0.0 if callable(lr) else lr, momentum=0, weight_decay=0)
    for _ in range(steps):
        opt.zero_grad()
        naive_loss(run(clone), focus, mode).backward()
        if callable(lr):
            opt.param_groups[0]["lr"] = float(lr(params))
        opt.step()
    with torch.no_grad():
        return run(clone)


def normalized_lr(tau):
    """The normalized rule for ``naive_refine``: each step's rate is tau / ||g||^2 of that step's gradient,
    summed over the parameters SGD updates (each tensor once); 0 for a zero gradient."""
    def lr(params):
        sq = sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None)
        return tau / sq if sq > 0 else 0.0
    return lr


def first_step_eta(model, run, focus, mode, tau, select=lambda name: True):
    """tau / ||g||^2 for the first step, by plain autograd on a deep copy (the rate of a one-step refinement)."""
    clone = copy.deepcopy(model).eval()
    params = [p for name, p in clone.named_parameters() if select(name)]
    grads = torch.autograd.grad(naive_loss(run(clone), focus, mode), params, allow_unused=True)
    sq = sum(float(g.pow(2).sum()) for g in grads if g is not None)
    assert sq > 0, "zero gradient: the test input is degenerate"
    return tau / sq


def config_rate(model, run, focus, config, select=lambda name: True):
    """The rate ``naive_refine`` takes for ``config``: its fixed lr; under the normalized rule tau / ||g||^2
    by hand, for the one step, or recomputed at every step when there are several."""
    if config.step_rule == "fixed":
        return config.lr
    if config.steps == 1:
        return first_step_eta(model, run, focus, config.mode, config.tau, select)
    return normalized_lr(config.tau)


# ----------------------------------------------------------------------------- float64 tiny models
class ExactRMSNorm(nn.Module):
    """RMSNorm in the input's own dtype, holding the original module's weight (same Parameter).

    transformers' LlamaRMSNorm / Qwen2RMSNorm compute in float32 whatever the model's dtype, which
    would put float32 rounding back into a float64 model; this is the same formula without it.
    """

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.variance_epsilon = weight, eps

    def forward(self, hidden):
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class ExactGemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm (scale 1 + weight) in the input's own dtype, holding the original module's weight."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, hidden):
        return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def tiny_lm64(arch="llama", *, tied=True, layers=4, attn=None, seed=0):
    """``tiny_causal_lm(...).double()`` with no float32 islands, for exact comparisons.

    Llama/Qwen2 norms are swapped for ``ExactRMSNorm`` (Gemma-3's for ``ExactGemmaRMSNorm``), and their default
    attention is sdpa (the eager Llama/Qwen2/Gemma attention takes its softmax in float32). GPT-2's eager attention stays in float64 and
    is the default there (transformers 4.46's sdpa mask for padded GPT-2 inputs overflows in float64).
    What stays float32 is the rotary table, a function of the positions alone, computed identically
    by every path.
    """
    attn = attn or ("eager" if arch == "gpt2" else "sdpa")
    model = tiny_causal_lm(arch, tied=tied, layers=layers, attn=attn, seed=seed).double()
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            parent, _, child = name.rpartition(".")
            exact = (ExactGemmaRMSNorm(module.weight, module.eps) if "Gemma" in type(module).__name__
                     else ExactRMSNorm(module.weight, module.variance_epsilon))
            setattr(model.get_submodule(parent), child, exact)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    return model


def assert_exact(actual, expected, what=""):
    """Equal up to float64 rounding (see the module docstring)."""
    assert actual.dtype == expected.dtype == torch.float64, (actual.dtype, expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}\n{m}")
