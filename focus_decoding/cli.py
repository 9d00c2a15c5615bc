"""`focus-decoding`: the parser, error handling and dispatch to one job module per command.

Example:
    focus-decoding generate "The capital of France is" --max-new-tokens 16
    focus-decoding eval-text --max-uncertain 40 --out runs/smollm2
    accelerate launch -m focus_decoding.cli eval-text --model tiny-llama --out runs/tiny

Layout, read top-down: ``cli`` (this file) -> the jobs ``cli_generate``, ``cli_eval_text``,
``cli_eval_vision``, ``cli_tune``, ``cli_export`` -> ``runs`` (what every job shares) -> the library.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from typing import Iterator, Sequence

import torch

from . import cli_eval_text, cli_eval_vision, cli_export, cli_generate, cli_tune
from .config import MODES, PRESETS, STEP_RULES, FocusConfig
from .runs import DEFAULT_MODEL, TINY_MODELS, is_default_model, nonnegative_int, world_size

JOBS = {"generate": (cli_generate, "plain vs focus greedy continuation of a prompt"),
        "eval-text": (cli_eval_text, "next-token accuracy on the uncertain positions of a text set"),
        "eval-vision": (cli_eval_vision, "top-1 accuracy on the uncertain images of a classifier"),
        "tune": (cli_tune, "choose a focus setting on dev, judge it on test: does focus help this model?")}
TOOLS = {"export-generate": (cli_export, "write focus decoding as a Hub-style custom_generate folder")}  # no model


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (the usage is in --help), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``focus-decoding``: the shared method options plus each job's own."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("method")
    g.add_argument("--model", default=None, help=f"HF id, model folder or .gguf file; {', '.join(TINY_MODELS)}; "
                   "default: embedded SmolLM2-135M (eval-vision: 'digits' or a torchvision name; default digits CNN)")
    g.add_argument("--mode", choices=MODES, default="ifo", help="ifo raises the focus logits, dofo lowers the others")
    g.add_argument("--step-rule", choices=STEP_RULES, default=None,
                   help="fixed: the step is --lr; normalized: the step lowers the focus loss by --tau (default: "
                        "fixed, or normalized when --tau is given)")
    g.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: preset's, or the method's)")
    g.add_argument("--tau", type=float, default=None, help="normalized rule's first-order loss decrease (1.0)")
    g.add_argument("--threshold", type=float, default=None, help="refine when p(top1)-p(top2) < threshold (0.04)")
    g.add_argument("--n-focus", type=int, default=None, help="size of the focus set (2)")
    g.add_argument("--steps", type=int, default=None, help="SGD steps per refinement (1)")
    g.add_argument("--params", default=None, help="'all', 'last:N' or comma-separated name patterns (tune: "
                   "comma-separated selectors to search, '+' joining the patterns of one; default last:2)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="per-model learning rate of the method (default for the embedded model: smollm2-135m)")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the dev/test split and of tiny models")
    g.add_argument("--out", default=None, help="directory for JSON, markdown table and PNG")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: the accelerate/GPU default)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    parser = OneLineParser(prog="focus-decoding", description="Focus on the likely: refine uncertain predictions.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (job, help_text) in JOBS.items():
        job.add_arguments(sub.add_parser(command, parents=[common], help=help_text))
    for command, (job, help_text) in TOOLS.items():
        job.add_arguments(sub.add_parser(command, help=help_text))
    return parser


def config_from_args(args: argparse.Namespace) -> FocusConfig:
    """FocusConfig from the method options; the embedded model defaults to its preset step, which an explicit
    --lr, --tau or --step-rule replaces."""
    fields = {"threshold": args.threshold, "n_focus": args.n_focus, "steps": args.steps, "lr": args.lr,
              "tau": args.tau, "step_rule": args.step_rule or ("normalized" if args.tau is not None else None)}
    overrides = {k: v for k, v in fields.items() if v is not None}
    if args.params is not None:
        parts = [p.strip() for p in args.params.split(",") if p.strip()]
        overrides["params"] = parts[0] if len(parts) == 1 and (parts[0] == "all" or parts[0].startswith("last:")) else parts
    preset = args.preset
    if preset is None and is_default_model(args.model) and args.command != "eval-vision":
        preset = DEFAULT_MODEL
    if preset is not None:
        return FocusConfig.preset(preset, args.mode, **overrides)
    return FocusConfig(mode=args.mode, **overrides)


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``focus-decoding``; returns the exit status (2 for bad input, 130 when interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0)
    if world_size() > 1 and args.device.startswith("cpu"):
        os.environ["ACCELERATE_USE_CPU"] = "1"  # gather over gloo on CPU even where CUDA exists
    try:
        with _sigterm_as_interrupt():
            if args.command in TOOLS:
                return TOOLS[args.command][0].run(args)
            config = config_from_args(args)
            torch.manual_seed(args.seed)
            return JOBS[args.command][0].run(args, config)
    except KeyboardInterrupt:  # Ctrl-C outside the evaluation loop (which saves its windows and says so itself)
        _error(args.command, "interrupted")
        return 130
    except (ValueError, OSError) as exc:  # CliError, FocusConfig, missing files, hub offline: the user's to fix
        _error(args.command, f"error: {exc}")
        return 2


def _error(command: str, message: str) -> None:
    """One line on stderr, whatever the source message looks like."""
    print(f"focus-decoding {command}: {' '.join(message.split())}", file=sys.stderr)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler or launcher stopping the job) ends the run like Ctrl-C: the finished windows stay saved."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
