"""`focus-decoding eval-vision` and the whole image job `run_eval_vision`: load, evaluate, write files and figures.

``evaluation.evaluate_classifier`` returns reports; this module is where the vision job loads the
classifier and data by name, checks that they fit each other (one forward on one image, before the
run), and writes ``vision_reports.json``, the table and the top-k figures.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..config import FocusConfig
from ..evaluation.report import FocusReport, jsonable, markdown_table
from . import common as runs
from .argtypes import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The eval-vision command's own options."""
    parser.add_argument("--data", default=None, help="image data set spec: digits (default), mnist, mnist16, "
                        "mnist-{noise,blur,contrast,shot,impulse,motion,rotate,shear}-{1,2}, "
                        "or a folder / torchvision data set with --root")
    parser.add_argument("--root", default=None, help="folder of the image data set")
    parser.add_argument("--checkpoint", default=None, help="classifier checkpoint (digits CNN: default "
                        "~/.cache/focus_decoding/digits.pt, trained there on first use)")
    parser.add_argument("--train", action="store_true", help="digits CNN: train it (seconds) and save it at a "
                        "--checkpoint that does not exist yet")
    parser.add_argument("--weights", default=None, help="torchvision weights name for --model, e.g. DEFAULT")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--max-samples", type=positive_int, default=None)
    parser.add_argument("--gradcam", type=positive_int, default=None, metavar="N",
                        help="also write DIR/gradcam.png (+ gradcam.json): for the first N uncertain images, the GradCAM "
                             "map of the top class before and after the focus step (needs the grad-cam extra and --out)")


def run(args: argparse.Namespace, config: FocusConfig) -> int:
    """Run the vision evaluation and write its reports."""
    out = runs.check_out_dir(args.out)
    device = runs.resolve_device(args.device)
    name = args.model or "digits"
    _check_weights(name, args.weights)
    if args.train and name != "digits":
        raise runs.CliError(f"--train trains the digits CNN; --model {name} comes with its own weights")
    if args.gradcam:  # before the model loads: fail in seconds
        if out is None:
            raise runs.CliError("--gradcam N needs --out DIR (where gradcam.png is written)")
        from ..vision.gradcam import require_gradcam

        try:
            require_gradcam()
        except ImportError as err:
            raise runs.CliError(str(err)) from err
    try:
        model = load_model(name, weights=args.weights, checkpoint=args.checkpoint, progress=not args.no_progress,
                           train=args.train or None)
    except (RuntimeError, pickle.UnpicklingError, KeyError, EOFError) as err:  # weights not cached, not a checkpoint
        source = f"--model {name!r}" + (f" with --checkpoint {args.checkpoint!r}" if args.checkpoint else "")
        raise runs.CliError(f"{source} cannot be loaded ({type(err).__name__}: {err})") from err
    model = model.to(device)
    data = _dataset(name, args)  # loaded once: the evaluation and --gradcam see the same images
    check_fits(model, data, name, args.data or "digits")
    reports = run_eval_vision(model, data=data, config=config, batch_size=args.batch_size,
                              max_samples=args.max_samples, progress=not args.no_progress,
                              model_name=name, data_name=args.data or "digits")
    meta = runs.run_metadata(args.seed, device, model=args.model, dataset=args.data)
    for r in reports:
        r.meta = {**meta, **r.meta}
    print(markdown_table(reports))
    for r in reports:
        runs.print_summary(r)
    if out is not None:
        path = runs.write_results(out, "eval_vision", reports, {"config": config.to_dict(), "meta": meta})
        print(f"wrote {path} (+ .md, .png)")
    if args.gradcam:
        _write_gradcam(args, model, data, config, out)
    return 0


def _dataset(name: str, args: argparse.Namespace):
    """The ``--data`` images, transformed as ``--model``/``--weights`` expect."""
    from ..vision import load_image_dataset

    transform = _weights_transform(name, args.weights) if args.data not in (None, "digits") else None
    return load_image_dataset(args.data or "digits", root=args.root, transform=transform)


def _write_gradcam(args: argparse.Namespace, model: nn.Module, data, config: FocusConfig, out) -> None:
    """GradCAM before/after the step for the first ``--gradcam`` uncertain images of the evaluated data."""
    from torch.utils.data import Subset

    from .figures import write_gradcam

    if args.max_samples:
        data = Subset(data, range(min(len(data), args.max_samples)))
    paths = write_gradcam(model, data, config, out, n=args.gradcam, batch_size=args.batch_size)
    found = len(json.loads(paths["json"].read_text())["images"])
    short = f" (only {found} uncertain images with a finite refinement)" if found < args.gradcam else ""
    print(f"wrote {paths.get('png', 'no figure')} and {paths['json']}: {found} of the {args.gradcam} images asked "
          f"for{short}")


def _check_weights(name: str, weights: str | None) -> None:
    """Refuse a ``--weights`` name the model does not have, listing those it has."""
    if weights is None:
        return
    from ..vision import REAL_CLASSIFIERS

    if name == "digits" or name in REAL_CLASSIFIERS:
        raise runs.CliError(f"--weights names torchvision weights; --model {name} has its own (use --checkpoint for a "
                            "state_dict of the same architecture)")
    import torchvision

    try:
        allowed = list(torchvision.models.get_model_weights(name).__members__)
    except (ValueError, KeyError):  # not a torchvision model: loading it names what is allowed
        return
    if weights not in allowed:
        raise runs.CliError(f"--weights {weights!r} is not a weights name of {name}; allowed: {', '.join(allowed)}")


def load_model(name: str, *, weights: Any = None, checkpoint: str | os.PathLike | None = None,
               progress: bool = True, train: bool | None = None) -> nn.Module:
    """``"digits"`` (the small CNN; ``train`` as ``vision.digits_model``) or a classifier by name."""
    from ..vision import digits_model, load_classifier

    if name == "digits":
        return digits_model(checkpoint, train=train, progress=progress)
    return load_classifier(name, weights=weights, checkpoint=checkpoint)


def check_fits(model: nn.Module, data, model_name: str, data_name: str) -> None:
    """One forward on the first image, before the run: a model and data that do not fit are named, both of them."""
    from ..vision import logits_of

    image = data[0][0] if len(data) else None
    if image is None:
        raise runs.CliError(f"--data {data_name} holds no images")
    shape = tuple(image.shape)
    try:
        with torch.no_grad():
            x = image.unsqueeze(0).to(next(model.parameters()).device)
            logits_of(model(x))
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as err:
        reason = " ".join(str(err).split())[:160] or type(err).__name__
        raise runs.CliError(f"--model {model_name} does not accept the images of --data {data_name} (shape "
                            f"{list(shape)}): {reason}") from err


def run_eval_vision(model: nn.Module | str | None = None, data: Any = None,
                    config: FocusConfig | Mapping | Sequence | None = None, *, checkpoint: str | os.PathLike | None = None,
                    batch_size: int = 64, max_samples: int | None = None, out_dir: str | os.PathLike | None = None,
                    progress: bool = True, weights: Any = None, root: str | os.PathLike | None = None,
                    max_batch: int = 8, method: str = "auto", device: str | torch.device | None = None,
                    model_name: str | None = None, data_name: str | None = None) -> list[FocusReport]:
    """Evaluate ``model`` (default: the digits CNN, trained if no checkpoint) on ``data`` (default: digits test).

    ``model``: an ``nn.Module``, ``"digits"`` or a torchvision model name (``weights`` passed through).
    ``data``: a Dataset, a DataLoader, or a ``load_image_dataset`` spec (with ``root``).
    ``config``: one config, a list of them, or ``None`` for iFo and doFo at the method's vision defaults.
    ``device``: where to run a model loaded here by name; a module you pass stays where it is.
    ``model_name`` / ``data_name``: how the reports name them (default: the name given, or the class).
    Writes ``vision_reports.json``, ``vision_table.md`` and ``vision_topk.png`` into ``out_dir`` when given.
    """
    from torch.utils.data import DataLoader, Dataset, Subset

    from ..evaluation.classifier import evaluate_classifier
    from ..vision import load_image_dataset

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be None or an integer >= 1, got {max_samples!r}")
    model_name = model_name or (model if isinstance(model, str) else "digits" if model is None else type(model).__name__)
    if not isinstance(model, nn.Module):  # loaded here, so ours to move; a caller's module is never touched
        model = load_model(model or "digits", weights=weights, checkpoint=checkpoint, progress=progress)
        model = model if device is None else model.to(device)
    data_name = data_name or (str(data) if isinstance(data, (str, os.PathLike))
                              else "digits" if data is None else type(data).__name__)
    if data is None or isinstance(data, (str, os.PathLike)):
        transform = _weights_transform(model_name, weights) if data not in (None, "digits") else None
        data = load_image_dataset(data or "digits", root=root, transform=transform)
    if isinstance(data, Dataset):
        if max_samples is not None:
            data = Subset(data, range(min(len(data), max_samples)))
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    configs = [FocusConfig(mode="ifo"), FocusConfig(mode="dofo")] if config is None else \
        [config] if isinstance(config, (FocusConfig, Mapping)) else list(config)
    meta = {"model": model_name, "dataset": data_name}
    reports = [evaluate_classifier(model, data, c, max_batch=max_batch, progress=progress, method=method, meta=meta,
                                   name=f"{model_name}/{data_name}/{FocusConfig.coerce(c).mode}") for c in configs]
    if out_dir is not None:
        write_outputs(reports, out_dir)
    return reports


def _weights_transform(model_name: str, weights: Any):
    """The preprocessing that ``weights`` were trained with (None without weights)."""
    if weights is None or model_name == "digits":
        return None
    import torchvision

    if isinstance(weights, str):
        weights = torchvision.models.get_model_weights(model_name)[weights]
    return weights.transforms()


def write_outputs(reports: Sequence[FocusReport], out_dir: str | os.PathLike, stem: str = "vision") -> dict[str, Path]:
    """``<stem>_reports.json`` (reports + summaries; NaN as null), ``<stem>_table.md`` and top-k PNGs in ``out_dir``."""
    from . import figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}_reports.json", "table": out / f"{stem}_table.md"}
    payload = [{"report": r.to_dict(), "summary": r.summary()} for r in reports]
    paths["json"].write_text(json.dumps(jsonable(payload), indent=2))
    paths["table"].write_text(markdown_table(reports) + "\n")
    panels = {}  # the top-k table comes from the unmodified pass: one figure per (model, data set)
    for r in reports:
        panels.setdefault((r.meta.get("model", r.name), r.meta.get("dataset", "")), r)
    for i, ((model, data), r) in enumerate(panels.items()):
        key = "png" if i == 0 else f"png_{model}_{data}"
        name = f"{stem}_topk.png" if i == 0 else f"{stem}_topk_{_slug(model)}_{_slug(data)}.png"
        paths[key] = figures.plot_topk({t: r.topk_accuracy(t) for t in r.topk_thresholds}, out / name,
                                     title=f"Top-k accuracy on uncertain predictions: {model} on {data}",
                                     counts=dict(zip(r.topk_thresholds, r.topk_counts)))
    return paths


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(text))[:40]
