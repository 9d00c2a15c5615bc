"""Train the small digits CNN (sklearn's 8x8 digits, fixed split) and save a checkpoint.

    python examples/train_digits.py                       # -> ~/.cache/focus_decoding/digits.pt
    python examples/train_digits.py --epochs 20 --checkpoint digits.pt
"""
import argparse
import time

from focus_decoding.vision import default_digits_checkpoint, train_digits


def main() -> None:
    """Train, save, print the test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=str(default_digits_checkpoint()))
    args = parser.parse_args()
    start = time.perf_counter()
    _, acc = train_digits(args.epochs, seed=args.seed, checkpoint=args.checkpoint, progress=True)
    print(f"test accuracy {100 * acc:.2f}% after {args.epochs} epochs in {time.perf_counter() - start:.1f} s; "
          f"saved {args.checkpoint}")


if __name__ == "__main__":
    main()
