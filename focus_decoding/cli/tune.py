"""`focus-decoding tune`: choose a focus setting on a dev split, judge it on the test split, write the evidence.

Order of a run: options and ``--out`` are checked, then the data (split into dev and test), then the
model is loaded and every candidate checked against it; only then does the search start
(``tune.tune``: a stop-early race on dev, the choice on test, a verdict). Every uncertain dev token
and every test window is kept in ``DIR/partial.json`` with the run's fingerprint, so Ctrl-C loses at
most one token's refinements and ``--resume`` continues exactly that run (and refuses any other,
naming the option that differs); a finished ``tune.json`` is never replaced silently
(``cli.resumable``). Output in ``DIR``: ``tune.json`` (every number), ``focus_config.json`` (the
chosen ``FocusConfig``, loaded strictly by ``FocusConfig.from_dict`` and storable with
``set_focus_config``), ``tune.md`` and ``tune.png`` (the dev race). The last line printed is the
verdict; "not enough data" exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .. import tune as tuning
from ..config import MODES, FocusConfig
from ..evaluation.report import FocusReport, jsonable
from . import common
from .argtypes import at_least_one, lr_grid, nonnegative_int, open_fraction, positive_int, tau_grid
from .common import CliError
from .resumable import Finished, ResumableRun, add_text_arguments, fingerprint, open_text_run

SAVE_EVERY_S = 2.0  # partial.json at most this often (and always on Ctrl-C)
RESULT = "tune.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The tune command's own options (the grid's params come from --params, a comma-separated list)."""
    add_text_arguments(parser)
    parser.add_argument("--dev-fraction", type=open_fraction, default=0.5, help="share of the documents used as dev")
    parser.add_argument("--modes", type=_modes, default=None, help=f"comma-separated, from {', '.join(MODES)} "
                        "(default: --mode)")
    parser.add_argument("--lrs", type=lr_grid, default=None, metavar="GRID",
                        help="fixed-rule learning rates (default, when neither --lrs nor --taus is given: "
                             f"{','.join(f'{x:g}' for x in tuning.DEFAULT_LRS)})")
    parser.add_argument("--taus", type=tau_grid, default=None, metavar="GRID",
                        help="normalized-rule taus (default, when neither --lrs nor --taus is given: "
                             f"{','.join(f'{x:g}' for x in tuning.DEFAULT_TAUS)})")
    parser.add_argument("--dev-max-uncertain", type=nonnegative_int, default=tuning.DEFAULT_DEV_MAX_UNCERTAIN,
                        help="uncertain dev tokens the race runs on (0 = all)")
    parser.add_argument("--test-max-uncertain", type=nonnegative_int, default=tuning.DEFAULT_TEST_MAX_UNCERTAIN,
                        help="uncertain test tokens the chosen setting is judged on (0 = all)")
    parser.add_argument("--min-test-uncertain", type=positive_int, default=tuning.MIN_TEST_TOKENS,
                        help="fewest uncertain test tokens a verdict is given on; below, 'not enough data' and exit "
                             f"status 2 (default {tuning.MIN_TEST_TOKENS}: see tune.verdict for why)")
    parser.add_argument("--alpha", type=open_fraction, default=0.05,
                        help="error rate of the verdict and of the race's stop-early rule")
    parser.add_argument("--budget-ratio", type=at_least_one, default=2.0,
                        help="race refinements at most this times those of the final choice alone (>= 1)")
    parser.add_argument("--exhaustive", action="store_true",
                        help="run every candidate on every dev token (and report what the race would have chosen)")


def run(args: argparse.Namespace, config: FocusConfig) -> int:
    """Race on dev, test the choice, write tune.json / focus_config.json / tune.md / tune.png, print the verdict."""
    from ..evaluation.windows import tokenize_stream
    from ..resources.corpora import split_dev_test

    _check_options(args)
    candidates = grid_from_args(args, config)
    group = common.process_group()
    run_ = open_text_run(args, RESULT, candidates, group)
    job, texts, device, model, tokenizer = run_.job, run_.texts, run_.device, run_.model, run_.tokenizer
    out = job.out
    dev, test = split_dev_test(texts, dev_fraction=args.dev_fraction, seed=args.seed)
    n_test = max(0, len(tokenize_stream(tokenizer, test)) - 1)  # scored predictions: an upper bound on uncertain ones
    if n_test < args.min_test_uncertain:
        raise CliError(f"not enough data: the test split gives {n_test} predictions, fewer than the "
                       f"{args.min_test_uncertain} uncertain tokens a verdict needs (--min-test-uncertain); use more "
                       "text")
    # the fingerprint tokenizes the whole corpus once more: only worth it where a partial file can be written
    fp = run_fingerprint(args, candidates, tokenizer, texts) if out is not None else None
    try:
        state = job.begin(fp or {})
    except Finished as done:
        if group.rank == 0:
            print(f"already complete: {done}")
        return 0
    say = print if group.rank == 0 else (lambda *a, **k: None)  # one process speaks and writes
    resume = _restore(job, state, say) if args.resume else None
    say(f"tune: {len(candidates)} candidates, {len(dev)} dev / {len(test)} test texts, "
        f"threshold {config.threshold:g}, n_focus {config.n_focus}" + (f", {group.world} processes" if group.world > 1
                                                                       else ""))
    saver = _Saver(job, progress=not args.no_progress and group.rank == 0)
    try:
        result = tuning.tune(model, tokenizer, texts, candidates, dev_fraction=args.dev_fraction, seed=args.seed,
                             context_length=args.context_length, dev_max_uncertain=args.dev_max_uncertain or None,
                             test_max_uncertain=args.test_max_uncertain or None, alpha=args.alpha,
                             budget_ratio=args.budget_ratio, exhaustive=args.exhaustive, resume=resume,
                             on_progress=saver, progress_bars=not args.no_progress and group.rank == 0,
                             min_test_tokens=args.min_test_uncertain, group=group)
    except KeyboardInterrupt:
        saver.close(save=True)
        where = ("nothing saved (no --out)" if job.path is None else "nothing saved yet (still counting dev tokens)"
                 if saver.latest is None else f"partial results in {job.path}; rerun with --resume")
        print(f"\ninterrupted: {where}", file=sys.stderr)
        return 130
    saver.close(save=False)
    meta = common.run_metadata(args.seed, device, model=args.model or common.DEFAULT_MODEL, processes=group.world,
                               dataset=args.dataset or "bundled-sample", argv=sys.argv[1:], fingerprint=fp)
    if group.rank == 0:
        _print(result)
        if out is not None:
            write_outputs(out, result, meta)
            print(f"wrote {out / RESULT} (+ focus_config.json, tune.md, tune.png)")
            job.finish()  # only now: a run that dies while writing can still be resumed
    if result.verdict.kind == "not enough data":
        raise CliError(result.verdict.line)
    say(result.verdict.line)
    return 0


# ----------------------------------------------------------------------------- options
def _modes(text: str) -> list[str]:
    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(f"must be comma-separated modes from {MODES}, got {text!r}")
    return modes


def _check_options(args: argparse.Namespace) -> None:
    """Combinations that cannot work, refused before anything is loaded."""
    if getattr(args, "preset", None) is not None:
        raise CliError("tune searches the step itself; --preset is for generate/eval-text (use --lrs or --taus)")
    if args.lrs is not None and getattr(args, "lr", None) is not None:
        raise CliError("give the learning rates once: --lrs GRID or --lr VALUE")
    if args.taus is not None and getattr(args, "tau", None) is not None:
        raise CliError("give the taus once: --taus GRID or --tau VALUE")
    fixed = args.lrs is not None or getattr(args, "lr", None) is not None
    normalized = args.taus is not None or getattr(args, "tau", None) is not None
    rule = getattr(args, "step_rule", None)
    if rule == "normalized" and fixed and not normalized:
        raise CliError("--step-rule normalized searches --taus, but only fixed-rule learning rates (--lrs/--lr) were "
                       "given; allowed: --taus GRID, or drop --step-rule")
    if rule == "fixed" and normalized and not fixed:
        raise CliError("--step-rule fixed searches --lrs, but only normalized-rule taus (--taus/--tau) were given; "
                       "allowed: --lrs GRID, or drop --step-rule")
    if rule is not None and fixed and normalized:
        raise CliError(f"--step-rule {rule} contradicts a grid of both --lrs and --taus (each names its own rule); "
                       "drop --step-rule")


def grid_from_args(args: argparse.Namespace, config: FocusConfig) -> list[FocusConfig]:
    """The candidates: --modes x --params x (--lrs + --taus); threshold, n_focus, steps and precision from the shared
    options."""
    from ..method import parse_selectors

    lrs = args.lrs or ([args.lr] if getattr(args, "lr", None) is not None else None)
    taus = args.taus or ([args.tau] if getattr(args, "tau", None) is not None else None)
    if lrs is None and taus is None:
        rule = getattr(args, "step_rule", None)
        lrs = [] if rule == "normalized" else list(tuning.DEFAULT_LRS)
        taus = [] if rule == "fixed" else list(tuning.DEFAULT_TAUS)
    params = parse_selectors(args.params) if args.params else list(tuning.DEFAULT_PARAMS)
    return tuning.candidate_grid(modes=args.modes or [args.mode], params=params, lrs=lrs or [], taus=taus or [],
                                 threshold=config.threshold, n_focus=config.n_focus, steps=config.steps,
                                 precision=config.precision)


def run_fingerprint(args: argparse.Namespace, candidates: list[FocusConfig], tokenizer, texts: list[str]) -> dict:
    """Everything that defines this tune run, keyed by the option a user would have changed."""
    from .eval_text import stream_digest

    return fingerprint({
        "--model": common.model_identity(args.model), "--seed": args.seed,
        "--dataset": common.dataset_identity(args.dataset), "--split": args.split, "--max-texts": args.max_texts,
        "data (token stream sha256)": stream_digest(tokenizer, texts), "--dev-fraction": args.dev_fraction,
        "--context-length": args.context_length,
        "grid (--modes, --params, --lrs, --taus, --threshold, --n-focus, --steps, --precision)": [c.to_dict() for c in candidates],
        "--dev-max-uncertain": args.dev_max_uncertain, "--test-max-uncertain": args.test_max_uncertain,
        "--alpha": args.alpha, "--budget-ratio": args.budget_ratio, "--exhaustive": args.exhaustive,
        "--min-test-uncertain": args.min_test_uncertain, "processes": common.world_size()})


def _restore(job: ResumableRun, state: dict | None, say=print) -> dict | None:
    """The snapshot to resume from, validated: a partial file that does not hold one is named, never a traceback.
    ``say`` prints its progress lines (a silent function on all but the first process)."""
    if state is None:
        say(f"no partial results at {job.path}: starting from the beginning", file=sys.stderr)
        return None
    snapshot = state.get("resume")
    try:
        race_state = tuning.RaceState.from_dict(snapshot["race"])
        if snapshot.get("test") is not None:
            FocusReport.from_dict(snapshot["test"]["report"])
            int(snapshot["test"]["window"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CliError(f"--resume: {job.path} does not hold a valid tune state ({type(err).__name__}: "
                       f"{' '.join(str(err).split())[:120]}); remove it to start over") from err
    race = race_state.race
    say(f"resuming: {race.n_seen} of {race.n_tokens} dev tokens raced"
        + (", test under way" if snapshot.get("test") else ""), file=sys.stderr)
    return snapshot


# ----------------------------------------------------------------------------- progress and partial file
class _Saver:
    """``on_progress``: keeps the latest snapshot, writes it (throttled) to partial.json, drives the bars."""

    def __init__(self, job: ResumableRun, progress: bool):
        self.job, self.progress = job, progress
        self.latest: dict | None = None
        self.saved_at = 0.0
        self.bars: dict[str, Any] = {}

    def __call__(self, p: tuning.Progress) -> None:
        if p.snapshot is not None:
            self.latest = p.snapshot  # first: an interrupt from here on finds this token saved
            if time.monotonic() - self.saved_at >= SAVE_EVERY_S or p.phase == "test":
                self.save()
        if p.phase == "test":
            self.close_bars()  # the test phase draws evaluate_next_token's own bars
        elif self.progress:
            self._bar(p)

    def _bar(self, p: tuning.Progress) -> None:
        from tqdm.auto import tqdm

        desc = {"scan": "counting dev tokens", "race": "dev race"}[p.phase]
        if p.phase not in self.bars:
            self.close_bars()
            self.bars[p.phase] = tqdm(total=p.total, desc=desc, unit="window" if p.phase == "scan" else "refinement")
        bar = self.bars[p.phase]
        bar.total = max(p.total, p.done)  # the race's plan shrinks when candidates drop: the ETA follows
        bar.update(p.done - bar.n)
        if p.note:
            bar.set_postfix_str(p.note, refresh=False)

    def save(self) -> None:
        if self.latest is not None:
            self.job.save({"resume": self.latest})
            self.saved_at = time.monotonic()

    def close_bars(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    def close(self, save: bool) -> None:
        self.close_bars()
        if save:
            self.save()


# ----------------------------------------------------------------------------- output
def _print(result: tuning.TuneResult) -> None:
    """The race table, the spend, the test numbers (stdout); the verdict line is printed last by ``run``."""
    spend = result.race.spend()
    print(race_table(result))
    print(f"chosen: {result.chosen.label} (dev Δ_Corr {result.race.race.score(result.race.choice):+d} of "
          f"{spend['dev_uncertain_tokens']}; off = 0)")
    if result.race.race.score(result.race.choice) <= 0:
        print("dev: no candidate beat the plain model; the test below checks the best of them anyway")
    if result.race.race.eliminate:
        print(f"race: {spend['refinements']} refinements; an exhaustive sweep: {spend['exhaustive_refinements']}; "
              f"the final choice alone: {spend['final_alone_refinements']}; ratio {spend['ratio_to_final_alone']:.2f} "
              f"(by cost {spend['cost_weighted_ratio_to_final_alone']:.2f}, measured time "
              f"{spend['seconds_ratio_to_final_alone']:.2f})")
    else:
        same = "the same" if result.race.race_choice == result.race.choice else "a different"
        print(f"exhaustive: {spend['refinements']} refinements; the stop-early race on the same outcomes: "
              f"{spend['race_refinements']} (ratio {spend['race_ratio_to_final_alone']:.2f}) and {same} choice "
              f"({result.race.candidates[result.race.race_choice].label})")
    t = result.test
    print(f"test: {t.n_uncertain} uncertain of {t.n_total} scored; accuracy {t.base_accuracy:.2f}% -> "
          f"{t.focus_accuracy:.2f}%; Δ_Acc {t.delta_acc:+.2f} points, Δ_Corr {t.delta_corr:+d} "
          f"(wr→co {t.wrong_to_correct}, co→wr {t.correct_to_wrong}), p = {t.p_value:.3g}; "
          f"total {result.seconds:.1f}s")


def race_table(result: tuning.TuneResult) -> str:
    """Markdown: every candidate's dev numbers and fate, the plain model ("off"), and the test row."""
    race = result.race.race
    rows = ["| candidate | cost | dev tokens | Δ_Corr | wr→co | co→wr | p | status |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
            f"| off (plain model) | 0 | {race.n_tokens} | +0 | 0 | 0 | 1 | baseline |"]
    for i, (cfg, rep) in enumerate(zip(result.race.candidates, result.race.reports)):
        rows.append(f"| {cfg.label} | {race.costs[i]:.3g} | {rep.n_uncertain} | {rep.delta_corr:+d} | "
                    f"{rep.wrong_to_correct} | {rep.correct_to_wrong} | {rep.p_value:.2g} | "
                    f"{tuning.status(race, i, result.race.choice)} |")
    t = result.test
    rows += ["", "| test | n uncertain | base acc % | focus acc % | Δ_Acc (pp) | Δ_Corr | p |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| {result.chosen.label} | {t.n_uncertain} | {t.base_accuracy:.2f} | {t.focus_accuracy:.2f} | "
             f"{t.delta_acc:+.2f} | {t.delta_corr:+d} | {t.p_value:.3g} |"]
    return "\n".join(rows)


def write_outputs(out: Path, result: tuning.TuneResult, meta: dict) -> None:
    """tune.json, focus_config.json, tune.md and tune.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {**result.to_dict(), "meta": meta}
    (out / "tune.json").write_text(json.dumps(jsonable(payload), indent=2))
    (out / "focus_config.json").write_text(json.dumps(result.chosen.to_file_dict("focus-decoding tune"), indent=2) + "\n")
    (out / "tune.md").write_text(race_table(result) + f"\n\n{result.verdict.line}\n")
    from .figures import plot_race

    plot_race(result, out / "tune.png")
