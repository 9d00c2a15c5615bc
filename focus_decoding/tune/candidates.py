"""The candidates ``tune`` compares: every (params, mode, step) combination, one shared gate, and what each costs.

The threshold and ``n_focus`` are shared, so every candidate is gated identically and refines the
very same uncertain tokens: the comparisons are paired. ``refinement_cost`` says what one refinement
costs relative to a full-model one (the cached ``last:N`` path runs N of L blocks).
"""
from __future__ import annotations

from typing import Any, Sequence

from ..config import FocusConfig
from ..method import find_blocks
from ..method.tail import TAIL, shortcut

DEFAULT_MODES = ("ifo",)
# Defaults from docs/results.md (SmolLM2-135M, three corpora): lr 1e-2 was harmful on every corpus and
# 1e-5 changed nothing; tau 0.3 and 1 bracket lr 1e-4 and 1e-3 at last:2's median ||g||^2 and carry over
# to other models; "all" costs 17x last:2 per refinement and showed no gain there.
DEFAULT_LRS = (1e-4, 1e-3)
DEFAULT_TAUS: tuple[float, ...] = (0.3, 1.0)
DEFAULT_PARAMS = ("last:2",)


def candidate_grid(*, modes: Sequence[str] = DEFAULT_MODES, params: Sequence[Any] = DEFAULT_PARAMS,
                   lrs: Sequence[float] = DEFAULT_LRS, taus: Sequence[float] = DEFAULT_TAUS,
                   threshold: float = 0.04, n_focus: int = 2, steps: int = 1,
                   precision: str = "float32") -> list[FocusConfig]:
    """Every (params, mode, step) combination as a FocusConfig, in the order given, duplicates dropped."""
    steps_ = [{"lr": lr} for lr in lrs] + [{"step_rule": "normalized", "tau": tau} for tau in taus]
    if not modes or not params or not steps_:
        raise ValueError("the tuning grid needs at least one mode, one params selector and one lr or tau")
    out: list[FocusConfig] = []
    for selector in params:
        for mode in modes:
            for step in steps_:
                cfg = FocusConfig(mode=mode, params=selector, threshold=threshold, n_focus=n_focus, steps=steps,
                                  precision=precision, **step)
                if cfg not in out:
                    out.append(cfg)
    return out


def refinement_cost(model, config: FocusConfig) -> float:
    """One refinement's cost relative to a full-model one, times steps: N/L on the cached last:N path, half a block
    (one MLP of L blocks' attention and MLP) on the tail, else 1."""
    n_top = shortcut(model, config)
    if n_top is None:
        return float(config.steps)
    _, blocks = find_blocks(model)
    return config.steps * (0.5 if n_top == TAIL else n_top) / len(blocks)


def check_candidates(candidates: Sequence[FocusConfig]) -> None:
    """ValueError unless there is a candidate and all share one gate (threshold, n_focus)."""
    if not candidates:
        raise ValueError("tuning needs at least one candidate FocusConfig")
    gates = {(c.threshold, c.n_focus) for c in candidates}
    if len(gates) > 1:
        raise ValueError("all candidates must share threshold and n_focus (one gate, paired tokens); "
                         f"got {sorted(gates)}")
