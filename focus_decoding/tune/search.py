"""Does focus help this model on this text, and with which setting? A race on dev, a verdict on test.

``tune`` runs the three steps in order: the candidates (``tune.candidates``) race on the dev split
(``tune.dev`` feeding the pure ``tune.race``), the choice is evaluated on the disjoint test split and
judged (``tune.verdict``). Resumable from a snapshot that ``on_progress`` receives after every
uncertain dev token and every test window. Nothing here prints or writes files.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..config import FocusConfig
from ..evaluation.group import Group
from ..evaluation.report import FocusReport
from ..resources.corpora import split_dev_test
from .dev import OnProgress, Progress, RaceResult, run_race
from .race import Race, StopRule
from .verdict import MIN_TEST_TOKENS, Verdict, judge_on_test, verdict

DEFAULT_DEV_MAX_UNCERTAIN = 400  # the race's dev tokens: a quick search
DEFAULT_TEST_MAX_UNCERTAIN = 1000  # calls only large effects; a +1 point gain needs ~5,000-20,000 tokens


@dataclass
class TuneResult:
    """Everything ``tune`` found: the split, the race, the chosen setting, its test report and the verdict."""

    dev_texts: int
    test_texts: int
    race: RaceResult
    test: FocusReport
    verdict: Verdict
    alpha: float
    seconds: float

    @property
    def chosen(self) -> FocusConfig:
        return self.race.chosen

    def to_dict(self) -> dict[str, Any]:
        """Every number (JSON-able apart from NaN): race log, spend, dev and test reports, verdict."""
        race, r = self.race.race, self.race
        rows = [{"candidate": i, "label": c.label, "config": c.to_dict(), "cost": race.costs[i],
                 "dev": rep.summary(), "outcomes": rep.outcomes,
                 "status": status(race, i, r.choice)} for i, (c, rep) in enumerate(zip(r.candidates, r.reports))]
        return {"chosen": self.chosen.to_dict(), "chosen_label": self.chosen.label, "choice": r.choice,
                "race_choice": r.race_choice, "same_choice_as_race": r.race_choice == r.choice,
                "verdict": dataclasses.asdict(self.verdict), "alpha": self.alpha,
                "dev_best_beats_off": race.score(r.choice) > 0,
                "off": {"dev": {"n_total": r.state.base.n_total, "delta_corr": 0, "refinements": 0},
                        "note": "the plain model: every Δ is relative to it, and it costs nothing"},
                "spend": r.spend(), "candidates": rows, "eliminations": race.eliminated,
                "race": {"looks": race.looks, "level": race.level, "rule": dataclasses.asdict(race.rule),
                         "budget_ratio": race.budget_ratio, "exhaustive": not race.eliminate,
                         "plan": race.plan, "n_tokens": race.n_tokens},
                "dev_plain": r.state.base.summary(), "test": self.test.summary(),
                "test_report": self.test.to_dict(), "data": {"dev_texts": self.dev_texts, "test_texts": self.test_texts,
                                                             "dev_scored": r.state.base.n_total,
                                                             "dev_uncertain": race.n_tokens,
                                                             "test_scored": self.test.n_total,
                                                             "test_uncertain": self.test.n_uncertain},
                "seconds": self.seconds}


def status(race: Race, i: int, choice: int) -> str:
    """Candidate i's fate in words: chosen, survived, or where and why it was dropped."""
    if i == choice:
        return "chosen"
    if i in race.alive:
        return "survived"
    e = next(e for e in race.eliminated if e["candidate"] == i)
    return f"dropped at {e['at']} ({e['reason']})"


def tune(model, tokenizer, texts: Sequence[str], candidates: Sequence[FocusConfig | Mapping], *,
         dev_fraction: float = 0.5, seed: int = 0, context_length: int = 128,
         dev_max_uncertain: int | None = DEFAULT_DEV_MAX_UNCERTAIN,
         test_max_uncertain: int | None = DEFAULT_TEST_MAX_UNCERTAIN, alpha: float = 0.05, rule: StopRule | None = None,
         budget_ratio: float = 2.0, exhaustive: bool = False, resume: Mapping[str, Any] | None = None,
         on_progress: OnProgress | None = None, progress_bars: bool = False,
         min_test_tokens: int = MIN_TEST_TOKENS, group: Group | None = None) -> TuneResult:
    """Split, race on dev, evaluate the choice on test, judge; ``resume`` is a snapshot from ``on_progress``.

    ``group`` (``evaluation.group``, from ``accelerate launch`` / ``torchrun``) splits both passes over processes:
    every process makes the decisions, and gets the result, that one process gets (``tune.dev``)."""
    t0 = time.perf_counter()
    dev, test = split_dev_test(list(texts), dev_fraction=dev_fraction, seed=seed)
    rule = rule or StopRule(alpha=alpha)
    notify = on_progress or (lambda p: None)
    resume = dict(resume or {})
    race = run_race(model, tokenizer, dev, candidates, context_length=context_length, max_uncertain=dev_max_uncertain,
                    rule=rule, budget_ratio=budget_ratio, exhaustive=exhaustive, resume=resume.get("race"),
                    on_progress=notify, group=group)
    race_snapshot = race.state.to_dict()
    prior, start = None, 0
    if resume.get("test"):
        prior, start = FocusReport.from_dict(resume["test"]["report"]), int(resume["test"]["window"]) + 1
    total = test_max_uncertain or 0

    def on_window(w: int, so_far: FocusReport) -> None:
        notify(Progress("test", so_far.n_uncertain, total, {"race": race_snapshot,
                                                            "test": {"window": w, "report": so_far.to_dict()}}))

    start_snapshot = {"race": race_snapshot, "test": resume.get("test")}  # Ctrl-C from here on skips the race
    notify(Progress("test", prior.n_uncertain if prior else 0, total, start_snapshot))
    report = judge_on_test(model, tokenizer, test, race.chosen, context_length=context_length,
                           max_uncertain=test_max_uncertain, prior=prior, start_window=start, on_window=on_window,
                           progress=progress_bars, group=group)
    report.config = race.chosen.to_dict()
    report.meta.update(split="test", model=f"test {race.chosen.label}")
    return TuneResult(len(dev), len(test), race, report, verdict(report, alpha, min_test_tokens), alpha,
                      time.perf_counter() - t0)
