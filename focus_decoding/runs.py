"""What every command job shares: user errors, the model, checks made before a run, result and partial files.

Each job (``cli_generate``, ``cli_eval_text``, ``cli_eval_vision``) checks everything a user can get
wrong before the slow part starts, so a bad input costs seconds and never a traceback:
``check_out_dir``, then the data, then ``load_model`` and ``check_model_fits``. Long runs keep their
progress in a partial file (``save_partial``) together with a fingerprint of everything that defines
the run (``config_fingerprint`` + the job's own fields); ``load_partial`` refuses to continue a
different run and names the field that differs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .config import FocusConfig
from .report import FocusReport, jsonable, markdown_table

TINY_MODELS = ("tiny-llama", "tiny-gpt2", "tiny-qwen2")
DEFAULT_MODEL = "smollm2-135m"  # what --model means when it is not given
PARTIAL = "partial{suffix}.json"
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # launcher env vars
MODEL_CHOICES = (f"{DEFAULT_MODEL} (default), {', '.join(TINY_MODELS)}, a model folder, a .gguf file, "
                 "or a Hugging Face hub id")


class CliError(ValueError):
    """A user error reported as one line with exit code 2."""


# ----------------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded_int(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (0 = no limit)."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return value


def lr_grid(text: str) -> list[float]:
    """argparse type: comma-separated finite learning rates > 0."""
    try:
        grid = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated learning rates such as 1e-5,1e-4, got {text!r}")
    if len(grid) < 1 or any(not math.isfinite(x) or x <= 0 for x in grid):
        raise argparse.ArgumentTypeError(f"learning rates must be finite and > 0, got {text!r}")
    return grid


# ----------------------------------------------------------------------------- the model
def is_default_model(spec: str | None) -> bool:
    """``--model`` names the embedded SmolLM2-135M (or is not given)."""
    return spec in (None, "", "default", DEFAULT_MODEL)


def load_model(spec: str | None = None, *, device: str | torch.device = "cpu", seed: int = 0):
    """(model, tokenizer): None = embedded SmolLM2-135M; ``tiny-llama|gpt2|qwen2``; else a HF id, folder or .gguf."""
    from . import models

    try:
        if is_default_model(spec):
            model, tokenizer = models.load_default_model()
        elif spec in TINY_MODELS:
            tokenizer = models.char_tokenizer()
            model = models.tiny_causal_lm(spec[5:], vocab_size=len(tokenizer), seed=seed)
        else:
            model, tokenizer = models.load_causal_lm(spec)
    except (OSError, ValueError) as err:
        raise CliError(f"--model: {err}; allowed: {MODEL_CHOICES}") from err
    return model.to(device).eval(), tokenizer


def model_identity(spec: str | None) -> str:
    """What ``--model`` denotes, stable across working directories: the absolute path of a local model."""
    return DEFAULT_MODEL if is_default_model(spec) else source_identity(spec)


def dataset_identity(spec: str | None) -> str:
    """What ``--dataset`` denotes, stable across working directories: the absolute path of a local file."""
    return "bundled-sample" if spec is None else source_identity(spec)


def source_identity(spec: str) -> str:
    """A local path made absolute; anything else (a hub name) as it is."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def check_model_fits(model, config: FocusConfig, n_positions: int, what: str) -> None:
    """Refuse, before the run, an input longer than the model's positions, a focus set as large as its
    vocabulary, and a ``--params`` selector that matches none of its parameters."""
    from . import core
    from .models import position_limit

    limit = position_limit(model)
    if limit is not None and n_positions > limit[0]:
        raise CliError(f"{what} needs {n_positions} positions but the model has {limit[0]} (config.{limit[1]}); "
                       f"allowed: at most {limit[0]}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n_classes = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if n_classes is not None and config.n_focus >= n_classes:
        raise CliError(f"--n-focus {config.n_focus} is not below the model's {n_classes} classes; "
                       f"allowed: 1..{n_classes - 1}")
    core.split_parameters(model, config.params)  # raises ValueError naming the selector that matches nothing


# ----------------------------------------------------------------------------- devices and processes
def resolve_device(name: str) -> torch.device:
    """``auto``: the accelerate process device when launched, else CUDA when present, else CPU; others checked."""
    if name == "auto":
        if world_size() > 1:
            return partial_state().device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:  # torch's message lists every device type it knows: too long for one line
        raise CliError(f"--device {name!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps") from err
    count = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}.get(device.type)
    if count == 0:
        raise CliError(f"--device {name!r}: this machine has no {device.type} device; allowed: auto, cpu")
    if count is not None and device.index is not None and device.index >= count:
        raise CliError(f"--device {name!r}: this machine has {count} {device.type} device(s); "
                       f"allowed: {device.type}:0..{device.type}:{count - 1}")
    return device


def world_size() -> int:
    """Number of processes the launcher (accelerate, torchrun, MPI) started; 1 when run directly."""
    return max(int(os.environ.get(v, "1")) for v in WORLD_SIZE_VARS)


def partial_state():
    """accelerate's process state; on machines without CUDA (or with --device cpu) it must be told ``cpu=True``."""
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=cpu)


def process_group() -> tuple[int, int]:
    """(rank, world size) from accelerate when launched with several processes, else (0, 1)."""
    if world_size() <= 1:
        return 0, 1
    state = partial_state()
    return state.process_index, state.num_processes


# ----------------------------------------------------------------------------- result files
def check_out_dir(out: str | os.PathLike | None) -> Path | None:
    """``--out`` as a Path after proving a file can be created there; refused before any work is done."""
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {str(out)!r} is an existing file; allowed: a folder (created when missing)")
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder that would hold the new ones
    if not existing.is_dir():
        raise CliError(f"--out {str(out)!r} lies under the file {str(existing)!r}; allowed: a folder")
    try:
        tempfile.NamedTemporaryFile(dir=existing).close()  # a real name: O_TMPFILE fails oddly on /proc
    except OSError as err:
        raise CliError(f"--out {str(out)!r} cannot be written ({err.strerror or err} in {str(existing)!r}); "
                       "allowed: a writable folder") from err
    return path


def run_metadata(seed: int | None = None, device: Any = "cpu", **extra: Any) -> dict[str, Any]:
    """Library versions, seed, device, date and host: stored with every result file."""
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for name in ("accelerate", "datasets", "torchvision", "focus_decoding"):
        try:
            versions[name] = __import__(name).__dict__.get("__version__", "unknown")
        except ImportError:
            pass
    try:
        from importlib.metadata import version
        versions["focus_decoding"] = version("focus-decoding")
    except Exception:  # not installed as a distribution: keep what the module says
        pass
    return {"versions": versions, "seed": seed, "device": str(device), "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), **extra}


def write_results(out: str | Path, stem: str, reports: Sequence[FocusReport], extra: dict | None = None) -> Path:
    """``stem``.json (every number), ``stem``.md (the method's table) and ``stem``.png into ``out``."""
    from . import plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"summaries": [r.summary() for r in reports], "reports": [r.to_dict() for r in reports], **(extra or {})}
    (out / f"{stem}.json").write_text(json.dumps(jsonable(payload), indent=2))
    (out / f"{stem}.md").write_text(markdown_table(reports) + "\n")
    plots.plot_report(reports[-1], out / f"{stem}.png")
    return out / f"{stem}.json"


def print_summary(r: FocusReport) -> None:
    """One line of the report's headline measures."""
    print(f"scored {r.n_total} predictions, {r.n_uncertain} uncertain ({100 * r.fraction_uncertain:.1f}%); "
          f"accuracy {r.base_accuracy:.2f}% -> {r.focus_accuracy:.2f}%; Δ_Corr {r.delta_corr:+d} "
          f"(wr→co {r.wrong_to_correct}, co→wr {r.correct_to_wrong}), p={r.p_value:.3g}; {r.seconds:.1f}s")


# ----------------------------------------------------------------------------- partial files (Ctrl-C, --resume)
def partial_path(out: Path, rank: int = 0, world: int = 1) -> Path:
    """This process's partial file in ``out``: ``partial.json``, or ``partial.rankR.json`` under several processes."""
    return out / PARTIAL.format(suffix=f".rank{rank}" if world > 1 else "")


def check_partials(out: Path | None, *, resume: bool, overwrite: bool, world: int = 1) -> list[Path]:
    """The partial files in ``out``; refuses a run that would silently replace them, or resume from foreign ones."""
    if out is None or not out.is_dir():
        return []
    found = sorted(out.glob(PARTIAL.format(suffix="*")))
    names = ", ".join(p.name for p in found)
    if found and not resume and not overwrite:
        raise CliError(f"{out} holds unfinished results ({names}); pass --resume to continue them, or remove "
                       f"them (or pass --overwrite) to start over")
    expected = {partial_path(out, r, world) for r in range(world)}
    if resume and found and not set(found) <= expected:
        raise CliError(f"--resume: {out} holds {names}, written by a run with a different number of processes; "
                       f"this run has {world} (expects {', '.join(sorted(p.name for p in expected))})")
    return found


def config_fingerprint(config: FocusConfig) -> dict[str, Any]:
    """The method's settings keyed by their command-line option (``--lr``, ``--n-focus``, ...)."""
    return {f"--{name.replace('_', '-')}": value for name, value in config.to_dict().items()}


def fingerprint(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that defines a run, keyed by what the user would change, JSON-normalised so a saved
    copy compares equal to a fresh one."""
    return json.loads(json.dumps(jsonable(dict(fields))))


def save_partial(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (a JSON-able dict holding a ``fingerprint``) atomically: an interrupt keeps the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jsonable(dict(state))))
    tmp.replace(path)


def load_partial(path: Path, run_fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The saved state at ``path`` (None if there is none); ``CliError`` naming the file or the field that differs."""
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        saved = state["fingerprint"]
        if not isinstance(saved, dict):
            raise TypeError("fingerprint is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = f"missing {err}" if isinstance(err, KeyError) else " ".join(str(err).split())
        raise CliError(f"--resume: {path} is not a readable partial-results file ({reason}); remove it to start "
                       "over") from err
    for field in dict.fromkeys([*run_fingerprint, *saved]):  # this run's order first
        old, new = saved.get(field, "(not recorded)"), run_fingerprint.get(field, "(not set)")
        if old != new:
            raise CliError(f"--resume: {path} was written with {field} {_shown(old)}, this run has {_shown(new)}; "
                           "rerun with the same settings, or drop --resume and pass --overwrite to start over")
    return state


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)
