"""The method and nothing else: gate, focus set, losses, step size, functional SGD step, parameter
selection, module views and the cached top-blocks prefix. It knows no decoding loop, image, file or screen.

Read in this order: ``gate`` (which predictions, which classes) -> ``losses`` (one per mode) ->
``step`` (eta, the update, Algorithm 1) -> ``params`` (what the step updates) -> ``views`` (where
it runs) -> ``prefix`` (running only the top blocks, from kept states) -> ``tail`` (running only a classifier's
head, or a language model's position-wise tail, from kept inputs).
"""
from .gate import focus_classes, gate, is_uncertain, top2_gap, widen
from .losses import HEAD_INPUT_MODES, LOSSES, dofo_loss, entropy_loss, focus_loss, head_input_loss, ifo_loss
from .params import (FINAL_NORM_NAMES, find_blocks, final_norm_names, last_blocks_modules, name_matches,
                     parse_selector, parse_selectors, selector_text, split_parameters)
from .step import (StepResult, as_normal_tensor, batched_sgd_steps, focus_step, grad_enabled, refine, refine_batched,
                   refined_values, sgd_steps, sgd_update, sgd_update_, squared_norm, step_result, step_size,
                   warn_if_unchanged)
from .precision import Float32View, float32_like, head_logits, merged, needs_float32
from .views import Forward, as_view, input_device, is_view, last_logits_kwargs, model_forward, module_view

__all__ = [
    "focus_classes", "gate", "is_uncertain", "top2_gap", "widen",
    "HEAD_INPUT_MODES", "LOSSES", "dofo_loss", "entropy_loss", "focus_loss", "head_input_loss", "ifo_loss",
    "FINAL_NORM_NAMES", "find_blocks", "final_norm_names", "last_blocks_modules", "name_matches", "parse_selector",
    "parse_selectors", "selector_text", "split_parameters",
    "StepResult", "as_normal_tensor", "batched_sgd_steps", "focus_step", "grad_enabled", "refine", "refine_batched",
    "refined_values", "sgd_steps", "sgd_update", "sgd_update_", "squared_norm", "step_result", "step_size",
    "warn_if_unchanged",
    "Float32View", "float32_like", "head_logits", "merged", "needs_float32",
    "Forward", "as_view", "input_device", "is_view", "last_logits_kwargs", "model_forward", "module_view",
]
