"""Speed and memory of the generation adapter, as ratios measured in one run.

For the embedded SmolLM2-135M and a tiny random llama, on a 128-token context (CPU):
  * floor = forward+backward + forward (the least one refinement can cost);
  * ours / floor for one uncertain position, full-parameter iFo (target <= 1.10);
  * naive (deepcopy + torch.optim.SGD) / ours;
  * gated-off overhead: generate with a threshold that never fires / plain generate (target <= 1.03);
  * extra peak memory of one step / bytes of the updated parameters (target <= 1.1), measured in a
    fresh subprocess: a thread samples the resident set size (psutil) every 0.2 ms during the step;
    extra = peak sample - RSS just before the step, taken after a warm-up no-grad forward so the
    baseline already holds the weights and a plain forward's buffers. The child runs with
    MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS at once (glibc would otherwise keep
    them and hide the step's growth). getrusage's max-RSS growth is reported alongside; it misses
    what fits under the model-loading peak, so it is a lower bound.
Timings are medians over interleaved repetitions (A, B, A, B, ...) so drift hits both sides alike.

    python benchmarks/speed_generation.py [--quick] [--threads 1] [--out results/speed_generation.json]

On a machine shared with other jobs use --threads 1: with 2 OpenMP threads on 2 busy cores every
op waits at a barrier and a tiny forward becomes ~100x slower, which swamps every ratio.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # peak_memory, run as a script or imported

import peak_memory
from focus_decoding import FocusConfig
from focus_decoding.text.ways_in import enable, last_focus_stats
from focus_decoding.text.processor import FocusLogitsProcessor
from focus_decoding.resources.models import load_default_model, tiny_causal_lm

CONTEXT = 128


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved_medians(fns: dict, repeats: int, desc: str) -> dict[str, float]:
    """Median seconds of each function after one warm-up, the functions interleaved so that the
    machine's drift hits them all alike."""
    for fn in fns.values():  # warm-up: allocator, lazy inits
        fn()
    times = {k: [] for k in fns}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _load(name: str):
    if name == "smollm2-135m":
        return load_default_model()[0]
    return tiny_causal_lm("llama", tied=True, vocab_size=96, layers=4)


def _inputs(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.vocab_size, (1, CONTEXT), generator=gen)


def step_timings(model, repeats: int) -> dict:
    """Median seconds of forward, forward+backward, our step and the naive step; their ratios."""
    ids = _inputs(model)
    config = FocusConfig(threshold=1.0, lr=1e-4)  # full-parameter iFo; 1.0 makes the gate fire
    keep = FocusLogitsProcessor(model, config)._keep  # the same forward kwargs our step uses
    params = [p for p in model.parameters()]
    with torch.no_grad():
        scores = model(ids, use_cache=False, **keep).logits[:, -1]
    focus = scores[0].topk(2).indices

    def forward():
        with torch.no_grad():
            model(ids, use_cache=False, **keep)

    def forward_backward():
        loss = -model(ids, use_cache=False, **keep).logits[0, -1, focus].mean()
        torch.autograd.grad(loss, params)

    proc = FocusLogitsProcessor(model, config)  # built once per generate call, so outside the timing

    def ours():
        proc(ids, scores)

    def naive():
        ref = copy.deepcopy(model)
        opt = torch.optim.SGD(ref.parameters(), lr=config.lr, momentum=0, weight_decay=0)
        loss = -ref(ids, use_cache=False).logits[0, -1, focus].mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            ref(ids, use_cache=False)

    fns = {"forward": forward, "forward_backward": forward_backward, "ours": ours, "naive": naive}
    med = _interleaved_medians(fns, repeats, "step timings")
    floor = med["forward_backward"] + med["forward"]
    assert proc.stats.totals["refined"] == proc.stats.totals["checked"]  # every timed call really refined
    return {"seconds": med, "floor_s": floor, "ours_over_floor": med["ours"] / floor,
            "naive_over_ours": med["naive"] / med["ours"]}


def gated_off_overhead(model, repeats: int, new_tokens: int) -> dict:
    """Median generate time with a never-firing gate over plain generate (greedy, KV cache)."""
    model = enable(model)
    ids = _inputs(model)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=model.config.pad_token_id or 0)
    off = FocusConfig(threshold=1e-9)
    runs = {"plain": lambda: model.generate(ids, **kw), "gated_off": lambda: model.generate(ids, focus_config=off, **kw)}
    med = _interleaved_medians(runs, repeats, "gated-off generate")
    assert last_focus_stats().totals["uncertain"] == 0  # really gated off
    return {"seconds": med, "new_tokens": new_tokens, "gated_off_over_plain": med["gated_off"] / med["plain"]}


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_child(name: str) -> dict:
    """In a fresh process: peak RSS growth during one step vs the bytes of the updated parameters."""
    model = _load(name)
    ids = _inputs(model)
    proc = FocusLogitsProcessor(model, FocusConfig(threshold=1.0, lr=1e-4))
    with torch.no_grad():
        scores = model(ids, use_cache=False, **proc._keep).logits[:, -1]
    max_before = _max_rss_bytes()
    with peak_memory.PeakRSS() as measured:
        proc(ids, scores)
    # The floor's own forward+backward: gradients plus the activations autograd saves, no update.
    params = list(proc.trainable.values())
    with peak_memory.PeakRSS() as floor, torch.enable_grad():
        loss = model(ids, use_cache=False, **proc._keep).logits[0, -1, :2].sum()
        grads = torch.autograd.grad(loss, params)
        del loss, grads
    updated = sum(p.numel() * p.element_size() for p in params)
    extra = measured.extra_bytes
    return {"extra_peak_bytes": extra, "updated_param_bytes": updated, "extra_over_params": extra / updated,
            "floor_fwd_bwd_extra_bytes": floor.extra_bytes, "floor_fwd_bwd_over_params": floor.extra_bytes / updated,
            "ours_over_floor_fwd_bwd": extra / max(floor.extra_bytes, 1),
            "maxrss_growth_bytes": _max_rss_bytes() - max_before, "baseline_rss_bytes": measured.before}


def memory(name: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name], capture_output=True, text=True,
                         check=True, env=peak_memory.ENV)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    """All measurements for both models, in this one run."""
    repeats, gen_repeats, new_tokens = (3, 3, 16) if quick else (7, 7, 32)
    results = {"context": CONTEXT, "threads": torch.get_num_threads(), "quick": quick, "models": {}}
    for name in ("tiny-llama", "smollm2-135m"):
        model = _load(name)
        results["models"][name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "step": step_timings(model, repeats),
            "gated_off": gated_off_overhead(model, gen_repeats, new_tokens),
            "memory": memory(name),
        }
        del model
    summary(results)
    return results


def summary(results: dict) -> None:
    """One line of ratios per model."""
    for name, r in results["models"].items():
        s, g, m = r["step"], r["gated_off"], r["memory"]
        print(f"{name}: floor {s['floor_s'] * 1e3:.1f} ms | ours/floor {s['ours_over_floor']:.3f} (target <= 1.10) | "
              f"naive/ours {s['naive_over_ours']:.2f} | gated-off/plain {g['gated_off_over_plain']:.3f} (target <= 1.03) | "
              f"extra mem/params {m['extra_over_params']:.2f} (target <= 1.1; the floor's own fwd+bwd: "
              f"{m['floor_fwd_bwd_over_params']:.2f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and tokens")
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return
    results = run(quick=args.quick)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
