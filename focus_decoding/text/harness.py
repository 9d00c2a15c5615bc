"""lm-evaluation-harness backend: ``focus-hf``, the harness's own ``HFLM`` with focus decoding.

Everything (tokenisation, batching, padding, truncation, stop sequences, caching) stays HFLM's;
two narrow pieces change:

* ``_model_call`` (the logits of a batch of teacher-forced requests): each scored continuation
  position whose top-1/top-2 gap is under the threshold is refined on its own context with
  ``text.refine_position`` and its refined logits replace the plain ones, so HFLM's own
  log-softmax, sum and greedy check see the emitted (refined) prediction. A gate that never fires
  returns HFLM's logits untouched. (``_loglikelihood_tokens`` only tells it, per model input,
  how many trailing positions are continuation tokens.)
* ``_model_generate``: HFLM's generate path, where ``self.model`` is a stand-in whose ``generate``
  is ``text.focus_generate`` (an untouched model, any supported transformers).

lm-eval 0.4.13 does not read the ``lm_eval.models`` entry-point group (its CLI only knows the
models it ships or that were imported), so importing this module registers ``focus-hf`` with
``register_model``, and ``python -m focus_decoding.harness ARGS`` is the ``lm_eval`` command with
the backend imported::

    python -m focus_decoding.harness --model focus-hf --device cpu --tasks my_task --include_path tasks/ \\
        --model_args pretrained=default,mode=ifo,lr=1e-4,params=last:2

``params`` takes the package's one selector grammar (``all``, ``last:N``, name patterns joined by ``+``;
``|`` joins them too, the spelling of earlier versions; model_args themselves are comma-separated).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.huggingface import HFLM

from .. import method
from ..config import PRESETS, FocusConfig
from ..method import prefix, tail
from ..resources.models import DEFAULT_MODEL, default_model_path, is_embedded, resolve_source, tie_missing_gguf_head
from .ways_in import focus_generate, last_focus_stats
from .processor import STAT_FIELDS
from .refine import refine_position

NAME = "focus-hf"
FOCUS_KEYS = tuple(f.name for f in dataclasses.fields(FocusConfig))
DEFAULT_PRESET = DEFAULT_MODEL
# from_pretrained keyword arguments HFLM forwards (**kwargs) that we let through; anything else unknown is a typo
FROM_PRETRAINED_KEYS = ("attn_implementation", "low_cpu_mem_usage", "device_map", "cache_dir", "local_files_only",
                        "token", "load_in_8bit", "load_in_4bit")
PAD_ID = 0  # HFLM right-pads teacher-forced batches with zeros (lm_eval.models.utils_hf.pad_and_concat)


class HarnessInputError(ValueError):
    """A bad ``model_args`` value or model path: ``python -m focus_decoding.harness`` prints it as one line, exit 2."""


class FocusLM(HFLM):
    """HFLM with focus decoding: ``FocusLM(pretrained=..., mode=, n_focus=, threshold=, lr=, steps=, params=,
    step_rule=, tau=, preset=, focus_config=, **HFLM arguments)``.

    ``pretrained``: a Hub id or folder, a ``.gguf`` file, a model object, or ``"default"`` / omitted
    for the embedded SmolLM2-135M-Instruct (which then uses the ``smollm2-135m`` preset; a given
    ``lr``/``tau``/``step_rule`` replaces only the preset's step, ``preset=`` or ``focus_config`` all of it).
    ``tau`` alone selects the normalized step rule. ``focus_config`` (a ``FocusConfig`` or dict) replaces
    the separate fields. ``focus_stats`` counts what the gate did per request type.
    """

    def __init__(self, pretrained: Any = "default", *, preset: str | None = None,
                 focus_config: FocusConfig | dict | None = None, **kwargs: Any) -> None:
        focus_fields = {k: kwargs.pop(k) for k in FOCUS_KEYS if k in kwargs}
        try:
            check_keys(kwargs)
            pretrained, kwargs["gguf_file"], is_default = resolve_pretrained(pretrained, kwargs.get("gguf_file"))
            if preset is None and is_default and focus_config is None:
                preset = DEFAULT_PRESET  # as the package CLI does: a step given replaces the preset's step only
            self.focus_config = build_config(focus_fields, preset, focus_config)
            kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")  # HFLM's default: cuda
            super().__init__(pretrained=pretrained, **kwargs)
            if isinstance(pretrained, str) and kwargs.get("gguf_file"):  # 4.46 leaves a tied GGUF head random
                tie_missing_gguf_head(self.model, Path(pretrained) / kwargs["gguf_file"])
            if self.backend != "causal":
                raise ValueError(f"{NAME} supports decoder-only (causal) models; this one is {self.backend}")
            self._view = method.module_view(self.model)  # private module tree: the step never touches the model
            self._trainable, self._frozen = method.split_parameters(self._view, self.focus_config.params)
            self._n_top = tail.shortcut(self._view, self.focus_config, warn=True)  # last:N / tail: from kept states
        except HarnessInputError:
            raise
        except (ValueError, OSError) as err:  # the user's to fix: one line on the command line, not a traceback
            message = str(err) if str(err).startswith(NAME) else f"{NAME}: {err}"
            raise HarnessInputError(message) from err
        self._scored: tuple[dict[tuple[int, ...], int], list[int]] | None = None  # set while scoring
        self._generating = False
        self.focus_stats = {kind: dict.fromkeys(STAT_FIELDS, 0) for kind in ("loglikelihood", "generate_until")}

    # ------------------------------------------------------------------ teacher forcing
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's scoring, with the scored positions of each model input known to ``_model_call``."""
        table = scored_positions(requests, self.max_length)
        self._scored = table, sorted({len(inp) for inp in table})
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._scored = None

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """HFLM's logits, with the refined logits at every gated continuation position."""
        logits = super()._model_call(inps, attn_mask, labels)
        if self._scored is None:  # batch-size probing, or not a scoring call
            return logits
        stats = self.focus_stats["loglikelihood"]
        gated = {}
        for row in range(inps.shape[0]):
            positions = row_positions(inps[row].tolist(), *self._scored)
            stats["checked"] += len(positions)
            if positions:
                uncertain = method.gate(method.widen(logits[row, positions]), self.focus_config)
                hits = [t for t, u in zip(positions, uncertain.tolist()) if u]
                if hits:
                    gated[row] = hits
        if gated:
            self._refine_rows(inps, logits, gated)
        return logits

    def _refine_rows(self, inps: torch.Tensor, logits: torch.Tensor, gated: dict[int, list[int]]) -> None:
        """Replace ``logits[row, t]`` by the focus step's logits for each gated (row, t), in place."""
        stats = self.focus_stats["loglikelihood"]
        states = self._kept_states(inps, gated)
        for row, positions in gated.items():
            ids = inps[row:row + 1]  # right padding sits after every position we refine
            kept = None if states is None else (self._n_top, states[row])
            for t in positions:
                res = refine_position(self._view, ids, method.widen(logits[row, t]), t, self._trainable,
                                      self._frozen, self.focus_config, kept)
                logits[row, t] = res.logits.to(logits.dtype)
                for name in ("uncertain", "refined", "changed", "nonfinite"):
                    stats[name] += int(getattr(res, name))

    def _kept_states(self, inps: torch.Tensor, gated: dict[int, list[int]]) -> dict[int, torch.Tensor] | None:
        """The kept states (states entering block L-n for last:N, residuals before the last MLP for the tail), from one
        no-grad forward up to the last gated position."""
        if self._n_top is None:
            return None
        rows = sorted(gated)
        end = max(max(ts) for ts in gated.values()) + 1
        on_tail = self._n_top == tail.TAIL
        with torch.no_grad(), tail.TailCapture(self._view) if on_tail else contextlib.nullcontext() as capture:
            out = self._view(inps[rows, :end], use_cache=False, output_hidden_states=not on_tail)
        states = capture.states if on_tail else prefix.window_states(out, self._view, self._n_top)
        return {row: states[i:i + 1] for i, row in enumerate(rows)}

    # ------------------------------------------------------------------ generation
    @property
    def model(self):
        """The model; inside ``_model_generate`` a stand-in whose ``generate`` is ``focus_generate``."""
        model = HFLM.model.fget(self)
        return _FocusGenerating(model, self) if getattr(self, "_generating", False) else model

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """HFLM's generate path (stop sequences, temperature handling) with focus generation."""
        self._generating = True
        try:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        finally:
            self._generating = False

    def get_model_info(self) -> dict:
        """HFLM's model info plus the focus configuration and what the gate did (stored in the results)."""
        return {**super().get_model_info(), "focus_config": self.focus_config.to_dict(),
                "focus_stats": {k: dict(v) for k, v in self.focus_stats.items()}}


class _FocusGenerating:
    """Stands in for the model inside HFLM._model_generate: ``generate`` runs ``text.focus_generate``."""

    def __init__(self, model: torch.nn.Module, lm: FocusLM):
        self._model, self._lm = model, lm

    def generate(self, *args: Any, **kwargs: Any):
        out = focus_generate(self._model, *args, focus_config=self._lm.focus_config, **kwargs)
        stats = self._lm.focus_stats["generate_until"]
        for name, value in last_focus_stats().totals.items():
            stats[name] += value
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


# ----------------------------------------------------------------------------- helpers
def scored_positions(requests: Sequence, max_length: int) -> dict[tuple[int, ...], int]:
    """Model input (as HFLM builds it) -> how many trailing positions of it are scored continuation tokens."""
    table: dict[tuple[int, ...], int] = {}
    for _, context, continuation in requests:
        inp = tuple((context + continuation)[-(max_length + 1):][:-1])  # HFLM's left truncation
        table[inp] = max(table.get(inp, 0), len(continuation))  # requests sharing an input share its logits
    return table


def row_positions(row: list[int], scored: dict[tuple[int, ...], int], lengths: list[int]) -> list[int]:
    """Scored positions of one right-padded batch row (several inputs may fit when one ends in the pad id)."""
    unpadded = next((i + 1 for i in range(len(row) - 1, -1, -1) if row[i] != PAD_ID), 0)
    found: set[int] = set()
    for length in lengths:
        if not unpadded <= length <= len(row):
            continue
        n = scored.get(tuple(row[:length]))
        if n:
            found.update(range(length - n, length))
    return sorted(found)


def check_keys(kwargs: dict[str, Any]) -> None:
    """ValueError naming unknown model_args keys and the allowed ones."""
    hflm = [p for p in inspect.signature(HFLM.__init__).parameters if p not in ("self", "kwargs")]
    unknown = sorted(set(kwargs) - set(hflm) - set(FROM_PRETRAINED_KEYS))
    if unknown:
        raise ValueError(f"{NAME}: unknown model_args key(s) {unknown}; allowed: focus keys "
                         f"{['pretrained', *FOCUS_KEYS, 'preset', 'focus_config']}, HFLM keys {hflm}, "
                         f"from_pretrained keys {list(FROM_PRETRAINED_KEYS)}")


def build_config(fields: dict[str, Any], preset: str | None, focus_config: Any) -> FocusConfig:
    """The FocusConfig from model_args; a bad value raises ValueError naming the field and what is allowed."""
    if "tau" in fields and "step_rule" not in fields:
        fields["step_rule"] = "normalized"  # tau alone selects its rule, as --tau does on the command line
    try:
        if isinstance(fields.get("params"), str):
            fields["params"] = method.parse_selector(fields["params"].replace("|", "+"))
        if focus_config is not None:
            if fields or preset is not None:
                raise ValueError(f"give either focus_config or the separate fields {sorted(fields)} / preset, not both")
            return FocusConfig.coerce(focus_config)
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; allowed: {sorted(PRESETS)}")
            return FocusConfig.preset(preset, **fields)
        return FocusConfig(**fields)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{NAME} model_args: {err}") from None


def resolve_pretrained(pretrained: Any, gguf_file: str | None) -> tuple[Any, str | None, bool]:
    """(what HFLM loads, gguf_file, is the embedded model): ``default`` and ``x.gguf`` become folder + file."""
    if isinstance(pretrained, Path):
        pretrained = str(pretrained)  # HFLM takes anything but a str for a model object
    if is_embedded(pretrained):
        path = default_model_path()
        return str(path.parent), path.name, True
    if isinstance(pretrained, str) and pretrained.endswith(".gguf"):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no such file or folder: {pretrained!r}")
        if gguf_file not in (None, path.name):
            raise ValueError(f"{NAME}: pretrained={pretrained!r} is a GGUF file and gguf_file={gguf_file!r} differs")
        return str(path.parent), path.name, False
    if isinstance(pretrained, str):  # a missing path or an uncached hub id offline: say so before HFLM tries
        resolve_source(pretrained, {} if gguf_file is None else {"gguf_file": gguf_file})
    return pretrained, gguf_file, False


def _register() -> None:
    """Register ``focus-hf`` once (``python -m`` runs this file as ``__main__``; a second class would clash)."""
    if NAME not in model_registry:
        register_model(NAME)(FocusLM)


_register()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m focus_decoding.harness ...``: the ``lm_eval`` command line with ``focus-hf`` registered.

    A bad ``focus-hf`` model argument or model path is one line on stderr and exit status 2; Ctrl-C is one line, 130.
    """
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except HarnessInputError as err:
        print(f"python -m focus_decoding.harness: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("python -m focus_decoding.harness: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
