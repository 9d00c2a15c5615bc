"""Ways into ``model.generate``: the ``custom_generate`` callable, ``focus_generate`` and ``enable``.

One code path: ``generate`` below is what transformers calls as the decoding method. It puts a
``FocusLogitsProcessor`` FIRST in the prepared processors (before repetition penalty, temperature,
top-k, top-p: sampling warps the refined distribution) and runs transformers' own greedy/sampling
or beam-search loop, on a private view of the model's module tree, so the cached-prefix hooks and
everything else the loop does stay off the user's model. ``enable(model)`` and the Hub-style folder
(``text/custom_generate``, written by ``text.folder.export_generate``) both end up here.

transformers >= 4.57 calls a ``custom_generate`` callable with the keyword arguments it names
(``focus_config``). Older versions (4.46 - 4.56) have no such hook: there ``focus_generate`` runs
transformers' ``generate`` on a view whose ``_sample`` / ``_beam_search`` lead into the same loop.

Example:
    >>> import torch
    >>> import focus_decoding
    >>> from focus_decoding import FocusConfig
    >>> from focus_decoding.resources import tiny_causal_lm
    >>> model = tiny_causal_lm("llama")
    >>> out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=2, do_sample=False, pad_token_id=0,
    ...                      custom_generate=focus_decoding.generate, return_dict_in_generate=True,
    ...                      focus_config=FocusConfig(threshold=1.0, lr=1e-2))
    >>> out.focus_stats.totals["checked"]
    2
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import types
from typing import Any, Mapping

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import GenerationMixin, LogitsProcessorList
from transformers.utils import ModelOutput

from .. import method
from ..config import FocusConfig
from ..method import prefix, tail
from .processor import FocusLogitsProcessor, FocusStats, check_decoder_only

TRANSFORMERS = Version(transformers.__version__)
CALLABLE_FLOOR = Version("4.57.0")  # first release that hands a callable the keyword arguments it names
_REFUSED_LOOPS = {  # decoding methods transformers may dispatch to that focus decoding does not run
    "_contrastive_search": "contrastive search", "_assisted_decoding": "assisted decoding",
    "_group_beam_search": "group (diverse) beam search", "_constrained_beam_search": "constrained beam search",
    "_dola_decoding": "DoLa decoding",
}
_last = threading.local()


def last_focus_stats() -> FocusStats | None:
    """The :class:`FocusStats` of the last focused ``generate`` call made in this thread (None before any)."""
    return getattr(_last, "stats", None)


# ----------------------------------------------------------------------------- the custom_generate callable
def generate(model: nn.Module, input_ids: torch.LongTensor, logits_processor: LogitsProcessorList,
             stopping_criteria, generation_config, synced_gpus: bool = False, streamer=None,
             focus_config: FocusConfig | Mapping[str, Any] | None = None, **model_kwargs: Any):
    """Focus decoding as a ``custom_generate`` callable (transformers >= 4.57).

    ``model.generate(**inputs, custom_generate=focus_decoding.generate, focus_config=FocusConfig(...))``
    on an untouched model. ``focus_config`` (a ``FocusConfig`` or its dict) defaults to
    ``generation_config.focus_config``, else ``FocusConfig()``. Greedy, sampling, beam search
    (and beam sampling), ``num_return_sequences``, left padding, ``streamer``, ``stopping_criteria``
    and your own ``logits_processor`` work as in plain ``generate``; other modes raise ``ValueError``.
    With ``return_dict_in_generate=True`` the output has ``.focus_stats``; either way
    :func:`last_focus_stats` returns them.
    """
    if TRANSFORMERS < CALLABLE_FLOOR:
        raise ValueError(f"custom_generate=focus_decoding.generate needs transformers >= {CALLABLE_FLOOR} "
                         f"(installed: {TRANSFORMERS}); on older versions use focus_decoding.enable(model) or "
                         "focus_decoding.focus_generate(model, ...)")
    caller = _generate_locals()
    # transformers >= 4.57 does not pass streamer or assistant_model on to a callable: read them from its frame
    streamer = streamer if streamer is not None else caller.get("streamer")
    check_mode(generation_config, {}, caller.get("assistant_model"))  # the one check of this way in
    config = resolve_config(focus_config, generation_config)
    loop_name = "_beam_search" if (generation_config.num_beams or 1) > 1 else "_sample"
    loop = method.module_view(model, eval_mode=False)  # the loop's hooks and attributes stay off the user's model
    kwargs = dict(stopping_criteria=stopping_criteria, generation_config=generation_config,
                  synced_gpus=synced_gpus, **model_kwargs)
    if loop_name == "_sample":
        kwargs["streamer"] = streamer
    return _run_loop(model, loop, config, loop_name, (input_ids,), {"logits_processor": logits_processor, **kwargs})


def _run_loop(model: nn.Module, loop: nn.Module, config: FocusConfig, loop_name: str, args: tuple,
              kwargs: dict[str, Any]):
    """transformers' own ``loop_name`` loop on ``loop`` with the focus processor first; stats published.
    The decoding mode was checked by the way in (the callable, or ``focus_generate``), once."""
    input_ids = args[0]
    gen_config = kwargs["generation_config"]
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("focus decoding needs token ids to rebuild each row's context; inputs_embeds is not supported")
    if input_ids.numel() == 0:  # plain generate fails deep inside the model's attention on these
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one row of at least one "
                         "token (a BOS token to start from nothing)")
    user = list(kwargs.get("logits_processor") or [])
    if any(isinstance(p, FocusLogitsProcessor) for p in user):
        raise ValueError("pass either focus_config or a FocusLogitsProcessor in logits_processor, not both")
    focus = _processor_for(model, config, input_ids, gen_config, kwargs)
    kept = tail.shortcut(model, config, warn=True)  # refine from states the loop's forwards keep, when valid
    if kept == tail.TAIL:
        focus.tail = hooks = tail.TailCapture(loop)
    elif kept is not None:
        focus.recorder = hooks = prefix.HiddenRecorder(loop, kept)
    else:
        hooks = contextlib.nullcontext()
    kwargs["logits_processor"] = LogitsProcessorList([focus, *user])  # FIRST: refine, then warp
    with hooks:  # the hooks sit on the loop's view and are removed on exit
        out = getattr(type(model), loop_name)(loop, *args, **kwargs)
    _last.stats = stats = focus.stats
    if isinstance(out, ModelOutput):
        out.focus_stats = stats
    return out


def _processor_for(model: nn.Module, config: FocusConfig, input_ids: torch.Tensor, gen_config: Any,
                   model_kwargs: Mapping[str, Any]) -> FocusLogitsProcessor:
    """The processor for one decoding loop; ``input_ids`` are the expanded prompts ([batch x beams, L])."""
    mask = model_kwargs.get("attention_mask")
    if mask is None:  # transformers drops an all-ones mask
        mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
    beams = (getattr(gen_config, "num_beams", None) or 1) > 1
    eos = getattr(gen_config, "_eos_token_tensor", None)
    if eos is None:
        eos = getattr(gen_config, "eos_token_id", None)
    # beam search keeps finished hypotheses aside, so only greedy/sampling rows can be skipped on EOS
    return FocusLogitsProcessor(model, config, attention_mask=mask[:, :input_ids.shape[1]],
                                scores_are_log_probs=beams, eos_token_id=None if beams else eos)


def resolve_config(focus_config: Any, generation_config: Any) -> FocusConfig:
    """``focus_config``, else ``generation_config.focus_config``, else ``FocusConfig()``."""
    if focus_config is None:
        focus_config = getattr(generation_config, "focus_config", None)
    return FocusConfig() if focus_config is None else FocusConfig.coerce(focus_config)


def _generate_locals() -> dict[str, Any]:
    """Locals of transformers' ``generate`` when it is our caller (empty otherwise)."""
    target = inspect.unwrap(GenerationMixin.generate).__code__
    frame = sys._getframe(2)  # 0: here, 1: our callable, 2: whoever called it
    for _ in range(3):
        if frame is None:
            break
        if frame.f_code is target:
            return dict(frame.f_locals)
        frame = frame.f_back
    return {}


# ----------------------------------------------------------------------------- generate with focus, any version
def focus_generate(model: nn.Module, *args: Any, focus_config: FocusConfig | Mapping[str, Any] | None = None,
                   **kwargs: Any):
    """``model.generate(*args, **kwargs)`` with focus decoding, on any supported transformers (>= 4.46).

    The model is not modified. ``focus_config`` defaults as in :func:`generate`. On transformers
    >= 4.57 this is ``generate(..., custom_generate=focus_decoding.generate)``; before, transformers'
    ``generate`` runs on a view of the model whose greedy/sampling and beam loops lead into the same code.
    """
    check_decoder_only(model)
    if kwargs.get("custom_generate") is generate:  # asked for twice (an enabled model): once is enough
        kwargs.pop("custom_generate")
    if kwargs.get("custom_generate") is not None:
        raise ValueError("focus decoding is itself a custom_generate method; it cannot run another one "
                         f"(got custom_generate={kwargs['custom_generate']!r})")
    named = _bind_generate(model, args, kwargs)
    gen_config = named.get("generation_config") or model.generation_config
    config = resolve_config(focus_config, gen_config)
    plain = getattr(model, "_focus_previous_generate", None) or types.MethodType(type(model).generate, model)
    if TRANSFORMERS >= CALLABLE_FLOOR:  # the callable checks the decoding mode
        return plain(*args, custom_generate=generate, focus_config=config, **kwargs)
    check_mode(gen_config, kwargs, named.get("assistant_model"))  # before any work is done
    loop = method.module_view(model, eval_mode=False)
    for name in ("_sample", "_beam_search"):
        loop.__dict__[name] = functools.partial(_old_loop, model, loop, config, name)
    for name, mode in _REFUSED_LOOPS.items():
        loop.__dict__[name] = functools.partial(_refuse, mode)
    return type(model).generate(loop, *args, **kwargs)


def _old_loop(model: nn.Module, loop: nn.Module, config: FocusConfig, loop_name: str, *args: Any, **kwargs: Any):
    """transformers < 4.57: ``generate`` called ``loop._sample`` / ``loop._beam_search`` (4.46 passes a beam scorer too)."""
    return _run_loop(model, loop, config, loop_name, args, kwargs)


def _refuse(mode: str, *args: Any, **kwargs: Any):
    raise ValueError(f"focus decoding is not supported with {mode}; supported: greedy, sampling, beam search")


def _bind_generate(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """generate's named arguments (generation_config, assistant_model, ...)."""
    params = list(inspect.signature(type(model).generate).parameters)[1:]  # drop self
    named = dict(zip(params, args))
    named.update(kwargs)
    return named


# ----------------------------------------------------------------------------- enable
_UNSET = object()


def enable(model: nn.Module, focus_config: FocusConfig | Mapping[str, Any] | None = None) -> nn.Module:
    """Return ``model`` with a ``generate`` that accepts ``focus_config=`` (idempotent).

    This installs one instance attribute, ``generate``, once, here; focused calls never change the
    model afterwards, so several threads may generate with it at once. ``focus_config`` may be passed
    to ``generate``, or set (as a dict) on the ``GenerationConfig`` passed in or on
    ``model.generation_config``; giving it here stores it there. Without one, ``generate`` calls
    straight through. Statistics: ``out.focus_stats`` with ``return_dict_in_generate=True``, and
    :func:`last_focus_stats` (per thread).

    Example:
        >>> import torch
        >>> from focus_decoding import FocusConfig, enable, last_focus_stats
        >>> from focus_decoding.resources import tiny_causal_lm
        >>> model = enable(tiny_causal_lm("llama"))
        >>> out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=2, do_sample=False, pad_token_id=0,
        ...                      focus_config=FocusConfig(threshold=1.0, lr=1e-2), return_dict_in_generate=True)
        >>> out.focus_stats.totals["checked"], last_focus_stats() is out.focus_stats
        (2, True)
    """
    if not callable(getattr(model, "generate", None)):
        raise ValueError(f"model must have a generate method (a transformers model), got {type(model).__name__}")
    check_decoder_only(model)
    if focus_config is not None:
        set_focus_config(model.generation_config, focus_config)
    if not is_enabled(model):
        # keep an instance-level generate someone else installed; None means the class's own
        model.__dict__["_focus_previous_generate"] = model.__dict__.get("generate")
        # a bound method (not a closure) so deepcopy/pickle rebind it to the copy
        model.__dict__["generate"] = types.MethodType(_enabled_generate, model)
    return model


def set_focus_config(target, focus_config: FocusConfig | Mapping[str, Any]) -> None:
    """Store ``focus_config`` on a ``GenerationConfig`` (or on a model's ``generation_config``) so that
    ``save_pretrained`` keeps it and ``from_pretrained`` gives it back.

    A generation config derived from the model config (``_from_model_config``) loses every extra key
    when it is loaded again; once it holds a setting of its own it is no longer that, as transformers'
    own trainers mark it. Assigning ``generation_config.focus_config`` by hand skips that mark.
    """
    from transformers import GenerationConfig

    if not isinstance(target, GenerationConfig):
        if not isinstance(getattr(target, "generation_config", None), GenerationConfig):
            raise ValueError(f"set_focus_config needs a GenerationConfig or a model that has one, got "
                             f"{type(target).__name__}")
        target = target.generation_config
    target.focus_config = FocusConfig.coerce(focus_config).to_dict()
    target._from_model_config = False


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
    return isinstance(gen, types.MethodType) and gen.__func__ is _enabled_generate


def _enabled_generate(self: nn.Module, *args: Any, focus_config: Any = _UNSET, **kwargs: Any) -> Any:
    """``generate`` with focus decoding when a focus_config is given or configured."""
    if focus_config is _UNSET:
        gen_config = _bind_generate(self, args, kwargs).get("generation_config") or self.generation_config
        focus_config = getattr(gen_config, "focus_config", None)
    if focus_config is None:
        previous = self.__dict__.get("_focus_previous_generate")
        return (previous or types.MethodType(type(self).generate, self))(*args, **kwargs)
    return focus_generate(self, *args, focus_config=FocusConfig.coerce(focus_config), **kwargs)


def check_mode(gen_config: Any, overrides: Mapping[str, Any], assistant_model: Any) -> None:
    """ValueError naming the decoding mode when it is not greedy, sampling or beam search."""
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
