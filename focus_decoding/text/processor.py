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
from ..method import prefix, tail

STAT_FIELDS = ("checked", "uncertain", "refined", "changed", "nonfinite")
DECREASE_FIELDS = ("intended", "achieved")


@dataclass
class FocusStats:
    """Counts of one generate call, per row (``batch * max(num_beams, num_return_sequences)`` rows).

    ``checked``: decoding positions gated; ``uncertain``: the gate fired; ``refined``: a finite
    refinement was emitted; ``changed``: its argmax differs from the unrefined one; ``nonfinite``:
    the refinement overflowed and the original scores were kept. Under beam search a row is a beam slot.
    ``intended`` / ``achieved``: the loss decrease the steps asked for (first order) and the one they made,
    summed over the row's refinements; ``decrease`` compares them (a step that did nothing shows there).
    """

    checked: list[int] = field(default_factory=list)
    uncertain: list[int] = field(default_factory=list)
    refined: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    nonfinite: list[int] = field(default_factory=list)
    intended: list[float] = field(default_factory=list)
    achieved: list[float] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, int]:
        """Each count summed over rows."""
        return {name: sum(getattr(self, name)) for name in STAT_FIELDS}

    @property
    def decrease(self) -> dict[str, float]:
        """The loss decrease intended and achieved over every refinement, and their ratio (nan without a step)."""
        intended, achieved = sum(self.intended), sum(self.achieved)
        return {"intended": intended, "achieved": achieved,
                "ratio": achieved / intended if intended else float("nan")}

    def to_dict(self) -> dict[str, Any]:
        """Per-row lists plus ``totals`` and ``decrease`` (JSON-able)."""
        return {**asdict(self), "totals": self.totals, "decrease": self.decrease}


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

        max_batch: uncertain rows refined together where they share one computation (``params="tail"``;
            ``"last:N"`` contexts of one length); bounds the per-row parameter copies held at once.

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
                 eos_token_id: int | list[int] | Tensor | None = None, max_batch: int = 8) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_decoder_only(model)
        if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
            raise ValueError("attention_mask must be a 2-D tensor [batch, prompt_len] of 0/1, or None")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.model = model
        self.view = method.module_view(model)  # eval mode; every refinement forward runs here
        self.config = FocusConfig.coerce(config)
        self.attention_mask = attention_mask
        self.scores_are_log_probs = bool(scores_are_log_probs)
        self.eos_token_id = None if eos_token_id is None else torch.as_tensor(eos_token_id).flatten()
        self.max_batch = max_batch
        # selected once per processor: the parameter split is the same at every position
        self.trainable, self.frozen = method.split_parameters(self.view, self.config.params)
        self._counts: Tensor | None = None  # [5, rows] on the scores' device: STAT_FIELDS, no host sync per step
        self._decrease: Tensor | None = None  # [2, rows]: DECREASE_FIELDS
        self._keep = method.last_logits_kwargs(model)
        self._mask_cache: Tensor | None = None
        # kept-state fast paths, set by text.ways_in: a HiddenRecorder (last:N, method.prefix) or a TailCapture (tail)
        self.recorder: prefix.HiddenRecorder | None = None
        self.tail: tail.TailCapture | None = None
        self._seen: tuple[Tensor, Tensor | None] | None = None

    @property
    def stats(self) -> FocusStats:
        """What the processor did so far, per row (:class:`FocusStats`)."""
        if self._counts is None:
            return FocusStats()
        return FocusStats(*(row.tolist() for row in self._counts), *(row.tolist() for row in self._decrease))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Scores with every uncertain row replaced by its refined scores (same space as given).

        A step where no row is uncertain costs the gate and one host sync (a single bool): the counts
        stay on the device, and nothing else is computed.
        """
        rows = input_ids.shape[0]
        if scores.dim() != 2 or scores.shape[0] != rows:
            raise ValueError(f"scores must be [batch, vocab] with batch = {rows}, got {tuple(scores.shape)}")
        counts = self._grow(rows, scores.device)
        mask = self._row_masks(rows)
        if self.recorder is not None:  # file the states the forward just computed (every step, every row)
            self.recorder.observe(input_ids)
            self._seen = (input_ids, mask)
        active = self._active_rows(input_ids, mask)
        todo = method.gate(scores, self.config) & active
        counts[0, :rows] += active
        if not bool(todo.any()):  # the common case: leave the scores (and the model's flags) alone
            return scores
        out = scores.clone()
        for row, result in self._refine(todo.nonzero().flatten().tolist(), input_ids, mask, scores):
            for i, name in enumerate(STAT_FIELDS[1:], start=1):
                counts[i, row] += int(getattr(result, name))
            for i, name in enumerate(DECREASE_FIELDS):
                self._decrease[i, row] += getattr(result, name)
            if result.refined:
                new = result.logits
                if self.scores_are_log_probs:
                    new = torch.log_softmax(method.widen(new), dim=-1).to(scores.dtype)
                out[row] = new
        return out

    # ------------------------------------------------------------------ the refinements of one step
    def _refine(self, rows: list[int], input_ids: Tensor, mask: Tensor | None, scores: Tensor):
        """(row, StepResult) for each uncertain row: from kept states, several rows at once where they share
        one computation (the tail; last:N contexts of one length), else one row at a time on its context."""
        if self.tail is not None and self.tail.states is not None and self.tail.states.shape[0] == len(input_ids):
            states = self.tail.states[:, -1]  # this step's forward: each row's residual at its newest position
            yield from self._together(rows, states, scores, lambda values, state: tail.tail_logits(
                self.view, method.merged(values, self.frozen), state),
                loss_for=lambda state: tail.tail_loss_forward(self.view, state, self.trainable, self.config))
            return
        groups: dict[int, list[tuple[int, Tensor]]] = {}
        for row in rows:
            ids = self._row_context(input_ids[row], None if mask is None else mask[row])
            if ids.shape[1] == 0:  # a fully padded prompt: no context to refine on yet
                continue
            hidden = self._kept_hidden(row, ids)
            if hidden is None:
                forward = method.model_forward(self.view, ids, use_cache=False, select=lambda o: o.logits[0, -1],
                                               **self._keep)
                yield row, method.focus_step(forward, scores[row], self.trainable, self.frozen, self.config)
            else:
                groups.setdefault(hidden.shape[1], []).append((row, hidden))
        for group in groups.values():  # rows whose contexts have one length share the mask and rotary embeddings
            top = prefix.top_logits(self.view, self.recorder.n, group[0][1])
            yield from self._together(
                [r for r, _ in group], torch.stack([h for _, h in group]), scores,
                lambda values, hidden: top(method.merged(values, self.frozen), hidden),
                loss_for=lambda hidden, top=top: tail.top_loss_forward(self.view, top, hidden, self.trainable,
                                                                       self.config))

    def _together(self, rows: list[int], inputs: Tensor, scores: Tensor, one, loss_for=lambda x: None):
        """Refine ``rows`` (their kept ``inputs``, one per row) in chunks of ``max_batch``, each row its own step;
        a row alone takes its loss from ``loss_for(input)`` where that gives one (``step.refine``'s ``loss_forward``)."""
        for start in range(0, len(rows), self.max_batch):
            chunk = rows[start:start + self.max_batch]
            x = inputs[start:start + self.max_batch] if len(inputs) == len(rows) else inputs[chunk]
            # one row (no vmap overhead), or a low-precision model's float32 step: one row at a time
            if len(chunk) == 1 or method.needs_float32(self.trainable, self.config):
                for row, xi in zip(chunk, x):
                    yield row, method.focus_step(lambda values, xi=xi: one(values, xi), scores[row], self.trainable,
                                                 self.frozen, self.config, loss_forward=loss_for(xi))
                continue
            focus = method.focus_classes(scores[chunk], self.config.n_focus)
            intended: list[Tensor] = []
            new = method.refine_batched(one, self.trainable, focus, self.config, x, intended=intended)
            for i, row in enumerate(chunk):
                asked = float(sum(step[i] for step in intended))
                yield row, method.step_result(scores[row], new[i], focus[i], self.config.mode, asked)

    def _kept_hidden(self, row: int, ids: Tensor) -> Tensor | None:
        """last:N: the states entering the top blocks for ``row``'s context (None: run the full model)."""
        if self.recorder is None:
            return None
        seen, mask = self._seen
        hidden = self.recorder.hidden_for(row, seen[row], None if mask is None else mask[row])
        return hidden if hidden is not None and hidden.shape[1] == ids.shape[1] else None

    def _grow(self, rows: int, device) -> Tensor:
        """The device counters, with a column for every row being decoded."""
        if self._counts is None:
            self._counts = torch.zeros(len(STAT_FIELDS), rows, dtype=torch.long, device=device)
            self._decrease = torch.zeros(len(DECREASE_FIELDS), rows, dtype=torch.float64)  # on the host: set there
        elif self._counts.shape[1] < rows:
            more = rows - self._counts.shape[1]
            self._counts = torch.cat([self._counts, self._counts.new_zeros(len(STAT_FIELDS), more)], dim=1)
            self._decrease = torch.cat([self._decrease, self._decrease.new_zeros(len(DECREASE_FIELDS), more)], dim=1)
        return self._counts

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

    def _active_rows(self, input_ids: Tensor, mask: Tensor | None) -> Tensor:
        """[rows] bool on the device: rows still generating (no EOS yet)."""
        if self.eos_token_id is None or mask is None or input_ids.shape[1] <= mask.shape[1]:
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        generated = input_ids[:, mask.shape[1]:]
        return ~torch.isin(generated, self.eos_token_id.to(generated.device)).any(dim=1)


def check_decoder_only(model: nn.Module) -> None:
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"focus decoding supports decoder-only models; {type(model).__name__} is an "
                         "encoder-decoder model")
