"""focus_decoding: "focus on the likely" test-time refinement of uncertain predictions.

Layout, read top-down: ``config`` (FocusConfig) -> ``core`` (the method) -> adapters ``generation``
(transformers) and ``vision`` (image classifiers) -> evaluation ``eval_text`` / ``eval_vision``
(one ``FocusReport`` type) -> ways in from other tools (``decoding``: ``custom_generate`` and
``enable``) -> ``cli`` and ``benchmarks/``.
"""
from .config import PRESETS, FocusConfig
from .core import focus_classes, focus_loss, focus_step, is_uncertain, refine, sgd_steps, split_parameters, top2_gap
from .decoding import disable, enable, focus_generate, generate, is_enabled, last_focus_stats, set_focus_config
from .generation import FocusLogitsProcessor, FocusStats
from .models import load_default_model
from .report import FocusReport, markdown_table

# Text evaluation pulls in `datasets`, vision needs the optional torchvision: import them on first use.
_LAZY = {
    "evaluate_next_token": "eval_text",
    "load_texts": "data",
    "FocusClassifier": "vision",
    "ClassifierStats": "vision",
    "load_classifier": "vision",
    "load_image_dataset": "vision",
    "evaluate_classifier": "eval_vision",
    "run_eval_vision": "cli_eval_vision",
}

__all__ = ["FocusConfig", "PRESETS", "FocusReport", "markdown_table", "FocusLogitsProcessor", "FocusStats",
           "enable", "disable", "is_enabled", "generate", "focus_generate", "last_focus_stats", "set_focus_config", "load_default_model", "focus_classes", "focus_loss", "focus_step", "is_uncertain",
           "refine", "sgd_steps", "split_parameters", "top2_gap", *_LAZY]
__version__ = "0.2.0"


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'focus_decoding' has no attribute {name!r}")
