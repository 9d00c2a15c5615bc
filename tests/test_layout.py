"""The package's shape: imports run one way, no private names cross modules, 0.2's import paths still work."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import focus_decoding
from focus_decoding import _compat

ROOT = Path(focus_decoding.__file__).parent
# each room and the rooms it may import from (the layers of ARCHITECTURE.md); "" = the package's top modules
ALLOWED = {
    "config": set(), "resources": set(), "method": {"config"},
    "text": {"config", "method", "resources"}, "vision": {"config", "method", "resources"},
    "evaluation": {"config", "method", "resources", "text", "vision"},
    "tune": {"config", "method", "resources", "text", "evaluation"},
    "cli": {"config", "method", "resources", "text", "vision", "evaluation", "tune"},
}


def room(module: str) -> str:
    """``focus_decoding.text.ways_in`` -> ``text``; ``focus_decoding.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path):
    """(imported module, imported names) of every import in a file, relative ones resolved (package files)."""
    inside = ROOT in path.parents
    package = ".".join(("focus_decoding", *path.relative_to(ROOT).with_suffix("").parts)) if inside else ""
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + "._"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            yield base, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def package_files():
    return [p for p in ROOT.rglob("*.py") if "custom_generate" not in p.parts and p.name != "_compat.py"
            and p.relative_to(ROOT).parts[0] not in ("harness.py", "__init__.py")]


@pytest.mark.parametrize("path", package_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    mine = path.relative_to(ROOT).parts[0].removesuffix(".py")
    for module, names in imports(path):
        if not module.startswith("focus_decoding"):
            continue
        targets = [module] if module != "focus_decoding" else [f"focus_decoding.{n}" for n in names]
        for target in targets:
            other = room(target)
            assert other == mine or other in ALLOWED[mine], f"{path.relative_to(ROOT)} imports {target}"


@pytest.mark.parametrize("path", [*package_files(), *(ROOT.parent / "benchmarks").glob("*.py"),
                                  *(ROOT.parent / "examples").glob("*.py")], ids=lambda p: p.name)
def test_no_private_name_crosses_a_module(path):
    for module, names in imports(path):
        if module.startswith("focus_decoding"):
            private = [n for n in names if n.startswith("_")] + [p for p in module.split(".") if p.startswith("_")]
            assert not private, f"{path.name} imports {private} from {module}"


@pytest.mark.parametrize("old, names", [
    ("core", ["module_view", "focus_step", "split_parameters", "sgd_steps", "model_forward", "top2_gap"]),
    ("prefix", ["top_forward", "HiddenRecorder", "prefix_blocks"]),
    ("generation", ["FocusLogitsProcessor", "FocusStats"]),
    ("decoding", ["enable", "focus_generate", "generate", "last_focus_stats", "set_focus_config"]),
    ("models", ["tiny_causal_lm", "load_default_model", "load_causal_lm"]),
    ("data", ["load_texts", "split_dev_test"]), ("report", ["FocusReport", "markdown_table", "CO_WR"]),
    ("eval_text", ["evaluate_next_token", "tokenize_stream", "refine_position"]),
    ("eval_vision", ["evaluate_classifier"]), ("tuning", ["tune", "Race", "candidate_grid"]),
    ("metric", ["load"]), ("gradcam", ["gradcam_pairs"]), ("vision_real", ["MNISTNet", "load_image_dataset"]),
])
def test_the_import_paths_of_0_2_still_work(old, names):
    module = importlib.import_module(f"focus_decoding.{old}")
    assert module is importlib.import_module(f"focus_decoding.{_compat.OLD_PATHS[old]}")  # one module, two names
    for name in names:
        assert hasattr(module, name), f"focus_decoding.{old}.{name}"


def test_every_name_of_the_top_level_resolves():
    for name in focus_decoding.__all__:
        assert getattr(focus_decoding, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        focus_decoding.nothing  # noqa: B018


def test_importing_the_package_and_the_command_line_imports_nothing_heavy():
    code = "import sys, focus_decoding, focus_decoding.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"  # so the command line's Ctrl-C handler is in place before the slow imports
