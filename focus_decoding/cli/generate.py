"""`focus-decoding generate`: greedy continuation of a prompt without and with focus refinement."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Sequence

import torch

from ..config import FocusConfig
from ..evaluation.report import jsonable
from . import common as runs
from .argtypes import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The generate command's own options."""
    parser.add_argument("prompt", nargs="?", default="The capital of France is", help="text to continue")
    parser.add_argument("--max-new-tokens", type=positive_int, default=24)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="mark changed tokens with colour (auto: when stdout is a TTY) or with [[token]]")


def run(args: argparse.Namespace, config: FocusConfig) -> int:
    """Greedy continuation without and with focus refinement; changed tokens are marked."""
    from ..text.ways_in import focus_generate

    out_dir = runs.check_out_dir(args.out)
    device = runs.resolve_device(args.device)
    model, tokenizer = runs.load_model(args.model, device=device, seed=args.seed)
    prompt = args.prompt
    if args.chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    n_prompt = enc["input_ids"].shape[1]
    if n_prompt == 0:
        raise runs.CliError("the prompt is empty after tokenization; allowed: a prompt of at least one token")
    runs.check_model_fits(model, config, n_prompt + args.max_new_tokens,
                          f"the prompt ({n_prompt} tokens) plus --max-new-tokens {args.max_new_tokens}")
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
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {"prompt": args.prompt, "plain": tokenizer.decode(plain, skip_special_tokens=True),
                  "focus": tokenizer.decode(focus, skip_special_tokens=True), "plain_ids": plain.tolist(),
                  "focus_ids": focus.tolist(), "changed": changed, "stats": stats_dict(stats),
                  "config": config.to_dict(),
                  "meta": runs.run_metadata(args.seed, device, model=args.model or runs.DEFAULT_MODEL)}
        (out_dir / "generate.json").write_text(json.dumps(jsonable(record), indent=2, default=str))
        print(f"wrote {out_dir / 'generate.json'}")
    return 0


@torch.no_grad()
def changed_positions(model, sequence: torch.Tensor, n_prompt: int) -> list[bool]:
    """Per generated token: does it differ from the unmodified model's greedy pick for the same prefix?"""
    logits = model(sequence[None]).logits[0, n_prompt - 1:-1]  # one teacher-forced pass over the focus text
    return (logits.argmax(-1) != sequence[n_prompt:]).tolist()


def mark_changes(tokenizer, ids: list[int], changed: Sequence[bool], color: bool = False) -> str:
    """Decode ``ids``, marking the tokens the refinement changed as [[token]] (or green with ``color``)."""
    pieces, run_ = [], []
    for token, flag in zip(ids, changed):
        if not flag:
            run_.append(token)
            continue
        # runs of unchanged tokens decode together so multi-token characters stay intact
        pieces.append(tokenizer.decode(run_, skip_special_tokens=True))
        text = tokenizer.decode([token], skip_special_tokens=True)
        pieces.append(f"\033[1;32m{text}\033[0m" if color else f"[[{text}]]")
        run_ = []
    pieces.append(tokenizer.decode(run_ + ids[len(changed):], skip_special_tokens=True))
    return "".join(pieces)


def stats_dict(stats: Any) -> Any:
    """The generation statistics as plain data."""
    if stats is None or isinstance(stats, dict):
        return stats
    if hasattr(stats, "to_dict"):
        return stats.to_dict()
    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else str(stats)


def format_stats(stats: Any, config: FocusConfig) -> str:
    """One line: the configuration and the generation adapter's counters."""
    data = stats_dict(stats)
    data = data.get("totals", data) if isinstance(data, dict) else data
    body = ", ".join(f"{k}={v}" for k, v in data.items()) if isinstance(data, dict) else str(data)
    return f"mode={config.mode} {config.step_size_label} threshold={config.threshold:g} | {body}"
