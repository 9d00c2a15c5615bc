"""Stress test: one model object, two threads, hundreds of trials; does anything leak between them?

    python benchmarks/stress_threads.py [--trials 300] [--seed 0] [--out results/stress_threads.json]

Each trial picks at random a decoding mode (greedy, sampling, beam search), a way in (``enable``,
the ``custom_generate`` callable, a bare ``FocusLogitsProcessor`` on plain ``generate``) and what
the second thread does meanwhile (plain forwards, plain generates, or a second focused generate),
or a vision trial (``FocusClassifier`` beside plain forwards). Both threads start together at a
barrier. Counted per trial kind:
  plain_calls      plain forwards/generates the other thread ran while focused calls were running
  plain_mismatch   ... of which differed from their result alone
  focus_mismatch   a focused call differed from its own serial result (text and statistics;
                   sampling draws from torch's global generator, shared by the threads, so
                   sampled focus runs are compared on their statistics' ``checked`` counts only)
  weights_changed  any parameter or buffer of the model differed after the trial
  errors           exceptions in either thread
Every count should be 0. Runs on the tiny random models in a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

import focus_decoding
from focus_decoding import FocusConfig
from focus_decoding.text.ways_in import enable
from focus_decoding.text.processor import FocusLogitsProcessor
from focus_decoding.resources.models import tiny_causal_lm
from focus_decoding.vision import DigitsNet, FocusClassifier

PROMPTS = torch.tensor([[1, 5, 7, 9, 11], [0, 0, 4, 8, 6]])
MASK = (PROMPTS != 0).long()
MODES = {"greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=20),
         "beam": dict(do_sample=False, num_beams=3)}
ROUTES = ("enable", "callable", "processor")
OTHERS = ("plain_forward", "plain_generate", "focused")
COUNTS = ("trials", "plain_calls", "plain_mismatch", "focus_mismatch", "weights_changed", "errors")


def gen_kwargs(mode: str) -> dict:
    return dict(attention_mask=MASK, max_new_tokens=4, min_new_tokens=4, pad_token_id=0,
                return_dict_in_generate=True, **MODES[mode])


def focused_call(model, route: str, mode: str, config: FocusConfig):
    """One focused generate through ``route``; (sequences, stats dict)."""
    kw = gen_kwargs(mode)
    if route == "enable":
        out = model.generate(PROMPTS, focus_config=config, **kw)
        return out.sequences, out.focus_stats.to_dict()
    if route == "callable":
        out = model.generate(PROMPTS, custom_generate=focus_decoding.generate, focus_config=config, **kw)
        return out.sequences, out.focus_stats.to_dict()
    proc = FocusLogitsProcessor(model, config, attention_mask=MASK, scores_are_log_probs=mode == "beam")
    out = type(model).generate(model, PROMPTS, logits_processor=LogitsProcessorList([proc]), **kw)
    return out.sequences, proc.stats.to_dict()


def same_focus(a, b, mode: str) -> bool:
    if mode == "sample":  # the global RNG is shared: only what does not depend on the draws
        return a[1]["totals"]["checked"] == b[1]["totals"]["checked"]
    return torch.equal(a[0], b[0]) and a[1] == b[1]


def snapshot(model) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def unchanged(model, before) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), *model.buffers()]))


def run_pair(first, second) -> tuple[list, list, list[BaseException]]:
    """Run the two callables in two threads started together; each returns a list of results."""
    barrier, out, errors = threading.Barrier(2), [None, None], []

    def worker(i, job):
        try:
            barrier.wait()
            out[i] = job()
        except BaseException as err:  # noqa: BLE001 - counted
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i, job)) for i, job in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out[0] or [], out[1] or [], errors


def text_trial(rng: random.Random, models: dict) -> tuple[str, dict]:
    """One generation trial; (kind, counts)."""
    arch, mode, route, other = rng.choice(sorted(models)), rng.choice(sorted(MODES)), rng.choice(ROUTES), rng.choice(OTHERS)
    model = models[arch]
    config = FocusConfig(threshold=1.0, lr=rng.choice([0.3, 1.0]), params=rng.choice(["all", "last:2"]))
    kind = f"{mode}/{route}/{other}"
    probe = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(rng.randrange(10**6)))
    with torch.no_grad():
        plain_logits = model(probe).logits
    plain_text = type(model).generate(model, PROMPTS, **gen_kwargs("greedy")).sequences
    torch.manual_seed(0)
    alone = focused_call(model, route, mode, config)
    before = snapshot(model)
    counts = collections.Counter(trials=1)
    stop = threading.Event()

    def focused_rounds():
        try:
            return [focused_call(model, route, mode, config) for _ in range(2)]
        finally:
            stop.set()

    def other_rounds():
        results = []
        while not stop.is_set() or not results:
            if other == "plain_forward":
                with torch.no_grad():
                    results.append(torch.equal(model(probe).logits, plain_logits))
            elif other == "plain_generate":
                results.append(torch.equal(model.generate(PROMPTS, **gen_kwargs("greedy")).sequences, plain_text))
            else:
                results.append(same_focus(focused_call(model, route, mode, config), alone, mode))
                break
        return results

    focus_results, other_results, errors = run_pair(focused_rounds, other_rounds)
    counts["errors"] += len(errors)
    counts["focus_mismatch"] += sum(not same_focus(r, alone, mode) for r in focus_results)
    counts["focus_mismatch" if other == "focused" else "plain_mismatch"] += sum(not ok for ok in other_results)
    counts["plain_calls"] += 0 if other == "focused" else len(other_results)
    counts["weights_changed"] += int(not unchanged(model, before))
    return kind, counts


def vision_trial(rng: random.Random, net: torch.nn.Module) -> tuple[str, dict]:
    """FocusClassifier (loop or vmap) in one thread, plain forwards in the other."""
    method = rng.choice(["loop", "vmap"])
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(rng.randrange(10**6)))
    clf = FocusClassifier(net, FocusConfig(threshold=1.0, lr=0.1), method=method)
    with torch.no_grad():
        plain = net(images)
    alone = clf(images)
    before, stop = snapshot(net), threading.Event()
    counts = collections.Counter(trials=1)

    def focused_rounds():
        try:
            return [torch.equal(clf(images), alone) for _ in range(2)]
        finally:
            stop.set()

    def plain_rounds():
        results = []
        while not stop.is_set() or not results:
            with torch.no_grad():
                results.append(torch.equal(net(images), plain))
        return results

    focus_ok, plain_ok, errors = run_pair(focused_rounds, plain_rounds)
    counts["errors"] += len(errors)
    counts["focus_mismatch"] += sum(not ok for ok in focus_ok)
    counts["plain_mismatch"] += sum(not ok for ok in plain_ok)
    counts["plain_calls"] += len(plain_ok)
    counts["weights_changed"] += int(not unchanged(net, before))
    return f"vision/{method}/plain_forward", counts


def markdown(table: dict, totals: collections.Counter) -> str:
    """Counts grouped by each axis of a trial kind (mode or vision, way in, other thread), then all."""
    lines = ["| axis | value | " + " | ".join(COUNTS) + " |", "|---|---|" + "---:|" * len(COUNTS)]
    for axis, name in enumerate(("mode", "way in", "other thread")):
        groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for kind, counts in table.items():
            groups[kind.split("/")[axis]].update(counts)
        for value in sorted(groups):
            lines.append(f"| {name} | {value} | " + " | ".join(str(groups[value][c]) for c in COUNTS) + " |")
    lines.append("| **all** | | " + " | ".join(f"**{totals[c]}**" for c in COUNTS) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--vision-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    models = {"llama": enable(tiny_causal_lm("llama")), "gpt2": enable(tiny_causal_lm("gpt2"))}
    torch.manual_seed(0)
    net = DigitsNet().eval()
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    start = time.perf_counter()
    for i in range(args.trials):
        kind, counts = vision_trial(rng, net) if rng.random() < args.vision_fraction else text_trial(rng, models)
        table[kind].update(counts)
        if (i + 1) % 25 == 0:
            print(f"{i + 1}/{args.trials} trials, {time.perf_counter() - start:.0f}s", file=sys.stderr)
    totals = collections.Counter()
    for counts in table.values():
        totals.update(counts)
    print(markdown(table, totals))
    result = {"trials": args.trials, "seed": args.seed, "seconds": time.perf_counter() - start,
              "totals": {c: totals[c] for c in COUNTS}, "by_kind": {k: {c: v[c] for c in COUNTS} for k, v in table.items()},
              "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
