"""Evidence for the step rule and the parameter choice: many step sizes and selectors per uncertain token.

    python benchmarks/step_evidence.py run --corpus wiki,kjv --split dev,test --selectors last:2 \\
        --lrs 1e-4,3e-4,1e-3,3e-3,1e-2 --taus 0.1,0.3,1,3,10,30 --max-uncertain 1000 --out runs/ev
    python benchmarks/step_evidence.py summary runs/ev/*.jsonl --out docs/results/text/step_evidence.json

``run`` walks a corpus exactly as ``evaluate_next_token`` does (128-token windows, every token scored
once, the gate on each position) and, for each uncertain position, computes the focus-loss gradient
ONCE, then every (selector, step) point from it: with one SGD step the gradient does not depend on
the step size, and the gradient for a subset of the parameters is the restriction of the gradient
for all of them. Each point is then one refined forward: through the top N blocks from the kept
states for ``last:N`` (``prefix.top_forward``), otherwise the full model asked for the last
position's logits only. The step itself is the library's: ``core.focus_loss``, ``core.step_size``
(``lr`` or ``tau / ||g||^2`` over the selector's parameters) and ``core.sgd_update``. ``--check K``
recomputes the first K positions with ``eval_text.refine_position`` (the library path, one config at
a time) and records how many emitted tokens agree.

One JSON line per uncertain position (window, position, label, unrefined top-1, ||g||^2 per selector,
top-1 per selector and step), appended as it goes: an interrupted run keeps its positions and
``--resume`` continues after the last one. ``summary`` turns the lines into FocusReports per point,
chooses each selector's best step on the dev split and reports it on the test split.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from focus_decoding import method as core
from focus_decoding.evaluation import next_token as eval_text
from focus_decoding.method import prefix  # noqa: E402
from focus_decoding.config import FocusConfig  # noqa: E402
from focus_decoding.evaluation.report import FocusReport  # noqa: E402

SMOLLM2 = "smollm2-135m"


# ----------------------------------------------------------------------------- inputs
def load(model_name: str):
    """(model, tokenizer): the embedded SmolLM2 or an asset model (benchmarks/assets.py)."""
    if model_name == SMOLLM2:
        from focus_decoding.resources.models import load_default_model
        return load_default_model()
    import assets
    return assets.load_model(model_name)


def texts_for(corpus: str, split: str) -> list[str]:
    """The documents of ``split`` ("dev", "test" or "all") of an asset corpus or the bundled sample."""
    if corpus == "jargon":
        from focus_decoding.resources.corpora import load_texts
        texts = load_texts()
    else:
        import assets
        texts = assets.load_corpus(corpus)
    if split == "all":
        return texts
    import assets
    dev, test = assets.split(texts)
    return dev if split == "dev" else test


def point_key(rule: str, value: float) -> str:
    """``"lr=0.001"`` / ``"tau=1"``: one step point."""
    return f"{rule}={value:g}"


def point_config(base: FocusConfig, selector: str, key: str) -> FocusConfig:
    """The ``FocusConfig`` a point stands for."""
    rule, value = key.split("=")
    step = {"step_rule": "fixed", "lr": float(value)} if rule == "lr" else {"step_rule": "normalized", "tau": float(value),
                                                                          "lr": None}
    return dataclasses.replace(base, params=parse_selector(selector), **({"tau": None} | step))


def parse_selector(selector: str):
    """``all`` / ``last:N`` as they are; ``a|b|c`` as a list of patterns."""
    return selector if selector == "all" or selector.startswith("last:") else selector.split("|")


# ----------------------------------------------------------------------------- the walk
class Walker:
    """Gradient once per uncertain position, then one refined forward per (selector, step) point."""

    def __init__(self, model, selectors: Sequence[str], keys: Sequence[str], base: FocusConfig):
        self.model, self.view, self.base, self.keys = model, core.module_view(model), base, list(keys)
        self.selectors = list(selectors)
        self.names = {s: list(core.split_parameters(model, parse_selector(s))[0]) for s in self.selectors}
        self.params = dict(model.named_parameters())
        self.cached = {s: prefix.prefix_blocks(model, dataclasses.replace(base, params=parse_selector(s)))
                       for s in self.selectors}
        # one gradient for all selectors: through the top blocks when every selector is cached
        self.grad_top = max(self.cached.values()) if all(self.cached.values()) else None
        union = {n for s in self.selectors for n in self.names[s]}
        self.grad_names = [n for n in self.params if n in union]
        self.n_kept = max([n for n in self.cached.values() if n] or [0]) or None

    def window(self, ids: torch.Tensor):
        """(logits [T, V], kept states per n) of one window's no-grad forward."""
        with torch.no_grad():
            out = self.view(ids, use_cache=False, output_hidden_states=self.n_kept is not None)
        states = {}
        for n in set(v for v in self.cached.values() if v):
            states[n] = prefix.window_states(out, self.model, n)
        return core.widen(out.logits[0]), states

    def forward(self, ids, t: int, states, n: int | None) -> core.Forward:
        """The logits at local position ``t``: top-n blocks from kept states, or the full model (last position only)."""
        if n:
            return prefix.top_forward(self.view, n, states[n][:, :t + 1])
        return core.model_forward(self.view, ids[:, :t + 1], use_cache=False, logits_to_keep=1,
                                  select=lambda o: o.logits[0, -1])

    def position(self, ids, t: int, logits_t: torch.Tensor, states) -> dict:
        """||g||^2 per selector and the emitted top-1 per (selector, point) for one uncertain position."""
        base_top1 = int(logits_t.argmax())
        focus = core.as_normal_tensor(core.focus_classes(logits_t, self.base.n_focus))
        t0 = time.perf_counter()
        fwd = self.forward(ids, t, states, self.grad_top)
        with core.grad_enabled():
            leaves = {n: self.params[n].detach().requires_grad_(True) for n in self.grad_names}
            loss = core.focus_loss(fwd(leaves), focus, self.base.mode).sum()
            grads = dict(zip(self.grad_names, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
        grad_s = time.perf_counter() - t0
        sq, pred, fwd_s = {}, {}, {}
        for s in self.selectors:
            gs = [grads[n] for n in self.names[s]]
            sq_t = sum(core.widen(g).pow(2).sum() for g in gs if g is not None)
            sq[s] = float(sq_t)
            refined_fwd = self.forward(ids, t, states, self.cached[s])
            pred[s], t1 = {}, time.perf_counter()
            for key in self.keys:
                eta = self.eta(key, sq_t)
                with torch.no_grad():
                    values = {n: self.params[n].detach() if g is None else core.sgd_update(self.params[n].detach(), g, eta)
                              for n, g in zip(self.names[s], gs)}
                    new = refined_fwd(values)
                pred[s][key] = int(new.argmax()) if bool(torch.isfinite(new).all()) else base_top1
            fwd_s[s] = (time.perf_counter() - t1) / max(len(self.keys), 1)
        return {"base": base_top1, "sq": sq, "pred": pred, "grad_s": grad_s, "fwd_s": fwd_s}

    @staticmethod
    def eta(key: str, sq) -> float:
        """``core.step_size``'s eta for one point, from the selector's ||g||^2 computed once (same formula)."""
        rule, value = key.split("=")
        if rule == "lr":
            return float(value)
        if not isinstance(sq, torch.Tensor):
            return 0.0
        return float(torch.where(sq > 0, float(value) / sq, torch.zeros_like(sq)))

    def check(self, ids, t: int, logits_t, states, record: dict) -> dict:
        """Agreement of this walk's points with the library path (``eval_text.refine_position``) at one position."""
        agree = total = 0
        for s in self.selectors:
            cfg0 = point_config(self.base, s, self.keys[0])
            trainable, frozen = core.split_parameters(self.model, cfg0.params)
            n = self.cached[s]
            kept = (n, states[n]) if n else None
            for key in self.keys:
                res = eval_text.refine_position(self.view, ids, logits_t, t, trainable, frozen,
                                                point_config(self.base, s, key), kept)
                agree += int(int(res.logits.argmax()) == record["pred"][s][key])
                total += 1
        return {"agree": agree, "total": total}


def run(args) -> int:
    """Walk every (corpus, split) pair with one loaded model; one JSON-lines file per pair in ``args.out``."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    base = FocusConfig(mode=args.mode, threshold=args.threshold, n_focus=2)
    keys = [point_key("lr", float(x)) for x in args.lrs.split(",") if x] + \
           [point_key("tau", float(x)) for x in args.taus.split(",") if x]
    walker = Walker(model, args.selectors.split(","), keys, base)
    for corpus in args.corpus.split(","):
        for split in args.split.split(","):
            out = Path(args.out) / f"{args.model}_{corpus}_{split}_{args.tag}.jsonl"
            walk(walker, tokenizer, corpus, split, out, args)
    return 0


def walk(walker: Walker, tokenizer, corpus: str, split: str, out: Path, args) -> None:
    """Append one JSON line per uncertain position of ``corpus``/``split`` to ``out`` (resumable)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.resume and out.exists():
        done = {(r["w"], r["t"]) for r in read_records([out]) if "t" in r}
    elif out.exists():
        out.unlink()
    header = {"header": True, "model": args.model, "corpus": corpus, "split": split, "tag": args.tag,
              "selectors": walker.selectors, "keys": walker.keys, "config": walker.base.to_dict(),
              "threads": args.threads, "context_length": args.context_length, "cached": walker.cached,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    stream = eval_text.tokenize_stream(tokenizer, texts_for(corpus, split))
    n_unc, checked, t_start, c_start = len(done), 0, time.perf_counter(), time.process_time()
    log = open(args.log, "a") if args.log else sys.stderr
    with open(out, "a") as f:
        if not done:
            f.write(json.dumps(header) + "\n")
        for w, (s, lo, hi) in enumerate(eval_text.window_bounds(stream.numel(), args.context_length, args.context_length)):
            if n_unc >= args.max_uncertain:
                break
            ids = stream[s:hi - 1][None]
            logits, states = walker.window(ids)
            first = lo - 1 - s
            scored, labels = logits[first:], stream[lo:hi]
            uncertain = core.is_uncertain(scored, walker.base.threshold)
            if not done:
                f.write(json.dumps({"w": w, "tokens": int(labels.numel()), "uncertain": int(uncertain.sum()),
                                    "correct": int((scored.argmax(-1) == labels).sum())}) + "\n")
            for i in torch.nonzero(uncertain).flatten().tolist():
                if n_unc >= args.max_uncertain:
                    break
                t = first + i
                if (w, t) in done:
                    continue
                c0 = time.process_time()
                rec = walker.position(ids, t, logits[t], states)
                rec.update(w=w, t=t, label=int(labels[i]), gap=float(core.top2_gap(logits[t])),
                           cpu_s=time.process_time() - c0)
                if checked < args.check:
                    rec["check"] = walker.check(ids, t, logits[t], states, rec)
                    checked += 1
                f.write(json.dumps(rec) + "\n")
                f.flush()
                n_unc += 1
                if n_unc % 25 == 0:
                    el, cpu = time.perf_counter() - t_start, time.process_time() - c_start
                    print(f"{time.strftime('%H:%M:%S')} {args.model} {corpus}/{split} {n_unc}/{args.max_uncertain} "
                          f"uncertain, {el:.0f}s wall, {cpu:.0f}s cpu", file=log, flush=True)


# ----------------------------------------------------------------------------- summary
def read_records(paths: Iterable[Path]) -> list[dict]:
    """Every JSON line of ``paths``, each tagged with its file's header (a truncated last line is skipped)."""
    out = []
    for path in paths:
        header = {}
        for line in open(path):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption
            if rec.get("header"):
                header = rec
                continue
            rec["_h"] = header
            out.append(rec)
    return out


def report_for(recs: Sequence[dict], selector: str, key: str) -> FocusReport:
    """The FocusReport of one (selector, point) over the uncertain positions ``recs``."""
    rep = FocusReport(name=f"{selector} {key}")
    pos = [r for r in recs if "pred" in r and selector in r["pred"]]
    if pos:
        rep.add_outcomes(torch.tensor([r["label"] for r in pos]), torch.tensor([r["base"] for r in pos]),
                         torch.tensor([r["pred"][selector][key] for r in pos]))
    return rep


def row(rep: FocusReport) -> dict:
    """The numbers of one report that the tables show."""
    return {"n": rep.n_uncertain, "delta_corr": rep.delta_corr, "w2c": rep.wrong_to_correct,
            "c2w": rep.correct_to_wrong, "w2w": rep.wrong_to_other_wrong, "p": rep.p_value, "base_acc": rep.base_accuracy,
            "delta_acc": rep.delta_acc}


def percentiles(values: Sequence[float]) -> dict:
    """5/25/50/75/95th percentiles, min and max."""
    v = sorted(values)
    q = lambda f: v[min(len(v) - 1, int(round(f * (len(v) - 1))))]  # noqa: E731
    return {"n": len(v), "min": v[0], "p5": q(.05), "p25": q(.25), "median": q(.5), "p75": q(.75), "p95": q(.95),
            "max": v[-1]} if v else {"n": 0}


def summarize(paths: Sequence[Path]) -> dict:
    """Per (model, corpus, selector): every point on dev and test, the dev choice per rule, ||g||^2 spread."""
    recs = read_records(paths)
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in recs:
        h = r["_h"]
        groups.setdefault((h["model"], h["corpus"], h.get("tag", "")), {}).setdefault(h["split"], []).append(r)
    out = []
    for (model, corpus, tag), splits in sorted(groups.items()):
        pos = {sp: [r for r in rs if "pred" in r] for sp, rs in splits.items()}
        selectors = sorted({s for rs in pos.values() for r in rs for s in r["pred"]})
        for sel in selectors:
            entry = {"model": model, "corpus": corpus, "tag": tag, "params": sel, "points": {}, "sq": {}, "seconds": {}}
            keys = sorted({k for rs in pos.values() for r in rs if sel in r["pred"] for k in r["pred"][sel]},
                          key=lambda k: (k.split("=")[0], float(k.split("=")[1])))
            for sp, rs in pos.items():
                srs = [r for r in rs if sel in r["pred"]]
                entry["sq"][sp] = percentiles([r["sq"][sel] for r in srs])
                entry["points"][sp] = {k: row(report_for(srs, sel, k)) for k in keys}
                if srs:
                    entry["seconds"][sp] = {"grad_median": statistics.median(r["grad_s"] for r in srs),
                                            "cpu_per_position_median": statistics.median(r.get("cpu_s", 0) for r in srs),
                                            "refined_forward_median": statistics.median(r["fwd_s"][sel] for r in srs)}
                n_windows = [r for r in splits[sp] if "tokens" in r]
                entry.setdefault("windows", {})[sp] = {"tokens": sum(r["tokens"] for r in n_windows),
                                                       "uncertain": sum(r["uncertain"] for r in n_windows)}
                checks = [r["check"] for r in srs if "check" in r]
                if checks:
                    entry.setdefault("library_check", {})[sp] = {"agree": sum(c["agree"] for c in checks),
                                                                 "total": sum(c["total"] for c in checks)}
            if "dev" in entry["points"]:
                entry["chosen"] = {}
                for rule in ("lr", "tau"):
                    cand = [k for k in keys if k.startswith(rule + "=")]
                    if not cand:
                        continue
                    best = max(cand, key=lambda k: (entry["points"]["dev"][k]["delta_corr"], -entry["points"]["dev"][k]["p"]))
                    entry["chosen"][rule] = {"key": best, "dev": entry["points"]["dev"][best],
                                             "test": entry["points"].get("test", {}).get(best)}
            out.append(entry)
    return {"entries": out}


def shown(selector: str) -> str:
    """A selector as a markdown table cell (``a|b`` patterns as ``a, b``)."""
    return selector.replace("|", ", ")


def markdown(result: dict) -> str:
    """The tables of EVIDENCE.md: ||g||^2 spread, every point on dev/test, the dev choice and its transfer."""
    lines = []
    entries = result["entries"]
    sq = [e for e in entries if any(v.get("n") for v in e["sq"].values())]
    lines += ["### ||g||^2 over uncertain tokens", "",
              "| model | corpus | params | split | n | min | p5 | p25 | median | p75 | p95 | max |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in sq:
        for sp, v in e["sq"].items():
            if v.get("n"):
                lines.append(f"| {e['model']} | {e['corpus']} | {shown(e['params'])} | {sp} | {v['n']} | " +
                             " | ".join(f"{v[k]:.3g}" for k in ("min", "p5", "p25", "median", "p75", "p95", "max")) + " |")
    for e in entries:
        if not any(e["points"].get(sp) for sp in e["points"]):
            continue
        keys = list(next(iter(e["points"].values())).keys())
        lines += ["", f"### {e['model']} / {e['corpus']} / params={shown(e['params'])}", "",
                  "| step | dev Δ_Corr (w→c:c→w) | dev p | test Δ_Corr (w→c:c→w) | test p |", "|---|---:|---:|---:|---:|"]
        for k in keys:
            d, t = e["points"].get("dev", {}).get(k), e["points"].get("test", {}).get(k)
            cell = lambda r: (f"{r['delta_corr']:+d} of {r['n']} ({r['w2c']}:{r['c2w']}) | {r['p']:.2g}"  # noqa: E731
                              if r else "– | –")
            lines.append(f"| {k} | {cell(d)} | {cell(t)} |")
        for rule, c in e.get("chosen", {}).items():
            t = c["test"]
            lines.append(f"\nchosen on dev ({rule}): **{c['key']}**" + (
                f" → test {t['delta_corr']:+d} of {t['n']} ({t['w2c']}:{t['c2w']}), p = {t['p']:.2g}" if t else ""))
        sec = e.get("seconds", {})
        if sec:
            s0 = next(iter(sec.values()))
            lines.append(f"\nmedian seconds per position (shared machine, wall): gradient {s0['grad_median']:.3f}, "
                         f"one refined forward {s0['refined_forward_median']:.3f}")
        chk = e.get("library_check")
        if chk:
            lines.append("\nlibrary path check (eval_text.refine_position, same emitted token): " +
                         ", ".join(f"{sp} {v['agree']}/{v['total']}" for sp, v in chk.items()))
    lines += ["", pooled_table(entries), "", transfer_table(entries)]
    return "\n".join(lines) + "\n"


def pooled_table(entries: Sequence[dict]) -> str:
    """Per model/params/point: flips summed over every corpus, per split and over both, with the share changed."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        if any(e["points"].get(sp) for sp in e["points"]):
            groups.setdefault((e["model"], e["params"], e["tag"]), []).append(e)
    for (model, params, _), es in groups.items():
        corpora = ", ".join(e["corpus"] for e in es)
        out += ["", f"### pooled over {corpora} ({model}, params={shown(params)})", "",
                "| step | dev Δ_Corr (p) | test Δ_Corr (p) | dev+test Δ_Corr (w→c:c→w, p) | argmax changed |",
                "|---|---:|---:|---:|---:|"]
        keys = list(next(iter(es[0]["points"].values())).keys())
        for k in keys:
            tot = {}
            for sp in ("dev", "test"):
                rs = [e["points"].get(sp, {}).get(k) for e in es]
                rs = [r for r in rs if r]
                tot[sp] = [sum(r[f] for r in rs) for f in ("w2c", "c2w", "w2w", "n")]
            both = [a + b for a, b in zip(tot["dev"], tot["test"])]
            cell = lambda t: f"{t[0] - t[1]:+d}/{t[3]} ({mcnemar(t[0], t[1]):.2g})"  # noqa: E731
            changed = (both[0] + both[1] + both[2]) / both[3] if both[3] else float("nan")
            out.append(f"| {k} | {cell(tot['dev'])} | {cell(tot['test'])} | {both[0] - both[1]:+d}/{both[3]} "
                       f"({both[0]}:{both[1]}, {mcnemar(both[0], both[1]):.2g}) | {100 * changed:.1f} % |")
    return "\n".join(out)


def transfer_table(entries: Sequence[dict]) -> str:
    """For each model/params with several corpora: the step chosen on one corpus's dev, applied to every test split."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        if "chosen" in e:
            groups.setdefault((e["model"], e["params"], e["tag"]), []).append(e)
    for (model, params, _), es in groups.items():
        if len(es) < 2:
            continue
        for rule in ("lr", "tau"):
            if not all(rule in e["chosen"] for e in es):
                continue
            out += ["", f"### transfer of the dev choice ({model}, params={shown(params)}, rule {rule})", "",
                    "| chosen on (dev) | step | " + " | ".join(f"test {e['corpus']}" for e in es) + " | pooled test |",
                    "|---|---|" + "---:|" * (len(es) + 1)]
            for src in es:
                key = src["chosen"][rule]["key"]
                cells, w2c, c2w, n = [], 0, 0, 0
                for e in es:
                    r = e["points"].get("test", {}).get(key)
                    if r:
                        cells.append(f"{r['delta_corr']:+d}/{r['n']} (p {r['p']:.2g})")
                        w2c, c2w, n = w2c + r["w2c"], c2w + r["c2w"], n + r["n"]
                    else:
                        cells.append("–")
                out.append(f"| {src['corpus']} | {key} | " + " | ".join(cells) +
                           f" | {w2c - c2w:+d}/{n} (p {mcnemar(w2c, c2w):.2g}) |")
    return "\n".join(out)


def mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b vs c discordant flips (as FocusReport computes it)."""
    rep = FocusReport()
    rep.add_outcomes(torch.tensor([1] * b + [0] * c), torch.tensor([0] * (b + c)), torch.tensor([1] * (b + c)))
    return rep.p_value


def summary(args) -> int:
    """Print and write the summary of the given record files."""
    result = summarize([Path(p) for p in args.records])
    for e in result["entries"]:
        print(f"\n== {e['model']} / {e['corpus']} / {e['tag']} / {e['params']}")
        for sp, sq in e["sq"].items():
            if sq.get("n"):
                print(f"  ||g||^2 {sp}: n={sq['n']} p5={sq['p5']:.3g} median={sq['median']:.3g} p95={sq['p95']:.3g}")
        for sp, pts in e["points"].items():
            print(f"  {sp}: " + "  ".join(f"{k}:{v['delta_corr']:+d}(p={v['p']:.2g})" for k, v in pts.items()))
        for rule, c in e.get("chosen", {}).items():
            t = c["test"]
            print(f"  chosen {rule} on dev: {c['key']} dev {c['dev']['delta_corr']:+d}/{c['dev']['n']}"
                  + (f", test {t['delta_corr']:+d}/{t['n']} ({t['w2c']}:{t['c2w']}, p={t['p']:.3g})" if t else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``run`` or ``summary``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default=SMOLLM2)
    r.add_argument("--corpus", default="wiki", help="comma-separated: wiki, shakespeare, kjv (assets.py), jargon")
    r.add_argument("--split", default="dev,test", help="comma-separated: dev, test, all")
    r.add_argument("--selectors", default="last:2", help="comma-separated; a pattern list as a|b|c")
    r.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2")
    r.add_argument("--taus", default="0.1,0.3,1,3,10,30")
    r.add_argument("--mode", default="ifo", choices=("ifo", "dofo"))
    r.add_argument("--threshold", type=float, default=0.04)
    r.add_argument("--context-length", type=int, default=128)
    r.add_argument("--max-uncertain", type=int, default=1000)
    r.add_argument("--check", type=int, default=0, help="recompute the first K positions with the library path")
    r.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    r.add_argument("--resume", action="store_true")
    r.add_argument("--log", default=None)
    r.add_argument("--tag", default="grid", help="part of the output file names")
    r.add_argument("--out", required=True, help="output folder")
    s = sub.add_parser("summary")
    s.add_argument("records", nargs="+")
    s.add_argument("--out", default=None, help="JSON with every number")
    s.add_argument("--markdown", default=None, help="the tables as markdown")
    args = p.parse_args(argv)
    return run(args) if args.cmd == "run" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
