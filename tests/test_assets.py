"""benchmarks/assets.py: conversion rules, hash pinning and the dev/test split, on small made-up inputs."""
from __future__ import annotations

import hashlib
import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import assets  # noqa: E402

PLAY = """# Hamlet

## ACT I

### SCENE I. Elsinore.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

**FRANCISCO**  
Nay, answer me: stand, \\[Aside] and unfold yourself.  
Stand.

### SCENE II. A room.

**HAMLET**  
O, that this too too solid flesh would melt
"""


def test_play_scenes_one_document_per_scene_without_markup():
    scenes = assets.play_scenes(PLAY)
    assert len(scenes) == 2
    assert scenes[0].splitlines()[:2] == ["Hamlet", "ACT I. SCENE I. Elsinore."]
    assert "BERNARDO:\nWho's there?" in scenes[0]
    assert "[Aside]" in scenes[0] and "\\[" not in scenes[0]
    assert not any(ch in "".join(scenes) for ch in "*_#")
    assert scenes[1].endswith("HAMLET:\nO, that this too too solid flesh would melt")


def test_kjv_chapters_in_order_without_verse_numbers(tmp_path):
    db = tmp_path / "Bible.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE Books(TestamentID INT, BookID INT, ShortName TEXT, LongName TEXT)")
    con.execute("CREATE TABLE Bible(TestamentID INT, BookID INT, ChapterID INT, VerseID INT, Index_ TEXT, "
                "IndexTypeID INT, NumParagraphs INT, Passage1 TEXT, Passage2 TEXT)")
    con.executemany("INSERT INTO Books VALUES (?, ?, ?, ?)", [(1, 1, "Genesis", "G"), (2, 1, "Matthew", "M")])
    con.executemany("INSERT INTO Bible VALUES (?, ?, ?, ?, '', 0, 1, ?, ?)", [
        (2, 1, 1, 1, "1:1 The book of the generation.", ""),
        (1, 1, 1, 2, "1:2 And the earth was without form.", "Then more; 1:3 And light."),
        (1, 1, 1, 1, "1:1 In the beginning.", None)])
    con.commit()
    con.close()
    docs = assets.kjv_docs(db)
    assert docs == ["Genesis 1\nIn the beginning.\nAnd the earth was without form. Then more; And light.",
                    "Matthew 1\nThe book of the generation."]


def test_split_is_disjoint_complete_and_fixed():
    texts = [f"doc {i}" for i in range(11)]
    dev, test = assets.split(texts)
    assert sorted(dev + test) == sorted(texts) and not set(dev) & set(test)
    assert (dev, test) == assets.split(list(texts))
    assert assets.split(texts, seed=1) != (dev, test)


def test_check_hash_refuses_a_changed_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"abc")
    assets.check_hash(path, hashlib.sha256(b"abc").hexdigest())
    with pytest.raises(assets.AssetError, match="differs from the pinned"):
        assets.check_hash(path, hashlib.sha256(b"abd").hexdigest())


def test_join_checks_size_and_hash(tmp_path, monkeypatch):
    parts = [b"GGUF" + b"a" * 10, b"b" * 7]
    for i, data in enumerate(parts):
        (tmp_path / f"pkg{i}").mkdir()
        (tmp_path / f"pkg{i}" / "p.bin").write_bytes(data)
    monkeypatch.setattr(assets, "package_dir", lambda module, dist: tmp_path / module)
    whole = b"".join(parts)
    spec = assets.Model("m", "m.gguf", ("x==1",), (("pkg0", "p.bin"), ("pkg1", "p.bin")), len(whole),
                        hashlib.sha256(whole).hexdigest(), "X", "none")
    out = tmp_path / "cache" / "m.gguf"
    assets._join(spec, out)
    assert out.read_bytes() == whole
    bad = assets.Model(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(assets.AssetError, match="not the pinned ones"):
        assets._join(bad, tmp_path / "cache" / "bad.gguf")
    assert not (tmp_path / "cache" / "bad.partial").exists()


def test_missing_package_names_the_install_command(monkeypatch):
    with pytest.raises(assets.AssetError, match="--install"):
        assets.package_dir("surely_not_an_installed_module_xyz", "nothing==1")
