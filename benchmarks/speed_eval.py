"""Speed of next-token evaluation on the embedded SmolLM2-135M, CPU: uncertain positions refined per second.

Measures one-by-one refinement (``batch_positions=1``) against ``batch_positions=k`` on the same
128-token windows of the bundled sample, in one run, and prints the ratio.

    python benchmarks/speed_eval.py [--quick] [--out speed_eval.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from focus_decoding import FocusConfig
from focus_decoding.resources.corpora import load_texts
from focus_decoding.evaluation import evaluate_next_token
from focus_decoding.resources.models import load_default_model


def run(quick: bool = False, ks: tuple[int, ...] = (4,), context_length: int = 128) -> dict:
    """Refinements per second for k = 1 and each k in ``ks``; identical outcomes are checked, not assumed."""
    model, tokenizer = load_default_model()
    model.config._attn_implementation = "eager"  # vmap (batch_positions > 1) needs eager attention
    n_uncertain = 8 if quick else 32
    texts = load_texts(max_texts=20)
    config = FocusConfig.preset("smollm2-135m")
    out = {"model": "SmolLM2-135M-Instruct", "device": "cpu", "threads": torch.get_num_threads(),
           "context_length": context_length, "n_uncertain": n_uncertain, "config": config.to_dict(), "runs": {}}
    base = None
    for k in (1, *ks):
        t0 = time.perf_counter()
        report = evaluate_next_token(model, tokenizer, texts, config, context_length=context_length,
                                     max_uncertain=n_uncertain, batch_positions=k, progress=False)
        out["runs"][k] = {"uncertain_per_second": report.meta["uncertain_per_second"],
                          "refine_seconds": report.meta["refine_seconds"], "wall_seconds": time.perf_counter() - t0,
                          "n_total": report.n_total, "outcomes_equal_to_k1": None if base is None else
                          report.outcomes == base.outcomes}
        base = base or report
    one = out["runs"][1]["uncertain_per_second"]
    out["ratio_batched_over_one_by_one"] = {k: out["runs"][k]["uncertain_per_second"] / one for k in ks}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 uncertain positions instead of 32")
    parser.add_argument("--k", type=int, nargs="+", default=[4], help="batch_positions values to compare with 1")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    result = run(quick=args.quick, ks=tuple(args.k))
    for k, r in result["runs"].items():
        print(f"batch_positions={k}: {r['uncertain_per_second']:.3f} uncertain positions refined/s "
              f"({r['refine_seconds']:.1f} s refining, outcomes equal to k=1: {r['outcomes_equal_to_k1']})")
    for k, ratio in result["ratio_batched_over_one_by_one"].items():
        print(f"ratio batched(k={k}) / one-by-one: {ratio:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
