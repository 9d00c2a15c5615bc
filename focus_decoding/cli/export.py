"""`focus-decoding export-generate DIR`: write focus decoding as a Hub-style ``custom_generate`` folder."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export-generate command's options (it needs no model)."""
    parser.add_argument("directory", help="folder to write README.md and custom_generate/ into (created if missing)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files if the folder already has them")


def run(args: argparse.Namespace, config=None) -> int:
    """Write the folder and say how to use it."""
    from ..text.folder import FOLDER_FLOOR, export_generate

    path = export_generate(args.directory, overwrite=args.overwrite)
    print(f"wrote {path / 'README.md'} and {path / 'custom_generate'}/ (generate.py, requirements.txt)")
    print(f"use (transformers >= {FOLDER_FLOOR}): model.generate(**inputs, custom_generate={str(path)!r}, "
          "trust_remote_code=True, focus_config={'lr': 1e-4, 'params': 'last:2'})")
    return 0
