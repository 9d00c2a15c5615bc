"""`focus-decoding eval-text`: next-token evaluation sharded across processes, resumable, with lr selection.

Order of a run: every argument and ``--out`` is checked, then the data source (a hub name offline
fails in seconds), then the model is loaded and checked against the window settings; only then does
the evaluation start. Each finished window is kept in ``partial.json`` with the run's fingerprint
(model, data as a hash of the token stream, window settings, split, FocusConfig, shard), so
``--resume`` continues exactly the run that was interrupted and refuses any other.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Any

from . import runs
from .config import FocusConfig
from .report import FocusReport, markdown_table
from .runs import CliError, lr_grid, nonnegative_int, open_fraction, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The eval-text command's own options."""
    parser.add_argument("--dataset", default=None, help="text file/dir, or hub data set name (default: bundled sample)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-texts", type=positive_int, default=None)
    parser.add_argument("--context-length", type=positive_int, default=128)
    parser.add_argument("--stride", type=positive_int, default=None, help="<= --context-length (default: equal)")
    parser.add_argument("--max-uncertain", type=nonnegative_int, default=16,
                        help="stop after this many refinements (0 = no limit)")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="stop after this many scored positions")
    parser.add_argument("--batch-positions", type=positive_int, default=1)
    parser.add_argument("--select-lr", type=lr_grid, default=None, metavar="GRID",
                        help="comma-separated lrs: pick the best Δ_Corr on a dev split, report it on the test split")
    parser.add_argument("--dev-fraction", type=open_fraction, default=0.5)
    parser.add_argument("--resume", action="store_true", help="continue from the partial results in --out")
    parser.add_argument("--overwrite", action="store_true", help="discard the partial results in --out and start over")


def run(args: argparse.Namespace, config: FocusConfig) -> int:
    """Evaluate (or select the lr on dev, then evaluate on test); shards across accelerate processes."""
    from . import data

    _check_options(args, config)
    out = runs.check_out_dir(args.out)
    rank, world = runs.process_group()
    partial_dir = None if args.select_lr else out  # the lr sweep is rerun, never resumed
    found = runs.check_partials(partial_dir, resume=args.resume, overwrite=args.overwrite, world=world)
    texts = data.load_texts(args.dataset, split=args.split, max_texts=args.max_texts)  # before the slow model load
    if not texts:
        raise CliError(f"--dataset {args.dataset!r} gave no texts (all empty); allowed: files with some text")
    device = runs.resolve_device(args.device)
    model, tokenizer = runs.load_model(args.model, device=device, seed=args.seed)
    runs.check_model_fits(model, config, args.context_length, f"--context-length {args.context_length}")
    meta = runs.run_metadata(args.seed, device, model=args.model or runs.DEFAULT_MODEL,
                             dataset=args.dataset or "bundled-sample", processes=world,
                             argv=sys.argv[1:] if rank == 0 else None)
    if args.select_lr:
        return _select_lr(args, config, model, tokenizer, texts, meta)
    if args.overwrite:
        _discard(found, out, rank, world)
    fp = run_fingerprint(args, config, tokenizer, texts, rank, world) if partial_dir else None
    report = evaluate_texts(args, config, model, tokenizer, texts, name="eval-text", partial=partial_dir,
                            fingerprint=fp)
    if report is None:  # interrupted: the partial file says how far we got
        return 130
    if rank == 0:
        report.meta.update(meta)
        print(markdown_table([report]))
        runs.print_summary(report)
        if out is not None:
            path = runs.write_results(out, "eval_text", [report], {"config": config.to_dict(), "meta": meta})
            print(f"wrote {path} (+ .md, .png)")
            # only now: a run that dies while writing can still be resumed
            _remove([runs.partial_path(out, r, world) for r in range(world)])
    return 0


def _check_options(args: argparse.Namespace, config: FocusConfig) -> None:
    """Combinations of options that cannot work, refused before anything is loaded."""
    if args.select_lr and args.resume:
        raise CliError("--resume cannot be combined with --select-lr (rerun the selection instead)")
    if args.resume and args.overwrite:
        raise CliError("--resume continues the partial results in --out and --overwrite discards them; pass one")
    if args.resume and not args.out:
        raise CliError("--resume needs --out DIR (where the partial results were written)")
    if args.select_lr and config.step_rule != "fixed":
        raise CliError(f"--select-lr sweeps --lr, which --step-rule {config.step_rule} does not use; "
                       "allowed: --step-rule fixed")
    if args.stride is not None and args.stride > args.context_length:
        raise CliError(f"--stride {args.stride} is above --context-length {args.context_length}, which would skip "
                       f"tokens; allowed: 1..{args.context_length}")


def run_fingerprint(args: argparse.Namespace, config: FocusConfig, tokenizer, texts: list[str], rank: int,
                    world: int) -> dict[str, Any]:
    """Everything that defines this evaluation, keyed by the option a user would have changed."""
    fields = {"--model": runs.model_identity(args.model)}
    if args.model in runs.TINY_MODELS:
        fields["--seed"] = args.seed  # the tiny models' random weights come from it
    fields.update({"--dataset": runs.dataset_identity(args.dataset), "--split": args.split, "--max-texts": args.max_texts,
                   "data (token stream sha256)": stream_digest(tokenizer, texts),
                   "--context-length": args.context_length, "--stride": args.stride or args.context_length,
                   **runs.config_fingerprint(config), "shard (rank/world)": f"{rank}/{world}"})
    return runs.fingerprint(fields)


def stream_digest(tokenizer, texts: list[str]) -> str:
    """A short SHA-256 of the token stream the evaluation scores: the data as the model sees it."""
    from .eval_text import tokenize_stream

    return hashlib.sha256(tokenize_stream(tokenizer, texts).numpy().tobytes()).hexdigest()[:16]


def _discard(found: list[Path], out: Path, rank: int, world: int) -> None:
    """--overwrite: each process removes its own partial file; the main one also those of another process count."""
    mine, ours = runs.partial_path(out, rank, world), {runs.partial_path(out, r, world) for r in range(world)}
    _remove([p for p in found if p == mine or (rank == 0 and p not in ours)])


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _split_budget(total: int | None, rank: int, world: int) -> int | None:
    if not total:
        return None
    return total // world + (1 if rank < total % world else 0)


def evaluate_texts(args: argparse.Namespace, config: FocusConfig, model, tokenizer, texts: list[str], *, name: str,
                   partial: Path | None = None, fingerprint: dict | None = None,
                   quiet: bool = False) -> FocusReport | None:
    """One evaluation, sharded over processes, resumable from ``partial``; the merged report (None if interrupted)."""
    from . import eval_text

    rank, world = runs.process_group()
    max_uncertain = _split_budget(args.max_uncertain, rank, world)
    max_tokens = _split_budget(args.max_tokens, rank, world)
    prior, start = None, 0
    path = runs.partial_path(partial, rank, world) if partial else None
    if path is not None and getattr(args, "resume", False):
        prior, start = _restore(path, fingerprint)
        if prior is not None:
            print(f"[rank {rank}] resuming after window {start - 1} ({prior.n_uncertain} refinements done)", file=sys.stderr)
            max_uncertain = None if max_uncertain is None else max_uncertain - prior.n_uncertain
            max_tokens = None if max_tokens is None else max_tokens - prior.n_total

    def on_window(index: int, so_far: FocusReport) -> None:
        if path is not None:  # keep every finished window on disk so Ctrl-C loses at most one
            report = prior.merge(so_far) if prior is not None else so_far
            runs.save_partial(path, {"fingerprint": fingerprint, "window": index, "config": config.to_dict(),
                                     "report": report.to_dict()})

    exhausted = (max_uncertain is not None and max_uncertain <= 0) or (max_tokens is not None and max_tokens <= 0)
    try:
        if exhausted:
            report = prior
        else:
            report = eval_text.evaluate_next_token(
                model, tokenizer, texts, config, context_length=args.context_length, stride=args.stride,
                max_uncertain=max_uncertain, max_tokens=max_tokens, batch_positions=args.batch_positions,
                progress=not (args.no_progress or quiet), name=name, start_window=start, on_window=on_window,
                shard=(rank, world) if world > 1 else None)
            report = prior.merge(report) if prior is not None else report
    except KeyboardInterrupt:
        where = f"partial results in {path}; rerun with --resume" if path else "nothing saved (no --out)"
        print(f"\ninterrupted: {where}", file=sys.stderr)
        return None
    if world > 1:
        from accelerate.utils import gather_object
        parts = gather_object([report.to_dict()])
        report = FocusReport.from_dict(parts[0])
        for part in parts[1:]:
            report = report.merge(FocusReport.from_dict(part))
    return report


def _restore(path: Path, fingerprint: dict | None) -> tuple[FocusReport | None, int]:
    """(report so far, first window to run) from this run's partial file; (None, 0) when there is none."""
    state = runs.load_partial(path, fingerprint or {})
    if state is None:
        print(f"no partial results at {path}: starting from the first window", file=sys.stderr)
        return None, 0
    try:
        return FocusReport.from_dict(state["report"]), int(state["window"]) + 1
    except (KeyError, TypeError, ValueError) as err:
        raise CliError(f"--resume: {path} is not a readable partial-results file (bad or missing {err}); remove it "
                       "to start over") from err


def _select_lr(args, config, model, tokenizer, texts, meta) -> int:
    """Sweep ``--select-lr`` on the dev split, pick the best Δ_Corr, evaluate that lr on the disjoint test split."""
    from tqdm.auto import tqdm

    from . import data, plots

    dev, test = data.split_dev_test(texts, dev_fraction=args.dev_fraction, seed=args.seed)
    if not dev or not test:
        raise CliError(f"--select-lr needs texts in both splits; got {len(dev)} dev and {len(test)} test texts "
                       "(use more texts or change --dev-fraction)")
    rank, _ = runs.process_group()
    dev_reports = []
    for lr in tqdm(args.select_lr, desc="dev lr sweep", disable=args.no_progress or rank != 0):
        cfg = dataclasses.replace(config, lr=lr)
        rep = evaluate_texts(args, cfg, model, tokenizer, dev, name=f"dev lr={lr:g}", quiet=True)
        if rep is None:  # interrupted; the sweep keeps nothing to resume
            return 130
        rep.config, rep.meta = cfg.to_dict(), {**rep.meta, "split": "dev", "model": f"dev lr={lr:g}"}
        dev_reports.append(rep)
    # ties go to the smaller p-value, then to the smaller lr (the safer step)
    best = min(range(len(dev_reports)), key=lambda i: (-dev_reports[i].delta_corr, dev_reports[i].p_value,
                                                         args.select_lr[i]))
    chosen = dataclasses.replace(config, lr=args.select_lr[best])
    test_report = evaluate_texts(args, chosen, model, tokenizer, test, name=f"test lr={chosen.lr:g}")
    if test_report is None:
        return 130
    test_report.config, test_report.meta = chosen.to_dict(), {**test_report.meta, **meta, "split": "test",
                                                                 "model": f"test lr={chosen.lr:g}"}
    if rank == 0:
        print("dev (selection):")
        print(markdown_table(dev_reports))
        print(f"chosen lr = {chosen.lr:g} (dev Δ_Corr {dev_reports[best].delta_corr:+d})")
        print("test (reported):")
        print(markdown_table([test_report]))
        runs.print_summary(test_report)
        if args.out:
            extra = {"config": chosen.to_dict(), "meta": meta, "grid": args.select_lr, "chosen_lr": chosen.lr,
                     "dev": [r.summary() for r in dev_reports], "dev_texts": len(dev), "test_texts": len(test)}
            path = runs.write_results(args.out, "select_lr", [*dev_reports, test_report], extra)
            plots.plot_lr_sweep({config.mode: [_lr_row(r) for r in dev_reports]}, Path(args.out) / "select_lr_dev.png",
                                title=f"dev split: Δ_Corr vs lr (chosen {chosen.lr:g}, test Δ_Corr {test_report.delta_corr:+d})")
            print(f"wrote {path} (+ .md, .png, select_lr_dev.png)")
    return 0


def _lr_row(r: FocusReport) -> dict[str, float]:
    return {"lr": r.config["lr"], "delta_corr": r.delta_corr, "delta_corr_std": r.delta_corr_std, "p_value": r.p_value}
