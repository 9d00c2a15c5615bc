"""Models dispatched by accelerate with offloaded weights (issue 16): the same tokens, statistics and reports as the
same weights loaded plainly, for "all", "last:N" and the tail, and every weight and offload file left as it was."""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload, dispatch_model

from focus_decoding import FocusConfig, method
from focus_decoding.evaluation import evaluate_next_token
from focus_decoding.method import offload
from focus_decoding.text.ways_in import focus_generate

PROMPT = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])  # a batch, row 0 left-padded
DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
        "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}


class Bytes:
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b % 90 for b in text.encode()]}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def dispatched(kind: str, plain, tmp_path: Path):
    """(the same weights behind accelerate's offloading, the offload folder or None)."""
    model = copy.deepcopy(plain)
    if kind == "cpu_offload":
        return cpu_offload(model, execution_device="cpu"), None
    if kind == "disk":
        return dispatch_model(model, device_map=DISK, main_device="cpu", offload_dir=str(tmp_path / "off")), \
            tmp_path / "off"
    folder = tmp_path / "saved"
    plain.save_pretrained(folder)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": "60KB"},
                                                  offload_folder=str(tmp_path / "auto"))
    return loaded.eval(), tmp_path / "auto"


def generate(model, params, **kw):
    torch.manual_seed(0)
    out = focus_generate(model, PROMPT, attention_mask=(PROMPT != 0).long(), max_new_tokens=4, pad_token_id=0,
                         focus_config=FocusConfig(threshold=1.0, lr=1.0, params=params), return_dict_in_generate=True,
                         **kw)
    return out.sequences, {k: getattr(out.focus_stats, k) for k in ("checked", "uncertain", "refined", "changed")}


@pytest.mark.parametrize("kind", ["cpu_offload", "disk", "device_map_auto"])
@pytest.mark.parametrize("params", ["all", "last:2", "tail"])
def test_generation_on_an_offloaded_model_equals_the_plain_one(tiny_lm, tmp_path, kind, params):
    plain = tiny_lm("llama", layers=4, tied=False)
    model, folder = dispatched(kind, plain, tmp_path)
    assert offload.is_offloaded(model)
    files = digest(folder) if folder else None
    stored = {name: {k: hook.weights_map[k].clone() for k, _ in m.named_parameters(recurse=False)}
              for name, m in model.named_modules() for hook in [getattr(m, "_hf_hook", None)]
              if getattr(hook, "offload", False)}
    want = generate(plain, params)
    got = generate(model, params)
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and sum(want[1]["refined"]) > 0
    if folder:
        assert digest(folder) == files  # the offload files, bitwise
    for name, m in model.named_modules():  # the stored weights, bitwise, and still offloaded
        hook = getattr(m, "_hf_hook", None)
        if getattr(hook, "offload", False):
            assert all(torch.equal(hook.weights_map[k], v) for k, v in stored[name].items())
            assert all(p.is_meta for p in m.parameters(recurse=False))


@pytest.mark.parametrize("params", ["last:2", "tail"])
def test_next_token_evaluation_on_an_offloaded_model(tiny_lm, tmp_path, params):
    plain = tiny_lm("llama", layers=4, tied=False)
    model, _ = dispatched("disk", plain, tmp_path)
    assert method.input_device(model).type == "cpu"  # the execution device, never meta
    texts = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!"]
    cfg = FocusConfig(threshold=0.3, lr=5.0, params=params)
    want = evaluate_next_token(plain, Bytes(), texts, cfg, context_length=24, progress=False)
    got = evaluate_next_token(model, Bytes(), texts, cfg, context_length=24, progress=False)
    assert got.outcomes == want.outcomes and got.n_total == want.n_total and want.n_uncertain > 0


def test_a_classifier_behind_cpu_offload():
    from focus_decoding.vision import DigitsNet, FocusClassifier

    torch.manual_seed(0)
    plain = DigitsNet().eval()
    model = cpu_offload(copy.deepcopy(plain), execution_device="cpu")
    x = torch.rand(5, 1, 8, 8)
    for params in ("all", "head"):
        cfg = FocusConfig(threshold=1.0, lr=0.5, params=params)
        torch.testing.assert_close(FocusClassifier(model, cfg)(x), FocusClassifier(plain, cfg)(x))
