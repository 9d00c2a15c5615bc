"""Format result JSONs (CLI, experiments, bare or partial reports) as the method's markdown table.

    python benchmarks/table.py runs/*/eval_text.json runs/exp/exp_lr.json [--out table.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from focus_decoding.evaluation.report import FocusReport, markdown_table


def reports_in(data: Any) -> list[FocusReport]:
    """Every full report a result file holds, in file order."""
    if isinstance(data, dict) and "outcomes" in data and "n_total" in data:
        return [FocusReport.from_dict(data)]  # a bare FocusReport.to_dict()
    if isinstance(data, dict) and isinstance(data.get("reports"), list):
        return [FocusReport.from_dict(r) for r in data["reports"]]
    if isinstance(data, dict) and isinstance(data.get("report"), dict):
        return [FocusReport.from_dict(data["report"])]  # exp_topk, or a --resume partial file
    raise ValueError("no report found: expected a FocusReport dict or a JSON with 'reports' / 'report'")


def main(argv: Sequence[str] | None = None) -> int:
    """Print (or write with --out) one table row per report found in the given files."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="result JSON files")
    p.add_argument("--out", default=None, help="write the table to this markdown file")
    args = p.parse_args(argv)
    reports = []
    for name in args.files:
        try:
            reports += reports_in(json.loads(Path(name).read_text()))
        except (OSError, ValueError) as exc:
            print(f"table: error: {name}: {exc}", file=sys.stderr)
            return 2
    text = markdown_table(reports)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
