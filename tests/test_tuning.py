"""tuning.py: the stop-early rules on hand-made paired outcomes, the race on a real tiny model, the verdict."""
import random

import pytest
import torch

from focus_decoding.resources import models
from focus_decoding import tune as tuning
from focus_decoding.config import FocusConfig
from focus_decoding.evaluation.windows import tokenize_stream
from focus_decoding.evaluation.report import CO_CO, CO_WR, WR_CO, WR_SAME, FocusReport
from focus_decoding.tune import Race, StopRule
from focus_decoding import method

TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog met on the mat. " * 4


# ----------------------------------------------------------------------------- the rules, on hand-made outcomes
def test_sign_test_is_the_exact_one_sided_binomial_tail():
    assert tuning.sign_test_worse(0, 5) == 1 / 32
    assert tuning.sign_test_worse(1, 4) == 6 / 32  # P(X >= 4), X ~ Bin(5, 1/2)
    assert tuning.sign_test_worse(5, 0) == 1.0
    assert tuning.sign_test_worse(0, 0) == 1.0


def test_a_clearly_worse_candidate_is_dropped_at_the_first_look():
    # candidate 1 loses every token the leader gets right: 16 losses, no win
    race = Race([1.0, 1.0], [1e-4, 1e-1], n_tokens=200, budget_ratio=2.0)
    assert race.looks[0] == 16 and race.plan == []  # two candidates fit the 2x budget: only significance acts
    for t in range(16):
        assert race.alive == [0, 1], f"dropped before the first look, at token {t}"
        race.record({0: CO_CO, 1: CO_WR})
    assert race.alive == [0]
    drop = race.eliminated[0]
    assert (drop["candidate"], drop["at"], drop["reason"], drop["losses"], drop["wins"]) == (1, 16, "worse", 16, 0)
    assert drop["p_value"] == 2 ** -16 <= drop["level"]


def test_equal_candidates_are_not_dropped_by_the_significance_rule():
    race = Race([1.0] * 3, [1e-3, 1e-2, 1e-1], n_tokens=300, budget_ratio=3.0)  # budget off: all may finish
    for t in range(300):
        race.record({i: [CO_CO, WR_SAME, CO_WR, WR_CO][t % 4] for i in race.alive})
    assert race.alive == [0, 1, 2] and race.eliminated == []
    # random candidates of equal strength: the rule's bound (alpha per candidate) holds with room to spare
    rng, dropped = random.Random(0), 0
    for _ in range(200):
        race = Race([1.0] * 4, [1, 2, 3, 4], n_tokens=256, budget_ratio=4.0)
        for _ in range(256):
            race.record({i: rng.choice([CO_CO, CO_WR, WR_CO, WR_SAME]) for i in race.alive})
        dropped += any(e["reason"] == "worse" for e in race.eliminated)
    assert dropped / 200 <= race.rule.alpha


def test_the_error_rule_counts_the_looks_and_the_candidates():
    rule = StopRule(alpha=0.05)
    assert rule.looks(200) == [16, 32, 64, 128]
    assert rule.level(2, 4) == 0.05 / 4 and rule.level(5, 4) == 0.05 / 16
    # 6 losses, no win by token 16: p = 1/64 = 0.016 < 0.05, significant for a single look ...
    one_look = Race([1.0, 1.0], [1, 2], n_tokens=17)
    many_looks = Race([1.0, 1.0], [1, 2], n_tokens=200)
    for race in (one_look, many_looks):
        for t in range(16):
            race.record({0: CO_CO if t < 6 else WR_SAME, 1: CO_WR if t < 6 else WR_SAME})
    assert one_look.looks == [16] and one_look.alive == [0]
    # ... but not once the rule pays for four looks (level 0.0125)
    assert many_looks.alive == [0, 1]


def test_the_race_never_spends_more_than_twice_the_final_choice_alone():
    rng = random.Random(1)
    for m, n in [(2, 50), (3, 7), (5, 40), (8, 300), (16, 100), (12, 11), (6, 1)]:
        outcomes = ["".join(rng.choice([CO_CO, CO_WR, WR_CO, WR_SAME]) for _ in range(n)) for _ in range(m)]
        race = Race.replay(outcomes, [rng.choice([0.1, 1.0]) for _ in range(m)], list(range(m)))
        assert race.refinements <= 2 * n, (m, n)
        assert len(race.outcomes[race.choice()]) == n  # the choice saw every token
    for alive, left, budget in [(8, 300, 600), (5, 40, 41), (3, 10, 10), (16, 100, 150)]:
        plan = tuning.halving_plan(0, alive, budget, left)
        assert tuning.plan_spend(plan, 0, alive, left) <= budget and plan[-1][1] == 1


def test_ties_go_to_the_cheaper_then_the_smaller_step():
    race = Race([1.0, 0.1, 0.1], [1e-4, 1e-2, 1e-3], n_tokens=10, eliminate=False)
    for _ in range(10):
        race.record({0: CO_CO, 1: CO_CO, 2: CO_CO})
    assert race.choice() == 2  # cost 0.1 beats the smaller step at cost 1.0; then step 1e-3 < 1e-2
    # a better Δ_Corr wins whatever it costs
    better = Race([1.0, 0.1], [1e-4, 1e-3], n_tokens=1, eliminate=False)
    better.record({0: WR_CO, 1: CO_CO})
    assert better.choice() == 0


def test_a_budget_cut_drops_candidates_dominated_by_a_cheaper_equal_one_first():
    # five candidates, a budget that cuts to three after the first token (plan 5 -> 3 -> 2 -> 1)
    race = Race([1.0, 0.1, 0.5, 0.01, 1.0], [1, 2, 3, 4, 5], n_tokens=60, budget_ratio=1.2)
    assert race.plan[0] == [1, 3]
    dropped = race.record({0: WR_CO, 1: WR_CO, 2: WR_CO, 3: WR_SAME, 4: WR_SAME})
    # 0 (+1, cost 1) and 2 (+1, cost 0.5) are matched by 1 (+1, cost 0.1); 3 (+0) is the cheapest of all, so
    # nobody dominates it; 4 is dominated by everyone. Of the dominated, the better rank (2) fills the third place.
    assert race.alive == [1, 2, 3]
    assert sorted(e["candidate"] for e in dropped) == [0, 4] and {e["reason"] for e in dropped} == {"budget"}


def test_race_state_round_trips_through_json():
    import json

    race = Race([1.0, 0.5, 0.2], [1, 2, 3], n_tokens=80)
    for t in range(30):
        race.record({i: [CO_CO, CO_WR][(t + i) % 2] for i in race.alive})
    again = Race.from_dict(json.loads(json.dumps(race.to_dict())))
    assert again.to_dict() == race.to_dict()
    for _ in range(50):
        codes = {i: CO_CO for i in race.alive}
        assert race.record(codes) == again.record(dict(codes))
    assert again.to_dict() == race.to_dict()


# ----------------------------------------------------------------------------- the race on a real tiny model
@pytest.fixture(scope="module")
def trained():
    """A 2-block tiny Llama fitted for a second to a repetitive text: right about half the time when unsure."""
    tok = models.char_tokenizer()
    model = models.tiny_causal_lm("llama", vocab_size=len(tok), layers=2)
    ids = tokenize_stream(tok, [TEXT])
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(ids[None, :-1]).logits[0], ids[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


GRID = dict(lrs=[1e-6, 30.0], taus=[], params=["last:1", "all"], threshold=0.5)  # a no-op step vs a wrecking one


@pytest.fixture(scope="module")
def exhaustive(trained):
    model, tok = trained
    return tuning.run_race(model, tok, [TEXT], tuning.candidate_grid(**GRID), context_length=64, max_uncertain=64,
                           exhaustive=True)


def test_the_race_makes_the_exhaustive_sweeps_choice_at_under_twice_the_cost(trained, exhaustive):
    model, tok = trained
    race = tuning.run_race(model, tok, [TEXT], tuning.candidate_grid(**GRID), context_length=64, max_uncertain=64)
    n = race.race.n_tokens
    assert n == 64 and exhaustive.race.n_tokens == n
    assert [exhaustive.race.score(i) for i in (1, 3)] < [-5, -5]  # lr 30 really is clearly worse
    assert exhaustive.chosen.label == "ifo last:1 lr=1e-06"  # the no-op step, the cheaper of two ties
    assert race.choice == exhaustive.choice == exhaustive.race_choice
    spend = race.spend()
    assert spend["refinements"] <= 2 * n < spend["exhaustive_refinements"] == 4 * n
    assert spend["ratio_to_final_alone"] <= 2.0
    # paired and deterministic: the race's outcomes are the sweep's on the same tokens, and its
    # decisions are the replay of the sweep's outcomes
    for a, b in zip(race.race.outcomes, exhaustive.race.outcomes):
        assert b.startswith(a)
    assert exhaustive.race_refinements == race.race.refinements
    replayed = Race.replay(exhaustive.race.outcomes, exhaustive.race.costs, exhaustive.race.steps)
    assert replayed.eliminated == race.race.eliminated


def test_a_wrecking_step_is_dropped_by_significance_within_two_looks(trained):
    model, tok = trained
    cands = [FocusConfig(lr=1e-6, params="last:1", threshold=0.5), FocusConfig(lr=30.0, params="all", threshold=0.5)]
    race = tuning.run_race(model, tok, [TEXT], cands, context_length=64, max_uncertain=64)
    (drop,) = race.race.eliminated
    assert drop["candidate"] == 1 and drop["reason"] == "worse" and drop["at"] <= 32
    assert race.reports[1].n_uncertain == drop["at"] and race.reports[0].n_uncertain == 64


def test_refinement_cost_is_the_share_of_blocks_the_step_runs_through(trained):
    model, _ = trained
    assert tuning.refinement_cost(model, FocusConfig(params="last:1")) == 0.5
    assert tuning.refinement_cost(model, FocusConfig(params="all", steps=2)) == 2.0


# ----------------------------------------------------------------------------- candidates and verdict
def test_candidate_grid_and_params_grid():
    params = method.parse_selectors("last:2,all,model.norm+lm_head")
    grid = tuning.candidate_grid(modes=["ifo", "dofo"], params=params,
                                 lrs=[1e-4], taus=[0.5, 0.5], threshold=0.1)
    assert len(grid) == 3 * 2 * 2  # the repeated tau counts once
    assert {c.threshold for c in grid} == {0.1}
    assert grid[-1].params == ("model.norm", "lm_head") and grid[-1].tau == 0.5
    with pytest.raises(ValueError, match="at least one"):
        tuning.candidate_grid(lrs=[], taus=[])
    with pytest.raises(ValueError, match="share threshold"):
        tuning.run_race(None, None, ["x"], [FocusConfig(threshold=0.1), FocusConfig(threshold=0.2)])


def _report(wr_co: int, co_wr: int, same: int = 100) -> FocusReport:
    return FocusReport(n_total=1000, outcomes=WR_CO * wr_co + CO_WR * co_wr + CO_CO * same)


@pytest.mark.parametrize("wr_co, co_wr, kind", [(30, 10, "helps"), (10, 30, "harmful"), (12, 8, "no significant gain"),
                                                 (0, 0, "no significant gain")])
def test_verdict_reads_the_test_report_alone(wr_co, co_wr, kind):
    report = _report(wr_co, co_wr)
    v = tuning.verdict(report, alpha=0.05)
    assert v.kind == kind and v.line.startswith(kind) and v.p_value == report.p_value
    if kind == "helps":
        assert v.line.startswith(f"helps: +{report.delta_acc:.1f} points on uncertain tokens (p = ")
    if kind != "helps":
        assert "leave it off" in v.line


@pytest.mark.parametrize("exhaustive", [False, True])
def test_two_processes_make_the_decisions_one_makes(exhaustive):
    """tune with its windows split over two processes (threads here): the same outcomes, eliminations, choice,
    test report and verdict as one process, on every process."""
    from conftest import run_as_processes

    tok = models.char_tokenizer()
    model = models.tiny_causal_lm("llama", vocab_size=len(tok), layers=2)
    texts = [("the quick brown fox jumps over the lazy dog " * 3)[i:] for i in range(8)]
    grid = tuning.candidate_grid(params=["last:1", "all"], lrs=[1e-3, 30.0], taus=[1.0], threshold=0.5)
    kwargs = dict(context_length=16, dev_max_uncertain=40, test_max_uncertain=30, exhaustive=exhaustive,
                  rule=StopRule(first_look=4), min_test_tokens=1)
    alone = tuning.tune(model, tok, texts, grid, **kwargs)
    both = run_as_processes(2, lambda group: tuning.tune(model, tok, texts, grid, group=group, **kwargs))
    for result in both:
        race, one = result.race.race, alone.race.race
        assert race.outcomes == one.outcomes and race.eliminated == one.eliminated
        assert result.race.choice == alone.race.choice and result.verdict == alone.verdict
        assert result.test.outcomes == alone.test.outcomes and result.test.n_total == alone.test.n_total
        assert result.race.state.base.n_total == alone.race.state.base.n_total
    assert any(e["reason"] for e in alone.race.race.eliminated) or exhaustive  # the race really dropped some
