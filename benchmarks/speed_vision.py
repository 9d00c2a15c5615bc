"""`FocusClassifier`'s paths: images refined per second and extra memory, plain / all (loop, vmap) / head.

    OMP_NUM_THREADS=1 python benchmarks/speed_vision.py --out docs/results/vision/speed_vision.json
    python benchmarks/speed_vision.py --models resnet18 --batches 4 16 --size 32   # random ResNet-18
    python benchmarks/speed_vision.py --quick                                      # a smoke run

Models: the pretrained ccexam CNNs (``ccexam-mnist`` on ``mnist-contrast-2`` test images, since it is
saturated, p(top1) = 1.0 in float32, on most clean MNIST images; ``ccexam-usps`` on MNIST resized to
16x16; ``ccexam-svhn`` on uniform random 3x32x32 images: no SVHN data ships), and torchvision's
``resnet18`` with random weights. Every timed image is refined (threshold 1.0, images the gate takes,
checked), so the batch size B is the number of images refined together (``max_batch = B``). Paths: the
model alone (plain), ``params="all"`` image by image (loop) and batched (vmap), ``params="head"`` (the
head from its kept input, all images together). Target (issue 17): on MNISTNet at B = 64 the head adds
at most 0.15x what the faster "all" path adds to plain inference (``head added / all added``).

Everything runs with one torch thread. Speed, one process per model: after one warm-up call per path,
calls on the same B images are repeated until at least ``--min-images`` images are refined (a block);
loop and vmap blocks alternate, ``--repeats`` of each, and the median images/s is reported, so a change
of machine load hits both paths alike. Memory, one fresh process per (model, path), B ascending: the
peak extra memory of one call after a warm-up call; on CUDA ``torch.cuda.max_memory_allocated`` minus
what was allocated before, on CPU the peak resident-set growth (``peak_memory.PeakRSS``, run with
``MALLOC_MMAP_THRESHOLD_`` so freed chunks leave the resident set), i.e. what one chunk of B images adds
on top of the model and its inputs.
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

MODELS = ("ccexam-mnist", "ccexam-usps", "ccexam-svhn")
BATCHES = (1, 2, 4, 8, 16, 32, 64)


def _inputs(name: str, batch: int, size: int, device: str):
    """(model, images [batch, ...]) for one case."""
    import torch

    from focus_decoding import method as core
    from focus_decoding.vision import load_classifier, load_image_dataset

    if name == "resnet18":
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.resnet18().eval().to(device), torch.randn(batch, 3, size, size).to(device)
    model = load_classifier(name)
    if name == "ccexam-svhn":
        x = torch.rand(4 * batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    else:  # MNISTNet saturates (p = 1.0) on clean MNIST; its shifted test images are the ones it refines
        x = load_image_dataset("mnist16" if name == "ccexam-usps" else "mnist-contrast-2", split="test").tensors[0]
    x = x[:2000]
    with torch.no_grad():
        gated = x[core.top2_gap(model(x)) < 1.0]  # what threshold 1.0 gates: every timed row is refined
    if len(gated) < batch:
        raise RuntimeError(f"only {len(gated)} images of {name}'s data are uncertain; need {batch}")
    return model.to(device), gated[:batch].to(device)


PATHS = ("plain", "loop", "vmap", "head")  # no refinement; params="all" per image / batched; params="head" batched


def _classifier(model, batch: int, path: str):
    """A callable for one path: the model alone (no_grad) or FocusClassifier refining every image."""
    import torch

    from focus_decoding import FocusConfig
    from focus_decoding.vision import FocusClassifier

    if path == "plain":
        return torch.no_grad()(model)
    if path == "head":
        return FocusClassifier(model, FocusConfig(threshold=1.0, lr=1e-3, params="head"), max_batch=batch)
    return FocusClassifier(model, FocusConfig(threshold=1.0, lr=1e-3), max_batch=batch, method=path)


def _speed_worker(name: str, batches: list[int], size: int, min_images: int, repeats: int, device: str) -> list[dict]:
    """Images/s of every path for every B, timed in alternating blocks (plain, loop, vmap, head, plain, ...) so load
    drift hits them alike."""
    import torch

    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for batch in batches:
        model, x = _inputs(name, batch, size, device)
        clfs = {m: _classifier(model, batch, m) for m in PATHS}
        for clf in clfs.values():
            clf(x)  # warm-up: first-call costs (vmap tracing, allocator) are not the steady state
        calls, rates = max(1, -(-min_images // batch)), {m: [] for m in clfs}
        for _ in range(repeats):
            for method, clf in clfs.items():
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    clf(x)
                sync()
                rates[method].append(calls * batch / (time.perf_counter() - start))
        assert clfs["vmap"].stats.vectorized and not clfs["loop"].stats.vectorized
        assert all(clfs[p].stats.gated == batch for p in PATHS[1:]), "every timed image must be refined"
        rows.append({"batch": batch, "size": int(x.shape[-1]), "parameters": sum(p.numel() for p in model.parameters()),
                     **{f"{m}_images_per_s": statistics.median(r) for m, r in rates.items()}})
    return rows


def _memory_worker(name: str, batches: list[int], size: int, method: str, device: str) -> list[float]:
    """Peak extra memory (MB) of one call on B images, for each B in ascending order, one path."""
    import torch

    torch.set_num_threads(1)
    peaks = []
    for batch in sorted(batches):
        model, x = _inputs(name, batch, size, device)
        clf = _classifier(model, batch, method)
        with torch.no_grad():
            model(x)
        clf(x)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with PeakRSS() as measured:
            clf(x)
        peak = (torch.cuda.max_memory_allocated() - before) if device.startswith("cuda") else measured.extra_bytes
        peaks.append(peak / 2**20)
    return peaks


def _subprocess(kind: str, *args):
    cmd = [sys.executable, __file__, "--worker", json.dumps([kind, *args])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"worker {kind} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(models=MODELS, batches=BATCHES, size: int = 32, min_images: int = 64, repeats: int = 3,
        device: str | None = None, quick: bool = False) -> dict:
    """Speed of every path per model (one process, interleaved) and memory per path (one fresh process each)."""
    import torch

    if quick:
        models, batches, min_images, repeats = ["ccexam-usps"], [1, 8], 16, 1
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = sorted(batches)
    rows = []
    for name in models:
        speed = _subprocess("speed", name, batches, size, min_images, repeats, device)
        memory = {m: _subprocess("memory", name, batches, size, m, device) for m in PATHS}
        for i, sp in enumerate(speed):
            lo_mb, vm_mb = memory["loop"][i], memory["vmap"][i]
            per_image = {p: 1 / sp[f"{p}_images_per_s"] for p in PATHS}  # seconds
            full_added = min(per_image["loop"], per_image["vmap"]) - per_image["plain"]  # the faster "all" path
            rows.append({"model": name, **sp, **{f"{p}_extra_mb": memory[p][i] for p in PATHS},
                         "speedup_vmap_over_loop": sp["vmap_images_per_s"] / sp["loop_images_per_s"],
                         "memory_ratio_vmap_over_loop": vm_mb / max(lo_mb, 1e-3),
                         "head_added_over_all_added": (per_image["head"] - per_image["plain"]) / full_added})
            print(_row(rows[-1]), flush=True)
    return {"device": device, "threads": 1, "min_images": min_images, "repeats": repeats, "cases": rows}


HEADER = ("| model | params | input | B | plain img/s | loop img/s | vmap img/s | head img/s | vmap / loop speed | "
          "head added / all added | loop extra MB | vmap extra MB | head extra MB |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def _row(r: dict) -> str:
    return (f"| {r['model']} | {r['parameters'] / 1e3:.0f}k | {r['size']}x{r['size']} | {r['batch']} | "
            f"{r['plain_images_per_s']:.0f} | {r['loop_images_per_s']:.0f} | {r['vmap_images_per_s']:.0f} | "
            f"{r['head_images_per_s']:.0f} | {r['speedup_vmap_over_loop']:.2f} | {r['head_added_over_all_added']:.3f} | "
            f"{r['loop_extra_mb']:.1f} | {r['vmap_extra_mb']:.1f} | {r['head_extra_mb']:.1f} |")


def main() -> None:
    """Print the table and write the JSON (+ a markdown table next to it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"{MODELS} or resnet18")
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--size", type=int, default=32, help="input size of resnet18 (the ccexam nets have their own)")
    parser.add_argument("--min-images", type=int, default=64, help="images refined per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    parser.add_argument("--quick", action="store_true", help="ccexam-usps, B in {1, 8}, one short block")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="benchmarks/results/speed_vision.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = json.loads(args.worker)
        print(json.dumps((_speed_worker if kind == "speed" else _memory_worker)(*rest)))
        return
    print(HEADER)
    result = run(args.models, args.batches, args.size, args.min_images, args.repeats, args.device, args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(f"device {result['device']}, 1 thread\n\n{HEADER}\n" +
                                      "\n".join(_row(r) for r in result["cases"]) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
