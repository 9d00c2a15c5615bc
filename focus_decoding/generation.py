"""`transformers` adapter: a logits processor that refines uncertain next-token predictions.

The processor gates each row of a decoding step, rebuilds an uncertain row's own unpadded context
and hands it to ``core.focus_step``; ``enable(model)`` teaches ``model.generate`` a ``focus_config``
argument and puts the processor FIRST, before repetition penalty, temperature, top-k and top-p.
"""
from __future__ import annotations

import inspect
import types
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor
from transformers.utils import ModelOutput

from . import core, prefix
from .config import FocusConfig

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
    next-token logits replace that row's scores. The model is never modified; rows never interact.

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
        >>> from focus_decoding.generation import FocusLogitsProcessor
        >>> from focus_decoding.models import tiny_causal_lm
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
        _check_decoder_only(model)
        if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
            raise ValueError("attention_mask must be a 2-D tensor [batch, prompt_len] of 0/1, or None")
        self.model = model
        self.config = FocusConfig.coerce(config)
        self.attention_mask = attention_mask
        self.scores_are_log_probs = bool(scores_are_log_probs)
        self.eos_token_id = None if eos_token_id is None else torch.as_tensor(eos_token_id).flatten()
        # selected once per processor: the parameter split is the same at every position
        self.trainable, self.frozen = core.split_parameters(model, self.config.params)
        self.stats = FocusStats()
        self._keep = _logits_to_keep_kwarg(model)
        self._mask_cache: Tensor | None = None
        # cached-prefix fast path (focus_decoding.prefix): enable's generate sets a HiddenRecorder here
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
        uncertain = core.is_uncertain(scores, self.config.threshold).tolist()  # batched: cheap when nothing fires
        todo = []
        for row in range(rows):
            if active[row]:
                self.stats.checked[row] += 1
                if uncertain[row]:
                    todo.append(row)
        if not todo:  # the common case: leave the scores (and the model's flags) alone
            return scores
        out = scores.clone()
        with core.eval_mode(self.model):  # dropout off during the step; flags restored after
            for row in todo:
                ids = self._row_context(input_ids[row], None if mask is None else mask[row])
                result = core.focus_step(self._row_forward(row, ids), scores[row], self.trainable,
                                         self.frozen, self.config)
                for name in ("uncertain", "refined", "changed", "nonfinite"):
                    getattr(self.stats, name)[row] += int(getattr(result, name))
                if result.refined:
                    new = result.logits
                    if self.scores_are_log_probs:
                        new = torch.log_softmax(new.float(), dim=-1).to(scores.dtype)
                    out[row] = new
        return out

    def _row_forward(self, row: int, ids: Tensor) -> core.Forward:
        """Forward for one row: the full model on ``ids`` ([1, L]) without KV cache, last logits."""
        if self.recorder is not None:  # last:N: run only the top blocks from the recorded states
            seen, mask = self._seen
            hidden = self.recorder.hidden_for(row, seen[row], None if mask is None else mask[row])
            if hidden is not None and hidden.shape[1] == ids.shape[1]:
                return prefix.top_forward(self.model, self.recorder.n, hidden)
        return core.model_forward(self.model, ids, use_cache=False, select=lambda o: o.logits[0, -1], **self._keep)

    def _row_context(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        """A row's unpadded context [1, L]: prompt tokens where mask is 1, then every generated token."""
        if mask is not None:
            prompt_len = mask.shape[0]
            ids = torch.cat([ids[:prompt_len][mask.bool()], ids[prompt_len:]])
        return core.as_normal_tensor(ids.unsqueeze(0))  # embedding backward saves the ids

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


# ----------------------------------------------------------------------------- generate integration
_UNSET = object()


def enable(model: nn.Module, focus_config: FocusConfig | Mapping[str, Any] | None = None) -> nn.Module:
    """Return ``model`` with a ``generate`` that accepts ``focus_config=`` (idempotent).

    ``focus_config`` may be passed to ``generate``, or set (as a dict) on the ``GenerationConfig``
    passed in or on ``model.generation_config``; giving it here stores it there. Without one,
    ``generate`` calls straight through. After a focused call, ``model.last_focus_stats`` holds the
    :class:`FocusStats`; with ``return_dict_in_generate=True`` the output has ``.focus_stats`` too.
    Not thread-safe: one focused ``generate`` per model at a time.

    Example:
        >>> import torch
        >>> from focus_decoding import FocusConfig
        >>> from focus_decoding.generation import enable
        >>> from focus_decoding.models import tiny_causal_lm
        >>> model = enable(tiny_causal_lm("llama"))
        >>> out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=2, do_sample=False, pad_token_id=0,
        ...                      focus_config=FocusConfig(threshold=1.0, lr=1e-2), return_dict_in_generate=True)
        >>> out.focus_stats.totals["checked"], model.last_focus_stats is out.focus_stats
        (2, True)
    """
    if not callable(getattr(model, "generate", None)):
        raise ValueError(f"model must have a generate method (a transformers model), got {type(model).__name__}")
    _check_decoder_only(model)
    if focus_config is not None:
        model.generation_config.focus_config = FocusConfig.coerce(focus_config).to_dict()
    if not is_enabled(model):
        # keep an instance-level generate someone else installed; None means the class's own
        model.__dict__["_focus_previous_generate"] = model.__dict__.get("generate")
        # a bound method (not a closure) so deepcopy/pickle rebind it to the copy
        model.__dict__["generate"] = types.MethodType(_focus_generate, model)
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo :func:`enable`: ``model.generate`` is the original again (a stored focus_config is kept)."""
    if is_enabled(model):
        previous = model.__dict__.pop("_focus_previous_generate")
        if previous is None:
            del model.__dict__["generate"]
        else:
            model.__dict__["generate"] = previous
    return model


def is_enabled(model: nn.Module) -> bool:
    """Whether :func:`enable` is in effect on ``model``."""
    gen = model.__dict__.get("generate")
    return isinstance(gen, types.MethodType) and gen.__func__ is _focus_generate


def _focus_generate(self: nn.Module, *args: Any, focus_config: Any = _UNSET, **kwargs: Any) -> Any:
    """``generate`` with focus refinement when a focus_config is given or configured."""
    previous = self.__dict__.get("_focus_previous_generate")
    original = previous if previous is not None else types.MethodType(type(self).generate, self)
    call = _bind_generate(self, args, kwargs)
    if focus_config is _UNSET:
        focus_config = getattr(call.get("generation_config") or self.generation_config, "focus_config", None)
    if focus_config is None:
        return original(*args, **kwargs)
    config = FocusConfig.coerce(focus_config)
    _check_supported_call(self, call, kwargs)

    created: list[FocusLogitsProcessor] = []
    n_top = prefix.prefix_blocks(self, config)  # cached-prefix fast path for last:N, when valid
    if n_top is None and config.last_blocks is not None:
        prefix.warn_fallback(self, config)
    recorder = None if n_top is None else prefix.HiddenRecorder(self, n_top)
    had_own = "_get_logits_processor" in self.__dict__
    own = self.__dict__.get("_get_logits_processor")

    def get_logits_processor(*a: Any, **kw: Any):
        base = own if had_own else types.MethodType(type(self)._get_logits_processor, self)
        processors = base(*a, **kw)
        bound = inspect.signature(base).bind_partial(*a, **kw).arguments
        gen_config = bound["generation_config"]
        _check_mode(gen_config, {}, None)  # the final config, after transformers merged everything
        focus = _processor_for_call(self, config, gen_config, bound)
        focus.recorder = recorder
        created.append(focus)
        processors.insert(0, focus)  # FIRST: refine the model's own distribution, then warp it
        return processors

    # transformers appends custom processors after its defaults; wrapping the factory for the
    # duration of this call is the only way to run first, in every supported version
    self.__dict__["_get_logits_processor"] = get_logits_processor
    try:
        if recorder is None:
            out = original(*args, **kwargs)
        else:
            with recorder:  # hooks removed on exit, also on error
                out = original(*args, **kwargs)
    finally:
        if had_own:
            self.__dict__["_get_logits_processor"] = own
        else:
            self.__dict__.pop("_get_logits_processor", None)
        if created:
            self.__dict__["last_focus_stats"] = created[-1].stats
    if created and isinstance(out, ModelOutput):
        out.focus_stats = created[-1].stats
    return out


def _processor_for_call(model: nn.Module, config: FocusConfig, gen_config: Any,
                        bound: Mapping[str, Any]) -> FocusLogitsProcessor:
    """The processor for one generate call, from what ``_get_logits_processor`` was given."""
    model_kwargs = bound.get("model_kwargs") or {}
    mask = model_kwargs.get("attention_mask")
    prompt_len = bound.get("input_ids_seq_length")
    if mask is None and prompt_len:
        mask = torch.ones(1, int(prompt_len), dtype=torch.long)  # transformers drops all-ones masks
    beams = (getattr(gen_config, "num_beams", None) or 1) > 1
    eos = getattr(gen_config, "_eos_token_tensor", None)
    if eos is None:
        eos = getattr(gen_config, "eos_token_id", None)
    # beam search keeps finished hypotheses aside, so only greedy/sampling rows can be skipped on EOS
    return FocusLogitsProcessor(model, config, attention_mask=mask, scores_are_log_probs=beams,
                                eos_token_id=None if beams else eos)


def _bind_generate(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """generate's named arguments (generation_config, logits_processor, assistant_model, ...)."""
    params = list(inspect.signature(type(model).generate).parameters)[1:]  # drop self
    named = dict(zip(params, args))
    named.update(kwargs)
    return named


def _check_decoder_only(model: nn.Module) -> None:
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"focus decoding supports decoder-only models; {type(model).__name__} is an "
                         "encoder-decoder model")


def _check_supported_call(model: nn.Module, call: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    """ValueError for a decoding mode focus decoding does not support (before generate starts)."""
    _check_decoder_only(model)
    for proc in call.get("logits_processor") or []:
        if isinstance(proc, FocusLogitsProcessor):
            raise ValueError("pass either focus_config or a FocusLogitsProcessor in logits_processor, not both")
    if call.get("inputs_embeds") is not None:
        raise ValueError("focus_config needs token ids to rebuild each row's context; inputs_embeds is not supported")
    if call.get("custom_generate") is not None:
        raise ValueError("focus_config is not supported with custom_generate (a custom decoding loop)")
    _check_mode(call.get("generation_config") or model.generation_config, kwargs, call.get("assistant_model"))


def _check_mode(gen_config: Any, overrides: Mapping[str, Any], assistant_model: Any) -> None:
    def value(name: str) -> Any:
        return overrides[name] if name in overrides else getattr(gen_config, name, None)

    if assistant_model is not None:
        raise ValueError("focus_config is not supported with assisted/speculative decoding (assistant_model)")
    problems = [
        ("prompt_lookup_num_tokens", "prompt-lookup (assisted) decoding"),
        ("assistant_early_exit", "self-speculative (assisted) decoding"),
        ("use_mtp", "multi-token-prediction (assisted) decoding"),
        ("dola_layers", "DoLa decoding"),
        ("constraints", "constrained beam search"),
        ("force_words_ids", "constrained beam search"),
    ]
    for name, mode in problems:
        if value(name) not in (None, False):
            raise ValueError(f"focus_config is not supported with {mode} ({name}); supported: greedy, "
                             "sampling, beam search")
    alpha, top_k = value("penalty_alpha"), value("top_k")
    if alpha is not None and alpha > 0 and top_k is not None and top_k > 1:
        raise ValueError("focus_config is not supported with contrastive search (penalty_alpha with top_k > 1); "
                         "supported: greedy, sampling, beam search")
    groups = value("num_beam_groups")
    if groups is not None and groups > 1:
        raise ValueError("focus_config is not supported with group/diverse beam search (num_beam_groups > 1); "
                         "supported: greedy, sampling, beam search")


def _logits_to_keep_kwarg(model: nn.Module) -> dict[str, int]:
    """Ask for the last position's logits only, where the model's forward allows it (same values)."""
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in names:
            return {name: 1}
    return {}
