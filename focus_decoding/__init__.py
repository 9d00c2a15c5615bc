"""focus_decoding: "focus on the likely" test-time refinement of uncertain predictions.

One package per idea, each importing only from those listed after it:

    cli/         the command line: parser, one module per command, what every job shares, figures
    tune/        the race on dev (pure bookkeeping) and the verdict on test
    evaluation/  reports and measures, next-token and classifier evaluation, the `evaluate` metric
    text/        the transformers adapter: processor, ways into generate, lm-eval backend, custom_generate/
    vision/      FocusClassifier, image models and data, GradCAM
    method/      gate, focus set, losses, step, parameter selection, module views, cached prefix
    config.py    FocusConfig and presets            resources/   model loaders, corpora, hub checks (leaves)

Every name below is imported on first use, so ``import focus_decoding`` (and the command line's
Ctrl-C handler) costs nothing before it is needed.
"""
from __future__ import annotations

import importlib

from . import _compat

__version__ = "0.3.0"

# public name -> the module that defines it
_NAMES = {
    "FocusConfig": "config", "PRESETS": "config", "MODES": "config",
    "focus_classes": "method", "focus_loss": "method", "focus_step": "method", "gate": "method",
    "is_uncertain": "method", "refine": "method", "sgd_steps": "method", "split_parameters": "method",
    "top2_gap": "method", "LOSSES": "method",
    "FocusLogitsProcessor": "text", "FocusStats": "text", "enable": "text", "disable": "text", "is_enabled": "text",
    "generate": "text", "focus_generate": "text", "last_focus_stats": "text", "set_focus_config": "text",
    "export_generate": "text",
    "FocusClassifier": "vision", "ClassifierStats": "vision", "load_classifier": "vision",
    "load_image_dataset": "vision",
    "FocusReport": "evaluation", "markdown_table": "evaluation", "evaluate_next_token": "evaluation",
    "evaluate_classifier": "evaluation",
    "load_default_model": "resources", "load_texts": "resources",
    "run_eval_vision": "cli.eval_vision",
}
__all__ = sorted(_NAMES)

_compat.install(__name__)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value  # once: the next access is a plain attribute
        return value
    raise AttributeError(f"module 'focus_decoding' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
