"""Which parameters the step updates: the ``params`` selector, its one text grammar, and the split.

A selector is ``"all"``; ``"last:N"`` (the last N transformer blocks plus the final norm, never the
output head); ``"head"`` (a classifier's one top-level ``fc``/``classifier``/``head``/``heads``
module); ``"tail"`` (a language model's position-wise tail: the last block's MLP with its norms and
the final norm); or a tuple of name patterns (a full name, a module prefix such as ``"lm_head"`` or
``"model.layers.3"``, or an ``fnmatch`` glob such as ``"*norm*"``). On the command line and in
``tune`` grids one grammar writes them: ``+`` joins the patterns of one selector and ``,`` separates
selectors (``"last:2,model.norm+lm_head"`` is two candidates).

Example:
    >>> from focus_decoding.method.params import parse_selector, parse_selectors
    >>> parse_selector("last:2"), parse_selector("model.norm+lm_head")
    ('last:2', ('model.norm', 'lm_head'))
    >>> parse_selectors("all,last:2,model.norm+lm_head")
    ['all', 'last:2', ('model.norm', 'lm_head')]
"""
from __future__ import annotations

import fnmatch
from typing import Any, Iterable

from torch import Tensor, nn

from ..config import SELECTOR_WORDS, normalise_params
from .offload import materialize

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")
HEAD_NAMES = ("fc", "classifier", "head", "heads")  # torchvision's and ccexam's names for a classifier's head
# model type -> (norm before the MLP, the MLP, norm after it or None): the position-wise part of the last block
MLP_PARTS = {
    "llama": ("post_attention_layernorm", "mlp", None), "qwen2": ("post_attention_layernorm", "mlp", None),
    "mistral": ("post_attention_layernorm", "mlp", None), "gpt2": ("ln_2", "mlp", None),
    "gemma3_text": ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
    "gemma2": ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
}




# ----------------------------------------------------------------------------- the text grammar
def parse_selector(text: str) -> Any:
    """One selector from text: ``"all"``, ``"last:N"``, ``"head"``, ``"tail"``, or patterns joined by ``+`` (a tuple)."""
    patterns = tuple(p.strip() for p in str(text).split("+") if p.strip())
    if not patterns:
        raise ValueError(f"params selector {text!r} is empty; allowed: all, last:N, head, tail or name patterns "
                         "joined by '+'")
    if len(patterns) == 1 and (patterns[0] in SELECTOR_WORDS or patterns[0].startswith("last:")):
        return patterns[0]
    return patterns


def parse_selectors(text: str) -> list[Any]:
    """Comma-separated selectors (a ``tune`` grid); duplicates, after normalising, are kept once."""
    out: list[Any] = []
    for item in (part for part in str(text).split(",") if part.strip()):
        selector = normalise_params(parse_selector(item))
        if selector not in out:
            out.append(selector)
    if not out:
        raise ValueError(f"params must name at least one selector (all, last:N, patterns), got {text!r}")
    return out


def selector_text(selector: Any) -> str:
    """The grammar's text for a selector (the inverse of ``parse_selector``)."""
    return selector if isinstance(selector, str) else "+".join(selector)


# ----------------------------------------------------------------------------- the model's structure
def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer's stack of blocks: the ModuleList of identical modules with most parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise ValueError(f"FocusConfig.params='last:N' needs a stack of blocks; none found in {type(model).__name__}")
    return best


def final_norm_names(model: nn.Module) -> list[str]:
    """Qualified names of the final norm(s) that sit beside the blocks (``model.norm``, ``transformer.ln_f``)."""
    prefix, _ = find_blocks(model)
    parent = prefix.rpartition(".")[0]
    modules = dict(model.named_modules())
    return [name for name in (f"{parent}.{nm}" if parent else nm for nm in FINAL_NORM_NAMES) if name in modules]


def last_blocks_modules(model: nn.Module, n: int) -> list[str]:
    """Module names ``last:n`` selects: the last n blocks and the final norm."""
    prefix, blocks = find_blocks(model)
    if not 1 <= n <= len(blocks):
        raise ValueError(f"FocusConfig.params='last:{n}' but the model has {len(blocks)} blocks; "
                         f"allowed N: 1..{len(blocks)}")
    return [f"{prefix}.{i}" for i in range(len(blocks) - n, len(blocks))] + final_norm_names(model)


def name_matches(name: str, pattern: str) -> bool:
    """``name`` is ``pattern``, lies under the module ``pattern``, or matches it as an ``fnmatch`` glob."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def head_name(model: nn.Module) -> str:
    """The classifier head ``params="head"`` means: the one top-level module named fc, classifier, head or heads."""
    found = [name for name, m in model.named_children() if name in HEAD_NAMES and any(True for _ in m.parameters())]
    if len(found) != 1:
        which = f"has {found}" if found else "has none of them"
        raise ValueError(f"FocusConfig.params='head' needs exactly one top-level module named one of {HEAD_NAMES} "
                         f"with parameters; {type(model).__name__} {which}; name the head's parameters instead "
                         "(e.g. params=['classifier'])")
    return found[0]


def tail_modules(model: nn.Module) -> list[str]:
    """Module names of the position-wise tail: the last block's norm(s) and MLP, and the final norm."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in MLP_PARTS:
        raise ValueError(f"FocusConfig.params='tail' is defined for the model types {sorted(MLP_PARTS)}; this model's "
                         f"is {kind!r} ({type(model).__name__}); use 'last:N' instead")
    prefix, blocks = find_blocks(model)
    last = f"{prefix}.{len(blocks) - 1}"
    norms = final_norm_names(model)
    if len(norms) != 1:
        raise ValueError(f"FocusConfig.params='tail': {type(model).__name__} has no single final norm ({norms})")
    return [f"{last}.{part}" for part in MLP_PARTS[kind] if part is not None] + norms


# ----------------------------------------------------------------------------- the split
def split_parameters(model: nn.Module, selector) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(parameters the step updates, the rest), by canonical name; tied weights appear once.

    Every pattern of a pattern list must match at least one parameter: a typo is an error naming it,
    never a smaller selection than asked for.
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    if not canonical:
        raise ValueError("the model has no parameters, so there is nothing to refine")
    if selector == "all":
        chosen = set(canonical.values())
    else:
        word = isinstance(selector, str)
        patterns = (last_blocks_modules(model, int(selector[5:])) if word and selector.startswith("last:")
                    else [head_name(model)] if selector == "head" else tail_modules(model) if selector == "tail"
                    else list(selector))
        chosen = _matched(model, canonical, patterns, check=not word)
    params = dict(model.named_parameters())
    trainable = materialize(model, {n: params[n] for n in params if n in chosen})  # offloaded: loaded, to update
    frozen = {n: params[n].detach() for n in params if n not in chosen}
    return trainable, frozen


def _matched(model: nn.Module, canonical: dict[int, str], patterns: Iterable[str], check: bool) -> set[str]:
    chosen: set[str] = set()
    aliases = list(model.named_parameters(remove_duplicate=False))
    for pattern in patterns:
        hits = {canonical[id(p)] for alias, p in aliases if name_matches(alias, pattern)}
        if check and not hits:
            raise ValueError(f"FocusConfig.params pattern {pattern!r} matches no parameter of {type(model).__name__}; "
                             f"allowed: 'all', 'last:N' or patterns such as {sorted(canonical.values())[:3]}")
        chosen |= hits
    return chosen
