"""load_texts: bundled sample, local files through `datasets`, fast offline failure; split_dev_test."""
import json
import time

import pytest

from focus_decoding.resources import corpora as data
from focus_decoding.resources import hub
from focus_decoding.resources.corpora import SAMPLE_PATH, load_texts, split_dev_test


def test_bundled_sample_is_real_documented_prose():
    texts = load_texts()
    raw = [json.loads(line)["text"] for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]
    assert texts == raw and len(texts) == 90
    assert 40_000 <= SAMPLE_PATH.stat().st_size <= 150_000
    assert (SAMPLE_PATH.parent / "SOURCE.md").read_text().count("public domain") >= 1
    assert load_texts(max_texts=3) == raw[:3]
    cut = load_texts(max_chars=1500)
    assert sum(map(len, cut)) == 1500 and "".join(cut) == "".join(raw)[:1500]


def test_local_txt_md_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("First line.\nSecond line of the same document.\n")
    (tmp_path / "b.md").write_text("# Title\n\nA markdown document.")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x y", "z"])))
    (tmp_path / "ignored.csv").write_text("a,b\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["First line.\nSecond line of the same document.\n"]
    assert load_texts(str(tmp_path / "c.jsonl")) == ["x y", "z"]
    assert load_texts(str(tmp_path / "c.jsonl"), streaming=False) == ["x y", "z"]
    folder = load_texts(str(tmp_path))
    assert sorted(folder) == sorted(["First line.\nSecond line of the same document.\n",
                                     "# Title\n\nA markdown document.", "x y", "z"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "no text field"}))
    with pytest.raises(ValueError, match="text field"):
        load_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="unsupported file type"):
        load_texts(str(tmp_path / "ignored.csv"))


@pytest.mark.parametrize("spec", ["openwebtext", "simplewiki", "contracts", "someone/some-corpus"])
def test_hub_name_fails_fast_offline_with_a_hint(spec, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(data.HubUnavailable, match="--dataset path/to/file.txt"):
        load_texts(spec, max_texts=1)
    assert time.perf_counter() - t0 < 5
    # without the offline flag: an unreachable endpoint also fails within seconds
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="unreachable"):  # HubUnavailable is a ConnectionError
        load_texts(spec, max_texts=1)
    assert time.perf_counter() - t0 < hub.CONNECT_TIMEOUT_S + 2


def test_unknown_spec_and_bad_limits():
    with pytest.raises(ValueError, match="neither an existing file"):
        load_texts("no_such_corpus")
    for path in ("no_such_file.txt", "/no/such/file.txt", "./corpus", "a/b/c"):  # paths, never hub ids
        with pytest.raises(FileNotFoundError, match="no such file or folder"):
            load_texts(path)
    with pytest.raises(ValueError, match="max_texts"):
        load_texts(max_texts=0)
    with pytest.raises(ValueError, match="max_chars"):
        load_texts(max_chars=-5)


def test_split_dev_test():
    texts = [f"doc {i}" for i in range(10)]
    dev, test = split_dev_test(texts, dev_fraction=0.3, seed=1)
    assert len(dev) == 3 and len(test) == 7 and not set(dev) & set(test)
    assert sorted(dev + test) == sorted(texts)
    assert split_dev_test(texts, 0.3, seed=1) == (dev, test)  # deterministic per seed
    assert split_dev_test(texts, 0.3, seed=2) != (dev, test)
    one = "alpha beta gamma delta epsilon zeta"
    d, t = split_dev_test([one])
    assert d[0] + t[0] == one and d[0] and t[0] and abs(len(d[0]) - len(one) / 2) < 8
    assert all(len(split) >= 1 for split in split_dev_test(["a", "b"], 0.9))
    with pytest.raises(ValueError, match="dev_fraction"):
        split_dev_test(texts, 1.0)


@pytest.mark.parametrize("content, message", [
    (b"text\x00with a NUL", "binary file \\(NUL byte at offset 4\\)"),
    (b"ok \xff\xfe not utf-8", "not UTF-8 text \\(byte 0xff at offset 3\\)"),
    ("caf\u00e9".encode()[:-1], "ends inside a UTF-8 character"),
])
def test_non_text_files_are_named(content, message, tmp_path):
    path = tmp_path / "blob.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        load_texts(str(path))
    assert str(path) in str(err.value)


def test_text_check_reads_characters_across_chunks(tmp_path):
    path = tmp_path / "accents.txt"
    path.write_text("caf\u00e9 na\u00efve " * 50, encoding="utf-8")
    data.check_text_file(path, chunk=3)  # 3-byte chunks cut every two-byte character somewhere: still text
    assert load_texts(str(path)) == ["caf\u00e9 na\u00efve " * 50]


def test_bad_bytes_past_the_checked_start_are_still_named(tmp_path):
    path = tmp_path / "long.txt"
    path.write_bytes(b"a" * (2 << 20) + b"\xff tail")  # the start check reads 1 MiB; the stream finds the rest
    with pytest.raises(ValueError, match="not UTF-8 text") as err:
        load_texts(str(path))
    assert str(path) in str(err.value)
