"""`focus-decoding eval-text`: next-token evaluation sharded across processes, resumable, with lr selection.

Split out of ``cli.py`` along the command's seam: this module holds what only eval-text needs
(accelerate sharding and gathering, partial files for Ctrl-C / ``--resume``, ``--select-lr``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .cli import (DEFAULT_MODEL, PARTIAL, CliError, _partial_state, _print_summary, _world_size, load_model,
                  resolve_device, run_metadata, write_results)
from .config import FocusConfig
from .report import FocusReport, markdown_table


def cmd_eval_text(args: argparse.Namespace, config: FocusConfig) -> int:
    """Evaluate (or select the lr on dev, then evaluate on test); shards across accelerate processes."""
    from . import data

    if args.select_lr and args.resume:
        raise CliError("--resume cannot be combined with --select-lr (rerun the selection instead)")
    if args.resume and not args.out:
        raise CliError("--resume needs --out DIR (where the partial results were written)")
    rank, world = _process_group()
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device=device, seed=args.seed)
    texts = data.load_texts(args.dataset, split=args.split, max_texts=args.max_texts)
    if not texts:
        raise CliError(f"--dataset {args.dataset!r} gave no texts")
    meta = run_metadata(args.seed, device, model=args.model or DEFAULT_MODEL, dataset=args.dataset or "bundled-sample",
                        processes=world, argv=sys.argv[1:] if rank == 0 else None)
    if args.select_lr:
        return _select_lr(args, config, model, tokenizer, texts, meta)
    report = evaluate_texts(args, config, model, tokenizer, texts, name="eval-text",
                            partial=Path(args.out) if args.out else None)
    if report is None:  # interrupted: the partial file says how far we got
        return 130
    if rank == 0:
        report.meta.update(meta)
        print(markdown_table([report]))
        _print_summary(report)
        if args.out:
            path = write_results(args.out, "eval_text", [report], {"config": config.to_dict(), "meta": meta})
            print(f"wrote {path} (+ .md, .png)")
    return 0




def _process_group() -> tuple[int, int]:
    """(rank, world size) from accelerate when launched with several processes, else (0, 1)."""
    if _world_size() <= 1:
        return 0, 1
    state = _partial_state()
    return state.process_index, state.num_processes


def _split_budget(total: int | None, rank: int, world: int) -> int | None:
    if not total:
        return None
    return total // world + (1 if rank < total % world else 0)


def evaluate_texts(args: argparse.Namespace, config: FocusConfig, model, tokenizer, texts: list[str], *, name: str,
                   partial: Path | None = None, quiet: bool = False) -> FocusReport | None:
    """One evaluation, sharded over processes, resumable from ``partial``; the merged report (None if interrupted)."""
    from . import eval_text

    rank, world = _process_group()
    max_uncertain = _split_budget(args.max_uncertain, rank, world)
    max_tokens = _split_budget(args.max_tokens, rank, world)
    prior, start = None, 0
    path = partial / PARTIAL.format(suffix=f".rank{rank}" if world > 1 else "") if partial else None
    if path is not None and getattr(args, "resume", False):
        prior, start = _load_partial(path, config)
        if prior is not None:
            print(f"[rank {rank}] resuming after window {start - 1} ({prior.n_uncertain} refinements done)", file=sys.stderr)
            max_uncertain = None if max_uncertain is None else max_uncertain - prior.n_uncertain
            max_tokens = None if max_tokens is None else max_tokens - prior.n_total

    def on_window(index: int, so_far: FocusReport) -> None:
        if path is not None:  # keep every finished window on disk so Ctrl-C loses at most one
            _save_partial(path, index, prior.merge(so_far) if prior is not None else so_far, config)

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
    if path is not None and path.exists():
        path.unlink()  # finished: a later run must not resume from stale windows
    return report


def _save_partial(path: Path, window: int, report: FocusReport, config: FocusConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"window": window, "config": config.to_dict(), "report": report.to_dict()}))
    tmp.replace(path)  # atomic: an interrupt during the write leaves the previous file intact


def _load_partial(path: Path, config: FocusConfig) -> tuple[FocusReport | None, int]:
    if not path.exists():
        print(f"no partial results at {path}: starting from the first window", file=sys.stderr)
        return None, 0
    saved = json.loads(path.read_text())
    if FocusConfig.from_dict(saved["config"]) != config:
        raise CliError(f"--resume: {path} was written with config {saved['config']}, not {config.to_dict()}")
    return FocusReport.from_dict(saved["report"]), int(saved["window"]) + 1


def _select_lr(args, config, model, tokenizer, texts, meta) -> int:
    """Sweep ``--select-lr`` on the dev split, pick the best Δ_Corr, evaluate that lr on the disjoint test split."""
    from tqdm.auto import tqdm

    from . import data

    dev, test = data.split_dev_test(texts, dev_fraction=args.dev_fraction, seed=args.seed)
    if not dev or not test:
        raise CliError(f"--select-lr needs texts in both splits; got {len(dev)} dev and {len(test)} test texts "
                       "(use more texts or change --dev-fraction)")
    rank, _ = _process_group()
    dev_reports = []
    for lr in tqdm(args.select_lr, desc="dev lr sweep", disable=args.no_progress or rank != 0):
        cfg = dataclasses.replace(config, lr=lr)
        rep = evaluate_texts(args, cfg, model, tokenizer, dev, name=f"dev lr={lr:g}", quiet=True)
        rep.config, rep.meta = cfg.to_dict(), {**rep.meta, "split": "dev", "model": f"dev lr={lr:g}"}
        dev_reports.append(rep)
    # ties go to the smaller p-value, then to the smaller lr (the safer step)
    best = min(range(len(dev_reports)), key=lambda i: (-dev_reports[i].delta_corr, dev_reports[i].p_value,
                                                         args.select_lr[i]))
    chosen = dataclasses.replace(config, lr=args.select_lr[best])
    test_report = evaluate_texts(args, chosen, model, tokenizer, test, name=f"test lr={chosen.lr:g}")
    test_report.config, test_report.meta = chosen.to_dict(), {**test_report.meta, **meta, "split": "test",
                                                                 "model": f"test lr={chosen.lr:g}"}
    if rank == 0:
        print("dev (selection):")
        print(markdown_table(dev_reports))
        print(f"chosen lr = {chosen.lr:g} (dev Δ_Corr {dev_reports[best].delta_corr:+d})")
        print("test (reported):")
        print(markdown_table([test_report]))
        _print_summary(test_report)
        if args.out:
            extra = {"config": chosen.to_dict(), "meta": meta, "grid": args.select_lr, "chosen_lr": chosen.lr,
                     "dev": [r.summary() for r in dev_reports], "dev_texts": len(dev), "test_texts": len(test)}
            path = write_results(args.out, "select_lr", [*dev_reports, test_report], extra)
            from . import plots
            plots.plot_lr_sweep({config.mode: [_lr_row(r) for r in dev_reports]}, Path(args.out) / "select_lr_dev.png",
                                title=f"dev split: Δ_Corr vs lr (chosen {chosen.lr:g}, test Δ_Corr {test_report.delta_corr:+d})")
            print(f"wrote {path} (+ .md, .png, select_lr_dev.png)")
    return 0


def _lr_row(r: FocusReport) -> dict[str, float]:
    return {"lr": r.config["lr"], "delta_corr": r.delta_corr, "delta_corr_std": r.delta_corr_std, "p_value": r.p_value}
