"""The method's table for image classifiers: `evaluate_classifier` over models x modes on one data set.

    python benchmarks/vision.py                                   # digits CNN on digits, iFo + doFo
    python benchmarks/vision.py --models resnet18 efficientnet_b0 --weights DEFAULT \\
        --data imagenet --root /data/imagenet --max-samples 5000
    python benchmarks/vision.py --threshold 0.3 --lr 1e-2 --modes ifo

Writes vision_reports.json, vision_table.md and vision_topk.png into --out and prints the table.
Pretrained torchvision weights must already be in the torch hub cache (nothing is downloaded here).
"""
from __future__ import annotations

import argparse
import os

from focus_decoding import FocusConfig, markdown_table
from focus_decoding.eval_vision import run_eval_vision, write_outputs


def main(argv: list[str] | None = None) -> list:
    """Run every (model, mode) and write one combined report set."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["digits"], help="'digits' or torchvision model names")
    parser.add_argument("--weights", default=None, help="torchvision weights for every model, e.g. DEFAULT")
    parser.add_argument("--checkpoint", default=None, help="state_dict file (digits: default cache path)")
    parser.add_argument("--data", default="digits", help="digits | cifar100 | emnist | caltech256 | imagenet | ImageFolder dir")
    parser.add_argument("--root", default=None, help="directory holding the data set's files")
    parser.add_argument("--modes", nargs="+", choices=("ifo", "dofo"), default=["ifo", "dofo"])
    parser.add_argument("--threshold", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=None, help="default: the method's vision lr per mode")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8, help="uncertain images refined together")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--method", choices=("auto", "vmap", "loop"), default="auto")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "vision"))
    args = parser.parse_args(argv)
    configs = [FocusConfig(mode=m, threshold=args.threshold, lr=args.lr, steps=args.steps) for m in args.modes]
    reports = []
    for name in args.models:
        reports += run_eval_vision(name, args.data, configs, checkpoint=args.checkpoint, weights=args.weights,
                                   root=args.root, batch_size=args.batch_size, max_samples=args.max_samples,
                                   max_batch=args.max_batch, method=args.method)
    paths = write_outputs(reports, args.out)
    print(markdown_table(reports))
    for r in reports:
        print(f"{r.name}: wrong->correct {r.wrong_to_correct}, correct->wrong {r.correct_to_wrong}, "
              f"non-finite {r.nonfinite}, {r.seconds:.1f} s")
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return reports


if __name__ == "__main__":
    main()
