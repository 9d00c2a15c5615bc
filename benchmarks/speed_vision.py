"""Per-sample loop vs batched vmap path of `FocusClassifier` on ResNet-18 (random weights, every row refined).

    python benchmarks/speed_vision.py [--quick] [--out benchmarks/results/speed_vision.json]

Each (input size, path) is measured in a fresh subprocess so that its memory high-water mark is its own.
Time: median over repeats of one call on B uncertain images (threshold 1.0, so every row takes a step),
after one warm-up call. Peak memory per chunk: on CUDA, ``torch.cuda.max_memory_allocated`` during the
call minus the memory allocated before it; on CPU, the peak resident-set growth over the calls, sampled
by ``peak_memory.PeakRSS`` (model, inputs and a plain forward already done), i.e. what one chunk of
``max_batch = B`` images adds on top of the model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import ENV, PeakRSS  # noqa: E402

CASES = [(32, 16), (224, 4)]  # (input size, B uncertain images) on CPU
QUICK_CASES = [(32, 4), (224, 2)]


def _worker(size: int, batch: int, method: str, repeats: int, device: str) -> dict:
    """Time one path in this process; returns seconds, images/s and peak extra memory (MB)."""
    import torch
    import torchvision

    from focus_decoding import FocusConfig
    from focus_decoding.vision import FocusClassifier

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    clf = FocusClassifier(model, FocusConfig(threshold=1.0, lr=1e-3), max_batch=batch, method=method)
    with torch.no_grad():
        model(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    with PeakRSS() as measured:
        for _ in range(repeats + 1):  # the first call is the warm-up
            sync()
            start = time.perf_counter()
            clf(x)
            sync()
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak_mb = measured.extra_bytes / 2**20
    sec = statistics.median(times[1:])
    return {"size": size, "batch": batch, "method": method, "seconds": sec, "images_per_s": batch / sec,
            "peak_extra_mb": peak_mb, "vectorized": clf.stats.vectorized, "device": device,
            "threads": torch.get_num_threads()}


def run(quick: bool = False, device: str | None = None) -> dict:
    """Measure both paths for every case, each in a fresh subprocess; ratios loop/vmap included."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases, repeats = (QUICK_CASES, 1) if quick else (CASES, 3)
    rows = []
    for size, batch in cases:
        pair = {}
        for method in ("loop", "vmap"):
            cmd = [sys.executable, __file__, "--worker", json.dumps([size, batch, method, repeats, device])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=ENV).stdout
            pair[method] = json.loads(out.strip().splitlines()[-1])
        rows.append({"size": size, "batch": batch, "loop": pair["loop"], "vmap": pair["vmap"],
                     "speedup_vmap_over_loop": pair["loop"]["seconds"] / pair["vmap"]["seconds"],
                     "memory_ratio_vmap_over_loop": pair["vmap"]["peak_extra_mb"] / max(pair["loop"]["peak_extra_mb"], 1e-9)})
    return {"model": "resnet18 (random weights, 1000 classes)", "device": device, "quick": quick,
            "repeats": repeats, "cases": rows}


def main() -> None:
    """Print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="benchmarks/results/speed_vision.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(*json.loads(args.worker))))
        return
    result = run(args.quick, args.device)
    print(f"{result['model']} on {result['device']}")
    print("| size | B | loop s | vmap s | loop img/s | vmap img/s | vmap speed-up | loop peak MB | vmap peak MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["cases"]:
        lo, vm = r["loop"], r["vmap"]
        print(f"| {r['size']} | {r['batch']} | {lo['seconds']:.3f} | {vm['seconds']:.3f} | {lo['images_per_s']:.1f} | "
              f"{vm['images_per_s']:.1f} | {r['speedup_vmap_over_loop']:.2f}x | {lo['peak_extra_mb']:.0f} | {vm['peak_extra_mb']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
