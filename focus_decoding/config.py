"""`FocusConfig`: every knob of the method in one frozen, validated, serialisable object."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

MODES = ("ifo", "dofo", "entropy")  # the losses of method.LOSSES
MODE_LABELS = {"ifo": "iFo (raise focus logits)", "dofo": "doFo (lower other logits)",
               "entropy": "entropy minimisation (baseline)"}
STEP_RULES = ("fixed", "normalized")
PRECISIONS = ("float32", "model")  # how a float16/bfloat16 model's step is taken (method.precision)
# Algorithm 1 of the method (its vision defaults); the method has none for entropy: iFo's, the smaller one.
DEFAULT_LR = {"ifo": 1.6e-5, "dofo": 2.56e-4, "entropy": 1.6e-5}
DEFAULT_TAU = 1.0  # normalized rule: first-order decrease of the focus loss, in logit units

# Per-model step settings, per mode: the learning rates the method used for its text experiments,
# and, for the embedded SmolLM2-135M, what this package measured (README, "Results"). Each entry is
# a dict of FocusConfig fields.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2": {"ifo": {"lr": 4.03e-2}, "dofo": {"lr": 6.25e-8}},
    "llama-3.2-1b": {"ifo": {"lr": 2.29e-3}, "dofo": {"lr": 7.43e-6}},
    "gemma-2-2b": {"ifo": {"lr": 4.03e-2}, "dofo": {"lr": 1.31e-4}},
    "qwen2.5-1.5b": {"ifo": {"lr": 1.55e-2}, "dofo": {"lr": 7.43e-6}},
    # No setting gave a significant gain on three corpora (README, Results); this is the smallest step of
    # `tune`'s grid, never significantly harmful, on the 17x cheaper parameters that did as well as any.
    "smollm2-135m": {mode: {"lr": 1e-4, "params": "last:2"} for mode in ("ifo", "dofo")},
    "vision": {mode: {"lr": DEFAULT_LR[mode]} for mode in ("ifo", "dofo")},
}

ParamsSelector = Union[str, Sequence[str]]
SELECTOR_WORDS = ("all", "head", "tail")  # with "last:N": selectors that name a part of the model, not parameters
WRITTEN_BY = "written_by"  # key of a config file a program wrote: loaded strictly


@dataclass(frozen=True)
class FocusConfig:
    """How to refine an uncertain prediction.

    Args:
        mode: ``"ifo"`` raises the focus logits (loss = -mean focus logits); ``"dofo"`` lowers
            all the others (loss = +mean of the other logits); ``"entropy"`` minimises the softmax
            entropy (the one-input form of TENT's objective, a baseline: the focus set is not used).
        n_focus: how many of the most likely classes form the focus set (>= 1, < number of classes).
        threshold: refine only when p(top1) - p(top2) < threshold; in (0, 1]. 1.0 refines everything
            except exact certainty.
        lr: SGD learning rate of the ``"fixed"`` step rule; ``None`` takes the method's default for
            ``mode`` (1.6e-5 for iFo, 2.56e-4 for doFo). Must be None under ``"normalized"``.
        steps: number of plain SGD steps (>= 1), focus set fixed across steps.
        params: which parameters the step updates: ``"all"``; ``"last:N"`` = the last N transformer
            blocks plus the final norm (never the output head); ``"head"`` = a classifier's top-level
            fc/classifier/head module; ``"tail"`` = a language model's last MLP, its norms and the final
            norm (refined from kept states, a few matrix-vector products); or a list of name patterns
            (a full name, a module prefix such as ``"lm_head"``, or an ``fnmatch`` glob).
        step_rule: ``"fixed"`` (the method's: eta = lr) or ``"normalized"`` (eta = tau / ||g||^2 per
            input, over the selected parameters, so the focus loss drops by tau to first order
            whatever the size of the gradient).
        tau: the normalized rule's target decrease (> 0); ``None`` = 1.0. Must be None under ``"fixed"``.
        precision: how a float16/bfloat16 model takes the step. ``"float32"`` (default): the selected
            parameters' update and the refined forward are computed in float32 (one float32 copy of the
            selected parameters; the change of the logits is added to the model's own logits), so the step
            is the one asked for. ``"model"``: the update is rounded to the model's dtype, as plain SGD on
            the model would be; most of a small step is then lost (the statistics say how much). Float32
            and float64 models are not affected.

    Example:
        >>> from focus_decoding import FocusConfig
        >>> FocusConfig(mode="ifo", lr=1e-4).threshold
        0.04
        >>> FocusConfig.preset("gpt2").lr
        0.0403
        >>> FocusConfig(step_rule="normalized", tau=0.5).tau
        0.5
        >>> FocusConfig.from_dict(FocusConfig(steps=3).to_dict()) == FocusConfig(steps=3)
        True
    """

    mode: str = "ifo"
    n_focus: int = 2
    threshold: float = 0.04
    lr: float | None = None
    steps: int = 1
    params: ParamsSelector = "all"
    step_rule: str = "fixed"
    tau: float | None = None
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"FocusConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.step_rule not in STEP_RULES:
            raise ValueError(f"FocusConfig.step_rule must be one of {STEP_RULES}, got {self.step_rule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"FocusConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen dataclass
        set_("n_focus", _integer(self.n_focus, "n_focus"))
        set_("steps", _integer(self.steps, "steps"))
        if not _is_real(self.threshold) or not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError(f"FocusConfig.threshold must be a number in (0, 1], got {self.threshold!r}")
        set_("threshold", float(self.threshold))
        if self.step_rule == "fixed":
            if self.tau is not None:
                raise ValueError("FocusConfig.tau is the parameter of step_rule='normalized'; with step_rule='fixed' "
                                 f"set lr instead (got tau={self.tau!r})")
            set_("lr", _positive(DEFAULT_LR[self.mode] if self.lr is None else self.lr, "lr"))
        else:
            if self.lr is not None:
                raise ValueError("FocusConfig.lr is the parameter of step_rule='fixed'; with step_rule='normalized' "
                                 f"set tau instead (got lr={self.lr!r})")
            set_("tau", _positive(DEFAULT_TAU if self.tau is None else self.tau, "tau"))
        set_("params", normalise_params(self.params))

    @property
    def last_blocks(self) -> int | None:
        """N of a ``"last:N"`` selector, else None."""
        if isinstance(self.params, str) and self.params.startswith("last:"):
            return int(self.params[5:])
        return None

    @property
    def step_size_label(self) -> str:
        """``"lr=1e-4"`` or ``"tau=0.5"``: the step's one parameter, for tables and progress bars."""
        return f"lr={self.lr:g}" if self.step_rule == "fixed" else f"tau={self.tau:g}"

    @property
    def step_value(self) -> float:
        """The step's one number: ``lr`` (fixed rule) or ``tau`` (normalized)."""
        return self.lr if self.step_rule == "fixed" else self.tau

    @property
    def label(self) -> str:
        """``"ifo last:2 lr=0.001"``: mode, parameters and step, the one label of tables, plots and progress bars."""
        params = self.params if isinstance(self.params, str) else "+".join(self.params)
        return f"{self.mode} {params} {self.step_size_label}"

    @classmethod
    def preset(cls, name: str, mode: str = "ifo", **overrides: Any) -> "FocusConfig":
        """The step the method used (or this package measured) for model ``name`` in ``mode``; ``overrides`` win."""
        key = str(name).lower()
        if key not in PRESETS:
            raise ValueError(f"unknown FocusConfig preset {name!r}; allowed: {sorted(PRESETS)}")
        if mode not in MODES:
            raise ValueError(f"FocusConfig.mode must be one of {MODES}, got {mode!r}")
        fields = dict(PRESETS[key].get(mode, {}))  # a mode the preset does not know: the method's defaults
        if {"lr", "tau", "step_rule"} & set(overrides):  # an explicit step replaces the preset's step
            for name_ in ("lr", "tau", "step_rule"):
                fields.pop(name_, None)
            if "step_rule" not in overrides:  # tau alone means the normalized rule, lr alone the fixed one
                overrides = {**overrides, "step_rule": "normalized" if overrides.get("tau") is not None else "fixed"}
        return cls.from_dict({"mode": mode, **fields, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (for ``GenerationConfig`` and result files)."""
        out = dataclasses.asdict(self)
        if isinstance(self.params, tuple):
            out["params"] = list(self.params)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FocusConfig":
        """Inverse of ``to_dict``; unknown keys or a non-mapping raise ``ValueError``.

        A hand-written dict may leave fields out: they take their defaults. A dict holding
        ``"written_by"`` (the ``focus_config.json`` that ``tune`` writes) is loaded strictly: every field
        must be there, so an edited file that lost ``lr`` or ``mode`` is an error naming them, never the
        defaults in their place.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"FocusConfig.from_dict needs a dict of FocusConfig fields, got {type(data).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        data = dict(data)
        written_by = data.pop(WRITTEN_BY, None)
        unknown = set(data) - set(allowed)
        if unknown:
            raise ValueError(f"unknown FocusConfig field(s) {sorted(map(str, unknown))}; allowed: {allowed}")
        missing = [name for name in allowed if name not in data]
        if written_by is not None and missing:
            raise ValueError(f"this FocusConfig was written by {written_by} with every field, and {missing} are "
                             "missing now; restore them (or remove 'written_by' to take the defaults)")
        return cls(**data)

    def to_file_dict(self, written_by: str) -> dict[str, Any]:
        """``to_dict()`` marked as written by a program (``from_dict`` then loads it strictly)."""
        return {WRITTEN_BY: written_by, **self.to_dict()}

    @classmethod
    def coerce(cls, value: "FocusConfig | Mapping[str, Any]") -> "FocusConfig":
        """Accept a ``FocusConfig`` or its dict form."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise ValueError(f"focus_config must be a FocusConfig or a dict, got {type(value).__name__}")


def _is_real(x: Any) -> bool:
    """Python and numpy numbers, not bools (a bool threshold or lr is a mistake, not 1.0)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and type(x).__name__ != "bool_"


def _integer(x: Any, field: str) -> int:
    if isinstance(x, numbers.Integral) and not isinstance(x, bool) and type(x).__name__ != "bool_" and int(x) >= 1:
        return int(x)
    raise ValueError(f"FocusConfig.{field} must be an integer >= 1, got {x!r}")


def _positive(x: Any, field: str) -> float:
    if not _is_real(x) or not math.isfinite(float(x)) or float(x) <= 0:
        raise ValueError(f"FocusConfig.{field} must be a finite number > 0, got {x!r}")
    return float(x)


def normalise_params(params: ParamsSelector) -> ParamsSelector:
    """A selector in its one form: ``"all"``, ``"last:N"`` (N without leading zeros) or a tuple of patterns."""
    if isinstance(params, str) and not params.strip():
        params = ()
    if isinstance(params, str):
        params = params.strip()
        if params in SELECTOR_WORDS:
            return params
        if params.startswith("last:"):
            n = params[5:]
            if not (n.isascii() and n.isdigit()) or int(n) < 1:
                raise ValueError(f"FocusConfig.params 'last:N' needs an integer N >= 1, got {params!r}")
            return f"last:{int(n)}"
        return (params,)  # a single name pattern
    if isinstance(params, Sequence) and params and all(isinstance(p, str) and p.strip() for p in params):
        words = [p for p in params if p.strip() in SELECTOR_WORDS or p.strip().startswith("last:")]
        if words and len(params) > 1:
            raise ValueError(f"FocusConfig.params: {words[0]!r} selects on its own and cannot be combined with other "
                             f"patterns (got {list(params)!r}); allowed: 'all', 'last:N', 'head', 'tail' or a list of "
                             "name patterns")
        if words:
            return normalise_params(words[0])
        return tuple(p.strip() for p in params)
    raise ValueError(
        "FocusConfig.params must be 'all', 'last:N' (N >= 1), 'head', 'tail' or a non-empty list of non-empty "
        f"parameter name patterns, got {params!r}")
