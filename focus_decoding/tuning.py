"""Does focus help this model on this text, and with which setting? A race on dev, a verdict on test.

Read top-down:

1. **Candidates** (``candidate_grid``): every combination of a step (fixed ``lr`` grid and/or
   normalized ``tau`` grid), a mode (iFo/doFo) and a parameter selector (``"all"``, ``"last:N"``,
   patterns). The threshold and ``n_focus`` are shared, so every candidate is gated identically and
   refines the very same uncertain tokens: the comparisons are paired. ``refinement_cost`` says
   what one refinement costs relative to a full-model one (the cached ``last:N`` path runs N of L
   blocks).
2. **The race** (``Race``, pure bookkeeping; ``run_race`` feeds it): one pass over the dev windows,
   one no-grad forward per window shared by all candidates, and at every uncertain token each
   still-alive candidate refines it (``eval_text.refine_position``, exactly the method). Two rules
   stop candidates early:

   - *significance* (``StopRule``): at the looks n = 16, 32, 64, ... uncertain tokens, each alive
     candidate is compared with the current leader on the tokens where exactly one of the two is
     right (the discordant pairs); it is dropped when its losses are improbable for a candidate at
     least as good as the leader: one-sided exact sign test at level alpha / (K * (m - 1)) for K
     looks and m candidates. By the union bound over the K looks and the m - 1 possible opponents,
     a candidate that no other candidate truly beats is dropped by this rule with probability at
     most alpha (tokens taken as exchangeable), whichever leader the data happen to pick.
   - *budget* (``halving_plan``): the race may spend at most ``budget_ratio`` (2) times the
     refinements that the final choice alone needs on the same N dev tokens. A successive-halving
     plan (a, a/2, ..., 1 survivors, every level spending the same number of refinements) is fitted
     to the remaining budget, and recomputed whenever the significance rule frees some. At each cut
     the weakest are dropped: first candidates dominated by one at least as good and at least as
     cheap, then the lowest Δ_Corr, ties to the more expensive, then the larger step. This rule
     has no error guarantee; it is what buys the cost bound, and its drops are logged as such.

   The leader and the final choice: the best Δ_Corr on the tokens seen, ties to the cheaper
   candidate, then the smaller step. ``exhaustive=True`` runs every candidate on every dev token
   instead; ``Race.replay`` then shows what the race would have chosen from the same outcomes.
3. **The test** (``judge_on_test``): the chosen setting on the disjoint test split with
   ``eval_text.evaluate_next_token``; ``verdict`` reads the test report alone: helps, harmful, or no
   significant gain. Every number is relative to the plain model ("off"), which costs nothing.

``tune`` runs the three in order, resumable from a snapshot that ``on_progress`` receives after
every uncertain dev token and every test window. Nothing here prints or writes files.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from . import core, data, eval_text, prefix
from .config import FocusConfig
from .report import CO_CO, CO_WR, WR_CO, FocusReport

DEFAULT_MODES = ("ifo",)
# Defaults from docs/results/text/EVIDENCE.md (SmolLM2-135M, three corpora): lr 1e-2 was harmful on every
# corpus and 1e-5 changed nothing; tau 0.3 and 1 bracket lr 1e-4 and 1e-3 at last:2's median ||g||^2 and
# carry over to other models; "all" costs 17x last:2 per refinement and showed no gain there.
DEFAULT_LRS = (1e-4, 1e-3)
DEFAULT_TAUS: tuple[float, ...] = (0.3, 1.0)
DEFAULT_PARAMS = ("last:2",)
DEFAULT_DEV_MAX_UNCERTAIN = 400  # the race's dev tokens: a quick search
DEFAULT_TEST_MAX_UNCERTAIN = 1000  # calls only large effects; a +1 point gain needs ~5,000-20,000 tokens
CORRECT_AFTER = (CO_CO, WR_CO)  # outcome codes whose refined prediction is right


# ----------------------------------------------------------------------------- 1. candidates
def candidate_grid(*, modes: Sequence[str] = DEFAULT_MODES, params: Sequence[Any] = DEFAULT_PARAMS,
                   lrs: Sequence[float] = DEFAULT_LRS, taus: Sequence[float] = DEFAULT_TAUS,
                   threshold: float = 0.04, n_focus: int = 2, steps: int = 1) -> list[FocusConfig]:
    """Every (params, mode, step) combination as a FocusConfig, cheapest selectors first, duplicates dropped."""
    steps_ = [{"lr": lr} for lr in lrs] + [{"step_rule": "normalized", "tau": tau} for tau in taus]
    if not modes or not params or not steps_:
        raise ValueError("the tuning grid needs at least one mode, one params selector and one lr or tau")
    out: list[FocusConfig] = []
    for selector in params:
        for mode in modes:
            for step in steps_:
                cfg = FocusConfig(mode=mode, params=selector, threshold=threshold, n_focus=n_focus, steps=steps, **step)
                if cfg not in out:
                    out.append(cfg)
    return out


def refinement_cost(model, config: FocusConfig) -> float:
    """One refinement's cost relative to a full-model one: N/L on the cached last:N path, else 1, times steps."""
    n_top = prefix.prefix_blocks(model, config)
    if n_top is None:
        return float(config.steps)
    _, blocks = core.find_blocks(model)
    return config.steps * n_top / len(blocks)


def step_value(config: FocusConfig) -> float:
    """The step's one number (lr or tau): the last tie-break, smaller first."""
    return config.lr if config.step_rule == "fixed" else config.tau


def label(config: FocusConfig) -> str:
    """``"ifo last:2 lr=0.001"``: one candidate in tables, plots and progress bars."""
    params = config.params if isinstance(config.params, str) else "+".join(config.params)
    return f"{config.mode} {params} {config.step_size_label}"


def _check_candidates(candidates: Sequence[FocusConfig]) -> None:
    if not candidates:
        raise ValueError("tuning needs at least one candidate FocusConfig")
    gates = {(c.threshold, c.n_focus) for c in candidates}
    if len(gates) > 1:
        raise ValueError("all candidates must share threshold and n_focus (one gate, paired tokens); "
                         f"got {sorted(gates)}")


# ----------------------------------------------------------------------------- 2a. the stopping rules
def sign_test_worse(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= losses) for X ~ Binomial(wins + losses, 1/2) (1.0 with no pairs)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(losses, n + 1)) / 2 ** n


@dataclass(frozen=True)
class StopRule:
    """Significance rule: a paired sign test against the leader at geometrically spaced looks."""

    alpha: float = 0.05  # bound on dropping a candidate that no other one truly beats
    first_look: int = 16  # uncertain tokens seen at the first look
    growth: float = 2.0  # each look after ``growth`` times as many tokens

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"StopRule.alpha must be in (0, 1), got {self.alpha!r}")
        if self.first_look < 1 or self.growth <= 1:
            raise ValueError(f"StopRule needs first_look >= 1 and growth > 1, got {self.first_look}, {self.growth}")

    def looks(self, n_tokens: int) -> list[int]:
        """The token counts at which candidates are compared: first_look, x growth, ..., below n_tokens."""
        out, n = [], float(self.first_look)
        while math.ceil(n) < n_tokens:
            if not out or math.ceil(n) > out[-1]:
                out.append(math.ceil(n))
            n *= self.growth
        return out

    def level(self, n_candidates: int, n_looks: int) -> float:
        """Per-comparison level: alpha split evenly over the looks and the m - 1 opponents (Bonferroni)."""
        return self.alpha / (max(1, n_looks) * max(1, n_candidates - 1))


def halving_plan(n_seen: int, alive: int, budget_left: float, n_tokens: int) -> list[tuple[int, int]]:
    """Cuts ``(at token count, survivors from then on)`` that keep the remaining spend within ``budget_left``.

    Levels alive, ceil(alive/2), ..., 1; every level but the last spends the same s refinements, the
    last survivor runs to ``n_tokens``. Level lengths are rounded down, which only moves spend to the
    single survivor, so the plan never spends more than ``budget_left`` (needs budget_left >= the tokens left).
    """
    left = n_tokens - n_seen
    if alive <= 1 or alive * left <= budget_left:
        return []
    levels = [alive]
    while levels[-1] > 1:
        levels.append(math.ceil(levels[-1] / 2))
    share = (budget_left - left) / (len(levels) - 1 - sum(1 / a for a in levels[:-1]))
    cuts, at = [], n_seen
    for size, survivors in zip(levels, levels[1:]):
        at = min(n_tokens, at + math.floor(max(0.0, share) / size))
        cuts.append((at, survivors))
    return cuts


def plan_spend(plan: Sequence[Sequence[int]], n_seen: int, alive: int, n_tokens: int) -> int:
    """Refinements the alive candidates spend from ``n_seen`` to ``n_tokens`` if they follow ``plan``."""
    spend, at, size = 0, n_seen, alive
    for cut_at, survivors in plan:
        if cut_at > at:
            spend += size * (cut_at - at)
            at = cut_at
        size = min(size, survivors)
    return spend + size * max(0, n_tokens - at)


# ----------------------------------------------------------------------------- 2b. the race's bookkeeping
class Race:
    """Paired outcomes of the candidates on the same uncertain tokens, and who is still running.

    ``record`` takes one token's outcome code (``report.CO_CO`` ...) from every alive candidate,
    then applies the significance rule at the looks and the budget plan. Pure: no model, no time.
    """

    def __init__(self, costs: Sequence[float], steps: Sequence[float], n_tokens: int, *,
                 rule: StopRule = StopRule(), budget_ratio: float = 2.0, eliminate: bool = True):
        if len(costs) != len(steps) or not costs:
            raise ValueError("Race needs one cost and one step value per candidate")
        if budget_ratio < 1:
            raise ValueError(f"budget_ratio must be >= 1 (the final choice alone), got {budget_ratio!r}")
        self.costs, self.steps = [float(c) for c in costs], [float(s) for s in steps]
        self.n_tokens, self.rule = int(n_tokens), rule
        self.budget_ratio, self.eliminate = float(budget_ratio), eliminate
        self.outcomes = ["" for _ in costs]
        self.alive = list(range(len(costs)))
        self.eliminated: list[dict[str, Any]] = []
        self.looks = rule.looks(self.n_tokens) if eliminate else []
        self.level = rule.level(len(costs), len(self.looks))
        self.plan: list[list[int]] = []
        self.n_seen = 0
        if eliminate:
            self._replan()
            self._apply_budget()  # a budget too small for even one token each cuts before the first

    # -------------------------------------------------------------- reading
    @property
    def finished(self) -> bool:
        return self.n_seen >= self.n_tokens

    @property
    def refinements(self) -> int:
        return sum(len(o) for o in self.outcomes)

    def score(self, i: int) -> int:
        """Δ_Corr of candidate i on the tokens it refined (wrong→correct minus correct→wrong)."""
        o = self.outcomes[i]
        return o.count(WR_CO) - o.count(CO_WR)

    def rank_key(self, i: int) -> tuple:
        """Best first: higher Δ_Corr, then cheaper, then smaller step, then grid order."""
        return (-self.score(i), self.costs[i], self.steps[i], i)

    def leader(self) -> int:
        return min(self.alive, key=self.rank_key)

    def choice(self) -> int:
        """The final choice: the leader among the survivors (all of which saw every dev token)."""
        return self.leader()

    def paired(self, i: int, j: int) -> tuple[int, int]:
        """(wins, losses) of i against j on the tokens both refined: i right and j wrong, and the reverse."""
        wins = losses = 0
        for a, b in zip(self.outcomes[i], self.outcomes[j]):
            ok_a, ok_b = a in CORRECT_AFTER, b in CORRECT_AFTER
            wins += ok_a and not ok_b
            losses += ok_b and not ok_a
        return wins, losses

    def budget(self) -> float:
        """Refinements the race may spend in all: budget_ratio x the final choice alone (n_tokens)."""
        return self.budget_ratio * self.n_tokens

    def planned_total(self) -> int:
        """Refinements spent so far plus those the current plan still spends (an upper bound)."""
        return self.refinements + plan_spend(self.plan, self.n_seen, len(self.alive), self.n_tokens)

    # -------------------------------------------------------------- recording
    def record(self, codes: Mapping[int, str]) -> list[dict[str, Any]]:
        """Add one token's outcome for every alive candidate; return the eliminations this caused."""
        if set(codes) != set(self.alive):
            raise ValueError(f"record needs an outcome for exactly the alive candidates {self.alive}, "
                             f"got {sorted(codes)}")
        if self.finished:
            raise ValueError(f"the race already saw its {self.n_tokens} tokens")
        for i, code in codes.items():
            self.outcomes[i] += code
        self.n_seen += 1
        before = len(self.eliminated)
        if self.eliminate and self.n_seen in self.looks:
            self._significance()
        if self.eliminate:
            self._apply_budget()
        return self.eliminated[before:]

    def _significance(self) -> None:
        """Drop every alive candidate whose paired losses against the leader are significant at ``level``."""
        lead = self.leader()
        dropped = False
        for i in list(self.alive):
            if i == lead:
                continue
            wins, losses = self.paired(i, lead)
            p = sign_test_worse(wins, losses)
            if p <= self.level:
                self._drop(i, "worse", lead, wins, losses, p)
                dropped = True
        if dropped:
            self._replan()  # the freed budget lets the others run longer

    def _apply_budget(self) -> None:
        """Cut to the plan's survivor count once its token count is reached: the weakest go first."""
        due = [survivors for at, survivors in self.plan if at <= self.n_seen]
        if not due or len(self.alive) <= min(due):
            return
        lead = self.leader()
        for i in sorted(self.alive, key=self._keep_key)[min(due):]:
            wins, losses = self.paired(i, lead)
            self._drop(i, "budget", lead, wins, losses, sign_test_worse(wins, losses))

    def _keep_key(self, i: int) -> tuple:
        """Who stays at a budget cut: undominated first (nobody at least as good and as cheap), then rank."""
        dominated = any(self.score(j) >= self.score(i) and self.costs[j] <= self.costs[i]
                        and (self.score(j), -self.costs[j]) != (self.score(i), -self.costs[i])
                        for j in self.alive if j != i)
        return (dominated, *self.rank_key(i))

    def _drop(self, i: int, reason: str, lead: int, wins: int, losses: int, p: float) -> None:
        self.alive.remove(i)
        self.eliminated.append({"candidate": i, "at": self.n_seen, "reason": reason, "leader": lead,
                                "score": self.score(i), "leader_score": self.score(lead), "wins": wins,
                                "losses": losses, "p_value": p, "level": self.level if reason == "worse" else None})

    def _replan(self) -> None:
        budget_left = self.budget() - self.refinements
        self.plan = [list(c) for c in halving_plan(self.n_seen, len(self.alive), budget_left, self.n_tokens)]

    # -------------------------------------------------------------- replay and persistence
    @classmethod
    def replay(cls, outcomes: Sequence[str], costs: Sequence[float], steps: Sequence[float], **kwargs) -> "Race":
        """The race run on outcomes recorded for every candidate on every token (an exhaustive sweep's)."""
        n = len(outcomes[0]) if outcomes else 0
        if any(len(o) != n for o in outcomes):
            raise ValueError("replay needs the same number of outcomes for every candidate")
        race = cls(costs, steps, n, **kwargs)
        for t in range(n):
            race.record({i: outcomes[i][t] for i in race.alive})
        return race

    def to_dict(self) -> dict[str, Any]:
        return {"costs": self.costs, "steps": self.steps, "n_tokens": self.n_tokens,
                "rule": dataclasses.asdict(self.rule), "budget_ratio": self.budget_ratio, "eliminate": self.eliminate,
                "outcomes": list(self.outcomes), "alive": list(self.alive), "eliminated": list(self.eliminated),
                "looks": list(self.looks), "level": self.level, "plan": [list(c) for c in self.plan],
                "n_seen": self.n_seen}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Race":
        race = cls.__new__(cls)
        race.costs, race.steps, race.n_tokens = list(d["costs"]), list(d["steps"]), int(d["n_tokens"])
        race.rule, race.budget_ratio, race.eliminate = StopRule(**d["rule"]), float(d["budget_ratio"]), d["eliminate"]
        race.outcomes, race.alive = list(d["outcomes"]), list(d["alive"])
        race.eliminated, race.looks, race.level = [dict(e) for e in d["eliminated"]], list(d["looks"]), d["level"]
        race.plan, race.n_seen = [list(c) for c in d["plan"]], int(d["n_seen"])
        return race


# ----------------------------------------------------------------------------- 2c. the race on a model
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
    window: int = 0  # window in progress
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


class _Refiner:
    """One candidate's fixed pieces: its config, trainable/frozen split and cached-prefix depth."""

    def __init__(self, model, config: FocusConfig):
        self.config = config
        self.trainable, self.frozen = core.split_parameters(model, config.params)
        self.n_top = prefix.prefix_blocks(model, config, warn=True)


def count_uncertain(model, stream: torch.Tensor, bounds, threshold: float, limit: int | None,
                    on_window: Callable[[int], None] | None = None) -> int:
    """How many uncertain tokens the dev pass will refine: min(limit, all of them). One forward per window."""
    view, n = core.module_view(model), 0
    for w, (s, lo, hi) in enumerate(bounds):
        with torch.no_grad():
            logits = core.widen(view(stream[s:hi - 1][None], use_cache=False).logits[0])
        n += int(core.is_uncertain(logits[lo - 1 - s:], threshold).sum())
        if on_window is not None:
            on_window(w)
        if limit is not None and n >= limit:
            return limit
    return n


def run_race(model, tokenizer, texts: Sequence[str], candidates: Sequence[FocusConfig | Mapping], *,
             context_length: int = 128, max_uncertain: int | None = None, rule: StopRule = StopRule(),
             budget_ratio: float = 2.0, exhaustive: bool = False, resume: Mapping[str, Any] | None = None,
             on_progress: OnProgress | None = None) -> RaceResult:
    """The dev race (or, ``exhaustive``, every candidate on every dev token); resumable from a snapshot."""
    candidates = [FocusConfig.coerce(c) for c in candidates]
    _check_candidates(candidates)
    threshold = candidates[0].threshold
    device = next(model.parameters()).device
    stream = eval_text.tokenize_stream(tokenizer, texts).to(device)
    if stream.numel() < 2:
        raise ValueError("the dev texts must give at least 2 tokens")
    bounds = eval_text.window_bounds(stream.numel(), context_length, context_length)
    notify = on_progress or (lambda p: None)
    if resume is not None:
        state = RaceState.from_dict(resume)
    else:
        n = count_uncertain(model, stream, bounds, threshold, max_uncertain,
                            lambda w: notify(Progress("scan", w + 1, len(bounds))))
        if n == 0:
            raise ValueError(f"the dev split has no uncertain token (top-1/top-2 gap < threshold {threshold:g}); "
                             "use more text or a larger threshold")
        race = Race([refinement_cost(model, c) for c in candidates], [step_value(c) for c in candidates], n,
                    rule=rule, budget_ratio=budget_ratio, eliminate=not exhaustive)
        state = RaceState(race, FocusReport(name="dev plain"), [0] * len(candidates), [0.0] * len(candidates))
        notify(Progress("race", 0, race.planned_total(), {"race": state.to_dict()}))  # the scan is not redone
    refiners = [_Refiner(model, c) for c in candidates]
    _race_windows(model, stream, bounds, refiners, state, notify)
    return _race_result(candidates, state, rule, budget_ratio, exhaustive)


def _race_windows(model, stream, bounds, refiners: list[_Refiner], state: RaceState, notify: OnProgress) -> None:
    """The dev pass from ``state``'s position: one forward per window, every alive candidate on each uncertain token."""
    race, view = state.race, core.module_view(model)
    threshold = refiners[0].config.threshold
    while not race.finished and state.window < len(bounds):
        s, lo, hi = bounds[state.window]
        ids = stream[s:hi - 1][None]
        depths = {refiners[i].n_top for i in race.alive} - {None}
        with torch.no_grad():  # one forward for every candidate; hidden states only if one runs cached
            out = view(ids, use_cache=False, output_hidden_states=bool(depths))
            logits = core.widen(out.logits[0])
        kept = {n: prefix.window_states(out, model, n) for n in depths}
        del out
        first = lo - 1 - s  # local position predicting label lo
        labels = stream[lo:hi]
        todo = torch.nonzero(core.is_uncertain(logits[first:], threshold)).flatten().tolist()
        seen_before = race.n_seen - state.done_in_window  # uncertain tokens recorded in earlier windows
        todo = todo[:race.n_tokens - seen_before]
        ends_here = bool(todo) and seen_before + len(todo) == race.n_tokens
        n_scored = todo[-1] + 1 if ends_here else labels.numel()  # the dev budget may end mid-window
        if not state.started:
            state.base.add_predictions(logits[first:first + n_scored], labels[:n_scored])
            state.started = True
        before = state.base.n_total - n_scored  # dev predictions scored before this window
        for k in range(state.done_in_window, len(todo)):
            t = first + todo[k]
            _refine_token(view, ids, logits, t, int(labels[todo[k]]), refiners, kept, state)
            state.scored_upto.append(before + todo[k] + 1)
            state.done_in_window = k + 1
            lead = race.leader()
            notify(Progress("race", race.refinements, race.planned_total(), {"race": state.to_dict()},
                            f"alive {len(race.alive)}, leader {label(refiners[lead].config)} {race.score(lead):+d}"))
        if race.finished:
            break
        state.window, state.done_in_window, state.started = state.window + 1, 0, False
        notify(Progress("race", race.refinements, race.planned_total(), {"race": state.to_dict()}))


def _refine_token(view, ids, logits, t: int, label_id: int, refiners: list[_Refiner], kept, state: RaceState) -> None:
    """Every alive candidate refines the prediction at local position t; the race records the outcomes."""
    race, base = state.race, int(logits[t].argmax())
    alive, focus = list(race.alive), []
    for i in alive:
        r = refiners[i]
        t0 = time.perf_counter()
        res = eval_text.refine_position(view, ids, logits[t], t, r.trainable, r.frozen, r.config,
                                        None if r.n_top is None else (r.n_top, kept[r.n_top]))
        state.seconds[i] += time.perf_counter() - t0
        state.nonfinite[i] += int(res.nonfinite)
        focus.append(int(res.logits.argmax()))
    codes = FocusReport()  # the report's own outcome codes, one per candidate
    codes.add_outcomes(torch.tensor([label_id] * len(alive)), torch.tensor([base] * len(alive)), torch.tensor(focus))
    race.record(dict(zip(alive, codes.outcomes)))


def _race_result(candidates, state: RaceState, rule: StopRule, budget_ratio: float, exhaustive: bool) -> RaceResult:
    """Dev reports per candidate, the choice, and (exhaustive) the stop-early race replayed on the same outcomes."""
    race = state.race
    reports = []
    for i, cfg in enumerate(candidates):
        k = len(race.outcomes[i])
        n_total = state.base.n_total if i in race.alive else (state.scored_upto[k - 1] if k else 0)
        reports.append(FocusReport(name=f"dev {label(cfg)}", n_total=n_total, outcomes=race.outcomes[i],
                                   nonfinite=state.nonfinite[i], seconds=state.seconds[i], config=cfg.to_dict(),
                                   meta={"split": "dev", "cost": race.costs[i]}))
    choice = race.choice()
    race_choice, race_refinements = choice, race.refinements
    if exhaustive:  # the same outcomes, fed to the stop-early race: what it would have chosen and spent
        replayed = Race.replay(race.outcomes, race.costs, race.steps, rule=rule, budget_ratio=budget_ratio)
        race_choice, race_refinements = replayed.choice(), replayed.refinements
    return RaceResult(list(candidates), state, reports, choice, race_choice, race_refinements)


# ----------------------------------------------------------------------------- 3. the test and the verdict
def judge_on_test(model, tokenizer, texts: Sequence[str], config: FocusConfig, *, context_length: int = 128,
                  max_uncertain: int | None = None, prior: FocusReport | None = None, start_window: int = 0,
                  on_window: Callable[[int, FocusReport], None] | None = None,
                  progress: bool = False) -> FocusReport:
    """``evaluate_next_token`` on the test split, continuing ``prior`` (windows before ``start_window``)."""
    left = None if max_uncertain is None else max_uncertain - (prior.n_uncertain if prior else 0)
    if prior is not None and left is not None and left <= 0:
        return prior

    def merged(w: int, so_far: FocusReport) -> None:
        if on_window is not None:
            on_window(w, prior.merge(so_far) if prior is not None else so_far)

    report = eval_text.evaluate_next_token(model, tokenizer, texts, config, context_length=context_length,
                                           max_uncertain=left, progress=progress, name="test",
                                           start_window=start_window, on_window=merged)
    return prior.merge(report) if prior is not None else report


@dataclass(frozen=True)
class Verdict:
    """The answer read from the test report alone: ``kind`` is "helps", "harmful" or "no significant gain"."""

    kind: str
    line: str
    delta_acc: float
    p_value: float


def verdict(report: FocusReport, alpha: float = 0.05) -> Verdict:
    """"helps" when Δ_Corr > 0 with p < alpha, "harmful" when Δ_Corr < 0 with p < alpha, else leave it off."""
    p, acc = report.p_value, report.delta_acc if report.n_uncertain else 0.0
    where = f"on uncertain tokens (p = {p:.2g}, {report.n_uncertain} test tokens)"
    if report.delta_corr > 0 and p < alpha:
        return Verdict("helps", f"helps: {acc:+.1f} points {where}", acc, p)
    if report.delta_corr < 0 and p < alpha:
        return Verdict("harmful", f"harmful: {acc:+.1f} points {where}: leave it off", acc, p)
    return Verdict("no significant gain", f"no significant gain: leave it off ({acc:+.1f} points {where})", acc, p)


# ----------------------------------------------------------------------------- all three
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
        rows = [{"candidate": i, "label": label(c), "config": c.to_dict(), "cost": race.costs[i],
                 "dev": rep.summary(), "outcomes": rep.outcomes,
                 "status": _status(race, i, r.choice)} for i, (c, rep) in enumerate(zip(r.candidates, r.reports))]
        return {"chosen": self.chosen.to_dict(), "chosen_label": label(self.chosen), "choice": r.choice,
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


def _status(race: Race, i: int, choice: int) -> str:
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
         on_progress: OnProgress | None = None, progress_bars: bool = False) -> TuneResult:
    """Split, race on dev, evaluate the choice on test, judge; ``resume`` is a snapshot from ``on_progress``."""
    t0 = time.perf_counter()
    dev, test = data.split_dev_test(list(texts), dev_fraction=dev_fraction, seed=seed)
    rule = rule or StopRule(alpha=alpha)
    notify = on_progress or (lambda p: None)
    resume = dict(resume or {})
    race = run_race(model, tokenizer, dev, candidates, context_length=context_length, max_uncertain=dev_max_uncertain,
                    rule=rule, budget_ratio=budget_ratio, exhaustive=exhaustive, resume=resume.get("race"),
                    on_progress=notify)
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
                        progress=progress_bars)
    report.config = race.chosen.to_dict()
    report.meta.update(split="test", model=f"test {label(race.chosen)}")
    return TuneResult(len(dev), len(test), race, report, verdict(report, alpha), alpha, time.perf_counter() - t0)


def parse_params_grid(text: str) -> list[Any]:
    """``"all,last:2,model.norm+lm_head"`` -> ["all", "last:2", ["model.norm", "lm_head"]]: one selector per comma."""
    out: list[Any] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        patterns = [p.strip() for p in item.split("+") if p.strip()]
        out.append(patterns[0] if len(patterns) == 1 else patterns)
    if not out:
        raise ValueError(f"params grid must name at least one selector (all, last:N, patterns), got {text!r}")
    return out
