"""The parser of ``focus-decoding``: the method's shared options, each job's own, and the config they give.

``--params`` has the package's one selector grammar (``method.params``): ``+`` joins the patterns of
one selector, ``,`` separates selectors; ``tune`` searches every selector given, the other commands
take exactly one.
"""
from __future__ import annotations

import argparse

from .. import method
from ..config import MODES, PRECISIONS, PRESETS, STEP_RULES, FocusConfig
from ..resources.models import DEFAULT_MODEL, TINY_MODELS, is_embedded
from . import eval_text, eval_vision, export, generate, tune
from .argtypes import nonnegative_int
from .common import CliError

JOBS = {"generate": (generate, "plain vs focus greedy continuation of a prompt"),
        "eval-text": (eval_text, "next-token accuracy on the uncertain positions of a text set"),
        "eval-vision": (eval_vision, "top-1 accuracy on the uncertain images of a classifier"),
        "tune": (tune, "choose a focus setting on dev, judge it on test: does focus help this model?")}
TOOLS = {"export-generate": (export, "write focus decoding as a Hub-style custom_generate folder")}  # no model


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (the usage is in --help), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``focus-decoding``: the shared method options plus each job's own."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("method")
    g.add_argument("--model", default=None, help=f"HF id, model folder or .gguf file; {', '.join(TINY_MODELS)}; "
                   "default: embedded SmolLM2-135M (eval-vision: 'digits' or a torchvision name; default digits CNN)")
    g.add_argument("--mode", choices=MODES, default="ifo",
                   help="ifo raises the focus logits, dofo lowers the others, entropy minimises the softmax entropy")
    g.add_argument("--step-rule", choices=STEP_RULES, default=None,
                   help="fixed: the step is --lr; normalized: the step lowers the focus loss by --tau (default: "
                        "fixed, or normalized when --tau is given)")
    g.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: preset's, or the method's)")
    g.add_argument("--tau", type=float, default=None, help="normalized rule's first-order loss decrease (1.0)")
    g.add_argument("--threshold", type=float, default=None, help="refine when p(top1)-p(top2) < threshold (0.04)")
    g.add_argument("--n-focus", type=int, default=None, help="size of the focus set (2)")
    g.add_argument("--steps", type=int, default=None, help="SGD steps per refinement (1)")
    g.add_argument("--params", default=None, help="which parameters the step updates: 'all', 'last:N', 'tail', 'head' "
                   "or name patterns joined by '+'; tune: comma-separated selectors to search (default last:2)")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="a bf16/fp16 model's step: float32 (default: the step asked for) or model (rounded to its dtype)")
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


def params_from_args(args: argparse.Namespace) -> list:
    """The ``--params`` selectors (one grammar for every command); ValueError naming a malformed one."""
    return method.parse_selectors(args.params) if args.params is not None else []


def config_from_args(args: argparse.Namespace) -> FocusConfig:
    """FocusConfig from the method options; the embedded model defaults to its preset step, which an explicit
    --lr, --tau or --step-rule replaces."""
    fields = {"threshold": args.threshold, "n_focus": args.n_focus, "steps": args.steps, "lr": args.lr,
              "tau": args.tau, "step_rule": args.step_rule or ("normalized" if args.tau is not None else None),
              "precision": args.precision}
    overrides = {k: v for k, v in fields.items() if v is not None}
    selectors = params_from_args(args)
    if len(selectors) > 1 and args.command != "tune":
        raise CliError(f"--params names {len(selectors)} selectors ({args.params}); {args.command} takes one: join the "
                       f"patterns of one selector with '+' (e.g. {'+'.join(map(method.selector_text, selectors))})")
    if selectors:
        overrides["params"] = selectors[0]
    preset = args.preset
    if preset is None and is_embedded(args.model) and args.command != "eval-vision":
        preset = DEFAULT_MODEL
    if preset is not None:
        return FocusConfig.preset(preset, args.mode, **overrides)
    return FocusConfig(mode=args.mode, **overrides)
