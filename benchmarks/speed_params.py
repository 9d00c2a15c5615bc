"""CPU seconds of one refinement per parameter selector, through the library's own path (SmolLM2-135M).

    python benchmarks/speed_params.py [--repeats 3] [--length 128] [--out speed_params.json]

Each selector is refined (threshold 1.0: the gate always fires) at the last position of one ``--length``-token context of the bundled sample,
as ``evaluate_next_token`` does it: ``eval_text.refine_position`` with the kept states when the
selector runs cached (``last:N``), the full model otherwise. Times are CPU seconds of the calling
thread with one torch thread (other jobs on a shared machine do not count), medians over interleaved
repeats; the window's own forward is not included (it is paid once per window, refined or not).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from focus_decoding import FocusConfig
from focus_decoding import method as core
from focus_decoding.evaluation import next_token as eval_text
from focus_decoding.method import prefix
from focus_decoding.resources.models import load_default_model

SELECTORS = ("all", "last:1", "last:2", "last:4", "last:8", "last:16", "*norm*", "model.embed_tokens",
             "model.layers.0|model.layers.1|model.layers.2|model.layers.3",
             "model.layers.0|model.layers.1|model.layers.2|model.layers.3|model.layers.4|model.layers.5|"
             "model.layers.6|model.layers.7")


def parse(selector: str):
    """``all`` / ``last:N`` as they are; ``a|b`` as a pattern list."""
    return selector if selector == "all" or selector.startswith("last:") else selector.split("|")


def run(repeats: int = 3, length: int = 128, selectors=SELECTORS) -> dict:
    """Median CPU seconds per refinement for each selector."""
    torch.set_num_threads(1)
    from focus_decoding.resources.corpora import load_texts
    model, tok = load_default_model()
    view = core.module_view(model)
    ids = eval_text.tokenize_stream(tok, load_texts(max_texts=20))[:length][None]
    with torch.no_grad():
        out = view(ids, use_cache=False, output_hidden_states=True)
    logits_t = out.logits[0, -1]
    setups = {}
    for sel in selectors:
        cfg = FocusConfig(step_rule="normalized", tau=1.0, threshold=1.0, params=parse(sel))  # always refine
        trainable, frozen = core.split_parameters(model, cfg.params)
        n = prefix.prefix_blocks(model, cfg)
        kept = (n, prefix.window_states(out, model, n)) if n else None
        setups[sel] = (cfg, trainable, frozen, kept, sum(p.numel() for p in trainable.values()))
    times: dict[str, list[float]] = {s: [] for s in selectors}
    for _ in range(repeats + 1):  # the first round warms up
        for sel, (cfg, trainable, frozen, kept, _) in setups.items():
            t = time.thread_time()
            eval_text.refine_position(view, ids, logits_t, length - 1, trainable, frozen, cfg, kept)
            times[sel].append(time.thread_time() - t)
    return {"length": length, "repeats": repeats, "clock": "thread CPU time, 1 torch thread",
            "selectors": {s: {"cpu_s": statistics.median(times[s][1:]), "cached": setups[s][3] is not None,
                              "parameters": setups[s][4]} for s in selectors}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args()
    result = run(args.repeats, args.length)
    base = result["selectors"]["all"]["cpu_s"]
    for sel, r in result["selectors"].items():
        print(f"{sel[:60]:60s} {r['parameters']:>11,d} params  cached={str(r['cached']):5s} "
              f"{r['cpu_s']:.3f} s  ({r['cpu_s'] / base:.3f} of all)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
