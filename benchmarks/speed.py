"""Every speed and memory ratio the project tracks, measured in one run, printed and written as JSON.

    python benchmarks/speed.py [--quick] [--only generation,prefix] [--out results/speed.json]

Each section lives in its own script (also runnable alone) and returns a dict of measurements:
  generation: refinement / floor, naive / ours, gated-off overhead, peak memory / parameter bytes
  prefix:     last:N cached refinement / full refinement, focus generation / plain generation
  tail:       what the tail adds to generation against last:1 (threshold 1) and plain greedy (threshold 0.04)
  vision:     plain / per-sample loop / batched vmap / head path, images per second, memory per chunk
  eval:       uncertain positions refined per second, batched / one-by-one
  memory:     peak extra memory of one bf16 (and float32) refinement against the gradient floor + float32 copy
Ratios are only compared within one run: these machines are noisy.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
SECTIONS = {"generation": "speed_generation", "prefix": "speed_prefix", "tail": "speed_tail", "vision": "speed_vision",
            "eval": "speed_eval", "memory": "memory_precision"}
OPTIONS = {"prefix": {"generate": True}}  # also time last:2 focus generation against plain greedy


def environment() -> dict:
    """Library versions, machine and date, stored with every result."""
    import torch
    import transformers

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=Path("results/speed.json"))
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; allowed: {list(SECTIONS)}")
    results = {"environment": environment()}
    for name in chosen:
        print(f"\n=== {name} ===", flush=True)
        results[name] = importlib.import_module(SECTIONS[name]).run(quick=args.quick, **OPTIONS.get(name, {}))
        print(json.dumps(results[name], indent=1, default=str), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
