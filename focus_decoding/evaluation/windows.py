"""The token stream, its windows, and the one window scan that next-token evaluation and ``tune`` share.

A stream is every text's tokens with the tokenizer's EOS between documents. Window w feeds tokens
[s, e) and scores the labels [lo, hi) no earlier window scored, so every token after the first is
scored exactly once. ``scan`` runs one no-grad forward per window and yields what every consumer
needs: the logits, the labels, the gate of the scored positions and, for the cached ``last:N``
path, the states entering the top blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

import contextlib

from .. import method
from ..config import FocusConfig
from ..method import prefix, tail


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


@dataclass
class Window:
    """One scanned window: its input, logits of every position, and the gate of the scored ones."""

    index: int  # window number in the stream
    start: int  # stream index of the first input token
    ids: Tensor  # [1, T] input tokens
    logits: Tensor  # [T, V] next-token logits of every input position (float32 or wider)
    first: int  # local position predicting the first scored label
    labels: Tensor  # [n] the scored labels
    uncertain: Tensor  # [n] the gate at the scored positions
    states: dict[int | str, Tensor] = field(default_factory=dict)  # n -> states entering block L-n [1, T, H];
    #                                                                "tail" -> residuals before the last MLP

    @property
    def scored(self) -> Tensor:
        """[n, V] logits of the scored positions."""
        return self.logits[self.first:]

    def kept(self, n: int | str | None) -> tuple[int | str, Tensor] | None:
        """``(n, states)`` for ``text.refine_position`` (None: the full model)."""
        return None if n is None else (n, self.states[n])


def scan(view: nn.Module, stream: Tensor, bounds: Sequence[tuple[int, int, int]], config: FocusConfig, *,
         windows: Iterable[int] | None = None, depths: Callable[[], Iterable[int]] = tuple) -> Iterator[Window]:
    """One no-grad forward per window of ``bounds`` (those numbered in ``windows``, default all).

    ``depths()`` (asked before each window) names the kept-state paths (``method.tail.shortcut``) whose
    states to keep: top-block depths (the hidden states are only requested then) and ``"tail"``.
    """
    for w in range(len(bounds)) if windows is None else windows:
        s, lo, hi = bounds[w]
        ids = stream[s:hi - 1][None]
        keep = {n for n in depths() if n is not None}
        blocks = {n for n in keep if n != tail.TAIL}
        capture = tail.TailCapture(view) if tail.TAIL in keep else contextlib.nullcontext()
        with torch.no_grad(), capture:
            out = view(ids, use_cache=False, output_hidden_states=bool(blocks))
            logits = method.widen(out.logits[0])
        states = {n: prefix.window_states(out, view, n) for n in blocks}
        if tail.TAIL in keep:
            states[tail.TAIL] = capture.states
        del out
        first = lo - 1 - s
        yield Window(w, s, ids, logits, first, stream[lo:hi], method.gate(logits[first:], config), states)


def n_rounds(bounds: Sequence[tuple[int, int, int]], group) -> int:
    """Rounds over ``bounds`` for ``group``'s processes (``evaluation.group``): one window each per round."""
    return -(-len(bounds) // group.world)


def rounds(view: nn.Module, stream: Tensor, bounds: Sequence[tuple[int, int, int]], config: FocusConfig, group, *,
           start: int = 0, depths: Callable[[], Iterable[int]] = tuple) -> Iterator[tuple[int, int, Window | None]]:
    """``scan`` split over processes: per round r from ``start``, (r, the round's last window, this process's
    window ``r * world + rank`` or None past the end). Every process goes through the same rounds."""
    for r in range(start, n_rounds(bounds, group)):
        w = r * group.world + group.rank
        win = next(scan(view, stream, bounds, config, windows=[w], depths=depths)) if w < len(bounds) else None
        yield r, min(len(bounds), (r + 1) * group.world) - 1, win
