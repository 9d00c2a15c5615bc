"""CPU seconds of one refinement per parameter selector, through the library's own path (SmolLM2-135M).

    python benchmarks/speed_params.py [--repeats 3] [--length 128] [--out speed_params.json]

Each selector is refined (threshold 1.0: the gate always fires) at the last position of one
``--length``-token context of the bundled sample, as ``evaluate_next_token`` does it: one window scan
(``evaluation.windows.scan``) keeps the states, then ``text.refine_position`` runs from them where the
selector allows (``last:N`` through the top blocks, ``tail`` through the last MLP and the head), the
full model otherwise. Times are CPU seconds of the calling
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
from focus_decoding.evaluation.windows import scan
from focus_decoding.method import tail
from focus_decoding.resources.models import load_default_model
from focus_decoding.text.refine import refine_position

SELECTORS = ("all", "last:1", "last:2", "last:4", "last:8", "last:16", "tail", "*norm*", "model.embed_tokens",
             "model.layers.0+model.layers.1+model.layers.2+model.layers.3",
             "model.layers.0+model.layers.1+model.layers.2+model.layers.3+model.layers.4+model.layers.5+"
             "model.layers.6+model.layers.7")


def run(repeats: int = 3, length: int = 128, selectors=SELECTORS) -> dict:
    """Median CPU seconds per refinement for each selector (the window's forward, paid once, not included)."""
    torch.set_num_threads(1)
    from focus_decoding.resources.corpora import load_texts
    model, tok = load_default_model()
    view = core.module_view(model)
    stream = eval_text.tokenize_stream(tok, load_texts(max_texts=40))[:length + 1]
    configs = {sel: FocusConfig(step_rule="normalized", tau=1.0, threshold=1.0, params=core.parse_selector(sel))
               for sel in selectors}  # threshold 1: the gate always fires
    depths = {tail.shortcut(view, cfg) for cfg in configs.values()} - {None}
    window = next(scan(view, stream, [(0, 1, length + 1)], configs["all"], depths=lambda: depths))
    setups = {}
    for sel, cfg in configs.items():
        trainable, frozen = core.split_parameters(model, cfg.params)
        kept = window.kept(tail.shortcut(view, cfg))  # as evaluate_next_token refines: from the kept states
        setups[sel] = (cfg, trainable, frozen, kept, sum(p.numel() for p in trainable.values()))
    times: dict[str, list[float]] = {s: [] for s in selectors}
    t_last = length - 1
    for _ in range(repeats + 1):  # the first round warms up
        for sel, (cfg, trainable, frozen, kept, _) in setups.items():
            t = time.thread_time()
            refine_position(view, window.ids, window.logits[t_last], t_last, trainable, frozen, cfg, kept)
            times[sel].append(time.thread_time() - t)
    return {"length": length, "repeats": repeats, "clock": "thread CPU time, 1 torch thread",
            "selectors": {s: {"cpu_s": statistics.median(times[s][1:]), "cached": setups[s][3] is not None,
                              "parameters": setups[s][4]} for s in selectors}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--selectors", default=",".join(SELECTORS), help="comma-separated --params values")
    parser.add_argument("--out")
    args = parser.parse_args()
    result = run(args.repeats, args.length, tuple(args.selectors.split(",")))
    base = result["selectors"].get("all", next(iter(result["selectors"].values())))["cpu_s"]
    for sel, r in result["selectors"].items():
        print(f"{sel[:60]:60s} {r['parameters']:>11,d} params  cached={str(r['cached']):5s} "
              f"{r['cpu_s']:.3f} s  ({r['cpu_s'] / base:.3f} of all)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
