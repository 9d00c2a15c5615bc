"""Cheap refinements with a cached prefix: run the step through the top N blocks only.

With ``FocusConfig(params="last:N")`` the step updates the last N blocks and the final norm only,
so the hidden states that ENTER block ``L-N`` are the same before and after the update, at every
context position. We keep them (from generation's normal cached forward via ``HiddenRecorder``,
or from an evaluation window's ``output_hidden_states``) and build a ``Forward`` that runs
only the top N blocks, the final norm and the head (``top_forward``). It plugs into the same
``step.refine`` / ``step.focus_step`` with the same trainable/frozen dicts; nothing else changes.

When the cached path is used (``prefix_blocks``): the architecture is supported
(``supports_prefix``: Llama / SmolLM2, Qwen2, Mistral, GPT-2, and Gemma-2/3, whose layers differ: the
top blocks get their own attention inputs and the logits their softcapping) and every trainable parameter lives ONLY in the top blocks, the final norm or the head. The
tied-head rule follows: ``last:N`` never selects the head, so an embedding tied to the head is never
updated and the kept states stay valid; a pattern list that selects the head (or embedding) of a
TIED model updates the embedding too, so the kept states would be stale and the uncached path is
used. Anything unsupported returns ``None`` and the caller falls back to the uncached path (with a
one-time warning from ``warn_fallback``), never a wrong result.

Example:
    >>> import torch
    >>> from focus_decoding import FocusConfig, method
    >>> from focus_decoding.resources import tiny_causal_lm
    >>> from focus_decoding.method.prefix import prefix_blocks, top_forward, input_states
    >>> model, ids = tiny_causal_lm("llama"), torch.tensor([[1, 5, 7, 9]])
    >>> config = FocusConfig(params="last:2", lr=1e-2)
    >>> n = prefix_blocks(model, config)
    >>> hidden = input_states(model, n, ids)  # states entering block L-n
    >>> trainable, frozen = method.split_parameters(model, config.params)
    >>> fast = top_forward(model, n, hidden)
    >>> slow = method.model_forward(model, ids, use_cache=False, select=lambda o: o.logits[0, -1])
    >>> focus = method.focus_classes(slow({}), 2)
    >>> a = method.refine(fast, trainable, frozen, focus, config)
    >>> b = method.refine(slow, trainable, frozen, focus, config)
    >>> torch.allclose(a, b, atol=1e-5)
    True
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..config import FocusConfig
from .params import find_blocks, final_norm_names, split_parameters
from .precision import float32_like, head_logits
from .step import as_normal_tensor
from .views import Forward, as_view, module_view

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gpt2", "gemma3_text", "gemma2")


# ----------------------------------------------------------------------------- what is supported
def supports_prefix(model: nn.Module) -> bool:
    """True for decoder-only Llama-style (Llama, SmolLM2, Qwen2, Mistral), GPT-2 and Gemma-2/3 models."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        return False
    try:
        _top_modules(model, 1)
    except ValueError:
        return False
    return True


def prefix_blocks(model: nn.Module, config: FocusConfig, *, warn: bool = False) -> int | None:
    """How many top blocks the step can run through with kept states, or None (use the uncached path).

    ``last:N`` gives N. A pattern list gives the fewest top blocks holding every trainable parameter;
    None when one is also used below them (the head of a tied model is the embedding) or for ``"all"``.
    ``warn``: a ``last:N`` that falls back to the uncached path says so once (``warn_fallback``).
    """
    n = _prefix_blocks(model, config)
    if warn and n is None and config.last_blocks is not None:
        warn_fallback(model, config)
    return n


def _prefix_blocks(model: nn.Module, config: FocusConfig) -> int | None:
    if config.params == "all" or not supports_prefix(model):
        return None
    trainable, _ = split_parameters(model, config.params)
    _, blocks = find_blocks(model)
    candidates = [config.last_blocks] if config.last_blocks is not None else range(1, len(blocks) + 1)
    for n in candidates:
        if _only_in_top(model, n, trainable):
            return n
    return None


def _only_in_top(model: nn.Module, n: int, trainable: Mapping[str, Tensor]) -> bool:
    """True when no trainable parameter is used below block L-n (e.g. a head tied to the embedding)."""
    names = _top_names(model, n)
    inside = lambda name: any(name == t or name.startswith(t + ".") for t in names)  # noqa: E731
    top, lower = set(), set()
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):  # a tied parameter is owned by modules in both parts
            (top if inside(name) else lower).add(id(p))
    return all(id(p) in top and id(p) not in lower for p in trainable.values())


_warned: set[str] = set()


def warn_fallback(model: nn.Module, config: FocusConfig) -> None:
    """One-time warning that ``last:N`` runs uncached for this model/selector."""
    key = f"{type(model).__name__}:{config.params}"
    if key in _warned:
        return
    _warned.add(key)
    why = ("the architecture is not supported" if not supports_prefix(model)
           else "a trainable parameter is also used below the top blocks (e.g. a head tied to the embedding)")
    warnings.warn(f"focus_decoding: cached-prefix refinement unavailable for {type(model).__name__} with "
                  f"params={config.params!r} ({why}); using the uncached path (warned once)", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- the top of the model
def _top_names(model: nn.Module, n: int) -> list[str]:
    """Qualified module names of blocks L-n.., the final norm and the head."""
    prefix, blocks = find_blocks(model)
    if not 1 <= n <= len(blocks):
        raise ValueError(f"n must be in 1..{len(blocks)} (the model's blocks), got {n}")
    modules = dict(model.named_modules())
    norms = final_norm_names(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((nm for nm, m in modules.items() if head is not None and m is head), None)
    if len(norms) != 1 or head_name is None:
        raise ValueError(f"{type(model).__name__}: cannot find one final norm and an output head")
    return [f"{prefix}.{i}" for i in range(len(blocks) - n, len(blocks))] + [norms[0], head_name]


def _top_modules(model: nn.Module, n: int) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    return {name: modules[name] for name in _top_names(model, n)}


class _Top(nn.Module):
    """References (never copies) the model's top blocks, final norm and head."""

    def __init__(self, blocks: Sequence[nn.Module], norm: nn.Module, head: nn.Module, softcap: float | None = None):
        super().__init__()
        self.blocks, self.norm, self.head, self.softcap = nn.ModuleList(blocks), norm, head, softcap

    def forward(self, hidden: Tensor, inputs: Sequence[tuple[tuple, dict]], pre_head: bool = False) -> Tensor:
        """Logits of the last position, from the states entering the first kept block; ``inputs`` = each
        block's own extra (args, kwargs): layers of one model may differ (sliding vs full attention).
        ``pre_head``: the head's input [H] at the last position instead (its normed hidden state)."""
        for block, (args, kwargs) in zip(self.blocks, inputs):
            out = block(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers < 4.54 returns tuples
        # Norm and head are per-position: the last position alone gives the same logits.
        normed = self.norm(hidden[:, -1:])
        if pre_head:
            return normed.reshape(-1)
        logits = head_logits(self.head, normed)[0, -1]
        if self.softcap:  # Gemma-2/3 cap their logits after the head (final_logit_softcapping)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class _Captured(Exception):
    pass


def _block_inputs(view: nn.Module, n: int, hidden: Tensor, attention_mask: Tensor | None) -> list[tuple[tuple, dict]]:
    """The extra (args, kwargs) (causal mask, rotary embeddings, ...) the model feeds each of its top ``n`` blocks
    for an uncached input of ``hidden``'s length, taken from the model's own forward.

    The blocks do no work meanwhile: on a throwaway view every block passes its input through, each top block
    first records what it was given, and the final norm stops the forward. Nothing reaches the user's model.
    """
    probe = module_view(view)
    _, blocks = find_blocks(probe)
    top = list(blocks)[len(blocks) - n:]
    seen: list[tuple[tuple, dict]] = []

    def passthrough(index):
        def forward(hidden_states, *args, **kwargs):
            if index >= len(blocks) - n:
                kwargs = dict(kwargs)
                kwargs.pop("hidden_states", None)
                seen.append((tuple(args), kwargs))
                if len(seen) == n:
                    raise _Captured()
            while isinstance(hidden_states, tuple):  # what the previous passthrough returned
                hidden_states = hidden_states[0]
            # a 1-tuple: loops that index the block's output ([0], transformers < 4.54) and loops that pass it
            # on as it is (the next passthrough unwraps it) both carry on to the top blocks
            return (hidden_states,)
        return forward

    for i, block in enumerate(blocks):
        block.__dict__["forward"] = passthrough(i)  # the probe's own module copies: nothing else sees them
    try:  # outside inference mode: the step saves the mask and rotary tensors for backward
        with torch.inference_mode(False), torch.no_grad():
            probe(inputs_embeds=hidden.detach(), attention_mask=attention_mask, use_cache=False)
    except _Captured:
        pass
    if len(seen) != len(top):
        raise RuntimeError(f"{type(view).__name__} never called its top {n} blocks")
    return seen


def top_forward(model: nn.Module, n: int, hidden: Tensor, attention_mask: Tensor | None = None) -> Forward:
    """A ``Forward`` running blocks L-n.., the final norm and the head on the kept ``hidden``.

    ``hidden`` is ``[1, T, H]``: the states entering block L-n for an unpadded context of T tokens
    (positions 0..T-1). The causal mask and rotary embeddings are the ones the model itself builds
    for that input. ``attention_mask``, if given, must be all ones (the context is unpadded).
    """
    if attention_mask is not None and (attention_mask.shape != hidden.shape[:2] or not bool(attention_mask.all())):
        raise ValueError("attention_mask must be None or all ones of shape [1, T] (the context is unpadded)")
    logits = top_logits(model, n, hidden)
    hidden = as_normal_tensor(hidden.detach())
    return lambda values: logits(values, hidden)


class TopLogits:
    """``logits(values, hidden)``: the last position's logits from ``hidden`` [1, T, H] entering block L-n;
    ``logits.pre_head(values, hidden)``: the head's input [H] there (for ``tail.top_loss_forward``)."""

    def __init__(self, top: nn.Module, rename: Mapping[str, str], inputs: list):
        self.top, self.rename, self.inputs = top, rename, inputs

    def __call__(self, values: Mapping[str, Tensor], hidden: Tensor, pre_head: bool = False) -> Tensor:
        local = {k: values[c] for k, c in self.rename.items() if c in values}
        return functional_call(self.top, local, (float32_like(hidden, values), self.inputs, pre_head), strict=False)

    def pre_head(self, values: Mapping[str, Tensor], hidden: Tensor) -> Tensor:
        return self(values, hidden, pre_head=True)


def top_logits(model: nn.Module, n: int, like: Tensor) -> TopLogits:
    """``logits(values, hidden)``: the last position's logits from ``hidden`` [1, T, H] entering block L-n, for every
    unpadded context of ``like``'s length T (they share the mask and rotary embeddings): one function that
    ``method.refine_batched`` maps over the states of many rows at once."""
    if like.dim() != 3 or like.shape[0] != 1:
        raise ValueError(f"hidden must have shape [1, T, H], got {tuple(like.shape)}")
    view = as_view(model)  # swaps happen on the view's modules
    mods = list(_top_modules(view, n).values())
    top = _Top(mods[:-2], mods[-2], mods[-1], getattr(view.config, "final_logit_softcapping", None))
    canonical = {id(p): name for name, p in view.named_parameters()}
    rename = {local: canonical[id(p)] for local, p in top.named_parameters()}
    return TopLogits(top, rename, _block_inputs(view, n, as_normal_tensor(like.detach()), None))


# ----------------------------------------------------------------------------- where the states come from
def input_states(model: nn.Module, n: int, input_ids: Tensor, **kwargs) -> Tensor:
    """States entering block L-n for ``input_ids`` (a plain no-grad forward; a reference and test helper)."""
    model = module_view(model, eval_mode=False)  # the hook goes on a private copy of the module tree
    _, blocks = find_blocks(model)
    seen = []
    handle = blocks[len(blocks) - n].register_forward_pre_hook(
        lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False, **kwargs)
    finally:
        handle.remove()
    return seen[0]


def window_states(outputs, model: nn.Module, n: int) -> Tensor:
    """States entering block L-n from a forward run with ``output_hidden_states=True`` ([B, T, H])."""
    _, blocks = find_blocks(model)
    return outputs.hidden_states[len(blocks) - n]


def kept_state_bytes(batch: int, length: int, hidden_size: int, dtype: torch.dtype, layers: int = 1) -> int:
    """Memory of the kept states: batch x length x hidden x dtype bytes per kept layer."""
    return batch * length * hidden_size * torch.empty((), dtype=dtype).element_size() * layers


class HiddenRecorder:
    """Records the states entering block L-n during ``generate``'s normal cached forward.

    A forward pre-hook keeps the states of each forward (prompt: every position; then one new
    position per row); ``observe(input_ids)``, called once per step with the full sequences the
    forward ran on (a logits processor sees exactly those), files them per row. Rows reordered by
    beam search or expanded by ``num_return_sequences`` are matched by token prefix: the states
    depend only on the tokens. Use as a context manager (the hook is removed on exit).
    """

    def __init__(self, model: nn.Module, n: int):
        if not supports_prefix(model):
            raise ValueError(f"HiddenRecorder: {type(model).__name__} is not supported; see supports_prefix")
        _, blocks = find_blocks(model)
        if not 1 <= n <= len(blocks):
            raise ValueError(f"n must be in 1..{len(blocks)} (the model's blocks), got {n}")
        self.model, self.n, self.block = model, n, blocks[len(blocks) - n]
        self._handles: list = []
        self._armed = False
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded (a new ``generate`` call)."""
        self._pending: list[Tensor] = []
        self._ids: Tensor | None = None  # [B, S] full sequences the states belong to
        self._states: Tensor | None = None  # [B, capacity, H]; positions >= S unused
        self.valid = True

    def __enter__(self) -> "HiddenRecorder":
        self._handles = [self.model.register_forward_pre_hook(self._arm, with_kwargs=True),
                         self.model.register_forward_hook(self._disarm),
                         self.block.register_forward_pre_hook(self._hook, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _arm(self, module, args, kwargs) -> None:
        # Only generate's cached forwards are recorded; uncached forwards (use_cache=False) must not be.
        self._armed = bool(kwargs.get("use_cache"))

    def _disarm(self, module, args, output) -> None:
        self._armed = False

    def _hook(self, module, args, kwargs) -> None:
        if not self._armed:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        self._pending.append(hidden.detach())

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept states."""
        return 0 if self._states is None else self._states.numel() * self._states.element_size()

    def observe(self, input_ids: Tensor) -> None:
        """File the states of the latest forward, which ran on the full sequences ``input_ids`` [B, S]."""
        pending, self._pending = self._pending, []
        if not self.valid:
            return
        if len(pending) != 1:  # a step was missed (or none ran): cannot tell which rows are which
            self.valid = False
            return
        new = pending[0]
        batch, length = input_ids.shape
        start = length - new.shape[1]
        if new.shape[0] != batch or start < 0:
            self.valid = False
            return
        if self._ids is None:
            if start != 0:
                self.valid = False
                return
            self._states = new.new_empty(batch, max(2 * length, 16), new.shape[-1])
        else:
            if start != self._ids.shape[1]:
                self.valid = False
                return
            order = self._match(input_ids[:, :start])
            if order is None:
                self.valid = False
                return
            if order is not ...:
                self._states = self._states[order]
            if length > self._states.shape[1]:  # grow by doubling, like a list
                grown = self._states.new_empty(batch, 2 * length, self._states.shape[-1])
                grown[:, :start] = self._states[:, :start]
                self._states = grown
        self._states[:, start:length] = new
        self._ids = input_ids.clone()

    def _match(self, prefix: Tensor):
        """Index of the stored row each current row continues (``...`` when unchanged), or None."""
        if prefix.shape == self._ids.shape and torch.equal(prefix, self._ids):
            return ...
        same = (prefix[:, None, :] == self._ids[None, :, :]).all(-1)  # [B_now, B_before]
        if not bool(same.any(-1).all()):
            return None
        return same.float().argmax(-1)

    def hidden_for(self, row: int, input_ids_row: Tensor, attention_mask_row: Tensor | None = None) -> Tensor | None:
        """[1, T, H] states of ``row``'s unpadded context, or None when they are not available.

        ``attention_mask_row`` marks the prompt's real tokens (left padding = 0); it may be shorter
        than the sequence (generated tokens are all attended).
        """
        if not self.valid or self._ids is None or row >= self._ids.shape[0]:
            return None
        if input_ids_row.shape[-1] != self._ids.shape[1] or not torch.equal(input_ids_row.reshape(-1).to(self._ids.device), self._ids[row]):
            return None
        length = self._ids.shape[1]
        keep = torch.ones(length, dtype=torch.bool, device=self._states.device)
        if attention_mask_row is not None:
            mask = attention_mask_row.reshape(-1).to(keep.device).bool()
            keep[: mask.shape[0]] = mask[:length]
        return self._states[row, :length][keep].unsqueeze(0)
