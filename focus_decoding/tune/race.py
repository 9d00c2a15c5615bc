"""The race's bookkeeping, pure: paired outcomes of the candidates on the same uncertain tokens, two stopping rules.

No model, no torch, no time: ``Race.record`` takes one token's outcome code per alive candidate
(``evaluation.outcomes``) and applies

- the *significance* rule (``StopRule``): at the looks n = 16, 32, 64, ... uncertain tokens each
  alive candidate is compared with the current leader on the tokens where exactly one of the two is
  right; it is dropped when its losses are improbable for a candidate at least as good as the leader
  (one-sided exact sign test at level alpha / (K * (m - 1)) for K looks and m candidates: by the
  union bound a candidate that no other truly beats is dropped with probability at most alpha);
- the *budget* rule (``halving_plan``): at most ``budget_ratio`` times the refinements of the final
  choice alone; a successive-halving plan fitted to the budget left cuts the weakest (dominated
  first, then the lowest Δ_Corr, ties to the more expensive, then the larger step). No error
  guarantee: it buys the cost bound, and its drops are logged as such.

The leader and the final choice: best Δ_Corr, ties to the cheaper candidate, then the smaller step
(``rank_key``) -- the one ranking every dev/test selection of the package uses (``Race(...,
eliminate=False)`` ranks an exhaustive sweep).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..evaluation.outcomes import CO_WR, CORRECT_AFTER, WR_CO


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

    ``record`` takes one token's outcome code (``evaluation.outcomes``) from every alive candidate,
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
