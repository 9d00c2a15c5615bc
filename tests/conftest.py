"""Shared fixtures: tiny random LMs, a tiny word-level tokenizer, the default model, an untouched-model check,
and caches of the session's own (no test reads or leaves state in the user's Hugging Face or focus_decoding cache)."""
from __future__ import annotations

import importlib
import os
import sys
import tempfile

# Before transformers, datasets or evaluate are imported (they read these once): every cache of this test
# process lives in a fresh folder, so a test passes on a machine whose caches are empty, and leaves nothing.
_CACHE = tempfile.mkdtemp(prefix="focus-tests-")
for _name in ("HF_MODULES_CACHE", "HF_DATASETS_CACHE", "HF_EVALUATE_CACHE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_name, None)
os.environ["HF_HOME"] = os.path.join(_CACHE, "huggingface")
os.environ["XDG_CACHE_HOME"] = _CACHE  # the trained digits CNN, benchmark assets

import pytest  # noqa: E402
import torch  # noqa: E402

from focus_decoding.evaluation.group import Group  # noqa: E402

from focus_decoding.resources.models import tiny_causal_lm


def need(module: str, why: str = "", *, module_level: bool = False):
    """Import an optional test dependency. A developer without it gets a skip that says what to install;
    under CI (``CI`` set) a missing dependency is a broken set-up and fails instead of skipping silently."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed ({err}); pip install -e '.[vision,test]' {why}".rstrip(),
                    allow_module_level=module_level)


@pytest.fixture
def fresh_hf_modules(tmp_path, monkeypatch):
    """An empty Hugging Face modules cache for this test alone: remote code (a ``custom_generate`` folder) is
    copied into it from scratch, as on a machine that never ran it; nothing another test imported is reused."""
    import transformers.dynamic_module_utils as dynamic

    modules = tmp_path / "hf_modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(modules))
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(modules))  # read once at import: patch the copy too
    for name in [n for n in sys.modules if n.split(".")[0] == "transformers_modules"]:
        monkeypatch.delitem(sys.modules, name)
    return modules


@pytest.fixture
def tiny_lm():
    """Factory for a fresh tiny random decoder: ``tiny_lm("llama"|"gpt2"|"qwen2", tied=..., layers=...)``."""
    return tiny_causal_lm


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level fast tokenizer for the tiny models' 96-token vocabulary (w4 .. w95; 0 pad, 1 bos, 2 eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left",
                                   model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per session."""
    from focus_decoding.resources.models import load_default_model

    try:
        return load_default_model()
    except FileNotFoundError as err:
        if os.environ.get("CI"):  # CI installs it: a missing model there is a broken set-up, not a skip
            raise
        pytest.skip(str(err))  # a developer without the optional model package


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a focus step must leave alone: values, grads, requires_grad and training flags."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


@pytest.fixture
def assert_untouched():
    """``check = assert_untouched(model)`` before; ``check()`` after asserts the model is bitwise unchanged."""
    def take(model: torch.nn.Module):
        before = snapshot(model)

        def check() -> None:
            after = snapshot(model)
            for kind in ("params", "buffers"):
                assert before[kind].keys() == after[kind].keys()
                for name, value in before[kind].items():
                    assert torch.equal(value, after[kind][name]), f"{kind[:-1]} {name} changed"
            assert after["requires_grad"] == before["requires_grad"]
            assert after["training"] == before["training"]
            assert all(p.grad is None for p in model.parameters()), "a .grad was left on the model"
        return check
    return take


class ThreadGroup(Group):
    """``world`` processes simulated by threads (a ``focus_decoding.evaluation.group.Group`` for tests):
    ``gather`` meets every thread at a barrier, as ``torch.distributed.all_gather_object`` meets processes."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.world, self._shared = rank, shared["world"], shared

    def gather(self, obj):
        slots, barrier = self._shared["slots"], self._shared["barrier"]
        slots[self.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()  # nobody writes the next round's object before everyone read this one
        return out


def run_in_threads(fns, on_error=None) -> None:
    """Call each of ``fns`` in its own thread, all at once; the first error is raised here once all have ended
    (``on_error()`` runs as soon as one fails, e.g. to abort a barrier the others wait at)."""
    import threading

    errors: list[BaseException] = []

    def call(fn):
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - surfaced in the calling thread below
            errors.append(err)
            if on_error is not None:
                on_error()

    threads = [threading.Thread(target=call, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def run_as_processes(world: int, job):
    """``job(group)`` in ``world`` threads, each with its own rank of one simulated group; the results by rank."""
    import threading

    shared = {"world": world, "slots": [None] * world, "barrier": threading.Barrier(world)}
    groups = [ThreadGroup(rank, shared) for rank in range(world)]
    results = [None] * world

    def run(rank):
        results[rank] = job(groups[rank])
    run_in_threads([lambda r=r: run(r) for r in range(world)], on_error=shared["barrier"].abort)
    return results
