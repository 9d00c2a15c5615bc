"""FocusConfig: defaults from the method, validation that names the field, presets, round trips."""
import dataclasses
import json
import re

import numpy as np
import pytest

from focus_decoding import PRESETS, FocusConfig
from focus_decoding.config import DEFAULT_LR


def test_defaults_follow_algorithm_1():
    cfg = FocusConfig()
    assert (cfg.mode, cfg.n_focus, cfg.threshold, cfg.steps, cfg.params) == ("ifo", 2, 0.04, 1, "all")
    assert cfg.lr == 1.6e-5
    assert FocusConfig(mode="dofo").lr == 2.56e-4  # the default rate depends on the mode
    # the paper's fixed rate stays the default rule; the normalized rule is opt-in
    assert (cfg.step_rule, cfg.tau) == ("fixed", None)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "sgd"}, "mode"),
        ({"n_focus": 0}, "n_focus"),
        ({"n_focus": 2.0}, "n_focus"),
        ({"n_focus": np.float64(2.0)}, "n_focus"),  # a numpy float is not an integer either
        ({"n_focus": True}, "n_focus"),  # a bool is not a count
        ({"steps": np.bool_(True)}, "steps"),
        ({"threshold": 0.0}, "threshold"),  # (0, 1]: zero would never refine
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": np.float32(1.5)}, "threshold"),  # numpy scalars get the same range check
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"steps": 0}, "steps"),
        ({"params": "last:0"}, "params"),
        ({"params": "last:x"}, "params"),
        ({"params": []}, "params"),
        ({"params": ""}, "params"),  # used to pass until it met a model
        ({"params": ["", "x"]}, "params"),  # one empty pattern would match nothing (or, as a prefix, everything)
        ({"params": ["  "]}, "params"),
        ({"step_rule": "adaptive"}, "step_rule"),
        ({"tau": 0.5}, "tau"),  # tau belongs to the normalized rule: under "fixed" it would be ignored silently
        ({"step_rule": "normalized", "lr": 1e-3}, "lr"),  # and lr is ignored under "normalized"
        ({"step_rule": "normalized", "tau": 0.0}, "tau"),
        ({"step_rule": "normalized", "tau": -1.0}, "tau"),
        ({"step_rule": "normalized", "tau": float("inf")}, "tau"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"FocusConfig.{field}"):
        FocusConfig(**kwargs)


def test_numpy_scalars_are_accepted_as_python_numbers():
    # values read from numpy arrays or sweeps (np.linspace, np.arange) are numpy scalars
    cfg = FocusConfig(threshold=np.float32(0.1), n_focus=np.int64(3), steps=np.int64(3), lr=np.float64(1e-3))
    assert (cfg.n_focus, cfg.steps) == (3, 3)
    assert cfg.threshold == float(np.float32(0.1)) and cfg.lr == 1e-3
    # converted, not just accepted: np.float32 / np.int64 would break json.dumps and type checks downstream
    assert type(cfg.threshold) is float and type(cfg.lr) is float
    assert type(cfg.n_focus) is int and type(cfg.steps) is int
    assert FocusConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    tau = FocusConfig(step_rule="normalized", tau=np.float32(0.5)).tau
    assert tau == 0.5 and type(tau) is float


def test_threshold_one_is_allowed():
    assert FocusConfig(threshold=1.0).threshold == 1.0


def test_presets_carry_the_method_rates():
    assert FocusConfig.preset("gpt2").lr == 4.03e-2
    assert FocusConfig.preset("Llama-3.2-1B", mode="dofo").lr == 7.43e-6
    assert FocusConfig.preset("qwen2.5-1.5b", steps=2).steps == 2
    assert set(PRESETS) >= {"gpt2", "llama-3.2-1b", "gemma-2-2b", "qwen2.5-1.5b", "smollm2-135m"}
    with pytest.raises(ValueError, match="unknown FocusConfig preset"):
        FocusConfig.preset("gpt5")


def test_preset_overrides_win():
    # an explicit rate replaces the preset's (this raised TypeError: lr given twice)
    cfg = FocusConfig.preset("gpt2", lr=1.0)
    assert cfg.lr == 1.0 and cfg.step_rule == "fixed"
    assert FocusConfig.preset("gpt2", mode="dofo", lr=1.0).lr == 1.0
    # switching the rule drops the preset's lr instead of failing on "lr under normalized"
    norm = FocusConfig.preset("gpt2", step_rule="normalized", tau=0.5)
    assert (norm.step_rule, norm.tau, norm.lr) == ("normalized", 0.5, None)
    with pytest.raises(ValueError, match="FocusConfig.mode"):
        FocusConfig.preset("gpt2", mode="sgd")


@pytest.mark.parametrize("data", [None, 3, "ifo", [("mode", "ifo")]])
def test_from_dict_needs_a_mapping(data):
    # ValueError (not TypeError or AttributeError) like every other bad value
    with pytest.raises(ValueError, match="FocusConfig.from_dict"):
        FocusConfig.from_dict(data)
    with pytest.raises(ValueError, match="focus_config"):
        FocusConfig.coerce(data)


def test_dict_round_trip_is_json_safe():
    cfg = FocusConfig(mode="dofo", lr=1e-3, steps=3, params=["lm_head", "model.layers.*.mlp*"])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert FocusConfig.from_dict(data) == cfg
    assert FocusConfig.coerce(data) == cfg
    with pytest.raises(ValueError, match="unknown FocusConfig field"):
        FocusConfig.from_dict({"mode": "ifo", "learning_rate": 1.0})


def test_normalized_rule_round_trip():
    cfg = FocusConfig(step_rule="normalized", tau=0.25, steps=2, params="last:2")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert (data["step_rule"], data["tau"], data["lr"]) == ("normalized", 0.25, None)
    back = FocusConfig.from_dict(data)
    assert back == cfg and (back.tau, back.lr) == (0.25, None)
    assert FocusConfig(step_rule="normalized").tau == 1.0  # the documented default tau
    assert cfg.step_size_label == "tau=0.25" and FocusConfig(lr=1e-4).step_size_label == "lr=0.0001"
    # a fixed-rule dict carries tau=None, so it round-trips too (tau=None is not "tau given")
    fixed = FocusConfig(lr=1e-3)
    assert FocusConfig.from_dict(json.loads(json.dumps(fixed.to_dict()))) == fixed


def test_single_pattern_and_last_blocks():
    assert FocusConfig(params="lm_head").params == ("lm_head",)
    assert FocusConfig(params="last:3").last_blocks == 3
    assert FocusConfig().last_blocks is None


def test_frozen():
    cfg = FocusConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert cfg.lr == 1.6e-5


def test_entropy_is_a_mode_and_presets_fall_back_to_the_method_defaults():
    cfg = FocusConfig(mode="entropy")
    assert cfg.lr == DEFAULT_LR["entropy"] and cfg.label == "entropy all lr=1.6e-05"
    # a preset that names no step for a mode gives the method's defaults for it, never a KeyError
    assert FocusConfig.preset("gpt2", mode="entropy") == FocusConfig(mode="entropy")
    assert FocusConfig.preset("smollm2-135m", mode="entropy", tau=0.3) == FocusConfig(
        mode="entropy", step_rule="normalized", tau=0.3)


def test_an_explicit_step_replaces_the_presets_and_names_its_rule():
    # tau alone: the normalized rule, the preset's params kept (as the command line and the harness do)
    assert FocusConfig.preset("smollm2-135m", tau=0.3) == FocusConfig(step_rule="normalized", tau=0.3, params="last:2")
    assert FocusConfig.preset("smollm2-135m", lr=1e-3) == FocusConfig(lr=1e-3, params="last:2")
    assert FocusConfig.preset("smollm2-135m", step_rule="normalized").tau == 1.0


@pytest.mark.parametrize("params, expected", [
    ("last:02", "last:2"), (" all ", "all"), (["lm_head", " model.norm "], ("lm_head", "model.norm")),
    (["last:3"], "last:3")])
def test_params_have_one_form(params, expected):
    assert FocusConfig(params=params).params == expected  # so last:2 and last:02 are one candidate, not two


@pytest.mark.parametrize("params, needle", [
    (["all", "lm_head"], "'all' selects on its own"), (["lm_head", "last:2"], "'last:2' selects on its own"),
    ("last:²", "integer N >= 1"), ("last:x", "integer N >= 1"), ("", "non-empty"), ([], "non-empty")])
def test_params_that_cannot_mean_one_thing_are_refused(params, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        FocusConfig(params=params)


def test_a_config_file_written_by_tune_loads_strictly():
    written = FocusConfig(lr=1e-3, params="last:2").to_file_dict("focus-decoding tune")
    assert FocusConfig.from_dict(written) == FocusConfig(lr=1e-3, params="last:2")
    for field in ("lr", "mode"):
        edited = {k: v for k, v in written.items() if k != field}
        with pytest.raises(ValueError, match=rf"written by focus-decoding tune.*\['{field}'\] are missing"):
            FocusConfig.from_dict(edited)  # never the defaults in its place
    # a hand-written dict (no "written_by") may leave fields out: they take their defaults
    assert FocusConfig.from_dict({"lr": 1e-3}) == FocusConfig(lr=1e-3)
