"""`focus-decoding tune` at scale on the three offline corpora, and the README's text results table.

    python benchmarks/assets.py --install          # once: the corpora, pinned by sha256
    OMP_NUM_THREADS=1 python benchmarks/tune_corpora.py --out docs/results/tune      # ~18 min per corpus, one core
    python benchmarks/tune_corpora.py --out docs/results/tune --table-only           # rebuild the table only

For each corpus it runs (unless ``OUT/<corpus>/tune.json`` already exists; ``--force`` reruns)

    focus-decoding tune --dataset <corpus>.jsonl --out OUT/<corpus> --modes MODES --params PARAMS
        --lrs 1e-4,1e-3 --taus 0.3,1 --dev-max-uncertain 1000 --test-max-uncertain 5000 [--exhaustive]

(``--modes`` default ifo, ``--params`` default last:2, ``--model`` an asset model, ``--race`` instead of
``--exhaustive``)

(an interrupted corpus continues with ``--resume``), then writes ``OUT/corpora.md``: per corpus the dev
Δ_Corr of every candidate, the choice, its test Δ_Corr, flips, Δ_Acc, p-value and verdict, and what the
stop-early race would have chosen on the same dev outcomes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CORPORA = ("wiki", "kjv", "shakespeare")
GRID = ["--lrs", "1e-4,1e-3", "--taus", "0.3,1", "--dev-max-uncertain", "1000", "--test-max-uncertain", "5000"]
Z95 = 1.959964  # two-sided 95 % normal quantile


def run_tune(corpus_file: Path, out: Path, force: bool, extra: list[str]) -> None:
    """One `tune` run through the command line, resumed if a partial run is there."""
    if (out / "tune.json").exists() and not force:
        print(f"{out}: done already (--force reruns)", flush=True)
        return
    cmd = [sys.executable, "-m", "focus_decoding.cli", "tune", "--dataset", str(corpus_file), "--out", str(out),
           *GRID, *extra]
    if force:
        cmd.append("--overwrite")
    elif (out / "partial.json").exists():
        cmd.append("--resume")
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def row(corpus: str, result: dict) -> str:
    """One table row from a tune.json."""
    labels = [c["label"] for c in result["candidates"]]
    dev = [c["dev"]["delta_corr"] for c in result["candidates"]]
    choice, race = result["choice"], result["race_choice"]
    dev_cells = " / ".join(f"**{d:+d}**" if i == choice else f"{d:+d}" for i, d in enumerate(dev))
    test = result["test"]
    race_cell = labels[race] + (" (same)" if race == choice else "")
    return (f"| {corpus} | {dev_cells} | {labels[choice]} | {test['delta_corr']:+d} ({test['wrong_to_correct']} : "
            f"{test['correct_to_wrong']}) of {test['n_uncertain']} | {test['delta_acc']:+.2f} pp | "
            f"{test['p_value']:.2g} | {result['verdict']['kind']} | {race_cell} |")


def table(out: Path) -> str:
    """The markdown table of every finished corpus under ``out``."""
    done = [(c, json.loads((out / c / "tune.json").read_text())) for c in CORPORA if (out / c / "tune.json").exists()]
    if not done:
        raise SystemExit(f"no finished tune run under {out}")
    labels = " / ".join(c["label"] for c in done[0][1]["candidates"])
    lines = [f"| corpus | dev Δ_Corr of {done[0][1]['data']['dev_uncertain']}: {labels} | chosen (dev) | "
             "test Δ_Corr (w→c : c→w) | Δ_Acc on uncertain | p | verdict | race's choice |",
             "|---|---|---|---:|---:|---:|---|---|"]
    lines += [row(c, r) for c, r in done]
    return "\n".join(lines) + "\n\n" + pooled_line([r["test"] for _, r in done]) + "\n"


def families_table(dirs: dict[str, Path]) -> str:
    """One compact table over several models' runs (``{model label: its OUT}``): per model x corpus the chosen
    setting and its test result, then per model the pooled Δ_Acc with its 95 % interval."""
    lines = ["| model | corpus | chosen on dev | test Δ_Corr (w→c : c→w) | Δ_Acc on uncertain | p | verdict |",
             "|---|---|---|---:|---:|---:|---|"]
    pooled = []
    for model, out in dirs.items():
        done = [(c, json.loads((out / c / "tune.json").read_text())) for c in CORPORA if (out / c / "tune.json").exists()]
        for corpus, r in done:
            t = r["test"]
            lines.append(f"| {model} | {corpus} | {r['chosen_label']} | {t['delta_corr']:+d} ({t['wrong_to_correct']} : "
                         f"{t['correct_to_wrong']}) of {t['n_uncertain']} | {t['delta_acc']:+.2f} pp | "
                         f"{t['p_value']:.2g} | {r['verdict']['kind']} |")
        if done:
            pooled.append(f"- {model}: " + pooled_line([r["test"] for _, r in done]))
    return "\n".join(lines) + "\n\n" + "\n".join(pooled) + "\n"


def pooled_line(tests: list[dict]) -> str:
    """The chosen settings' test tokens of every corpus together: Δ_Acc on uncertain tokens with its 95 % interval.

    Per token d is +1 (wrong -> right), -1 (right -> wrong) or 0; Δ_Acc = 100 mean(d), and the interval is the
    normal one for a paired mean, 100 (mean(d) +- 1.96 sqrt(var(d) / n)) with var(d) = (b + c) / n - mean(d)^2.
    """
    b = sum(t["wrong_to_correct"] for t in tests)
    c = sum(t["correct_to_wrong"] for t in tests)
    n = sum(t["n_uncertain"] for t in tests)
    mean = (b - c) / n
    half = Z95 * (((b + c) / n - mean ** 2) / n) ** 0.5
    return (f"pooled over {len(tests)} corpora: Δ_Corr {b - c:+d} ({b} : {c}) of {n} uncertain test tokens; "
            f"Δ_Acc {100 * mean:+.2f} points, 95 % CI [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results/tune"))
    parser.add_argument("--corpora", default=",".join(CORPORA), help=f"comma-separated subset of {CORPORA}")
    parser.add_argument("--force", action="store_true", help="rerun corpora that already have a tune.json")
    parser.add_argument("--table-only", action="store_true", help="only rebuild OUT/corpora.md")
    parser.add_argument("--model", default=None, help="an asset model of benchmarks/assets.py (default: the embedded "
                        "SmolLM2-135M)")
    parser.add_argument("--modes", default="ifo", help="comma-separated modes to race (default ifo)")
    parser.add_argument("--race", action="store_true", help="the stop-early race instead of the exhaustive sweep")
    parser.add_argument("--params", default="last:2", help="comma-separated selectors to race (default last:2)")
    parser.add_argument("--families", help="only print one table over several runs: LABEL=DIR,LABEL=DIR,...")
    args = parser.parse_args(argv)
    if args.families:
        print(families_table({k: Path(v) for k, v in (item.split("=", 1) for item in args.families.split(","))}))
        return
    chosen = [c.strip() for c in args.corpora.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CORPORA))
    if unknown:
        parser.error(f"unknown corpora {unknown}; allowed: {list(CORPORA)}")
    if not args.table_only:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import assets  # the pinned corpora; a missing or altered file is an error, never a silent rebuild

        extra = ["--modes", args.modes, "--params", args.params] + ([] if args.race else ["--exhaustive"])
        if args.model:
            extra += ["--model", str(assets.model_path(args.model))]
        for corpus in chosen:
            run_tune(assets.corpus_path(corpus), args.out / corpus, args.force, extra)
    text = table(args.out)
    (args.out / "corpora.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
