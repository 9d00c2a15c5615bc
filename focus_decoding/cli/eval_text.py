"""`focus-decoding eval-text`: next-token evaluation over one or several processes, resumable, never losing a result.

Order of a run: every argument and ``--out`` is checked, then the data source (a hub name offline
fails in seconds), then the model is loaded and checked against the window settings; only then does
the evaluation start. Each finished window is kept in ``partial.json`` with the run's fingerprint
(model, data as a hash of the token stream, window settings, FocusConfig, processes), so ``--resume``
continues exactly the run that was interrupted and refuses any other; a finished ``eval_text.json``
is never replaced silently (``cli.resumable``). Choosing a step on dev and judging it on test is
``tune``'s job (``--select-lr`` of earlier versions is refused, naming it).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any

from ..config import FocusConfig
from ..evaluation.report import FocusReport, markdown_table
from . import common
from .argtypes import nonnegative_int, positive_int
from .common import CliError
from .resumable import Finished, ResumableRun, add_text_arguments, config_fingerprint, fingerprint, open_text_run

RESULT = "eval_text.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The eval-text command's own options."""
    add_text_arguments(parser)
    parser.add_argument("--stride", type=positive_int, default=None, help="<= --context-length (default: equal)")
    parser.add_argument("--max-uncertain", type=nonnegative_int, default=16,
                        help="stop after this many refinements (0 = no limit)")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="stop after this many scored positions")
    parser.add_argument("--batch-positions", type=positive_int, default=1)
    parser.add_argument("--select-lr", default=None, metavar="GRID", help=argparse.SUPPRESS)  # refused: use tune


def run(args: argparse.Namespace, config: FocusConfig) -> int:
    """Evaluate, over the launched processes (the same report as one process); resumable; refuses to replace
    another run's results."""
    _check_options(args)
    group = common.process_group()
    rank, world = group.rank, group.world
    run_ = open_text_run(args, RESULT, [config], group)
    job, texts, device, model, tokenizer = run_.job, run_.texts, run_.device, run_.model, run_.tokenizer
    out = job.out
    fp = run_fingerprint(args, config, tokenizer, texts, world) if out is not None else None
    try:
        state = job.begin(fp or {})
    except Finished as done:
        if rank == 0:
            print(f"already complete: {done}")
        return 0
    meta = common.run_metadata(args.seed, device, model=args.model or common.DEFAULT_MODEL,
                               dataset=args.dataset or "bundled-sample", processes=world,
                               argv=sys.argv[1:] if rank == 0 else None, fingerprint=fp)
    report = evaluate_texts(args, config, model, tokenizer, texts, job, state, group)
    if report is None:  # interrupted: the partial file says how far we got
        return 130
    if rank == 0:
        report.meta.update(meta)
        print(markdown_table([report]))
        common.print_summary(report)
        if out is not None:
            path = common.write_results(out, "eval_text", [report], {"config": config.to_dict(), "meta": meta})
            print(f"wrote {path} (+ .md, .png)")
            job.finish()  # only now: a run that dies while writing can still be resumed
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """Combinations of options that cannot work, refused before anything is loaded."""
    if args.select_lr is not None:
        raise CliError("--select-lr was replaced by tune, which chooses the step on a dev split and judges it on a "
                       f"disjoint test split: focus-decoding tune --lrs {args.select_lr} --exhaustive")
    if args.stride is not None and args.stride > args.context_length:
        raise CliError(f"--stride {args.stride} is above --context-length {args.context_length}, which would skip "
                       f"tokens; allowed: 1..{args.context_length}")


def run_fingerprint(args: argparse.Namespace, config: FocusConfig, tokenizer, texts: list[str],
                    world: int) -> dict[str, Any]:
    """Everything that defines this evaluation, keyed by the option a user would have changed."""
    fields = {"--model": common.model_identity(args.model)}
    if args.model in common.TINY_MODELS:
        fields["--seed"] = args.seed  # the tiny models' random weights come from it
    fields.update({"--dataset": common.dataset_identity(args.dataset), "--split": args.split,
                   "--max-texts": args.max_texts, "data (token stream sha256)": stream_digest(tokenizer, texts),
                   "--context-length": args.context_length, "--stride": args.stride or args.context_length,
                   "--max-uncertain": args.max_uncertain, "--max-tokens": args.max_tokens,
                   **config_fingerprint(config), "processes": world})
    return fingerprint(fields)


def stream_digest(tokenizer, texts: list[str]) -> str:
    """A short SHA-256 of the token stream the evaluation scores: the data as the model sees it."""
    from ..evaluation.windows import tokenize_stream

    return hashlib.sha256(tokenize_stream(tokenizer, texts).numpy().tobytes()).hexdigest()[:16]


def evaluate_texts(args: argparse.Namespace, config: FocusConfig, model, tokenizer, texts: list[str],
                   job: ResumableRun, state: dict | None, group) -> FocusReport | None:
    """One evaluation over ``group``'s processes (every one ends with the whole report), continuing ``state``;
    None if interrupted."""
    from ..evaluation.next_token import evaluate_next_token

    prior, start = _restore(job, state)
    max_uncertain, max_tokens = args.max_uncertain or None, args.max_tokens
    if prior is not None:
        if group.rank == 0:
            print(f"resuming after window {start - 1} ({prior.n_uncertain} refinements done)", file=sys.stderr)
        max_uncertain = None if max_uncertain is None else max_uncertain - prior.n_uncertain
        max_tokens = None if max_tokens is None else max_tokens - prior.n_total
    elif args.resume and group.rank == 0:
        print(f"no partial results at {job.path}: starting from the first window", file=sys.stderr)

    def on_window(index: int, so_far: FocusReport) -> None:  # every finished round on disk: Ctrl-C loses one
        report = prior.merge(so_far) if prior is not None else so_far
        job.save({"window": index, "config": config.to_dict(), "report": report.to_dict()})

    exhausted = (max_uncertain is not None and max_uncertain <= 0) or (max_tokens is not None and max_tokens <= 0)
    try:
        if exhausted:
            return prior
        report = evaluate_next_token(
            model, tokenizer, texts, config, context_length=args.context_length, stride=args.stride,
            max_uncertain=max_uncertain, max_tokens=max_tokens, batch_positions=args.batch_positions,
            progress=not args.no_progress, name="eval-text", start_window=start, on_window=on_window, group=group)
    except KeyboardInterrupt:
        where = f"partial results in {job.path}; rerun with --resume" if job.path else "nothing saved (no --out)"
        print(f"\ninterrupted: {where}", file=sys.stderr)
        return None
    return prior.merge(report) if prior is not None else report


def _restore(job: ResumableRun, state: dict | None) -> tuple[FocusReport | None, int]:
    """(report so far, first window to run) from a partial state; (None, 0) when there is none."""
    if state is None:
        return None, 0
    try:
        return FocusReport.from_dict(state["report"]), int(state["window"]) + 1
    except (KeyError, TypeError, ValueError) as err:
        raise CliError(f"--resume: {job.path} is not a readable partial-results file (bad or missing {err}); remove "
                       "it to start over") from err
