"""The race on a model: one pass over the dev windows, every alive candidate on each uncertain token.

One no-grad forward per window is shared by all candidates (``evaluation.windows.scan``); at every
uncertain token each still-alive candidate refines it (``text.refine_position``, exactly the
method) and the race (``tune.race``) records the outcomes. ``exhaustive=True`` runs every candidate
on every dev token instead; ``Race.replay`` then shows what the race would have chosen from the same
outcomes. Resumable: ``on_progress`` receives a snapshot after every uncertain token and every window.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import method
from ..config import FocusConfig
from ..evaluation.group import Group
from ..evaluation.outcomes import outcome
from ..evaluation.report import FocusReport
from ..evaluation.windows import Window, rounds, tokenize_stream, window_bounds
from ..method.tail import shortcut
from ..text.refine import refine_position
from .candidates import check_candidates, refinement_cost
from .race import Race, StopRule


@dataclass
class Progress:
    """What ``on_progress`` receives: the phase, work done / planned, and a JSON-able snapshot to resume from."""

    phase: str  # "scan" (counting dev tokens), "race", "test"
    done: int  # refinements (race, test) or windows (scan) so far
    total: int  # planned upper bound of the same
    snapshot: dict[str, Any] | None = None  # tune(resume=snapshot) continues from exactly here
    note: str = ""  # e.g. the current leader


OnProgress = Callable[[Progress], None]


@dataclass
class RaceState:
    """Where the dev pass stands: the race, the plain model's counts, and the position in the windows."""

    race: Race
    base: FocusReport  # the plain model on the dev tokens scored: n_total and the top-k table
    nonfinite: list[int]  # per candidate: refinements that overflowed
    seconds: list[float]  # per candidate: time spent refining (measured, not used for decisions)
    scored_upto: list[int] = field(default_factory=list)  # per uncertain token: dev predictions scored up to it
    window: int = 0  # round in progress (with one process: the window)
    done_in_window: int = 0  # its uncertain tokens already recorded
    started: bool = False  # its predictions already counted in ``base``

    def to_dict(self) -> dict[str, Any]:
        return {"race": self.race.to_dict(), "base": self.base.to_dict(), "nonfinite": list(self.nonfinite),
                "seconds": list(self.seconds), "scored_upto": list(self.scored_upto), "window": self.window,
                "done_in_window": self.done_in_window, "started": self.started}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RaceState":
        return cls(Race.from_dict(d["race"]), FocusReport.from_dict(d["base"]), list(d["nonfinite"]),
                   list(d["seconds"]), list(d["scored_upto"]), int(d["window"]), int(d["done_in_window"]),
                   bool(d["started"]))


@dataclass
class RaceResult:
    """The dev race: candidates, their dev reports, the choice, and what it cost."""

    candidates: list[FocusConfig]
    state: RaceState
    reports: list[FocusReport]  # per candidate, on the dev tokens it refined
    choice: int  # index of the chosen candidate
    race_choice: int  # what the stop-early race chose (equals ``choice`` unless exhaustive)
    race_refinements: int  # refinements the stop-early race spent (replayed when exhaustive)

    @property
    def race(self) -> Race:
        return self.state.race

    @property
    def chosen(self) -> FocusConfig:
        return self.candidates[self.choice]

    def spend(self) -> dict[str, Any]:
        """Refinements spent, against an exhaustive sweep and against the final choice alone (plain and by cost)."""
        race, n = self.race, self.race.n_tokens
        counts = [len(o) for o in race.outcomes]
        weighted = sum(c * k for c, k in zip(race.costs, counts))
        secs = self.state.seconds
        alone_s = secs[self.choice] / counts[self.choice] * n if counts[self.choice] else float("nan")
        ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
        return {"dev_uncertain_tokens": n, "candidates": len(counts), "refinements": sum(counts),
                "per_candidate": counts, "exhaustive_refinements": len(counts) * n, "final_alone_refinements": n,
                "ratio_to_final_alone": ratio(sum(counts), n),
                "race_refinements": self.race_refinements, "race_ratio_to_final_alone": ratio(self.race_refinements, n),
                "cost_weighted_ratio_to_final_alone": ratio(weighted, race.costs[self.choice] * n),
                "refine_seconds": sum(secs), "final_alone_seconds_estimate": alone_s,
                "seconds_ratio_to_final_alone": ratio(sum(secs), alone_s)}


class Refiner:
    """One candidate's fixed pieces: its config, trainable/frozen split and cached-prefix depth."""

    def __init__(self, model, config: FocusConfig):
        self.config = config
        self.trainable, self.frozen = method.split_parameters(model, config.params)
        self.n_top = shortcut(model, config, warn=True)


def count_uncertain(view, stream: torch.Tensor, bounds, config: FocusConfig, limit: int | None,
                    on_window: Callable[[int], None] | None = None, group: Group | None = None) -> int:
    """How many uncertain tokens the dev pass will refine: min(limit, all of them). One forward per window, the
    windows split over ``group``'s processes round by round; every process gets the same number."""
    group, n = group or Group(), 0
    for _, last, win in rounds(view, stream, bounds, config, group):
        n += sum(group.gather(0 if win is None else int(win.uncertain.sum())))
        if on_window is not None:
            on_window(last)
        if limit is not None and n >= limit:
            return limit
    return n


def run_race(model, tokenizer, texts: Sequence[str], candidates: Sequence[FocusConfig | Mapping], *,
             context_length: int = 128, max_uncertain: int | None = None, rule: StopRule = StopRule(),
             budget_ratio: float = 2.0, exhaustive: bool = False, resume: Mapping[str, Any] | None = None,
             on_progress: OnProgress | None = None, group: Group | None = None) -> RaceResult:
    """The dev race (or, ``exhaustive``, every candidate on every dev token); resumable from a snapshot.

    With ``group`` (several processes) each round's windows are refined in parallel and the outcomes gathered
    and recorded in stream order, so every process makes the decisions one process makes, token by token
    (candidates dropped within a round still refine that round's later tokens: spent, never recorded).
    """
    candidates = [FocusConfig.coerce(c) for c in candidates]
    check_candidates(candidates)
    group = group or Group()
    stream = tokenize_stream(tokenizer, texts).to(method.input_device(model))
    if stream.numel() < 2:
        raise ValueError("the dev texts must give at least 2 tokens")
    bounds = window_bounds(stream.numel(), context_length, context_length)
    notify = on_progress or (lambda p: None)
    view = method.module_view(model)  # eval mode, private: other threads may use the model meanwhile
    if resume is not None:
        state = RaceState.from_dict(resume)
    else:
        n = count_uncertain(view, stream, bounds, candidates[0], max_uncertain,
                            lambda w: notify(Progress("scan", w + 1, len(bounds))), group)
        if n == 0:
            raise ValueError(f"the dev split has no uncertain token (top-1/top-2 gap < threshold "
                             f"{candidates[0].threshold:g}); use more text or a larger threshold")
        race = Race([refinement_cost(model, c) for c in candidates], [c.step_value for c in candidates], n,
                    rule=rule, budget_ratio=budget_ratio, eliminate=not exhaustive)
        state = RaceState(race, FocusReport(name="dev plain"), [0] * len(candidates), [0.0] * len(candidates))
        notify(Progress("race", 0, race.planned_total(), {"race": state.to_dict()}))  # the scan is not redone
    refiners = [Refiner(model, c) for c in candidates]
    _race_rounds(view, stream, bounds, refiners, state, notify, group)
    return _race_result(candidates, state, rule, budget_ratio, exhaustive)


def _race_rounds(view, stream, bounds, refiners: list[Refiner], state: RaceState, notify: OnProgress,
                 group: Group) -> None:
    """The dev pass from ``state``'s round (with one process a round is a window): one forward per window, every
    alive candidate on each uncertain token. One process records each token at once (Ctrl-C loses at most one);
    several record a round's tokens together, in stream order, once every process refined its own."""
    race = state.race
    if race.finished:
        return
    depths = lambda: {refiners[i].n_top for i in race.alive}  # noqa: E731 - states only for cached candidates
    for r, _, win in rounds(view, stream, bounds, refiners[0].config, group, start=state.window, depths=depths):
        found = group.gather(None if win is None else (win.labels.numel(),
                                                       torch.nonzero(win.uncertain).flatten().tolist()))
        seen_before = race.n_seen - state.done_in_window  # uncertain tokens recorded in earlier rounds
        plan, offset = [], seen_before  # per process: (its tokens in the budget, scored predictions counted)
        for item in found:
            if item is None or offset >= race.n_tokens:  # no window, or the dev budget ended before it
                plan.append(([], 0))
                continue
            todo = item[1][:race.n_tokens - offset]
            ends_here = bool(todo) and offset + len(todo) == race.n_tokens
            plan.append((todo, todo[-1] + 1 if ends_here else item[0]))  # the budget may end mid-window
            offset += len(todo)
        todo, n_scored = plan[group.rank]
        before = state.base.n_total + sum(n for _, n in plan[:group.rank]) - (n_scored if state.started else 0)
        if not state.started:  # the plain model's counts of this round's predictions, from every process
            part = FocusReport()
            if win is not None:
                scored = win.scored[:n_scored]
                part.add_predictions(scored, win.labels[:n_scored], method.top2_gap(scored))
            for other in group.gather(part):
                state.base = state.base.merge(other)
            state.started = True
        tokens = [(before + p + 1, win.first + p, int(win.labels[p])) for p in todo]
        if group.world == 1:
            for k in range(state.done_in_window, len(tokens)):
                _record(race, state, [(tokens[k][0], _refine_token(view, win, *tokens[k][1:], refiners, state))])
                state.done_in_window = k + 1
                _notify(notify, state, refiners)
        else:
            alive = list(race.alive)  # this round's later tokens may outlive a candidate: refined, not recorded
            mine = [(upto, _refine_token(view, win, t, label, refiners, state, alive)) for upto, t, label in tokens]
            spent = group.gather((mine, state.seconds, state.nonfinite))
            _record(race, state, [token for theirs, _, _ in spent for token in theirs])
            state.seconds = [sum(s[1][i] for s in spent) for i in range(len(state.seconds))]
            state.nonfinite = [sum(s[2][i] for s in spent) for i in range(len(state.nonfinite))]
        if race.finished:
            break
        state.window, state.done_in_window, state.started = r + 1, 0, False
        _notify(notify, state, refiners)


def _refine_token(view, win: Window, t: int, label_id: int, refiners: list[Refiner], state: RaceState,
                  alive: Sequence[int] | None = None) -> dict[int, str]:
    """The outcome code of every alive candidate refining the prediction at local position t."""
    base, codes = int(win.logits[t].argmax()), {}
    for i in state.race.alive if alive is None else alive:
        r = refiners[i]
        t0 = time.perf_counter()
        res = refine_position(view, win.ids, win.logits[t], t, r.trainable, r.frozen, r.config, win.kept(r.n_top))
        state.seconds[i] += time.perf_counter() - t0
        state.nonfinite[i] += int(res.nonfinite)
        codes[i] = outcome(label_id, base, int(res.logits.argmax()))
    return codes


def _record(race: Race, state: RaceState, tokens: list[tuple[int, dict[int, str]]]) -> None:
    """Record tokens in stream order: each one's codes of the candidates still alive when it comes."""
    for upto, codes in tokens:
        if race.finished:
            break
        race.record({i: codes[i] for i in race.alive})
        state.scored_upto.append(upto)


def _notify(notify: OnProgress, state: RaceState, refiners: list[Refiner]) -> None:
    race = state.race
    lead = race.leader()
    notify(Progress("race", race.refinements, race.planned_total(), {"race": state.to_dict()},
                    f"alive {len(race.alive)}, leader {refiners[lead].config.label} {race.score(lead):+d}"))


def _race_result(candidates, state: RaceState, rule: StopRule, budget_ratio: float, exhaustive: bool) -> RaceResult:
    """Dev reports per candidate, the choice, and (exhaustive) the stop-early race replayed on the same outcomes."""
    race = state.race
    reports = []
    for i, cfg in enumerate(candidates):
        k = len(race.outcomes[i])
        n_total = state.base.n_total if i in race.alive else (state.scored_upto[k - 1] if k else 0)
        reports.append(FocusReport(name=f"dev {cfg.label}", n_total=n_total, outcomes=race.outcomes[i],
                                   nonfinite=state.nonfinite[i], seconds=state.seconds[i], config=cfg.to_dict(),
                                   meta={"split": "dev", "cost": race.costs[i]}))
    choice = race.choice()
    race_choice, race_refinements = choice, race.refinements
    if exhaustive:  # the same outcomes, fed to the stop-early race: what it would have chosen and spent
        replayed = Race.replay(race.outcomes, race.costs, race.steps, rule=rule, budget_ratio=budget_ratio)
        race_choice, race_refinements = replayed.choice(), replayed.refinements
    return RaceResult(list(candidates), state, reports, choice, race_choice, race_refinements)
