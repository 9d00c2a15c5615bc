"""focus_decoding: "focus on the likely" test-time refinement of uncertain predictions."""
from .config import PRESETS, FocusConfig
from .core import focus_classes, focus_loss, focus_step, is_uncertain, refine, sgd_steps, split_parameters, top2_gap
from .report import FocusReport, markdown_table

__all__ = ["FocusConfig", "PRESETS", "FocusReport", "markdown_table", "focus_classes", "focus_loss",
           "focus_step", "is_uncertain", "refine", "sgd_steps", "split_parameters", "top2_gap"]
