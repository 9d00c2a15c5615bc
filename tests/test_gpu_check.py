"""``benchmarks/gpu_check.py --device cpu --quick``: the script a first GPU runs, run here so it cannot rot."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.default_model
def test_gpu_check_runs_on_cpu_and_its_numbers_say_what_they_claim(tmp_path, default_model):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert set(sections) == {"exactness", "bf16", "refinement", "generation", "vision"}
    assert not [name for name, s in sections.items() if "error" in s]
    exact = sections["exactness"]
    assert exact["all_same_tokens"] and exact["worst_relative_diff"] < 1e-5  # float32 against float64
    assert all(c["step_moved_scores_by"] > 1e3 * c["max_abs_diff"] for c in exact["cases"])  # the step did something
    bf16 = sections["bf16"]
    assert abs(bf16["last:2 precision=float32"]["ratio"] - 1) < 0.05  # the step asked for is the step taken
    assert bf16["last:2 precision=model"]["ratio"] < 0.9  # in-dtype rounding loses part of it: what float32 fixes
    row = sections["refinement"]["rows"][0]
    assert row["tail_ms"] < row["last:2_ms"] < row["all_ms"]  # each path runs through less of the model
    gen = sections["generation"]["rows"]
    assert [r["batch"] for r in gen] == [1, 8] and all(r["plain_ms"] > 0 for r in gen)
    vision = sections["vision"]
    assert vision["batch"] == 8 and vision["plain_images_per_s"] > vision["loop_images_per_s"] > 0
    assert all(s["peak_memory_bytes"] > 0 and s["seconds"] > 0 for s in sections.values())
