"""Classify the digits test split with and without focus, and print the method's report.

    python examples/train_digits.py      # once (classify.py also trains if the checkpoint is missing)
    python examples/classify.py --threshold 0.3 --lr 1e-2
"""
import argparse

import torch

from focus_decoding import FocusConfig, markdown_table
from focus_decoding.evaluation.classifier import evaluate_classifier
from focus_decoding.vision import FocusClassifier, digits_arrays, digits_model


def main() -> None:
    """Plain vs focus accuracy on the whole test split, then the report table, flips and p-value."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: ~/.cache/focus_decoding/digits.pt")
    parser.add_argument("--mode", choices=("ifo", "dofo"), default="ifo")
    parser.add_argument("--threshold", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=None, help="default: the method's vision default for --mode")
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    config = FocusConfig(mode=args.mode, threshold=args.threshold, lr=args.lr, steps=args.steps)
    model = digits_model(args.checkpoint)
    x, y = digits_arrays("test")

    with torch.no_grad():
        plain = model(x).argmax(-1)
    clf = FocusClassifier(model, config)
    focus = clf(x).argmax(-1)
    print(f"plain accuracy {100 * (plain == y).float().mean():.2f}%  |  with focus {100 * (focus == y).float().mean():.2f}%"
          f"  ({clf.stats.gated} of {len(y)} refined, {clf.stats.changed} predictions changed)")

    batches = list(zip(x.split(128), y.split(128)))
    report = evaluate_classifier(model, batches, config, name="digits", meta={"model": "DigitsNet", "dataset": "digits"})
    print(markdown_table([report]))
    print(f"flips: wrong->correct {report.wrong_to_correct}, correct->wrong {report.correct_to_wrong}, "
          f"wrong->other wrong {report.wrong_to_other_wrong}; exact McNemar p = {report.p_value:.3g}")


if __name__ == "__main__":
    main()
