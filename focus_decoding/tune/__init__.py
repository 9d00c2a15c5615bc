"""``tune``: does focus help this model on this text, and with which setting? A race on dev, a verdict on test.

Read in this order: ``candidates`` (the grid and its costs) -> ``race`` (pure bookkeeping and the two
stopping rules, no torch) -> ``dev`` (the race on a model) -> ``verdict`` (the test and its verdict)
-> ``search`` (``tune``: all three, resumable).
"""
from .candidates import DEFAULT_LRS, DEFAULT_MODES, DEFAULT_PARAMS, DEFAULT_TAUS, candidate_grid, refinement_cost
from .dev import Progress, RaceResult, RaceState, run_race
from .race import Race, StopRule, halving_plan, plan_spend, sign_test_worse
from .search import DEFAULT_DEV_MAX_UNCERTAIN, DEFAULT_TEST_MAX_UNCERTAIN, TuneResult, status, tune
from .verdict import KINDS, MIN_TEST_TOKENS, Verdict, judge_on_test, verdict

__all__ = ["DEFAULT_LRS", "DEFAULT_MODES", "DEFAULT_PARAMS", "DEFAULT_TAUS", "candidate_grid", "refinement_cost",
           "Progress", "RaceResult", "RaceState", "run_race", "Race", "StopRule", "halving_plan", "plan_spend",
           "sign_test_worse", "DEFAULT_DEV_MAX_UNCERTAIN", "DEFAULT_TEST_MAX_UNCERTAIN", "TuneResult", "status", "tune",
           "KINDS", "MIN_TEST_TOKENS", "Verdict", "judge_on_test", "verdict"]
