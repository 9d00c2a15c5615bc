"""Next-token evaluation of the method on text: sliding windows, one forward each, refine the uncertain.

Every position of a window is predicted by one no-grad forward; each position whose top-1/top-2 gap
is under the threshold is then refined exactly as in generation (context = the window up to and
including that position, ``core.focus_step``), and the outcome goes into a ``FocusReport``.

Example:
    >>> from focus_decoding import FocusConfig
    >>> from focus_decoding.eval_text import evaluate_next_token
    >>> from focus_decoding.models import tiny_causal_lm
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
from torch.func import functional_call, vmap

from . import core, prefix
from .config import FocusConfig
from .report import MAX_K, TOPK_THRESHOLDS, FocusReport

OnWindow = Callable[[int, FocusReport], None]


def tokenize_stream(tokenizer, texts: Sequence[str]) -> Tensor:
    """All texts as one token stream [N], with the tokenizer's EOS between documents."""
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, got a single str; wrap it in a list")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            ids.append(int(eos))
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def window_bounds(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Per window (input start, first scored label index, last scored label index + 1) in the stream.

    Window w feeds tokens [s, e) with s = w * stride and predicts labels [s + 1, e + 1); it scores
    only the labels no earlier window scored, so every token after the first is scored exactly once.
    """
    out, done = [], 1  # label index 0 has no context, so scoring starts at 1
    start = 0
    while done < n_tokens:
        end = min(start + context_length, n_tokens - 1)  # last input index + 1
        out.append((start, done, end + 1))
        done = end + 1
        start += stride
    return out


def evaluate_next_token(model: nn.Module, tokenizer, texts: Sequence[str], config: FocusConfig | Mapping, *,
                        context_length: int = 128, stride: int | None = None, max_uncertain: int | None = None,
                        max_tokens: int | None = None, batch_positions: int = 1,
                        thresholds: Sequence[float] = TOPK_THRESHOLDS, progress: bool = True, name: str = "",
                        start_window: int = 0, on_window: OnWindow | None = None,
                        shard: tuple[int, int] | None = None) -> FocusReport:
    """Score every next token of ``texts``; refine the uncertain ones one by one (or ``batch_positions`` at once)."""
    config = FocusConfig.coerce(config)
    stride = context_length if stride is None else stride
    _validate(context_length, stride, max_uncertain, max_tokens, batch_positions, start_window, shard, thresholds)
    rank, world = shard or (0, 1)
    device = next(model.parameters()).device
    stream = tokenize_stream(tokenizer, texts).to(device)
    if stream.numel() < 2:
        raise ValueError("texts must give at least 2 tokens to score a next-token prediction")
    windows = [(w, b) for w, b in enumerate(window_bounds(stream.numel(), context_length, stride))
               if w >= start_window and w % world == rank]
    report = FocusReport(name=name, topk_thresholds=list(thresholds), topk_counts=[0] * len(thresholds),
                         topk_hits=[[0] * MAX_K for _ in thresholds], config=config.to_dict())
    report.meta.update(model=_model_name(model), dataset=name, context_length=context_length, stride=stride,
                       batch_positions=batch_positions, shard=[rank, world], start_window=start_window)
    trainable, frozen = core.split_parameters(model, config.params)
    n_top = prefix.prefix_blocks(model, config, warn=True)  # last:N: refine through the top blocks from kept states
    if batch_positions > 1:
        n_top = None  # the batched (vmap) path runs the full model
    t0, refine_s = time.perf_counter(), 0.0
    bar = _bar(windows, progress, name)
    # Refinements dominate the time: with a budget, a second bar counts them (ETA per refinement).
    refined_bar = _NoBar() if not progress or max_uncertain is None else _refinement_bar(max_uncertain)
    view = core.module_view(model)  # eval mode, private: other threads may use the model meanwhile
    for w, (s, lo, hi) in bar:
        ids = stream[s:hi - 1][None]
        with torch.no_grad():
            out = view(ids, use_cache=False, output_hidden_states=n_top is not None)
            logits = core.widen(out.logits[0])
        kept = None if n_top is None else (n_top, prefix.window_states(out, model, n_top))
        del out
        first = lo - 1 - s  # local position predicting label index lo
        scored = logits[first:]
        labels = stream[lo:hi]
        uncertain = core.is_uncertain(scored, config.threshold)
        n = _cut(labels.numel(), uncertain, report, max_uncertain, max_tokens)
        report.add_predictions(scored[:n], labels[:n])
        positions = (first + torch.nonzero(uncertain[:n]).flatten()).tolist()
        r0 = time.perf_counter()
        base, focus, nonfinite = _refine_window(view, ids, logits, positions, trainable, frozen, config,
                                                batch_positions, kept, tick=refined_bar.update)
        refine_s += time.perf_counter() - r0
        report.nonfinite += nonfinite
        report.add_outcomes(stream[s + 1 + torch.tensor(positions, dtype=torch.long)].cpu(), base, focus)
        report.seconds = time.perf_counter() - t0
        report.meta.update(last_window=w, windows_done=report.meta.get("windows_done", 0) + 1)
        _finish_meta(report, refine_s)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(uncertain=report.n_uncertain, delta_corr=report.delta_corr)
        if on_window is not None:
            on_window(w, report)
        if n < labels.numel() or _limit_hit(report, max_uncertain, max_tokens):
            break
    refined_bar.close()
    report.seconds = time.perf_counter() - t0
    _finish_meta(report, refine_s)
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


def refine_position(model, ids: Tensor, logits_t: Tensor, t: int, trainable, frozen, config,
                    kept: tuple[int, Tensor] | None = None) -> core.StepResult:
    """The method's step for the prediction at local position ``t``, exactly as in generation.

    ``kept = (n, states entering block L-n for the window)`` runs the step through the top n blocks
    only (``focus_decoding.prefix``; valid for last:N); None runs the full model.
    """
    if kept is not None:
        n, states = kept
        return core.focus_step(prefix.top_forward(model, n, states[:, :t + 1]), logits_t, trainable, frozen, config)
    forward = core.model_forward(model, ids[:, :t + 1], use_cache=False, select=lambda o: o.logits[0, -1],
                                 **core.last_logits_kwargs(model))
    return core.focus_step(forward, logits_t, trainable, frozen, config)


def refine_positions_batched(model, ids: Tensor, logits: Tensor, positions: Sequence[int], trainable, frozen,
                             config: FocusConfig) -> list[core.StepResult]:
    """``refine_position`` for several positions of one window at once, each with its own parameters.

    Causal attention makes the logits at position t independent of later tokens, so every position
    shares the input ids[:, :max(t) + 1] and selects its own row; ``torch.func.vmap`` gives each
    position its own gradient and its own updated parameters. Works with eager and sdpa attention;
    under vmap, PyTorch runs sdpa through a slower per-sample loop, so eager is preferable here.
    """
    view = model if core.is_view(model) else core.module_view(model)
    ctx = ids[:, :max(positions) + 1]
    rows = torch.zeros(len(positions), ctx.shape[1], device=ids.device)
    rows[torch.arange(len(positions)), torch.tensor(positions)] = 1.0
    focus = core.focus_classes(logits[list(positions)], config.n_focus)

    def row_logits(values: Mapping[str, Tensor], row: Tensor) -> Tensor:
        out = functional_call(view, {**frozen, **values}, (ctx,), {"use_cache": False}, tie_weights=True, strict=False)
        return (core.widen(out.logits[0]) * row[:, None]).sum(0)  # one-hot select: vmap-safe

    def loss(values, row, foc):
        return core.focus_loss(row_logits(values, row), foc, config.mode)

    current = core.batched_sgd_steps(loss, trainable, config, rows, focus)
    with torch.no_grad():
        new = vmap(row_logits, in_dims=(0, 0))(current, rows)
    return [core.step_result(logits[t], new[i]) for i, t in enumerate(positions)]


# ----------------------------------------------------------------------------- helpers
def _cut(n_scored: int, uncertain: Tensor, report: FocusReport, max_uncertain, max_tokens) -> int:
    """How many of this window's scored positions fit under ``max_tokens`` / ``max_uncertain``."""
    n = n_scored
    if max_tokens is not None:
        n = min(n, max_tokens - report.n_total)
    if max_uncertain is not None:
        left = max_uncertain - report.n_uncertain
        idx = torch.nonzero(uncertain[:n]).flatten()
        if idx.numel() >= left:
            n = int(idx[left - 1]) + 1 if left > 0 else 0
    return n


def _limit_hit(report: FocusReport, max_uncertain, max_tokens) -> bool:
    return (max_uncertain is not None and report.n_uncertain >= max_uncertain) or \
        (max_tokens is not None and report.n_total >= max_tokens)


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


def _bar(windows, progress: bool, name: str):
    if not progress:
        return windows
    from tqdm.auto import tqdm

    return tqdm(windows, desc=f"focus eval {name}".strip(), unit="window")


def _validate(context_length, stride, max_uncertain, max_tokens, batch_positions, start_window, shard, thresholds):
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
    if shard is not None:
        if (not isinstance(shard, (tuple, list)) or len(shard) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in shard)
                or not 0 <= shard[0] < shard[1]):
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard!r}")
    if not thresholds or not all(isinstance(t, (int, float)) and 0 < t <= 1 and math.isfinite(t) for t in thresholds):
        raise ValueError(f"thresholds must be a non-empty list of numbers in (0, 1], got {thresholds!r}")
