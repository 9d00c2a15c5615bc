"""Next-token evaluation of the method on text: sliding windows, one forward each, refine the uncertain.

Every position of a window is predicted by one no-grad forward; each position whose top-1/top-2 gap
is under the threshold is then refined exactly as in generation (context = the window up to and
including that position, ``text.refine_position``), and the outcome goes into a ``FocusReport``.

Example:
    >>> from focus_decoding import FocusConfig
    >>> from focus_decoding.evaluation import evaluate_next_token
    >>> from focus_decoding.resources import tiny_causal_lm
    >>> class Bytes:  # any tokenizer with __call__ -> {"input_ids"} and eos_token_id
    ...     eos_token_id = 2
    ...     def __call__(self, text, add_special_tokens=False):
    ...         return {"input_ids": [3 + b % 90 for b in text.encode()]}
    >>> report = evaluate_next_token(tiny_causal_lm(), Bytes(), ["hello world"] * 4,
    ...                              FocusConfig(threshold=1.0, lr=1e-2), context_length=16, progress=False)
    >>> report.n_total, report.n_uncertain == report.n_total
    (46, True)
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import method
from ..config import FocusConfig
from ..method import tail
from ..text.refine import refine_position, refine_positions_batched
from .report import MAX_K, TOPK_THRESHOLDS, FocusReport
from .group import Group
from .windows import n_rounds, rounds, tokenize_stream, window_bounds

OnWindow = Callable[[int, FocusReport], None]


def evaluate_next_token(model: nn.Module, tokenizer, texts: Sequence[str], config: FocusConfig | Mapping, *,
                        context_length: int = 128, stride: int | None = None, max_uncertain: int | None = None,
                        max_tokens: int | None = None, batch_positions: int = 1,
                        thresholds: Sequence[float] = TOPK_THRESHOLDS, progress: bool = True, name: str = "",
                        start_window: int = 0, on_window: OnWindow | None = None,
                        group: Group | None = None) -> FocusReport:
    """Score every next token of ``texts``; refine the uncertain ones one by one (or ``batch_positions`` at once).

    ``group`` (``evaluation.group``) splits the windows over processes, round by round: window ``r * world + rank``
    in round ``r``. Each round every process learns what the others found, so ``max_uncertain`` and
    ``max_tokens`` cut at the same token a single process would, and the returned report (the same on every
    process) equals the single-process one, outcomes in stream order. ``start_window`` (a multiple of the world
    size) continues a run whose earlier windows are elsewhere (budgets then count from here); every round,
    ``on_window(w, report)`` receives the report of every window up to ``w``, on every process.
    """
    config = FocusConfig.coerce(config)
    group = group or Group()
    stride = context_length if stride is None else stride
    _validate(context_length, stride, max_uncertain, max_tokens, batch_positions, start_window, group, thresholds)
    stream = tokenize_stream(tokenizer, texts).to(method.input_device(model))
    if stream.numel() < 2:
        raise ValueError("texts must give at least 2 tokens to score a next-token prediction")
    bounds = window_bounds(stream.numel(), context_length, stride)
    blank = lambda: FocusReport(name=name, topk_thresholds=list(thresholds), topk_counts=[0] * len(thresholds),  # noqa: E731
                                topk_hits=[[0] * MAX_K for _ in thresholds], config=config.to_dict())
    report = blank()  # every process's windows so far, in stream order (the same on every process)
    trainable, frozen = method.split_parameters(model, config.params)
    n_top = tail.shortcut(model, config, warn=True)  # last:N / tail: refine from kept states
    if batch_positions > 1:
        n_top = None  # the batched (vmap) path runs the full model
    t0, refine_s = time.perf_counter(), 0.0
    view = method.module_view(model)  # eval mode, private: other threads may use the model meanwhile
    start_round = start_window // group.world
    bar = _bar(rounds(view, stream, bounds, config, group, start=start_round, depths=lambda: [n_top]),
               n_rounds(bounds, group) - start_round, progress and group.rank == 0, name)
    # Refinements dominate the time: with a budget, a second bar counts them (ETA per refinement).
    refined_bar = _NoBar() if not progress or max_uncertain is None or group.rank else _refinement_bar(max_uncertain)
    for _, last, win in bar:
        seen = group.gather(None if win is None else (win.labels.numel(), win.uncertain.tolist()))
        cuts, stop = _round(seen, report, max_uncertain, max_tokens)
        part = None
        if win is not None:
            n, part = cuts[group.rank], blank()
            part.add_predictions(win.scored[:n], win.labels[:n], method.top2_gap(win.scored[:n]))
            positions = (win.first + torch.nonzero(win.uncertain[:n]).flatten()).tolist()
            r0 = time.perf_counter()
            base, focus, nonfinite = _refine_window(view, win.ids, win.logits, positions, trainable, frozen, config,
                                                    batch_positions, win.kept(n_top), tick=refined_bar.update)
            refine_s += time.perf_counter() - r0
            part.nonfinite = nonfinite
            part.add_outcomes(stream[win.start + 1 + torch.tensor(positions, dtype=torch.long)].cpu(), base, focus)
            part.meta = {"seconds": time.perf_counter() - t0, "refine_seconds": refine_s}
        for other in group.gather(part):  # in rank order: stream order
            if other is not None:
                report = report.merge(other)
        report.seconds = time.perf_counter() - t0
        report.meta.update(last_window=last, windows_done=report.meta.get("windows_done", 0) + 1)
        _finish_meta(report, refine_s)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(uncertain=report.n_uncertain, delta_corr=report.delta_corr)
        if on_window is not None:
            on_window(last, report)
        if stop:
            break
    refined_bar.close()
    everyone = group.gather((time.perf_counter() - t0, refine_s))
    report.name = name
    report.seconds = max(s for s, _ in everyone)  # wall time: the slowest process
    report.meta.update(model=_model_name(model), dataset=name, context_length=context_length, stride=stride,
                       batch_positions=batch_positions, processes=group.world, start_window=start_window,
                       seconds_per_process=[s for s, _ in everyone],
                       refine_seconds_per_process=[s for _, s in everyone])
    _finish_meta(report, sum(s for _, s in everyone))
    return report


# ----------------------------------------------------------------------------- refinement
def _refine_window(model, ids, logits, positions, trainable, frozen, config, k,
                   kept=None, tick=lambda n: None) -> tuple[Tensor, Tensor, int]:
    """(unrefined top-1, emitted top-1, non-finite count) for the uncertain local ``positions``."""
    base, focus, nonfinite = [], [], 0
    for i in range(0, len(positions), k):
        chunk = positions[i:i + k]
        if k == 1:
            results = [refine_position(model, ids, logits[chunk[0]], chunk[0], trainable, frozen, config, kept)]
        else:
            results = refine_positions_batched(model, ids, logits, chunk, trainable, frozen, config)
        for t, res in zip(chunk, results):
            base.append(int(logits[t].argmax()))
            focus.append(int(res.logits.argmax()))
            nonfinite += int(res.nonfinite)
        tick(len(chunk))
    return torch.tensor(base, dtype=torch.long), torch.tensor(focus, dtype=torch.long), nonfinite


# ----------------------------------------------------------------------------- helpers
def _round(seen: list, so_far: FocusReport, max_uncertain, max_tokens) -> tuple[list[int], bool]:
    """One round's windows (per process, in stream order: (scored, uncertain flags) or None): how many scored
    positions of each fit under the budgets after ``so_far``, and whether the evaluation stops after it."""
    cuts, total, unc_total, short = [], so_far.n_total, so_far.n_uncertain, False
    for item in seen:
        if item is None:
            cuts.append(0)
            continue
        count, unc = item
        n = count if max_tokens is None else min(count, max(0, max_tokens - total))
        if max_uncertain is not None:
            left, idx = max_uncertain - unc_total, [i for i, u in enumerate(unc[:n]) if u]
            if len(idx) >= left:
                n = idx[left - 1] + 1 if left > 0 else 0
        cuts.append(n)
        total, unc_total, short = total + n, unc_total + sum(unc[:n]), short or n < count
    spent = (max_uncertain is not None and unc_total >= max_uncertain) or (max_tokens is not None and total >= max_tokens)
    return cuts, short or spent


def _finish_meta(report: FocusReport, refine_s: float) -> None:
    report.meta["seconds"] = report.seconds
    report.meta["refine_seconds"] = refine_s
    report.meta["uncertain_per_second"] = report.n_uncertain / refine_s if refine_s > 0 else float("nan")


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    path = str(getattr(cfg, "name_or_path", "") or "")
    return path.rstrip("/").rsplit("/", 1)[-1] or getattr(cfg, "model_type", None) or type(model).__name__


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _refinement_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="refined", unit="position", position=1, leave=False)


def _bar(windows, total: int, progress: bool, name: str):
    if not progress:
        return windows
    from tqdm.auto import tqdm

    return tqdm(windows, total=total, desc=f"focus eval {name}".strip(), unit="window")


def _validate(context_length, stride, max_uncertain, max_tokens, batch_positions, start_window, group, thresholds):
    def positive(value, field, allow_none=False):
        if allow_none and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be an integer >= 1{' or None' if allow_none else ''}, got {value!r}")

    positive(context_length, "context_length")
    positive(stride, "stride")
    if stride > context_length:
        raise ValueError(f"stride must be <= context_length ({context_length}), got {stride}")
    positive(max_uncertain, "max_uncertain", allow_none=True)
    positive(max_tokens, "max_tokens", allow_none=True)
    positive(batch_positions, "batch_positions")
    if isinstance(start_window, bool) or not isinstance(start_window, int) or start_window < 0:
        raise ValueError(f"start_window must be an integer >= 0, got {start_window!r}")
    if not isinstance(group, Group):
        raise ValueError(f"group must be a focus_decoding.evaluation.group.Group, got {type(group).__name__}")
    if start_window % group.world:
        raise ValueError(f"start_window must be a multiple of the {group.world} processes (a round's first window), "
                         f"got {start_window}")
    if not thresholds or not all(isinstance(t, (int, float)) and 0 < t <= 1 and math.isfinite(t) for t in thresholds):
        raise ValueError(f"thresholds must be a non-empty list of numbers in (0, 1], got {thresholds!r}")
