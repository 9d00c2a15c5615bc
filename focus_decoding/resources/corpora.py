"""Text for next-token evaluation: the bundled sample, local files (through `datasets`), hub corpora.

The bundled sample ``data/jargon_sample.jsonl`` is 90 entries (~100 KB) of *The Jargon Lexicon*
from The Jargon File 4.4.7 (public domain), taken from Debian's ``dict-jargon`` package; see
``data/SOURCE.md`` for exactly how it was cut.

Example:
    >>> from focus_decoding.resources import load_texts, split_dev_test
    >>> texts = load_texts(max_texts=4)
    >>> len(texts), texts[0].startswith("0")
    (4, True)
    >>> dev, test = split_dev_test(texts)
    >>> sorted(dev + test) == sorted(texts)
    True
"""
from __future__ import annotations

import codecs
import contextlib
import logging
import os
import random
from pathlib import Path
from typing import Iterable

from .hub import HubUnavailable, looks_like_path, offline_reason

SAMPLE_PATH = Path(__file__).parent / "data" / "jargon_sample.jsonl"
TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")

# The method's corpora: short name -> (hub id, config); "contracts" text field checked at load time.
HUB_CORPORA: dict[str, tuple[str, str | None]] = {
    "openwebtext": ("Skylion007/openwebtext", None),
    "simplewiki": ("wikimedia/wikipedia", "20231101.simple"),
    "contracts": ("albertvillanova/legal_contracts", None),
}
TEXT_FIELDS = ("text", "content", "contract", "document")
OFFLINE_HINT = ("no network access to the Hugging Face hub; use a local file or folder instead, "
                "e.g. `--dataset path/to/file.txt` (or .md / .jsonl with a \"text\" field, or a folder of them), "
                "or omit --dataset for the bundled sample")


def load_texts(spec: str | None = None, *, split: str = "train", max_texts: int | None = None,
               max_chars: int | None = None, streaming: bool = True) -> list[str]:
    """Documents from the bundled sample (``None``), a local file/folder, or a hub corpus name."""
    if max_texts is not None and (isinstance(max_texts, bool) or not isinstance(max_texts, int) or max_texts < 1):
        raise ValueError(f"max_texts must be an integer >= 1 or None, got {max_texts!r}")
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be an integer >= 1 or None, got {max_chars!r}")
    if spec is None:
        rows = _load_local([SAMPLE_PATH], split, streaming)
    elif os.path.exists(spec):
        rows = _load_local(_local_files(Path(spec)), split, streaming)
    elif looks_like_path(spec):  # never send a mistyped path to the hub as if it were a corpus name
        raise FileNotFoundError(f"dataset {spec!r}: no such file or folder; allowed: an existing "
                                f"{TEXT_SUFFIXES + JSON_SUFFIXES} file or a folder of them, {sorted(HUB_CORPORA)}, "
                                "or a hub id 'owner/name'")
    elif spec in HUB_CORPORA or "/" in spec:
        rows = _load_hub(spec, split, streaming)
    else:
        raise ValueError(
            f"dataset {spec!r} is neither an existing file/folder nor a known corpus; allowed: None (bundled sample), "
            f"a path to {TEXT_SUFFIXES + JSON_SUFFIXES} file(s), {sorted(HUB_CORPORA)}, or a hub id 'owner/name'")
    return _take(rows, max_texts, max_chars)


def split_dev_test(texts: list[str], dev_fraction: float = 0.5, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (dev, test) split by document; a single document is cut into two halves of its text."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("split_dev_test needs at least one non-empty text")
    if len(texts) == 1:
        # cut at a whitespace near the fraction so no word is split across dev and test
        text = texts[0]
        cut = int(len(text) * dev_fraction)
        space = text.rfind(" ", 0, cut)
        cut = space if space > 0 else cut
        return [text[:cut]], [text[cut:]]
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_dev = min(len(texts) - 1, max(1, round(len(texts) * dev_fraction)))
    dev_idx = set(order[:n_dev])
    return [t for i, t in enumerate(texts) if i in dev_idx], [t for i, t in enumerate(texts) if i not in dev_idx]


# ----------------------------------------------------------------------------- local files
def _local_files(path: Path) -> list[Path]:
    allowed = TEXT_SUFFIXES + JSON_SUFFIXES
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in allowed)
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no {allowed} files")
        return files
    if path.suffix.lower() not in allowed:
        raise ValueError(f"unsupported file type {path.suffix!r} for {str(path)!r}; allowed: {allowed}")
    return [path]


def check_text_file(path: Path, chunk: int = 1 << 16, max_bytes: int = 1 << 20) -> None:
    """Raise ``ValueError`` naming ``path`` unless its first ``max_bytes`` are UTF-8 text without NUL bytes.

    Only the start is read, so a large corpus costs no extra pass; a bad byte further on is caught
    while the file streams (see ``_load_local``).
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    allowed = f"allowed: UTF-8 text in {TEXT_SUFFIXES + JSON_SUFFIXES} files"
    offset = 0
    with open(path, "rb") as f:
        while offset < max_bytes and (block := f.read(min(chunk, max_bytes - offset))):
            nul = block.find(b"\0")
            if nul >= 0:
                raise ValueError(f"{str(path)!r} is a binary file (NUL byte at offset {offset + nul}); {allowed}")
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                raise ValueError(f"{str(path)!r} is not UTF-8 text (byte {block[err.start]:#04x} at offset "
                                 f"{offset + err.start}); {allowed}") from None
            offset += len(block)
        at_end = not f.read(1)
    if at_end:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"{str(path)!r} ends inside a UTF-8 character (truncated?); {allowed}") from None


def _load_local(files: list[Path], split: str, streaming: bool) -> Iterable[str]:
    """Each .txt/.md file is one document; each JSON record is one document (its "text" field)."""
    from datasets import load_dataset

    for path in files:  # before `datasets` sees them: its decode errors do not name the file
        check_text_file(path)
    text_files = [str(p) for p in files if p.suffix.lower() in TEXT_SUFFIXES]
    json_files = [str(p) for p in files if p.suffix.lower() in JSON_SUFFIXES]
    if text_files:
        try:
            ds = load_dataset("text", data_files={split: text_files}, split=split, sample_by="document",
                              keep_linebreaks=True, streaming=streaming)
            yield from (row["text"] for row in ds)
        except UnicodeDecodeError as err:  # past the checked start of a file
            where = ", ".join(repr(f) for f in text_files)
            raise ValueError(f"{where}: not UTF-8 text ({err.reason}, beyond the first MiB of a file); allowed: "
                             "UTF-8 text") from None
    if json_files:
        where = ", ".join(repr(f) for f in json_files)
        field = None
        for row in _json_rows(json_files, split, streaming, where):
            field = field or _text_field(row, where)
            yield row[field]


def _json_rows(files: list[str], split: str, streaming: bool, where: str) -> Iterable[dict]:
    """The records of JSON / JSON-lines files; a malformed file raises ``ValueError`` naming it."""
    from datasets import load_dataset

    try:
        with _quiet_logger("datasets.packaged_modules.json.json"):  # it logs the error we raise below
            yield from load_dataset("json", data_files={split: files}, split=split, streaming=streaming)
    except _json_errors() as err:
        raise ValueError(f"{where} is not valid JSON / JSON lines ({' '.join(str(err).split())}); allowed: one "
                         f"JSON object per line with a text field, one of {TEXT_FIELDS}") from err


def _json_errors() -> tuple[type[BaseException], ...]:
    """What `datasets` raises on a malformed JSON file (pyarrow's ArrowInvalid is a ValueError)."""
    from datasets.exceptions import DatasetGenerationError

    return DatasetGenerationError, ValueError


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _text_field(row: dict, where: str) -> str:
    for name in TEXT_FIELDS:
        if isinstance(row.get(name), str):
            return name
    raise ValueError(f"{where}: records need a text field, one of {TEXT_FIELDS}; found {sorted(row)}")


# ----------------------------------------------------------------------------- hub corpora
def _load_hub(spec: str, split: str, streaming: bool) -> Iterable[str]:
    """Stream only what is needed from the hub; fail within seconds when offline (checked here, not on first row)."""
    repo, config = HUB_CORPORA.get(spec, (spec, None))
    reason = offline_reason(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if reason is not None:
        raise HubUnavailable(f"cannot load dataset {repo!r}: {reason}; {OFFLINE_HINT}")
    return _stream_hub(repo, config, split, streaming)


def _stream_hub(repo: str, config: str | None, split: str, streaming: bool) -> Iterable[str]:
    from datasets import load_dataset

    try:
        try:
            ds = load_dataset(repo, config, split=split, streaming=streaming)
        except RuntimeError as err:
            # openwebtext and legal_contracts are loading-script datasets, which datasets >= 4 refuses;
            # the hub keeps a Parquet conversion of them on this branch.
            if "script" not in str(err).lower():
                raise
            ds = load_dataset(repo, config, split=split, streaming=streaming, revision="refs/convert/parquet")
        field = None
        for row in ds:
            field = field or _text_field(row, repo)
            yield row[field]
    except (ConnectionError, TimeoutError) as err:
        raise HubUnavailable(f"cannot load dataset {repo!r} ({type(err).__name__}: {err}); {OFFLINE_HINT}") from err


def _take(rows: Iterable[str], max_texts: int | None, max_chars: int | None) -> list[str]:
    """The first documents, up to ``max_texts`` of them and ``max_chars`` characters in all (last one cut)."""
    out, chars = [], 0
    for text in rows:
        if not text:
            continue
        if max_chars is not None and chars + len(text) > max_chars:
            text = text[:max_chars - chars]
        out.append(text)
        chars += len(text)
        if (max_texts is not None and len(out) >= max_texts) or (max_chars is not None and chars >= max_chars):
            break
    if hasattr(rows, "close"):
        rows.close()  # stop the generator (and its streaming download) early
    return out
