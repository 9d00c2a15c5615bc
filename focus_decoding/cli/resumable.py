"""Runs that survive Ctrl-C and never lose a result: partial files, fingerprints, and finished results kept.

A long job (``eval-text``, ``tune``) writing into ``--out DIR`` keeps its progress in
``DIR/partial.json`` together with a *fingerprint*: everything that defines the run, keyed by the
option a user would change (the number of processes included). Under several processes the state is
the same on every one (``evaluation.group``): the first writes it, all read it. ``ResumableRun`` is the
one helper both jobs use:

- ``check()`` (before anything slow): unfinished partial files need ``--resume`` or ``--overwrite``;
- ``begin(fingerprint)``: a finished result with the same fingerprint means the run is already
  complete (say so, recompute nothing); a finished result of another run is refused naming the
  option that differs (``--overwrite`` replaces it); ``--resume`` loads the partial state, refusing
  a foreign one the same way;
- ``save(state)`` atomically (an interrupt keeps the previous file); ``finish()`` once the results are written.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import FocusConfig
from ..evaluation.report import jsonable
from . import common
from .argtypes import positive_int
from .common import CliError

PARTIAL = "partial.json"
OLD_PARTIALS = "partial.rank*.json"  # what 0.2 wrote per process
SHOWN_CHARS = 160  # a refusal stays one readable line: long values are shown by their difference


def partial_path(out: Path) -> Path:
    """The partial file in ``out``."""
    return out / PARTIAL


def config_fingerprint(config: FocusConfig) -> dict[str, Any]:
    """The method's settings keyed by their command-line option (``--lr``, ``--n-focus``, ...)."""
    return {f"--{name.replace('_', '-')}": value for name, value in config.to_dict().items()}


def fingerprint(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that defines a run, keyed by what the user would change, JSON-normalised so a saved
    copy compares equal to a fresh one."""
    return json.loads(json.dumps(jsonable(dict(fields))))


def save_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON atomically (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(dict(payload))))
    tmp.replace(path)


def first_difference(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """``"<option> <old>, this run has <new>"`` for the first field that differs (this run's order), else None."""
    for field in dict.fromkeys([*current, *saved]):
        old, new = saved.get(field, "(not recorded)"), current.get(field, "(not set)")
        if old != new:
            return f"{field} {_shown(old, new)}, this run has {_shown(new, old)}"
    return None


def _shown(value: Any, other: Any) -> str:
    """A value in at most ``SHOWN_CHARS``: a long list is shown by what it has that ``other`` lacks."""
    text = "none" if value is None else str(value)
    if len(text) <= SHOWN_CHARS:
        return text
    if isinstance(value, list) and isinstance(other, list):
        extra = [v for v in value if v not in other]
        text = f"{len(value)} entries, {len(extra)} not in the other" + (f", first {extra[0]}" if extra else "")
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


class Finished(Exception):
    """The run is already complete: its result file holds this very fingerprint."""

    def __init__(self, path: Path):
        super().__init__(f"{path} already holds the results of this very run; nothing to do "
                         "(pass --overwrite to compute them again)")
        self.path = path


@dataclass
class ResumableRun:
    """One job's files in ``out``: ``result`` (the finished results, holding a fingerprint) and the partial files."""

    out: Path | None
    result: str  # file name of the finished results in ``out``, e.g. "tune.json"
    resume: bool = False
    overwrite: bool = False
    rank: int = 0
    world: int = 1
    fingerprint: dict[str, Any] | None = None

    @property
    def path(self) -> Path | None:
        """The partial file (None without ``--out``)."""
        return None if self.out is None else partial_path(self.out)

    def check(self) -> None:
        """Refuse, before anything is loaded, what can be refused without the fingerprint."""
        if self.resume and self.overwrite:
            raise CliError("--resume continues the partial results in --out and --overwrite discards them; pass one")
        if self.resume and self.out is None:
            raise CliError("--resume needs --out DIR (where the partial results were written)")
        if self.out is None or not self.out.is_dir():
            return
        old = sorted(self.out.glob(OLD_PARTIALS))
        if old and not self.overwrite:
            raise CliError(f"{self.out} holds {', '.join(p.name for p in old)}, unfinished results of an earlier version "
                           "(one file per process) that this one cannot continue; pass --overwrite to start over")
        if partial_path(self.out).exists() and not self.resume and not self.overwrite:
            raise CliError(f"{self.out} holds unfinished results ({PARTIAL}); pass --resume to continue them, or "
                           "--overwrite to start over")

    def begin(self, fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
        """The partial state to continue from (``--resume``), or None to start; ``Finished`` when already done."""
        self.fingerprint = dict(fingerprint)
        if self.out is None:
            return None
        done = self.out / self.result
        if done.exists() and not self.overwrite:
            saved = _read(done, "results").get("meta", {}).get("fingerprint")
            if not isinstance(saved, dict):
                raise CliError(f"{done} holds results without a fingerprint (an older version's, or edited); pass "
                               "--overwrite to replace them, or choose another --out")
            diff = first_difference(saved, self.fingerprint)
            if diff is None:
                raise Finished(done)
            raise CliError(f"{done} holds the finished results of another run ({diff}); pass --overwrite to replace "
                           "them, or choose another --out")
        if self.overwrite:
            self.discard()
            return None
        if not self.resume or not self.path.exists():
            return None
        state = _read(self.path, "partial-results")
        saved = state.get("fingerprint")
        if not isinstance(saved, dict):
            raise CliError(f"--resume: {self.path} is not a readable partial-results file (no fingerprint); remove "
                           "it to start over")
        diff = first_difference(saved, self.fingerprint)
        if diff is not None:
            raise CliError(f"--resume: {self.path} was written with {diff}; rerun with the same settings, or drop "
                           "--resume and pass --overwrite to start over")
        return state

    def save(self, state: Mapping[str, Any]) -> None:
        """Keep ``state`` (with this run's fingerprint) in the partial file; the first process writes, nothing without
        ``--out``."""
        if self.path is not None and self.rank == 0:
            save_json(self.path, {**state, "fingerprint": self.fingerprint})

    def discard(self) -> None:
        """Remove the partial files (the first process; the others only read them)."""
        if self.out is None or not self.out.is_dir() or self.rank:
            return
        for p in (partial_path(self.out), *self.out.glob(OLD_PARTIALS)):
            p.unlink(missing_ok=True)

    def finish(self) -> None:
        """The results are written: the partial file goes."""
        if self.out is not None and self.rank == 0:
            partial_path(self.out).unlink(missing_ok=True)


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not an object")
    except (OSError, ValueError, TypeError) as err:
        raise CliError(f"{path} is not a readable {what} file ({' '.join(str(err).split())}); remove it or pass "
                       "--overwrite") from err
    return state


# ----------------------------------------------------------------------------- a resumable run on text
def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a run over a text set: the data, the window, and what to do with earlier results."""
    parser.add_argument("--dataset", default=None, help="text file/dir, or hub data set name (default: bundled sample)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max-texts", type=positive_int, default=None)
    parser.add_argument("--context-length", type=positive_int, default=128)
    parser.add_argument("--resume", action="store_true", help="continue from the partial results in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the partial or finished results in --out and start over")


@dataclass
class TextRun:
    """What a text job has once everything a user can get wrong was checked: files, data, model."""

    job: ResumableRun
    group: Any  # evaluation.group.Group: the launched processes
    texts: list[str]
    device: Any
    model: Any
    tokenizer: Any


def open_text_run(args: argparse.Namespace, result: str, configs: Sequence[FocusConfig], group) -> TextRun:
    """Check ``--out`` and earlier results, load the texts, then the model, and check every config against it:
    in that order, so a bad input costs seconds, never a model load. ``group``: the launched processes."""
    from ..resources.corpora import load_texts

    job = ResumableRun(common.check_out_dir(args.out), result, resume=args.resume, overwrite=args.overwrite,
                       rank=group.rank, world=group.world)
    job.check()
    texts = load_texts(args.dataset, split=args.split, max_texts=args.max_texts)  # before the slow model load
    if not any(t.strip() for t in texts):
        raise CliError(f"--dataset {args.dataset or 'bundled sample'!r} holds no text (empty or whitespace only); "
                       "allowed: files with some text")
    device = common.resolve_device(args.device)
    model, tokenizer = common.load_model(args.model, device=device, seed=args.seed)
    for config in configs:
        common.check_model_fits(model, config, args.context_length, f"--context-length {args.context_length}")
    return TextRun(job, group, texts, device, model, tokenizer)
