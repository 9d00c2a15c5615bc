"""`transformers` adapter: a logits processor that refines uncertain next-token predictions.

The processor gates each row of a decoding step, rebuilds an uncertain row's own unpadded context
and hands it to ``method.focus_step``. The ways to put it into ``generate`` (the ``custom_generate``
callable, ``focus_generate``, ``enable``) live in ``text.ways_in``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor

from .. import method
from ..config import FocusConfig
from ..method import prefix

STAT_FIELDS = ("checked", "uncertain", "refined", "changed", "nonfinite")


@dataclass
class FocusStats:
    """Counts of one generate call, per row (``batch * max(num_beams, num_return_sequences)`` rows).

    ``checked``: decoding positions gated; ``uncertain``: the gate fired; ``refined``: a finite
    refinement was emitted; ``changed``: its argmax differs from the unrefined one; ``nonfinite``:
    the refinement overflowed and the original scores were kept. Under beam search a row is a beam slot.
    """

    checked: list[int] = field(default_factory=list)
    uncertain: list[int] = field(default_factory=list)
    refined: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)

    def ensure_rows(self, rows: int) -> None:
        """Grow every per-row list to ``rows`` entries."""
        for name in STAT_FIELDS:
            counts = getattr(self, name)
            counts.extend([0] * (rows - len(counts)))

    @property
    def totals(self) -> dict[str, int]:
        """Each count summed over rows."""
        return {name: sum(getattr(self, name)) for name in STAT_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """Per-row lists plus ``totals`` (JSON-able)."""
        return {**asdict(self), "totals": self.totals}


class FocusLogitsProcessor(LogitsProcessor):
    r"""Refine uncertain next-token scores with one focus step (a :class:`transformers.LogitsProcessor`).

    For each row whose top-1/top-2 probability gap is below ``config.threshold``, the row's own
    context (left padding dropped) is re-run through the full model without KV cache, ``config.steps``
    SGD steps on the focus loss are taken on a functional copy of the parameters, and the refined
    next-token logits replace that row's scores. Rows never interact. The model is never modified,
    not even during a call: the steps run on a private view of its module tree (``method.module_view``),
    so other threads may use the model meanwhile. One processor serves one ``generate`` call at a time.

    Args:
        model: the causal LM whose ``generate`` produced ``scores`` (decoder-only).
        config: a :class:`FocusConfig` or its dict.
        attention_mask: the prompt's ``[batch, prompt_len]`` mask (1 = token, 0 = padding); rows are
            expanded with ``repeat_interleave`` when generate has more rows (beams, return sequences).
            ``None``: no padding.
        scores_are_log_probs: ``False`` for greedy/sampling (scores are raw logits); ``True`` under
            beam search, whose scores are ``log_softmax(logits)``: refined rows are then emitted as
            log-probabilities too. ``enable`` sets it for you.
        eos_token_id: id(s) that end a row; rows that already generated one are skipped (their scores
            are discarded by generate anyway). Needs ``attention_mask`` to know where generation began.

    Statistics accumulate in ``self.stats`` (:class:`FocusStats`).

    Example:
        >>> import torch
        >>> from transformers import LogitsProcessorList
        >>> from focus_decoding import FocusConfig
        >>> from focus_decoding.text import FocusLogitsProcessor
        >>> from focus_decoding.resources import tiny_causal_lm
        >>> model = tiny_causal_lm("llama")
        >>> focus = FocusLogitsProcessor(model, FocusConfig(threshold=1.0, lr=1e-2))
        >>> out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False,
        ...                      logits_processor=LogitsProcessorList([focus]), pad_token_id=0)
        >>> focus.stats.totals["uncertain"]
        3
    """

    def __init__(self, model: nn.Module, config: FocusConfig | Mapping[str, Any],
                 attention_mask: Tensor | None = None, *, scores_are_log_probs: bool = False,
                 eos_token_id: int | list[int] | Tensor | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_decoder_only(model)
        if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
            raise ValueError("attention_mask must be a 2-D tensor [batch, prompt_len] of 0/1, or None")
        self.model = model
        self.view = method.module_view(model)  # eval mode; every refinement forward runs here
        self.config = FocusConfig.coerce(config)
        self.attention_mask = attention_mask
        self.scores_are_log_probs = bool(scores_are_log_probs)
        self.eos_token_id = None if eos_token_id is None else torch.as_tensor(eos_token_id).flatten()
        # selected once per processor: the parameter split is the same at every position
        self.trainable, self.frozen = method.split_parameters(self.view, self.config.params)
        self.stats = FocusStats()
        self._keep = method.last_logits_kwargs(model)
        self._mask_cache: Tensor | None = None
        # cached-prefix fast path (method.prefix): text.ways_in sets a HiddenRecorder here
        self.recorder: prefix.HiddenRecorder | None = None
        self._seen: tuple[Tensor, Tensor | None] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Scores with every uncertain row replaced by its refined scores (same space as given)."""
        rows = input_ids.shape[0]
        if scores.dim() != 2 or scores.shape[0] != rows:
            raise ValueError(f"scores must be [batch, vocab] with batch = {rows}, got {tuple(scores.shape)}")
        self.stats.ensure_rows(rows)
        mask = self._row_masks(rows)
        active = self._active_rows(input_ids, mask)
        if self.recorder is not None:  # file the states the forward just computed (every step, every row)
            self.recorder.observe(input_ids)
            self._seen = (input_ids, mask)
        uncertain = method.gate(scores, self.config).tolist()  # batched: cheap when nothing fires
        todo = []
        for row in range(rows):
            if active[row]:
                self.stats.checked[row] += 1
                if uncertain[row]:
                    todo.append(row)
        if not todo:  # the common case: leave the scores (and the model's flags) alone
            return scores
        out = scores.clone()
        for row in todo:
            ids = self._row_context(input_ids[row], None if mask is None else mask[row])
            if ids.shape[1] == 0:  # a fully padded prompt: no context to refine on yet
                continue
            result = method.focus_step(self._row_forward(row, ids), scores[row], self.trainable, self.frozen,
                                     self.config)
            for name in ("uncertain", "refined", "changed", "nonfinite"):
                getattr(self.stats, name)[row] += int(getattr(result, name))
            if result.refined:
                new = result.logits
                if self.scores_are_log_probs:
                    new = torch.log_softmax(method.widen(new), dim=-1).to(scores.dtype)
                out[row] = new
        return out

    def _row_forward(self, row: int, ids: Tensor) -> method.Forward:
        """Forward for one row: the full model on ``ids`` ([1, L]) without KV cache, last logits."""
        if self.recorder is not None:  # last:N: run only the top blocks from the recorded states
            seen, mask = self._seen
            hidden = self.recorder.hidden_for(row, seen[row], None if mask is None else mask[row])
            if hidden is not None and hidden.shape[1] == ids.shape[1]:
                return prefix.top_forward(self.view, self.recorder.n, hidden)
        return method.model_forward(self.view, ids, use_cache=False, select=lambda o: o.logits[0, -1], **self._keep)

    def _row_context(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        """A row's unpadded context [1, L]: prompt tokens where mask is 1, then every generated token."""
        if mask is not None:
            prompt_len = mask.shape[0]
            ids = torch.cat([ids[:prompt_len][mask.bool()], ids[prompt_len:]])
        return method.as_normal_tensor(ids.unsqueeze(0))  # embedding backward saves the ids

    def _row_masks(self, rows: int) -> Tensor | None:
        if self.attention_mask is None:
            return None
        if self._mask_cache is None or self._mask_cache.shape[0] != rows:
            mask = self.attention_mask
            if rows % mask.shape[0]:
                raise ValueError(f"attention_mask has {mask.shape[0]} rows, which does not divide the {rows} "
                                 "rows being decoded")
            self._mask_cache = mask.repeat_interleave(rows // mask.shape[0], dim=0)
        return self._mask_cache

    def _active_rows(self, input_ids: Tensor, mask: Tensor | None) -> list[bool]:
        if self.eos_token_id is None or mask is None or input_ids.shape[1] <= mask.shape[1]:
            return [True] * input_ids.shape[0]
        generated = input_ids[:, mask.shape[1]:]
        done = torch.isin(generated, self.eos_token_id.to(generated.device)).any(dim=1)
        return (~done).tolist()


def check_decoder_only(model: nn.Module) -> None:
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"focus decoding supports decoder-only models; {type(model).__name__} is an "
                         "encoder-decoder model")
