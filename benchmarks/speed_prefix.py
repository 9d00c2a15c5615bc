"""Speed of cached-prefix refinements (last:N through the top blocks only) on the embedded SmolLM2-135M, CPU.

Per refinement (one uncertain position, one iFo step + the refined forward), fastest of interleaved
repeats, all measured in this one run: full-parameter ("all", uncached), last:N uncached, last:N with
kept states. Prints cached/full against the target N/L + 0.10, and the memory of the kept states.
With ``--generate`` (needs ``focus_decoding.generation``) also times generation with last:2 at the
default threshold against plain greedy of the same tokens (target <= 1.5x) and full-parameter focus.

    python benchmarks/speed_prefix.py [--quick] [--generate] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from focus_decoding import FocusConfig
from focus_decoding import method as core
from focus_decoding.resources.models import load_default_model
from focus_decoding.method.prefix import input_states, kept_state_bytes, top_forward

LR = 1e-4  # FocusConfig.preset("smollm2-135m") iFo learning rate


def _best_times(fns: dict, repeats: int) -> dict:
    """Fastest seconds of each callable over interleaved repeats (robust to load from other processes)."""
    times = {k: [] for k in fns}
    for _ in tqdm(range(repeats), desc="repeats", leave=False):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


def refinement_times(model, context: int, ns=(1, 2, 4), repeats: int = 5) -> dict:
    """Seconds per refinement for 'all', last:N uncached and last:N cached at one context length."""
    n_blocks = len(core.find_blocks(model)[1])
    ids = torch.randint(100, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    slow = core.model_forward(model, ids, use_cache=False, select=lambda o: o.logits[0, -1])
    with torch.no_grad():
        focus = core.focus_classes(slow({}), 2)

    def job(forward_fn, params):
        config = FocusConfig(mode="ifo", lr=LR, params=params)
        trainable, frozen = core.split_parameters(model, config.params)
        return lambda: core.refine(forward_fn(), trainable, frozen, focus, config)

    fns = {"all": job(lambda: slow, "all")}
    kept = {}
    for n in ns:
        kept[n] = input_states(model, n, ids)  # in generation these come free from the cached forward
        fns[f"last:{n} uncached"] = job(lambda: slow, f"last:{n}")
        fns[f"last:{n} cached"] = job(lambda n=n: top_forward(model, n, kept[n]), f"last:{n}")
    for fn in fns.values():  # warm-up
        fn()
    times = _best_times(fns, repeats)
    hidden = model.config.hidden_size
    out = {"context": context, "blocks": n_blocks, "seconds": times, "ratios": {}}
    for n in ns:
        out["ratios"][f"last:{n}"] = {
            "cached/all": times[f"last:{n} cached"] / times["all"],
            "target": n / n_blocks + 0.10,
            "uncached/all": times[f"last:{n} uncached"] / times["all"],
            "cached/uncached": times[f"last:{n} cached"] / times[f"last:{n} uncached"],
            "kept_state_bytes_per_row": kept_state_bytes(1, context, hidden, model.dtype),
        }
    return out


def generation_times(model, tokenizer, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Generation with last:2 focus (cached) vs plain greedy vs full-parameter focus, same token count."""
    from focus_decoding.text.ways_in import enable, last_focus_stats

    enable(model)
    prompt = tokenizer(["Write a short story about a robot who learns to paint."], return_tensors="pt")
    common = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    fns = {
        "plain": lambda: model.generate(**prompt, **common),
        "focus last:2": lambda: model.generate(**prompt, **common, focus_config=FocusConfig(lr=LR, params="last:2")),
        "focus all": lambda: model.generate(**prompt, **common, focus_config=FocusConfig(lr=LR)),
    }
    fns["focus last:2"]()
    stats = last_focus_stats()
    times = _best_times(fns, repeats)
    return {"new_tokens": new_tokens, "seconds": times,
            "last:2/plain": times["focus last:2"] / times["plain"], "target": 1.5,
            "all/plain": times["focus all"] / times["plain"], "stats": repr(stats)}


def run(quick: bool = False, generate: bool = False, contexts=None, repeats: int | None = None) -> dict:
    """All measurements of this benchmark, in one run."""
    model, tokenizer = load_default_model()
    contexts = contexts or ((128,) if quick else (128, 512))
    repeats = repeats or (3 if quick else 5)
    result = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "threads": torch.get_num_threads(), "refinement": []}
    for c in contexts:
        result["refinement"].append(refinement_times(model, c, repeats=repeats))
        _print({"refinement": result["refinement"][-1:]})  # progress: each context as soon as it is done
    if generate:
        result["generation"] = generation_times(model, tokenizer, 16 if quick else 32, repeats=2 if quick else 3)
    return result


def _print(result: dict) -> None:
    for r in result["refinement"]:
        print(f"\ncontext {r['context']} tokens, {r['blocks']} blocks; seconds per refinement: "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["seconds"].items()))
        for name, q in r["ratios"].items():
            print(f"  {name}: cached/all {q['cached/all']:.3f} (target <= {q['target']:.3f}), "
                  f"uncached/all {q['uncached/all']:.3f}, cached/uncached {q['cached/uncached']:.3f}, "
                  f"kept states {q['kept_state_bytes_per_row'] / 2**20:.2f} MiB per row per kept layer")
    if "generation" in result:
        g = result["generation"]
        print(f"\ngeneration of {g['new_tokens']} tokens: " + ", ".join(f"{k} {v:.2f}s" for k, v in g["seconds"].items())
              + f"; last:2/plain {g['last:2/plain']:.2f} (target <= {g['target']}), all/plain {g['all/plain']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128-token context only, fewer repeats")
    parser.add_argument("--generate", action="store_true", help="also time generation (needs focus_decoding.generation)")
    parser.add_argument("--contexts", type=int, nargs="+", help="context lengths (default 128 512; quick: 128)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per variant (default 5; quick: 3)")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    res = run(quick=args.quick, generate=args.generate, contexts=args.contexts, repeats=args.repeats)
    if "generation" in res:
        _print({"refinement": [], "generation": res["generation"]})
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=2)
