"""Focus decoding ("focus on the likely") as a Hugging Face `custom_generate` method.

    model.generate(**inputs, custom_generate="<this folder>", trust_remote_code=True,
                   focus_config={"mode": "ifo", "lr": 1e-4, "params": "last:2"})

transformers calls ``generate(model=..., **generate_arguments)``. The method itself lives in the
`focus-decoding` package (one implementation, tested there); this file only hands the call over.
"""
from focus_decoding import focus_generate


def generate(model, *args, focus_config=None, **kwargs):
    """``model.generate(*args, **kwargs)`` with focus decoding; ``focus_config`` is a dict or FocusConfig."""
    for own in ("custom_generate", "trust_remote_code", "global_keys_to_exclude"):  # 4.52 passes its locals along
        kwargs.pop(own, None)
    return focus_generate(model, *args, focus_config=focus_config, **kwargs)
