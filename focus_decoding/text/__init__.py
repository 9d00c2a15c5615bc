"""The ``transformers`` adapter: the logits processor and its statistics, refining one position of a window,
the ways into ``generate`` (``custom_generate`` callable, ``focus_generate``, ``enable``), the Hub-style
``custom_generate/`` folder and (``text.harness``, optional) the lm-evaluation-harness backend.
"""
from .folder import FOLDER_FLOOR, METHOD_FOLDER, export_generate
from .ways_in import (CALLABLE_FLOOR, check_mode, disable, enable, focus_generate, generate, is_enabled,
                       last_focus_stats, resolve_config, set_focus_config)
from .processor import STAT_FIELDS, FocusLogitsProcessor, FocusStats, check_decoder_only
from .refine import refine_position, refine_positions_batched

__all__ = ["FOLDER_FLOOR", "METHOD_FOLDER", "export_generate", "CALLABLE_FLOOR", "check_mode", "disable", "enable",
           "focus_generate", "generate", "is_enabled", "last_focus_stats", "resolve_config", "set_focus_config",
           "STAT_FIELDS", "FocusLogitsProcessor", "FocusStats", "check_decoder_only", "refine_position",
           "refine_positions_batched"]
