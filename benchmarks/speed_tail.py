"""What refining through the tail costs in generation, on the embedded SmolLM2-135M (CPU, one torch thread).

    python benchmarks/speed_tail.py [--quick] [--out docs/results/speed_tail.json]

Two ratios of issue 17, each from one run, as the cost a setting *adds* to plain greedy generation of the
same tokens (``min_new_tokens`` = ``max_new_tokens``, so every variant emits as many):
  every token refined (threshold 1), a 256-token prompt, 32 new tokens:
      (tail - plain) / (last:1 - plain)                       target <= 0.2
  the default gate (threshold 0.04, the preset's step), 32 new tokens from a short prompt:
      tail / plain  (and last:2 / plain)                       target <= 1.05
Times are CPU seconds of the calling thread (other jobs on a shared machine do not count), the median of
interleaved repeats (plain, A, B, plain, A, B, ...) so load drift hits every variant alike. Per refinement
seconds per selector at several context lengths: ``speed_params.py --selectors all,last:1,last:2,tail``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from focus_decoding import FocusConfig, focus_generate, last_focus_stats
from focus_decoding.resources.corpora import load_texts
from focus_decoding.resources.models import load_default_model

PRESET = FocusConfig.preset("smollm2-135m")


def _times(fns: dict, repeats: int) -> dict[str, float]:
    """Median thread-CPU seconds of each callable over interleaved repeats (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            times[name].append(time.thread_time() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def generation(model, ids: torch.Tensor, new_tokens: int, variants: dict[str, FocusConfig | None],
               repeats: int) -> dict:
    """Seconds of greedy generation per variant (None: plain) and each focus variant's refinement counts."""
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))

    def job(cfg):
        return (lambda: model.generate(ids, **common)) if cfg is None else \
            (lambda: focus_generate(model, ids, focus_config=cfg, **common))

    seconds = _times({k: job(c) for k, c in variants.items()}, repeats)
    refined = {}
    for name, cfg in variants.items():
        if cfg is not None:
            focus_generate(model, ids, focus_config=cfg, **common)
            refined[name] = last_focus_stats().totals["refined"]
    return {"prompt_tokens": ids.shape[1], "new_tokens": new_tokens, "seconds": seconds, "refined": refined}


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    model, tok = load_default_model()
    text = " ".join(load_texts(max_texts=40))
    long_prompt = tok(text, return_tensors="pt").input_ids[:, :64 if quick else 256]
    short_prompt = tok(["Write a short story about a robot who learns to paint."], return_tensors="pt").input_ids
    new, repeats = (8, 1) if quick else (32, 3)
    every = dict(threshold=1.0, lr=PRESET.lr)
    all_refined = generation(model, long_prompt, new, {
        "plain": None, "last:1": FocusConfig(params="last:1", **every), "tail": FocusConfig(params="tail", **every)},
        repeats)
    s = all_refined["seconds"]
    all_refined["tail_added_over_last1_added"] = (s["tail"] - s["plain"]) / (s["last:1"] - s["plain"])
    all_refined["target"] = 0.2
    gated = generation(model, short_prompt, new, {
        "plain": None, "last:2": PRESET, "tail": FocusConfig(params="tail", lr=PRESET.lr)}, repeats)
    s = gated["seconds"]
    gated.update({"tail/plain": s["tail"] / s["plain"], "last:2/plain": s["last:2"] / s["plain"], "target": 1.05})
    return {"model": "SmolLM2-135M-Instruct", "device": "cpu", "threads": 1, "clock": "thread CPU time",
            "repeats": repeats, "threshold_1": all_refined, "threshold_0.04": gated}


def report(r: dict) -> str:
    a, g = r["threshold_1"], r["threshold_0.04"]
    sec = lambda d: ", ".join(f"{k} {v:.2f}s" for k, v in d["seconds"].items())  # noqa: E731
    return (f"threshold 1, {a['prompt_tokens']}-token prompt, {a['new_tokens']} new tokens ({sec(a)}; refined "
            f"{a['refined']}): tail adds {a['tail_added_over_last1_added']:.3f}x what last:1 adds "
            f"(target <= {a['target']})\n"
            f"threshold 0.04, {g['prompt_tokens']}-token prompt, {g['new_tokens']} new tokens ({sec(g)}; refined "
            f"{g['refined']}): tail/plain {g['tail/plain']:.3f} (target <= {g['target']}), "
            f"last:2/plain {g['last:2/plain']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 64-token prompt, 8 new tokens, one repeat")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    result = run(args.quick)
    print(report(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
