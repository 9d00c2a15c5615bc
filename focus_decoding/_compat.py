"""The import paths of focus_decoding 0.2 (one flat package), kept working without a module each.

``import focus_decoding.core`` and ``from focus_decoding.decoding import focus_generate`` (what a
``custom_generate`` folder exported by 0.2 runs) give the module that holds those names now;
``OLD_PATHS`` is the whole table (README, "Changelog"). ``python -m focus_decoding.harness`` is a
real module (``harness.py``): ``-m`` needs one.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

OLD_PATHS = {
    "core": "method", "prefix": "method.prefix", "generation": "text.processor", "decoding": "text.ways_in",
    "models": "resources.models", "data": "resources.corpora", "hub": "resources.hub",
    "report": "evaluation.report", "eval_text": "evaluation.next_token", "eval_vision": "evaluation.classifier",
    "metric": "evaluation.metric", "tuning": "tune", "gradcam": "vision.gradcam", "vision_real": "vision",
    "plots": "cli.figures", "runs": "cli.common",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``<package>.<old>`` and hands back the module ``<package>.<new>`` itself (one module, two names)."""

    def __init__(self, package: str):
        self.package = package
        self.table = {f"{package}.{old}": f"{package}.{new}" for old, new in OLD_PATHS.items()}

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.table:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(self.table[spec.name])

    def exec_module(self, module):
        pass  # the module is the new one, already executed


def install(package: str) -> None:
    """Put the alias finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _Alias) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(_Alias(package))
