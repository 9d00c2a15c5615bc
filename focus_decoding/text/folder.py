"""The Hub-style ``custom_generate`` folder: ``custom_generate/`` beside this file, copied out by ``export_generate``."""
from __future__ import annotations

import shutil
from pathlib import Path

from packaging.version import Version

FOLDER_FLOOR = Version("4.53.0")  # first release that loads custom_generate="folder" on an empty cache (4.52 fails)
METHOD_FOLDER = Path(__file__).parent / "custom_generate"  # generate.py, requirements.txt, README.md (the Hub card)


def export_generate(directory: str | Path, *, overwrite: bool = False) -> Path:
    """Write the ``custom_generate`` folder (as on the Hub) into ``directory``; return its path.

    ``model.generate(..., custom_generate=str(directory), trust_remote_code=True, focus_config={...})``
    then runs focus decoding (transformers >= 4.53: 4.52 fails to copy it into an empty modules cache); the
    folder can be pushed to the Hub as it is.
    """
    if not str(directory).strip():
        raise ValueError("export_generate needs a folder to write into, got an empty path; allowed: a folder "
                         "(created when missing)")
    directory = Path(directory).expanduser()
    targets = {METHOD_FOLDER / "README.md": directory / "README.md",  # the card sits at the repo root
               **{METHOD_FOLDER / name: directory / "custom_generate" / name for name in ("generate.py", "requirements.txt")}}
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; give a folder to write the custom_generate method into")
    above = next(p for p in directory.parents if p.exists())
    if not above.is_dir():
        raise NotADirectoryError(f"{directory} lies under the file {above}; give a folder to write the "
                                 "custom_generate method into")
    clash = [str(dst) for dst in targets.values() if dst.exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{clash[0]} already exists; choose an empty folder or pass overwrite=True (--overwrite)")
    try:
        for src, dst in targets.items():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    except OSError as err:  # read-only file system, no permission, disk full: say where, in words
        raise OSError(err.errno, f"cannot write the custom_generate folder into {directory} "
                                 f"({err.strerror or err}); allowed: a writable folder") from err
    return directory
