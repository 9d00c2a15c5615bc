"""`focus-decoding`: generate, eval-text and eval-vision from the command line.

Example:
    focus-decoding generate "The capital of France is" --max-new-tokens 16
    focus-decoding eval-text --max-uncertain 40 --out runs/smollm2
    accelerate launch -m focus_decoding.cli eval-text --model tiny-llama --out runs/tiny
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import MODES, PRESETS, FocusConfig
from .report import FocusReport, markdown_table
from .report import jsonable as _jsonable

TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-qwen2")
DEFAULT_MODEL = "smollm2-135m"  # what --model means when it is not given
PARTIAL = "partial{suffix}.json"
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # launcher env vars


class CliError(ValueError):
    """A user error reported as one line with exit code 2."""


# ----------------------------------------------------------------------------- models and metadata
def char_tokenizer():
    """A character-level tokenizer (100 ids: 4 specials + printable ASCII + newline) for tiny models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def load_model(spec: str | None = None, *, device: str | torch.device = "cpu", seed: int = 0):
    """(model, tokenizer): None = embedded SmolLM2-135M; ``tiny-llama|gpt2|qwen2``; else a HF id or path."""
    from .models import load_causal_lm, load_default_model, tiny_causal_lm

    if spec in (None, "", "default", DEFAULT_MODEL):
        model, tokenizer = load_default_model()
    elif spec in TINY_MODELS:
        tokenizer = char_tokenizer()
        model = tiny_causal_lm(spec[5:], vocab_size=len(tokenizer), seed=seed)
    else:
        model, tokenizer = load_causal_lm(spec)
    return model.to(device).eval(), tokenizer


def run_metadata(seed: int | None = None, device: Any = "cpu", **extra: Any) -> dict[str, Any]:
    """Library versions, seed, device, date and host: stored with every result file."""
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for name in ("accelerate", "datasets", "torchvision", "focus_decoding"):
        try:
            versions[name] = __import__(name).__dict__.get("__version__", "unknown")
        except ImportError:
            pass
    try:
        from importlib.metadata import version
        versions["focus_decoding"] = version("focus-decoding")
    except Exception:  # not installed as a distribution: keep what the module says
        pass
    return {"versions": versions, "seed": seed, "device": str(device), "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), **extra}


def write_results(out: str | Path, stem: str, reports: Sequence[FocusReport], extra: dict | None = None) -> Path:
    """``stem``.json (every number), ``stem``.md (the method's table) and ``stem``.png into ``out``."""
    from . import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"summaries": [r.summary() for r in reports], "reports": [r.to_dict() for r in reports], **(extra or {})}
    (out / f"{stem}.json").write_text(json.dumps(_jsonable(payload), indent=2))
    (out / f"{stem}.md").write_text(markdown_table(reports) + "\n")
    plots.plot_report(reports[-1], out / f"{stem}.png")
    return out / f"{stem}.json"



# ----------------------------------------------------------------------------- arguments
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _lr_grid(text: str) -> list[float]:
    try:
        grid = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated learning rates such as 1e-5,1e-4, got {text!r}")
    if len(grid) < 1 or any(not math.isfinite(x) or x <= 0 for x in grid):
        raise argparse.ArgumentTypeError(f"learning rates must be finite and > 0, got {text!r}")
    return grid


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``focus-decoding`` (three subcommands)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("method")
    g.add_argument("--model", default=None, help=f"HF id or path; {', '.join(TINY_MODELS)}; default: embedded SmolLM2-135M "
                   "(eval-vision: 'digits' or a torchvision name; default digits CNN)")
    g.add_argument("--mode", choices=MODES, default="ifo", help="ifo raises the focus logits, dofo lowers the others")
    g.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: preset's, or the method's)")
    g.add_argument("--threshold", type=float, default=None, help="refine when p(top1)-p(top2) < threshold (0.04)")
    g.add_argument("--n-focus", type=int, default=None, help="size of the focus set (2)")
    g.add_argument("--steps", type=int, default=None, help="SGD steps per refinement (1)")
    g.add_argument("--params", default=None, help="'all', 'last:N' or comma-separated name patterns")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="per-model learning rate of the method (default for the embedded model: smollm2-135m)")
    g.add_argument("--seed", type=int, default=0, help="seed of the dev/test split and of tiny models")
    g.add_argument("--out", default=None, help="directory for JSON, markdown table and PNG")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: the accelerate/GPU default)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    parser = argparse.ArgumentParser(prog="focus-decoding", description="Focus on the likely: refine uncertain predictions.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[common], help="plain vs focus greedy continuation of a prompt")
    gen.add_argument("prompt", nargs="?", default="The capital of France is", help="text to continue")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=24)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                     help="mark changed tokens with colour (auto: when stdout is a TTY) or with [[token]]")

    ev = sub.add_parser("eval-text", parents=[common], help="next-token accuracy on the uncertain positions of a text set")
    ev.add_argument("--dataset", default=None, help="text file/dir, or hub data set name (default: bundled sample)")
    ev.add_argument("--split", default="train")
    ev.add_argument("--max-texts", type=_positive_int, default=None)
    ev.add_argument("--context-length", type=_positive_int, default=128)
    ev.add_argument("--stride", type=_positive_int, default=None)
    ev.add_argument("--max-uncertain", type=int, default=16, help="stop after this many refinements (0 = no limit)")
    ev.add_argument("--max-tokens", type=_positive_int, default=None, help="stop after this many scored positions")
    ev.add_argument("--batch-positions", type=_positive_int, default=1)
    ev.add_argument("--select-lr", type=_lr_grid, default=None, metavar="GRID",
                    help="comma-separated lrs: pick the best Δ_Corr on a dev split, report it on the test split")
    ev.add_argument("--dev-fraction", type=float, default=0.5)
    ev.add_argument("--resume", action="store_true", help="continue from the partial results in --out")

    vi = sub.add_parser("eval-vision", parents=[common], help="top-1 accuracy on the uncertain images of a classifier")
    vi.add_argument("--data", default=None, help="image data set spec (default: scikit-learn digits test split)")
    vi.add_argument("--root", default=None, help="folder of the image data set")
    vi.add_argument("--checkpoint", default=None, help="classifier checkpoint (default digits CNN: trained if absent)")
    vi.add_argument("--weights", default=None, help="torchvision weights name for --model, e.g. DEFAULT")
    vi.add_argument("--batch-size", type=_positive_int, default=64)
    vi.add_argument("--max-samples", type=_positive_int, default=None)
    return parser


def config_from_args(args: argparse.Namespace) -> FocusConfig:
    """FocusConfig from the method options; the embedded model defaults to its preset learning rate."""
    overrides = {k: v for k, v in dict(threshold=args.threshold, n_focus=args.n_focus, steps=args.steps).items()
                 if v is not None}
    if args.params is not None:
        parts = [p.strip() for p in args.params.split(",") if p.strip()]
        overrides["params"] = parts[0] if len(parts) == 1 and (parts[0] == "all" or parts[0].startswith("last:")) else parts
    preset = args.preset
    if preset is None and args.model in (None, "", "default", DEFAULT_MODEL) and args.command != "eval-vision":
        preset = DEFAULT_MODEL
    if preset is not None:
        config = FocusConfig.preset(preset, args.mode, **overrides)
        return dataclasses.replace(config, lr=args.lr) if args.lr is not None else config
    return FocusConfig(mode=args.mode, lr=args.lr, **overrides)


def resolve_device(name: str) -> torch.device:
    """``auto``: the accelerate process device when launched, else CUDA when present, else CPU."""
    if name != "auto":
        return torch.device(name)
    if _world_size() > 1:
        return _partial_state().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``focus-decoding``; returns the exit status (2 for bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0)
    if _world_size() > 1 and args.device.startswith("cpu"):
        os.environ["ACCELERATE_USE_CPU"] = "1"  # gather over gloo on CPU even where CUDA exists
    try:
        config = config_from_args(args)
        torch.manual_seed(args.seed)
        from .cli_eval_text import cmd_eval_text  # imports this module: bound here, not at the top

        command = {"generate": cmd_generate, "eval-text": cmd_eval_text, "eval-vision": cmd_eval_vision}[args.command]
        return command(args, config)
    except (ValueError, FileNotFoundError) as exc:
        msg = " ".join(str(exc).split())  # one line, whatever the source message looks like
        print(f"focus-decoding {args.command}: error: {msg}", file=sys.stderr)
        return 2


def cmd_generate(args: argparse.Namespace, config: FocusConfig) -> int:
    """Greedy continuation without and with focus refinement; changed tokens are marked."""
    from .decoding import focus_generate

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device=device, seed=args.seed)
    prompt = args.prompt
    if args.chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    n_prompt = enc["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = model.generate(**enc, **kwargs)[0, n_prompt:]
    out = focus_generate(model, **enc, **kwargs, focus_config=config, return_dict_in_generate=True)
    focus = out.sequences[0, n_prompt:]
    changed = changed_positions(model, out.sequences[0], n_prompt)
    stats = out.focus_stats
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(f"prompt: {args.prompt}")
    print(f"plain:  {tokenizer.decode(plain, skip_special_tokens=True)}")
    print(f"focus:  {mark_changes(tokenizer, focus.tolist(), changed, color)}")
    print(f"stats:  {format_stats(stats, config)}; marked tokens: {sum(changed)}")
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {"prompt": args.prompt, "plain": tokenizer.decode(plain, skip_special_tokens=True),
                  "focus": tokenizer.decode(focus, skip_special_tokens=True), "plain_ids": plain.tolist(),
                  "focus_ids": focus.tolist(), "changed": changed, "stats": _stats_dict(stats),
                  "config": config.to_dict(), "meta": run_metadata(args.seed, device, model=args.model or DEFAULT_MODEL)}
        (out_dir / "generate.json").write_text(json.dumps(_jsonable(record), indent=2, default=str))
        print(f"wrote {out_dir / 'generate.json'}")
    return 0


@torch.no_grad()
def changed_positions(model, sequence: torch.Tensor, n_prompt: int) -> list[bool]:
    """Per generated token: does it differ from the unmodified model's greedy pick for the same prefix?"""
    logits = model(sequence[None]).logits[0, n_prompt - 1:-1]  # one teacher-forced pass over the focus text
    return (logits.argmax(-1) != sequence[n_prompt:]).tolist()


def mark_changes(tokenizer, ids: list[int], changed: Sequence[bool], color: bool = False) -> str:
    """Decode ``ids``, marking the tokens the refinement changed as [[token]] (or green with ``color``)."""
    pieces, run = [], []
    for token, flag in zip(ids, changed):
        if not flag:
            run.append(token)
            continue
        # runs of unchanged tokens decode together so multi-token characters stay intact
        pieces.append(tokenizer.decode(run, skip_special_tokens=True))
        text = tokenizer.decode([token], skip_special_tokens=True)
        pieces.append(f"\033[1;32m{text}\033[0m" if color else f"[[{text}]]")
        run = []
    pieces.append(tokenizer.decode(run + ids[len(changed):], skip_special_tokens=True))
    return "".join(pieces)


def _stats_dict(stats: Any) -> Any:
    if stats is None or isinstance(stats, dict):
        return stats
    if hasattr(stats, "to_dict"):
        return stats.to_dict()
    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else str(stats)


def format_stats(stats: Any, config: FocusConfig) -> str:
    """One line: the configuration and the generation adapter's counters."""
    data = _stats_dict(stats)
    data = data.get("totals", data) if isinstance(data, dict) else data
    body = ", ".join(f"{k}={v}" for k, v in data.items()) if isinstance(data, dict) else str(data)
    return f"mode={config.mode} lr={config.lr:g} threshold={config.threshold:g} | {body}"


# ----------------------------------------------------------------------------- accelerate and summaries
def _world_size() -> int:
    return max(int(os.environ.get(v, "1")) for v in WORLD_SIZE_VARS)


def _partial_state():
    """accelerate's process state; on machines without CUDA (or with --device cpu) it must be told ``cpu=True``."""
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def _print_summary(r: FocusReport) -> None:
    print(f"scored {r.n_total} predictions, {r.n_uncertain} uncertain ({100 * r.fraction_uncertain:.1f}%); "
          f"accuracy {r.base_accuracy:.2f}% -> {r.focus_accuracy:.2f}%; Δ_Corr {r.delta_corr:+d} "
          f"(wr→co {r.wrong_to_correct}, co→wr {r.correct_to_wrong}), p={r.p_value:.3g}; {r.seconds:.1f}s")


# ----------------------------------------------------------------------------- eval-vision
def cmd_eval_vision(args: argparse.Namespace, config: FocusConfig) -> int:
    """Run the vision evaluation and write its reports."""
    from . import eval_vision

    device = resolve_device(args.device)
    reports = eval_vision.run_eval_vision(model=args.model, data=args.data, config=config, checkpoint=args.checkpoint,
                                          batch_size=args.batch_size, max_samples=args.max_samples, out_dir=None,
                                          progress=not args.no_progress, weights=args.weights, root=args.root,
                                          device=device)
    meta = run_metadata(args.seed, device, model=args.model, dataset=args.data)
    for r in reports:
        r.meta = {**meta, **r.meta}
    print(markdown_table(reports))
    for r in reports:
        _print_summary(r)
    if args.out:
        path = write_results(args.out, "eval_vision", reports, {"config": config.to_dict(), "meta": meta})
        print(f"wrote {path} (+ .md, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
