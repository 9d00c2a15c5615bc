"""Peak extra memory of one refinement of the embedded SmolLM2-135M in bfloat16 (and float32 for comparison).

    python benchmarks/memory_precision.py [--out docs/results/memory_precision.json]

One fresh process per case (dtype x params x precision), CPU, one torch thread: after a warm-up refinement,
the peak resident-set growth during one refinement (threshold 1, the preset's step) at the last position
of a 128-token context, as next-token evaluation runs it (the window's states kept by its no-grad forward;
``last:2`` then runs through the top two blocks only), sampled by ``peak_memory.PeakRSS`` (run with ``MALLOC_MMAP_THRESHOLD_`` so freed
tensors leave the resident set). Against it, in the same process:
  floor      the plain forward+backward of the same loss on the same parameters, in the model's dtype
             (its activations and gradients: what any gradient step costs), measured the same way;
  copy       one float32 copy of the selected parameters (4 bytes each), what precision="float32" adds.
Target (issue 16): with precision="float32", extra <= floor + copy (reported as extra / (floor + copy));
before this round a 128 MiB bf16 tensor cost 641 MiB extra.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peak_memory  # noqa: E402

CASES = [("bfloat16", "last:2", "float32"), ("bfloat16", "last:2", "model"), ("bfloat16", "all", "float32"),
         ("bfloat16", "all", "model"), ("float32", "last:2", "float32"), ("float32", "all", "float32")]
MiB = 2**20


def child(dtype_name: str, params: str, precision: str) -> dict:
    """In a fresh process: the three measurements of one case."""
    import torch

    from focus_decoding import FocusConfig, method
    from focus_decoding.evaluation.windows import scan, tokenize_stream
    from focus_decoding.method import tail
    from focus_decoding.resources.corpora import load_texts
    from focus_decoding.resources.models import load_default_model
    from focus_decoding.text.refine import refine_position

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    model, tok = load_default_model(dtype)
    view = method.module_view(model)
    config = FocusConfig(threshold=1.0, lr=FocusConfig.preset("smollm2-135m").lr, params=params, precision=precision)
    stream = tokenize_stream(tok, load_texts(max_texts=40))[:129]
    depth = tail.shortcut(view, config)  # as evaluate_next_token refines: from the window's kept states
    window = next(scan(view, stream, [(0, 1, 129)], config, depths=lambda: {depth} - {None}))
    trainable, frozen = method.split_parameters(view, config.params)
    t = window.ids.shape[1] - 1

    def refine():
        return refine_position(view, window.ids, window.logits[t], t, trainable, frozen, config, window.kept(depth))

    refine()  # warm-up: allocator pools, lazy inits
    with peak_memory.PeakRSS() as measured:
        result = refine()
    ids = window.ids
    selected = list(trainable.values())
    with peak_memory.PeakRSS() as floor, torch.enable_grad():
        loss = -model(ids, use_cache=False).logits[0, -1, :2].float().mean()
        grads = torch.autograd.grad(loss, selected)
        del loss, grads
    n = sum(p.numel() for p in selected)
    copy = 4 * n if precision == "float32" and dtype != torch.float32 else 0
    return {"dtype": dtype_name, "params": params, "precision": precision, "selected_parameters": n,
            "selected_bytes": n * selected[0].element_size(), "extra_bytes": measured.extra_bytes,
            "floor_fwd_bwd_bytes": floor.extra_bytes, "float32_copy_bytes": copy,
            "extra_over_floor_plus_copy": measured.extra_bytes / max(floor.extra_bytes + copy, 1),
            "achieved_over_intended": result.achieved / result.intended if result.intended else None}


def run(cases=CASES, quick: bool = False) -> list[dict]:
    """Every case, one fresh process each (``quick``: bf16 last:2 only)."""
    rows = []
    cases = cases[:2] if quick else cases
    for case in cases:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True,
                             env={**peak_memory.ENV, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise RuntimeError(f"case {case} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(line(rows[-1]), flush=True)
    return rows


def line(r: dict) -> str:
    return (f"{r['dtype']:8s} {r['params']:6s} precision={r['precision']:7s}: extra {r['extra_bytes'] / MiB:7.1f} MiB; "
            f"floor fwd+bwd {r['floor_fwd_bwd_bytes'] / MiB:7.1f} MiB + float32 copy {r['float32_copy_bytes'] / MiB:6.1f}"
            f" MiB -> extra / (floor + copy) {r['extra_over_floor_plus_copy']:.2f} (target <= 1); selected "
            f"{r['selected_bytes'] / MiB:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bf16 last:2 only")
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    rows = run(quick=args.quick)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "context": 128, "cases": rows},
                                             indent=2))


if __name__ == "__main__":
    main()
