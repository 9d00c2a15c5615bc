"""Plain vs focus greedy decoding with the embedded SmolLM2-135M-Instruct (about a minute on 2 CPU cores).

    python examples/generate.py [--new-tokens 24] [--threshold 0.04]
"""
from __future__ import annotations

import argparse

import torch

from focus_decoding import FocusConfig
from focus_decoding.text.ways_in import enable
from focus_decoding.resources.models import load_default_model

PROMPTS = [
    "The three primary colors are",
    "Write one sentence about why the sky is blue.",
]


def chat(tokenizer, text: str) -> str:
    """The instruct model's chat template around one user message."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threshold", type=float, default=0.04, help="gate: refine when p1 - p2 < threshold")
    args = parser.parse_args()

    model, tok = load_default_model()
    enable(model)
    config = FocusConfig.preset("smollm2-135m", mode="ifo", threshold=args.threshold)
    batch = tok([chat(tok, p) for p in PROMPTS], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        plain = model.generate(**batch, **kw)
        focus = model.generate(**batch, focus_config=config, return_dict_in_generate=True, **kw)
    start = batch.input_ids.shape[1]
    for row, prompt in enumerate(PROMPTS):
        a, b = plain[row, start:].tolist(), focus.sequences[row, start:].tolist()
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        print(f"\n=== {prompt}")
        print("plain:", tok.decode(a, skip_special_tokens=True))
        print("focus:", tok.decode(b, skip_special_tokens=True))
        if first is None:
            print("tokens: identical")
        else:  # after the first difference the contexts differ, so later tokens are not comparable
            print(f"first changed token at position {first}: {tok.decode([a[first]])!r} -> {tok.decode([b[first]])!r}")
        stats = focus.focus_stats
        print(f"stats: checked {stats.checked[row]}, uncertain {stats.uncertain[row]}, refined {stats.refined[row]}, "
              f"changed {stats.changed[row]}, nonfinite {stats.nonfinite[row]}")
    print("\ntotals:", focus.focus_stats.totals, "| config:", config.to_dict())


if __name__ == "__main__":
    main()
