"""FocusConfig: defaults from the method, validation that names the field, presets, round trips."""
import json

import pytest

from focus_decoding import PRESETS, FocusConfig


def test_defaults_follow_algorithm_1():
    cfg = FocusConfig()
    assert (cfg.mode, cfg.n_focus, cfg.threshold, cfg.steps, cfg.params) == ("ifo", 2, 0.04, 1, "all")
    assert cfg.lr == 1.6e-5
    assert FocusConfig(mode="dofo").lr == 2.56e-4  # the default rate depends on the mode


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "sgd"}, "mode"),
        ({"n_focus": 0}, "n_focus"),
        ({"n_focus": 2.0}, "n_focus"),
        ({"threshold": 0.0}, "threshold"),  # (0, 1]: zero would never refine
        ({"threshold": 1.5}, "threshold"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"steps": 0}, "steps"),
        ({"params": "last:0"}, "params"),
        ({"params": "last:x"}, "params"),
        ({"params": []}, "params"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"FocusConfig.{field}"):
        FocusConfig(**kwargs)


def test_threshold_one_is_allowed():
    assert FocusConfig(threshold=1.0).threshold == 1.0


def test_presets_carry_the_method_rates():
    assert FocusConfig.preset("gpt2").lr == 4.03e-2
    assert FocusConfig.preset("Llama-3.2-1B", mode="dofo").lr == 7.43e-6
    assert FocusConfig.preset("qwen2.5-1.5b", steps=2).steps == 2
    assert set(PRESETS) >= {"gpt2", "llama-3.2-1b", "gemma-2-2b", "qwen2.5-1.5b", "smollm2-135m"}
    with pytest.raises(ValueError, match="unknown FocusConfig preset"):
        FocusConfig.preset("gpt5")


def test_dict_round_trip_is_json_safe():
    cfg = FocusConfig(mode="dofo", lr=1e-3, steps=3, params=["lm_head", "model.layers.*.mlp*"])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert FocusConfig.from_dict(data) == cfg
    assert FocusConfig.coerce(data) == cfg
    with pytest.raises(ValueError, match="unknown FocusConfig field"):
        FocusConfig.from_dict({"mode": "ifo", "learning_rate": 1.0})


def test_single_pattern_and_last_blocks():
    assert FocusConfig(params="lm_head").params == ("lm_head",)
    assert FocusConfig(params="last:3").last_blocks == 3
    assert FocusConfig().last_blocks is None


def test_frozen():
    with pytest.raises(Exception):
        FocusConfig().lr = 1.0
