from __future__ import annotations

import gzip
import os
import random
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest

from nmt.config import DataConfig
from nmt.data import corpus as corpus_mod
from nmt.data.corpus import (
    corpus_fingerprint,
    dataset_pairs,
    has_test,
    iter_dataset_pairs,
    iter_lines,
    iter_split,
    read_split,
)
from nmt.errors import NMTError

SRC = ["A dog runs.", "Two men sit.", "", "Über den Fluss"]
TGT = ["Ein Hund rennt.", "Zwei Männer sitzen.", "", "Across the river"]


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache (parquet conversion) inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def write(path: Path, lines: list[str], newline: str = "\n") -> None:
    data = "".join(line + newline for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def local_cfg(directory: Path) -> DataConfig:
    return DataConfig(dir=str(directory), train="train", valid="val", test="test")


def test_plain_and_gzip_windows_line_endings(tmp_path):
    write(tmp_path / "train.en", SRC, newline="\r\n")
    write(tmp_path / "train.de.gz", TGT)
    assert read_split(local_cfg(tmp_path), "train") == (SRC, TGT)


def test_lines_split_only_on_newline(tmp_path):
    src = ["a\u2028b", "c\x1cd"]  # characters str.splitlines would treat as line breaks
    write(tmp_path / "val.en", src)
    write(tmp_path / "val.de", ["x", "y"])
    assert read_split(local_cfg(tmp_path), "valid")[0] == src


def test_missing_file_names_path(tmp_path):
    write(tmp_path / "train.en", SRC)
    with pytest.raises(NMTError, match=f"not found: {tmp_path / 'train.de'}"):
        read_split(local_cfg(tmp_path), "train")


def test_line_count_mismatch_names_files_and_counts(tmp_path):
    write(tmp_path / "test.en", SRC)
    write(tmp_path / "test.de", TGT[:3])
    with pytest.raises(NMTError) as e:
        read_split(local_cfg(tmp_path), "test")
    msg = str(e.value)
    assert str(tmp_path / "test.en") in msg and "4" in msg
    assert str(tmp_path / "test.de") in msg and "3" in msg


def test_non_utf8_byte_names_file_and_line(tmp_path):
    write(tmp_path / "train.en", SRC)
    (tmp_path / "train.de").write_bytes(b"ok\nfine\nbad \xff byte\nok\n")
    with pytest.raises(NMTError, match=rf"{tmp_path / 'train.de'} line 3: not valid UTF-8"):
        read_split(local_cfg(tmp_path), "train")


def test_no_source_configured():
    with pytest.raises(NMTError, match="data.dir"):
        read_split(DataConfig(), "train")


def test_fingerprint_follows_content_not_path_or_mtime(tmp_path):
    for directory in (tmp_path / "a", tmp_path / "b"):
        directory.mkdir()
        write(directory / "train.en", SRC)
        write(directory / "train.de", TGT)
        write(directory / "val.en", SRC[:2])
        write(directory / "val.de", TGT[:2])
    cfg = local_cfg(tmp_path / "a")
    first = corpus_fingerprint(cfg, "train")
    assert corpus_fingerprint(cfg, "train") == first
    assert corpus_fingerprint(cfg, "valid") != first
    assert corpus_fingerprint(local_cfg(tmp_path / "b"), "train") == first  # the same corpus elsewhere
    path = tmp_path / "a" / "train.de"
    stamp = path.stat()
    write(path, [TGT[1], TGT[0], *TGT[2:]])  # rewritten in place, as `cp -p` or `rsync -t` would
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert path.stat().st_size == stamp.st_size and path.stat().st_mtime_ns == stamp.st_mtime_ns
    assert corpus_fingerprint(cfg, "train") != first


def test_fingerprint_of_a_hub_dataset_follows_its_resolved_revision(monkeypatch):
    revisions = {"wmt14": "1111", "other/name": "2222"}
    monkeypatch.setattr(datasets, "load_dataset_builder",
                        lambda name, config: SimpleNamespace(hash=revisions[name]))
    cfg = DataConfig(hf_name="wmt14", hf_config="de-en")
    first = corpus_fingerprint(cfg, "train")
    assert first != corpus_fingerprint(cfg, "valid")
    other = DataConfig(hf_name="wmt14", hf_config="fr-en")
    assert corpus_fingerprint(other, "train") != first
    revisions["wmt14"] = "3333"  # a new commit on the Hub
    assert corpus_fingerprint(cfg, "train") != first


def test_fingerprint_of_an_unreachable_hub_dataset(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wmt14' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset_builder", offline)
    with pytest.raises(NMTError, match="cannot reach the Hugging Face Hub for 'wmt14'; use data.dir"):
        corpus_fingerprint(DataConfig(hf_name="wmt14", hf_config="de-en"), "train")


# ---------------------------------------------------------------- Hugging Face layouts


def make_dataset(layout: str, src: list[str], tgt: list[str]) -> datasets.Dataset:
    if layout == "translation":  # wmt14 / iwslt2017
        rows = [{"en": s, "de": t} for s, t in zip(src, tgt, strict=True)]
        return datasets.Dataset.from_dict({"translation": rows})
    return datasets.Dataset.from_dict({"en": src, "de": tgt})  # bentrevett/multi30k


def make_splits(layout: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({
        "train": make_dataset(layout, SRC, TGT),
        "validation": make_dataset(layout, SRC[:2], TGT[:2]),
        "test": make_dataset(layout, SRC[1:], TGT[1:]),
    })


LAYOUTS = ["translation", "columns"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hub_layouts_saved_to_disk(tmp_path, layout):
    make_splits(layout).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(hf_name=str(tmp_path / "ds"))
    assert read_split(cfg, "train") == (SRC, TGT)
    assert read_split(cfg, "valid") == (SRC[:2], TGT[:2])
    assert read_split(cfg, "test") == (SRC[1:], TGT[1:])
    reverse = DataConfig(hf_name=str(tmp_path / "ds"), src_lang="de", tgt_lang="en")
    assert read_split(reverse, "train") == (TGT, SRC)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hub_layouts_parquet(tmp_path, layout):
    folder = tmp_path / "pq"
    folder.mkdir()
    for name, ds in make_splits(layout).items():
        ds.to_parquet(str(folder / f"{name}.parquet"))
    loaded = datasets.load_dataset("parquet", data_files=str(folder / "train.parquet"), split="train")
    assert dataset_pairs(loaded, "en", "de") == (SRC, TGT)
    cfg = DataConfig(hf_name=str(folder))  # a local data folder goes through load_dataset
    assert read_split(cfg, "test") == (SRC[1:], TGT[1:])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hub_unknown_language_lists_available(layout):
    ds = make_dataset(layout, SRC, TGT)
    with pytest.raises(NMTError, match=r"language 'fr' not in dataset x; available .*: en, de"):
        dataset_pairs(ds, "en", "fr", "x")


def test_hub_missing_split_lists_available(tmp_path):
    make_splits("columns").save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(hf_name=str(tmp_path / "ds"), hf_valid_split="dev")
    with pytest.raises(NMTError, match="no split 'dev'; available: train, validation, test"):
        read_split(cfg, "valid")


def test_hub_null_text_becomes_empty_line():
    ds = datasets.Dataset.from_dict({"en": ["a", None], "de": ["b", "c"]})
    assert dataset_pairs(ds, "en", "de") == (["a", ""], ["b", "c"])


def test_hub_unreachable(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wmt14' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(NMTError, match="cannot reach the Hugging Face Hub for 'wmt14'; use data.dir"):
        read_split(DataConfig(hf_name="wmt14", hf_config="de-en"), "train")


def test_hub_offline_mode_error(monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(*args, **kwargs):
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(NMTError, match="cannot reach the Hugging Face Hub"):
        read_split(DataConfig(hf_name="bentrevett/multi30k"), "valid")


@pytest.mark.parametrize("layout", ["saved", "parquet"])
def test_local_dataset_fingerprint_follows_content(tmp_path, layout):
    """A dataset saved to disk, or a folder of parquet files, is keyed by the bytes of its files."""
    splits = make_splits("columns")
    for name in ("a", "b"):
        if layout == "saved":
            splits.save_to_disk(str(tmp_path / name))
        else:
            (tmp_path / name).mkdir()
            for split, dataset in splits.items():
                dataset.to_parquet(str(tmp_path / name / f"{split}.parquet"))
    first = corpus_fingerprint(DataConfig(hf_name=str(tmp_path / "a")), "train")
    assert corpus_fingerprint(DataConfig(hf_name=str(tmp_path / "b")), "train") == first
    data = next(p for p in sorted((tmp_path / "a").rglob("*")) if p.suffix in (".arrow", ".parquet"))
    stamp = data.stat()
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert corpus_fingerprint(DataConfig(hf_name=str(tmp_path / "a")), "train") != first


class ConnectError(Exception):
    """Stands in for httpx.ConnectError, which is no OSError."""


@pytest.mark.parametrize("error", [ConnectError("dns"), TimeoutError("slow")])
def test_hub_other_network_errors(monkeypatch, error):
    def offline(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(NMTError, match="cannot reach the Hugging Face Hub for 'iwslt2017'"):
        read_split(DataConfig(hf_name="iwslt2017", hf_config="iwslt2017-en-de"), "test")


def test_hub_unknown_dataset(monkeypatch):
    def missing(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'nope/nope' doesn't exist")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(NMTError, match="dataset 'nope/nope' not found"):
        read_split(DataConfig(hf_name="nope/nope"), "train")


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("gz", [False, True])
def test_iter_split_streams_in_chunks(tmp_path, gz):
    src = [f"line {i}" for i in range(10)]
    tgt = [f"zeile {i}" for i in range(10)]
    for lang, lines in (("en", src), ("de", tgt)):
        data = ("\ufeff" + "".join(line + "\r\n" for line in lines)).encode()
        path = tmp_path / (f"train.{lang}.gz" if gz else f"train.{lang}")
        path.write_bytes(gzip.compress(data) if gz else data)
    chunks = list(iter_split(DataConfig(dir=str(tmp_path)), "train", chunk=4))
    assert [len(s) for s, _ in chunks] == [4, 4, 2]
    assert [line for s, _ in chunks for line in s] == src
    assert [line for _, t in chunks for line in t] == tgt


def test_iter_split_reads_lazily(tmp_path):
    write(tmp_path / "train.en", SRC)
    (tmp_path / "train.de").write_bytes(TGT[0].encode() + b"\n\xff broken\n")  # bad UTF-8 on line 2
    chunks = iter_split(DataConfig(dir=str(tmp_path)), "train", chunk=1)
    assert next(chunks) == ([SRC[0]], [TGT[0]])  # the bad line is not read yet
    with pytest.raises(NMTError, match="train.de line 2: not valid UTF-8"):
        next(chunks)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_iter_dataset_pairs_in_chunks(layout):
    ds = make_dataset(layout, SRC * 3, TGT * 3)
    chunks = list(iter_dataset_pairs(ds, "en", "de", chunk=2))
    assert [len(s) for s, _ in chunks] == [2] * (len(SRC) * 3 // 2) + [1] * (len(SRC) * 3 % 2)
    assert [line for s, _ in chunks for line in s] == SRC * 3
    assert [line for _, t in chunks for line in t] == TGT * 3


def save_hub_repo_layout(folder: Path, config: str, splits: dict[str, datasets.Dataset]) -> None:
    """A local copy of a parquet Hub repository such as wmt/wmt14: ``{config}/{split}-*.parquet``
    and a README whose front matter names the config's data files."""
    (folder / config).mkdir(parents=True)
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split, ds in splits.items():
        ds.to_parquet(str(folder / config / f"{split}-00000-of-00001.parquet"))
        lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]))


def test_hub_repository_layout_with_config(tmp_path):
    save_hub_repo_layout(tmp_path / "wmt14", "de-en", dict(make_splits("translation")))
    cfg = DataConfig(hf_name=str(tmp_path / "wmt14"), hf_config="de-en")
    assert read_split(cfg, "train") == (SRC, TGT)
    assert read_split(cfg, "valid") == (SRC[:2], TGT[:2])


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_a_corrupt_gzip_file_is_an_error_naming_it(tmp_path, damage):
    write(tmp_path / "train.en.gz", SRC * 500)
    write(tmp_path / "train.de.gz", TGT * 500)
    raw = bytearray((tmp_path / "train.en.gz").read_bytes())
    if damage == "flip":  # zlib.error, which is no OSError
        raw[len(raw) // 2:len(raw) // 2 + 8] = b"\xff" * 8
    else:  # EOFError
        del raw[len(raw) // 2:]
    (tmp_path / "train.en.gz").write_bytes(bytes(raw))
    with pytest.raises(NMTError, match=rf"cannot read {tmp_path / 'train.en.gz'}: "):
        read_split(local_cfg(tmp_path), "train")


def test_long_lines_and_nul_bytes(tmp_path):
    """A line over max_line_bytes (a file without newlines reads as one) or with a NUL byte is
    None in the training split, whose pairs stay aligned, and an error in the others."""
    (tmp_path / "train.en").write_bytes(b"ok one\n" + b"x" * 5000 + b"\nok\0two\nok three\nexactly10!\n")
    (tmp_path / "train.de").write_bytes(b"gut eins\nlang\nnul\ngut drei\n" + b"y" * 11 + b"\n")
    cfg = DataConfig(dir=str(tmp_path), train="train", valid="val", max_line_bytes=10)
    assert read_split(cfg, "train") == (["ok one", None, None, "ok three", "exactly10!"],
                                        ["gut eins", "lang", "nul", "gut drei", None])
    (tmp_path / "val.en").write_bytes(b"a\rb\r" * 100)  # \r only: one long line
    (tmp_path / "val.de").write_bytes(b"a\n")
    with pytest.raises(NMTError, match=rf"{tmp_path / 'val.en'} line 1: longer than data.max_line_bytes=10"):
        read_split(cfg, "valid")
    (tmp_path / "val.en").write_bytes(b"a\nb\0\n")
    (tmp_path / "val.de").write_bytes(b"a\nb\n")
    with pytest.raises(NMTError, match=rf"{tmp_path / 'val.en'} line 2: holds a NUL byte"):
        read_split(cfg, "valid")


@pytest.mark.parametrize("block", [1, 7, 1 << 20])
def test_lines_read_in_blocks_equal_lines_split_one_by_one(tmp_path, monkeypatch, block):
    monkeypatch.setattr(corpus_mod, "READ_BLOCK", block)
    rng = random.Random(block)
    pieces = ["a", "Über", "\r", "\r\n", "\n", "\n\n", " ", "\x1c", "\u2028", "Fluss"]
    data = ("\ufeff" + "".join(rng.choice(pieces) for _ in range(3000)) + "end").encode("utf-8")
    (tmp_path / "f.txt").write_bytes(data)
    want = [line.decode("utf-8").removesuffix("\r") for line in data.split(b"\n")]
    want[0] = want[0].removeprefix("\ufeff")
    assert list(iter_lines(tmp_path / "f.txt")) == want
    (tmp_path / "g.txt").write_bytes(data + b"\n" + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(NMTError, match=rf"g.txt line {len(want) + 1}: not valid UTF-8 \(byte 0xe9\)"):
        list(iter_lines(tmp_path / "g.txt"))


# ---------------------------------------------------------------- monolingual text


def test_local_mono_text_goes_to_the_side_of_its_task(tmp_path):
    write(tmp_path / "train.de.gz", TGT)
    write(tmp_path / "val.de", TGT[:2])
    cfg = DataConfig(dir=str(tmp_path), valid="val", test="test", lang="de")
    empty = [""] * len(TGT)
    assert read_split(cfg, "train", side="tgt") == (empty, TGT)
    assert read_split(cfg, "train", side="src") == (TGT, empty)
    assert [len(t) for _, t in iter_split(cfg, "train", chunk=3, side="tgt")] == [3, 1]
    assert not has_test(cfg, "tgt")  # no test.de: no test split
    write(tmp_path / "test.de", TGT[1:])
    assert has_test(cfg, "tgt") and read_split(cfg, "test", side="tgt")[1] == TGT[1:]


def test_mono_fingerprint_reads_only_its_language(tmp_path):
    write(tmp_path / "train.de", TGT)
    cfg = DataConfig(dir=str(tmp_path), lang="de")
    first = corpus_fingerprint(cfg, "train", "tgt")
    assert corpus_fingerprint(cfg, "train", "src") != first
    write(tmp_path / "train.de", TGT[:2])
    assert corpus_fingerprint(cfg, "train", "tgt") != first


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hub_mono_from_translation_or_text_column(tmp_path, layout):
    make_splits(layout).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(hf_name=str(tmp_path / "ds"), lang="de")
    assert read_split(cfg, "valid", side="tgt") == (["", ""], TGT[:2])
    fr = DataConfig(hf_name=str(tmp_path / "ds"), lang="fr")
    missing = "language 'fr' not in dataset" if layout == "translation" else "no 'text', 'fr' or 'translation' column"
    with pytest.raises(NMTError, match=missing):
        read_split(fr, "train", side="tgt")
    text = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": SRC})})
    text.save_to_disk(str(tmp_path / "text"))
    assert read_split(DataConfig(hf_name=str(tmp_path / "text"), lang="en"), "train", side="src") == (SRC, [""] * 4)
