"""What every command job shares: user errors, the model, checks made before a run, devices, result files.

Each job (``cli.generate``, ``cli.eval_text``, ``cli.eval_vision``, ``cli.tune``) checks everything a
user can get wrong before the slow part starts, so a bad input costs seconds and never a traceback:
``check_out_dir``, then the data, then ``load_model`` and ``check_model_fits``. Partial files,
fingerprints and finished results are ``cli.resumable``'s.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import method
from ..config import FocusConfig
from ..evaluation.report import FocusReport, jsonable, markdown_table
from ..resources import models
from ..resources.models import DEFAULT_MODEL, TINY_MODELS, is_embedded

WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # launcher env vars
MODEL_CHOICES = (f"{DEFAULT_MODEL} (default), {', '.join(TINY_MODELS)}, a model folder, a .gguf file, "
                 "or a Hugging Face hub id")


class CliError(ValueError):
    """A user error reported as one line with exit code 2."""


# ----------------------------------------------------------------------------- the model
def load_model(spec: str | None = None, *, device: str | torch.device = "cpu", seed: int = 0):
    """(model, tokenizer): None = embedded SmolLM2-135M; ``tiny-llama|gpt2|qwen2|gemma3``; else a HF id, folder or .gguf."""
    try:
        if is_embedded(spec):
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
    return DEFAULT_MODEL if is_embedded(spec) else source_identity(spec)


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
    limit = models.position_limit(model)
    if limit is not None and n_positions > limit[0]:
        raise CliError(f"{what} needs {n_positions} positions but the model has {limit[0]} (config.{limit[1]}); "
                       f"allowed: at most {limit[0]}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n_classes = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if n_classes is not None and config.n_focus >= n_classes:
        raise CliError(f"--n-focus {config.n_focus} is not below the model's {n_classes} classes; "
                       f"allowed: 1..{n_classes - 1}")
    method.split_parameters(model, config.params)  # raises ValueError naming the pattern that matches nothing


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


def process_group():
    """The launched processes (``evaluation.group``): accelerate's process group when there are several, else one.
    A launcher that was asked for several processes but started one is refused, saying why."""
    from ..evaluation.group import Group, current_group

    if world_size() <= 1:
        asked = launcher_processes()
        if asked > 1:
            raise CliError(f"the launcher was asked for {asked} processes but started one: accelerate launch --cpu runs "
                           "a single process whatever --num_processes says; for several CPU processes use accelerate "
                           f"launch --multi_gpu --num_processes {asked} ... --device cpu (gloo), or torchrun "
                           f"--nproc_per_node {asked} -m focus_decoding.cli ...")
        return Group()
    partial_state()  # initialises torch.distributed (gloo on CPU)
    return current_group()


def launcher_processes() -> int:
    """--num_processes of an ``accelerate launch`` that started this process (Linux: its command line), else 1."""
    try:
        words = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return 1
    if "launch" not in words or not any(w.endswith("accelerate") or "accelerate" in w for w in words[:3]):
        return 1
    for flag in ("--num_processes", "--num-processes"):
        if flag in words[:-1]:
            try:
                return int(words[words.index(flag) + 1])
            except ValueError:
                return 1
    return 1


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
    from . import figures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"summaries": [r.summary() for r in reports], "reports": [r.to_dict() for r in reports], **(extra or {})}
    (out / f"{stem}.json").write_text(json.dumps(jsonable(payload), indent=2))
    (out / f"{stem}.md").write_text(markdown_table(reports) + "\n")
    figures.plot_report(reports[-1], out / f"{stem}.png")
    return out / f"{stem}.json"


def print_summary(r: FocusReport) -> None:
    """One line of the report's headline measures."""
    print(f"scored {r.n_total} predictions, {r.n_uncertain} uncertain ({100 * r.fraction_uncertain:.1f}%); "
          f"accuracy {r.base_accuracy:.2f}% -> {r.focus_accuracy:.2f}%; Δ_Corr {r.delta_corr:+d} "
          f"(wr→co {r.wrong_to_correct}, co→wr {r.correct_to_wrong}), p={r.p_value:.3g}; {r.seconds:.1f}s")
