"""The first run on a GPU: is the method exact there, do bf16 steps count, and what does it cost? One JSON.

    python benchmarks/gpu_check.py --out gpu_check.json            # on a CUDA machine (under 8 minutes on one GPU)
    python benchmarks/gpu_check.py --device cpu --quick --out x.json   # the same code on CPU, small (what CI runs)
    make gpu-check                                                 # the first line, into docs/results/gpu_check.json

Sections (each records its seconds, its peak memory and, if it failed, its error; the others still run):
  exactness   focused greedy generation of tiny Llama / Gemma-3 models in float32 on the device against the
              naive reference (deep copy + torch.optim.SGD, float64, CPU) for all / last:2 / tail, iFo and doFo:
              same tokens, largest difference of the refined scores;
  bf16        the embedded SmolLM2-135M in bfloat16 on the device: achieved / intended first-order loss decrease
              of its steps, precision="float32" (target within 5 %) against precision="model";
  refinement  milliseconds per refinement of the float32 embedded model at 128 and 512 tokens (all, last:2, tail;
              as next-token evaluation runs them) against the forward+backward+forward floor;
  generation  focused (the preset, threshold 0.04) vs plain greedy, 32 new tokens, batch 1 and 8;
  vision      FocusClassifier's per-image loop vs batched vmap vs head path, images/s at B = 64.
Paste the JSON into docs/results.md (section "First GPU run").
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the naive reference every fast path is held against

from focus_decoding import FocusConfig, focus_generate, last_focus_stats, method  # noqa: E402
from focus_decoding.resources.models import load_default_model  # noqa: E402


class Device:
    """Timing and memory on one device (CUDA: synchronised, allocator peaks; CPU: wall clock, max RSS)."""

    def __init__(self, name: str):
        self.name, self.cuda = name, name.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.name)

    def ms(self, fn, repeats: int) -> float:
        """Median milliseconds of ``fn`` after one warm-up call."""
        fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.name)

    def peak_bytes(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.name))
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's high-water mark


# ----------------------------------------------------------------------------- exactness
def naive_greedy(model64, ids: torch.Tensor, config: FocusConfig, names: set[str], new_tokens: int):
    """Greedy decoding with the method written straight from its definition, float64 on CPU: (tokens, scores)."""
    from reference import naive_refine

    ids, scores = ids.clone(), []
    for _ in range(new_tokens):
        run = lambda m, ids=ids: m(ids, use_cache=False).logits[0, -1]  # noqa: E731
        with torch.no_grad():
            logits = run(model64)
        top = logits.softmax(-1).topk(2).values
        if float(top[0] - top[1]) < config.threshold:
            focus = logits.topk(config.n_focus).indices
            logits = naive_refine(model64, run, focus, config.mode, config.lr, config.steps, lambda n: n in names)
        scores.append(logits)
        ids = torch.cat([ids, logits.argmax()[None, None]], dim=1)
    return ids, torch.stack(scores)


def exactness(dev: Device, quick: bool) -> dict:
    from reference import tiny_lm64

    cases = []
    for arch in ("llama",) if quick else ("llama", "gemma3"):
        model64 = tiny_lm64(arch, tied=False)
        model = tiny_lm64(arch, tied=False).float().to(dev.name)
        model.generation_config.eos_token_id = None  # the reference does not stop at EOS either
        ids = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
        for params, mode, lr in (("all", "ifo", 0.5), ("last:2", "dofo", 30.0), ("tail", "ifo", 5.0)):
            config = FocusConfig(mode=mode, lr=lr, params=params, threshold=1.0)
            names = set(method.split_parameters(model64, config.params)[0])
            want_ids, want = naive_greedy(model64, ids, config, names, 4)
            out = focus_generate(model, ids.to(dev.name), focus_config=config, max_new_tokens=4, do_sample=False,
                                 pad_token_id=0, return_dict_in_generate=True, output_scores=True)
            got = torch.stack([s[0] for s in out.scores]).double().cpu()
            with torch.no_grad():  # how far the step moved the scores: the exactness is judged against this
                plain = model64(want_ids[:, :-1], use_cache=False).logits[0, -4:]
            cases.append({"arch": arch, "params": params, "mode": mode,
                          "same_tokens": bool(torch.equal(out.sequences.cpu(), want_ids)),
                          "max_abs_diff": float((got - want).abs().max()),
                          "max_abs_logit": float(want.abs().max()),
                          "step_moved_scores_by": float((want - plain).abs().max())})
    return {"cases": cases, "all_same_tokens": all(c["same_tokens"] for c in cases),
            "worst_relative_diff": max(c["max_abs_diff"] / max(c["max_abs_logit"], 1e-12) for c in cases)}


# ----------------------------------------------------------------------------- bf16
def bf16(dev: Device, quick: bool) -> dict:
    model, tok = load_default_model(torch.bfloat16)
    model = model.to(dev.name)
    prompt = tok(["The history of the city begins"], return_tensors="pt").to(dev.name)
    out = {}
    for params in ("last:2",) if quick else ("last:2", "all"):
        for precision in ("float32", "model"):
            config = FocusConfig(threshold=1.0, lr=FocusConfig.preset("smollm2-135m").lr, params=params,
                                 precision=precision)
            focus_generate(model, **prompt, focus_config=config, max_new_tokens=1 if quick else 8,
                           do_sample=False, pad_token_id=tok.pad_token_id)
            stats = last_focus_stats()
            out[f"{params} precision={precision}"] = {**stats.decrease, "refined": stats.totals["refined"]}
    return out


# ----------------------------------------------------------------------------- refinement cost
_LOADED: dict = {}


def float32_model(dev: Device):
    """The embedded model in float32 on the device, loaded once for the sections that share it."""
    if dev.name not in _LOADED:
        model, tok = load_default_model()
        _LOADED[dev.name] = (model.to(dev.name), tok)
    return _LOADED[dev.name]


def refinement(dev: Device, quick: bool) -> dict:
    from focus_decoding.evaluation.windows import scan, tokenize_stream
    from focus_decoding.method import tail
    from focus_decoding.resources.corpora import load_texts
    from focus_decoding.text.refine import refine_position

    model, tok = float32_model(dev)
    view = method.module_view(model)
    stream = tokenize_stream(tok, load_texts(max_texts=60)).to(dev.name)
    repeats, rows = (1 if quick else 10), []
    for length in (16,) if quick else (128, 512):
        configs = {p: FocusConfig(threshold=1.0, lr=1.6e-5, params=p) for p in ("all", "last:2", "tail")}
        depths = {tail.shortcut(view, c) for c in configs.values()} - {None}
        window = next(scan(view, stream[:length + 1], [(0, 1, length + 1)], configs["all"], depths=lambda: depths))
        t = length - 1
        ids = window.ids

        def floor():
            with torch.enable_grad():
                logits = view(ids, use_cache=False).logits[0, -1]
                params = [p for p in view.parameters()]
                torch.autograd.grad(-logits[:2].mean(), params, allow_unused=True)
            with torch.no_grad():
                view(ids, use_cache=False)

        row = {"tokens": length, "floor_fwd_bwd_fwd_ms": dev.ms(floor, repeats)}
        for params, config in configs.items():
            trainable, frozen = method.split_parameters(view, config.params)
            kept = window.kept(tail.shortcut(view, config))
            row[f"{params}_ms"] = dev.ms(lambda: refine_position(view, ids, window.logits[t], t, trainable, frozen,
                                                                 config, kept), repeats)
            row[f"{params}_over_floor"] = row[f"{params}_ms"] / row["floor_fwd_bwd_fwd_ms"]
        rows.append(row)
    return {"rows": rows}


# ----------------------------------------------------------------------------- generation
def generation(dev: Device, quick: bool) -> dict:
    model, tok = float32_model(dev)
    (new, repeats), rows = ((4, 1) if quick else (32, 3)), []
    prompts = ["Write a short story about a robot who learns to paint.", "The capital of France is",
               "List three prime numbers:", "Once upon a time", "The best way to learn a language is",
               "In 1969, humans", "A recipe for bread:", "The meaning of the word 'focus' is"]
    for batch in (1, 8):
        enc = tok(prompts[:batch], return_tensors="pt", padding=True).to(dev.name)
        common = dict(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
        plain = dev.ms(lambda: model.generate(**common), repeats)
        preset = FocusConfig.preset("smollm2-135m")
        row = {"batch": batch, "new_tokens": new, "plain_ms": plain}
        for name, config in (("last:2", preset), ("tail", FocusConfig(lr=preset.lr, params="tail"))):
            row[f"{name}_ms"] = dev.ms(lambda: focus_generate(model, focus_config=config, **common), repeats)
            row[f"{name}_over_plain"] = row[f"{name}_ms"] / plain
            row[f"{name}_refined"] = last_focus_stats().totals["refined"]
        rows.append(row)
    return {"rows": rows}


# ----------------------------------------------------------------------------- vision
def vision(dev: Device, quick: bool) -> dict:
    from focus_decoding.vision import FocusClassifier, load_classifier

    batch = 8 if quick else 64
    try:
        model, source = load_classifier("ccexam-mnist"), "ccexam-mnist, uniform random 1x28x28 images"
        x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    except (ImportError, ValueError, OSError, RuntimeError):  # ccexam not installed: a random ResNet-18
        import torchvision

        torch.manual_seed(0)
        model, source = torchvision.models.resnet18().eval(), "random resnet18, 3x32x32"
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model, x = model.to(dev.name), x.to(dev.name)
    repeats, out = (1 if quick else 5), {"model": source, "batch": batch}
    for path, kw in (("loop", dict(method="loop")), ("vmap", dict(method="vmap")), ("head", {})):
        config = FocusConfig(threshold=1.0, lr=1e-3, params="head" if path == "head" else "all")
        clf = FocusClassifier(model, config, max_batch=batch, **kw)
        out[f"{path}_images_per_s"] = batch / (dev.ms(lambda: clf(x), repeats) / 1e3)
    with torch.no_grad():
        out["plain_images_per_s"] = batch / (dev.ms(lambda: model(x), repeats) / 1e3)
    out["vmap_over_loop"] = out["vmap_images_per_s"] / out["loop_images_per_s"]
    return out


SECTIONS = {"exactness": exactness, "bf16": bf16, "refinement": refinement, "generation": generation,
            "vision": vision}


def run(device: str, quick: bool, only: list[str] | None = None) -> dict:
    dev = Device(device)
    result = {"device": device, "gpu": torch.cuda.get_device_name(device) if dev.cuda else None,
              "torch": torch.__version__, "python": platform.python_version(), "quick": quick, "sections": {}}
    import transformers

    result["transformers"] = transformers.__version__
    for name in only or SECTIONS:
        dev.reset_peak()
        start = time.perf_counter()
        try:
            entry = SECTIONS[name](dev, quick)
        except Exception as err:  # one section's failure is a finding; the others still run
            entry = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}
        entry.update(seconds=time.perf_counter() - start, peak_memory_bytes=dev.peak_bytes())
        result["sections"][name] = entry
        print(f"{name}: {json.dumps(entry)[:400]}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU check CI runs)")
    parser.add_argument("--only", help=f"comma-separated sections, from {', '.join(SECTIONS)}")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else None
    if only and set(only) - set(SECTIONS):
        parser.error(f"--only: unknown section(s) {sorted(set(only) - set(SECTIONS))}; allowed: {', '.join(SECTIONS)}")
    result = run(args.device, args.quick, only)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    failed = [n for n, s in result["sections"].items() if "error" in s]
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
