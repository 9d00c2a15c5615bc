"""Algorithm 1 written straight from the method, for the tests to compare every fast path against."""
import copy

import torch


def naive_refine(model, run, focus, mode, lr, steps=1, select=lambda name: True):
    """Deep copy in eval mode, ``torch.optim.SGD(lr, momentum=0, weight_decay=0)`` on the parameters
    whose name passes ``select``, ``steps`` steps on the focus loss over raw logits, then re-run.
    ``run(model)`` returns the logits ``[C]`` of the one input being refined."""
    clone = copy.deepcopy(model).eval()
    params = [p for name, p in clone.named_parameters() if select(name)]
    opt = torch.optim.SGD(params, lr=lr, momentum=0, weight_decay=0)
    for _ in range(steps):
        opt.zero_grad()
        logits = run(clone)
        if mode == "ifo":
            loss = -logits[focus].mean()
        else:
            others = torch.ones_like(logits, dtype=torch.bool)
            others[focus] = False
            loss = logits[others].mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return run(clone)
