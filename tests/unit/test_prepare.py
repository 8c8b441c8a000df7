from __future__ import annotations

import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import pytest

from nmt.config import Config, DataConfig, TokenizerConfig
from nmt.data import encode as encode_mod
from nmt.data import prepare as prepare_mod
from nmt.data.prepare import TokenArray, cache_key, prepare_data
from nmt.errors import NMTError
from nmt.tokenizer import Tokenizer

WORDS = "the a man woman dog cat runs sits on under red blue big small park street ball water".split()


def make_corpus(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    return src, [" ".join(w[::-1] + "q" for w in s.split()) for s in src]


def write_split(directory: Path, prefix: str, src: list[str], tgt: list[str]) -> None:
    (directory / f"{prefix}.en").write_text("".join(s + "\n" for s in src), encoding="utf-8")
    (directory / f"{prefix}.de").write_text("".join(t + "\n" for t in tgt), encoding="utf-8")


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    directory = tmp_path / "corpus"
    directory.mkdir()
    write_split(directory, "train", *make_corpus(200, 0))
    write_split(directory, "val", *make_corpus(20, 1))
    write_split(directory, "test", *make_corpus(20, 2))
    return directory


def make_cfg(tmp_path: Path, corpus: Path, **tokenizer) -> Config:
    return Config(run_dir=str(tmp_path / "run"),
                  data=DataConfig(dir=str(corpus), valid="val", test="test", max_len=100,
                                  max_len_ratio=5.0, cache_dir=str(tmp_path / "cache")),
                  tokenizer=TokenizerConfig(vocab_size=tokenizer.pop("vocab_size", 60), **tokenizer))


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in self)


def test_prepare_local_corpus(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    data = prepare_data(cfg, log=Log())
    src, tgt = make_corpus(200, 0)
    assert len(data.train) == 200 and len(data.valid) == 20 and len(data.test) == 20
    assert data.train.src.maps and data.train.src.data.dtype == np.uint16
    assert data.train.src.offsets.dtype == np.int64
    assert data.tokenizer.decode_src([data.train.src[5]]) == [src[5]]
    assert data.tokenizer.decode_tgt([data.train.tgt[7]]) == [tgt[7]]
    assert data.valid.src_text == make_corpus(20, 1)[0] and data.train.src_text is None
    saved = Tokenizer.load(Path(cfg.run_dir) / "tokenizer")
    assert saved.to_state() == data.tokenizer.to_state()


def mapped_rss_kb(path: Path) -> int:
    """This process's resident KiB of the memory maps of ``path`` (Linux ``/proc/self/smaps``)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_cached_arrays_give_the_memory_maps_pages_back_after_each_read(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.setattr(prepare_mod, "LENGTHS_BLOCK", 7)  # several blocks and a ragged last one
    monkeypatch.setattr(prepare_mod, "RELEASE_MIN", 0)  # the tiny files count as large
    data = prepare_data(make_cfg(tmp_path, corpus_dir), log=Log())
    cache = Path(data.cache_dir)
    for name in ("train.src", "train.tgt", "valid.tgt"):
        split, side = name.split(".")
        cached = getattr(getattr(data, split), side)
        in_memory = TokenArray(np.array(cached.data), np.array(cached.offsets))
        assert np.array_equal(cached.lengths(np.int32), np.diff(in_memory.offsets))
        assert cached.lengths(np.int32).dtype == np.int32
        idx = np.array([5, 0, 19, 5, len(cached) - 1])
        (lens, mask, tokens), (want_lens, want_mask, want_tokens) = cached.take(idx), in_memory.take(idx)
        assert np.array_equal(lens, want_lens) and np.array_equal(tokens, want_tokens)
        assert np.array_equal(mask, want_mask) and mask.sum() == len(tokens)
        assert np.array_equal(tokens, np.concatenate([in_memory[i] for i in idx]))
        if sys.platform.startswith("linux"):  # RSS no longer holds what the reads touched
            assert mapped_rss_kb(cache / f"{name}.bin") == 0
            assert mapped_rss_kb(cache / f"{name}.offsets.npy") == 0


def test_a_large_corpus_trains_its_tokenizer_in_another_process_to_the_same_model(tmp_path, corpus_dir,
                                                                                  monkeypatch):
    here = prepare_data(make_cfg(tmp_path / "here", corpus_dir), log=Log()).tokenizer
    monkeypatch.setattr(prepare_mod, "APART_MIN", 50)  # the corpus's 200 pairs now count as large
    monkeypatch.setattr(prepare_mod, "_train_tokenizer_here", None)  # would fail in this process
    apart = prepare_data(make_cfg(tmp_path / "apart", corpus_dir), log=Log()).tokenizer
    assert apart.to_state() == here.to_state()


def test_cleaning_counts_and_valid_untouched(tmp_path, corpus_dir):
    src, tgt = make_corpus(200, 0)
    src[:5] = ["   ", "  padded line  ", "the " * 10_000, "dog", "a dog"]
    tgt[:5] = ["x", "  gniddap q  ", "eht q", "god q " * 8, ""]
    write_split(corpus_dir, "train", src, tgt)
    write_split(corpus_dir, "val", ["", "a dog"], ["", "god q"])
    log = Log()
    data = prepare_data(make_cfg(tmp_path, corpus_dir), log=log)
    assert len(data.train) == 196
    assert log.has("kept 196 of 200 pairs; dropped 2 empty, 1 over data.max_len=100, 1 over data.max_len_ratio=5.0")
    assert data.tokenizer.decode_src([data.train.src[0]]) == ["padded line"]
    assert len(data.valid) == 2 and data.valid.src_text == ["", "a dog"]
    assert data.valid.src.lengths()[0] == 0


def forbid_corpus_work(monkeypatch) -> None:
    """Make every way of reading the corpus or training a tokenizer fail: a cache hit does none."""
    def fail(*args, **kwargs):
        raise AssertionError("a cache hit must not read the corpus or train a tokenizer")

    monkeypatch.setattr(Tokenizer, "train", fail)
    monkeypatch.setattr(Tokenizer, "train_streaming", fail)
    monkeypatch.setattr(prepare_mod, "iter_split", fail)
    monkeypatch.setattr(prepare_mod, "read_split", fail)


def test_cache_hit_skips_reading_and_tokenization(tmp_path, corpus_dir, monkeypatch):
    cfg = make_cfg(tmp_path, corpus_dir)
    first = prepare_data(cfg, log=Log())

    forbid_corpus_work(monkeypatch)
    log = Log()
    second = prepare_data(cfg, log=log)
    assert log.has("using cached data")
    assert np.array_equal(second.train.tgt.data, first.train.tgt.data)
    assert second.test.tgt_text == first.test.tgt_text
    assert second.tokenizer.to_state() == first.tokenizer.to_state()


def test_cache_is_keyed_by_settings_and_files(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    prepare_data(cfg, log=Log())
    bigger = make_cfg(tmp_path, corpus_dir, vocab_size=70)
    assert cache_key(bigger) != cache_key(cfg)
    log = Log()
    assert prepare_data(bigger, log=log).tokenizer.src_vocab_size == 70
    assert not log.has("using cached data")
    write_split(corpus_dir, "val", *make_corpus(21, 5))  # edited corpus file: new key
    log = Log()
    assert len(prepare_data(cfg, log=log).valid) == 21 and not log.has("using cached data")
    assert len([p for p in Path(cfg.data.cache_dir).iterdir() if p.is_dir()]) == 3


def test_interrupted_cache_is_not_used(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    root = Path(cfg.data.cache_dir)
    key = cache_key(cfg)
    (root / f".tmp-{key}-dead").mkdir(parents=True)  # left by a killed run
    (root / f".tmp-{key}-dead" / "train.src.bin").write_bytes(b"garbage")
    (root / key).mkdir()  # a cache folder without meta.json is incomplete
    (root / key / "train.src.bin").write_bytes(b"garbage")
    log = Log()
    data = prepare_data(cfg, log=log)
    assert not log.has("using cached data") and len(data.train) == 200
    assert (root / key / "meta.json").is_file()


def test_failed_build_leaves_no_cache(tmp_path, corpus_dir, monkeypatch):
    cfg = make_cfg(tmp_path, corpus_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "length_filter", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, log=Log())
    assert [p for p in Path(cfg.data.cache_dir).iterdir() if p.suffix != ".lock"] == []


def test_separate_tokenizers(tmp_path, corpus_dir):
    data = prepare_data(make_cfg(tmp_path, corpus_dir, vocab_size=40, joint=False,
                                 model_type="unigram"), log=Log())
    assert not data.tokenizer.joint
    assert data.tokenizer.src_vocab_size == data.tokenizer.tgt_vocab_size == 40
    assert data.tokenizer.decode_tgt([data.train.tgt[0]]) == [make_corpus(200, 0)[1][0]]


def test_no_test_split(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    cfg.data.test = ""
    assert prepare_data(cfg, log=Log()).test is None


def test_hub_dataset_end_to_end(tmp_path):
    def ds(n, seed):
        src, tgt = make_corpus(n, seed)
        return datasets.Dataset.from_dict({"en": src, "de": tgt})

    splits = datasets.DatasetDict({"train": ds(200, 0), "validation": ds(10, 1), "test": ds(10, 2)})
    splits.save_to_disk(str(tmp_path / "ds"))
    cfg = Config(run_dir=str(tmp_path / "run"),
                 data=DataConfig(hf_name=str(tmp_path / "ds"), max_len_ratio=5.0),
                 tokenizer=TokenizerConfig(vocab_size=60))
    data = prepare_data(cfg, log=Log())
    assert len(data.train) == 200 and data.test.src_text == make_corpus(10, 2)[0]


def test_empty_corpus_after_cleaning(tmp_path, corpus_dir):
    write_split(corpus_dir, "train", ["", " ", "x"], ["a", "", "  "])
    with pytest.raises(NMTError, match="empty after cleaning"):
        prepare_data(make_cfg(tmp_path, corpus_dir), log=Log())


def test_vocab_too_large(tmp_path, corpus_dir):
    with pytest.raises(NMTError, match=r"tokenizer.vocab_size=3000 is too large for this corpus; try <="):
        prepare_data(make_cfg(tmp_path, corpus_dir, vocab_size=3000), log=Log())


def test_missing_valid_file(tmp_path, corpus_dir):
    (corpus_dir / "val.de").unlink()
    with pytest.raises(NMTError, match=str(corpus_dir / "val.de")):
        prepare_data(make_cfg(tmp_path, corpus_dir), log=Log())


def test_token_array_select_and_lengths():
    arr = TokenArray.from_lengths(np.arange(10, dtype=np.uint16), np.array([3, 0, 2, 5]))
    assert arr.lengths().tolist() == [3, 0, 2, 5] and len(arr) == 4
    assert arr[3].tolist() == [5, 6, 7, 8, 9]
    kept = arr.select(np.array([True, True, False, True]))
    assert [kept[i].tolist() for i in range(3)] == [[0, 1, 2], [], [5, 6, 7, 8, 9]]


# ---------------------------------------------------------------- shared cache, scale


def test_cache_shared_by_two_run_dirs(tmp_path, corpus_dir, monkeypatch):
    cfg = make_cfg(tmp_path, corpus_dir)
    first = prepare_data(cfg, log=Log())

    forbid_corpus_work(monkeypatch)
    other = make_cfg(tmp_path / "elsewhere", corpus_dir)
    other.data.cache_dir = cfg.data.cache_dir
    log = Log()
    second = prepare_data(other, log=log)
    assert log.has(f"using cached data {Path(cfg.data.cache_dir) / cache_key(cfg)}")
    assert np.array_equal(second.train.src.data, first.train.src.data)
    assert Tokenizer.load(Path(other.run_dir) / "tokenizer").to_state() == first.tokenizer.to_state()


def test_concurrent_prepares_build_once(tmp_path, corpus_dir, monkeypatch):
    builds = []
    write_splits = prepare_mod._write_splits

    def slow_build(*args, **kwargs):
        builds.append(1)
        time.sleep(0.5)  # the other thread arrives while this one builds
        write_splits(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "_write_splits", slow_build)
    cfgs = [make_cfg(tmp_path / name, corpus_dir) for name in ("a", "b")]
    cfgs[1].data.cache_dir = cfgs[0].data.cache_dir
    logs = [Log(), Log()]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: prepare_data(cfgs[i], log=logs[i]), range(2)))
    assert len(builds) == 1
    assert any(log.has("waiting for another run preparing the same data") for log in logs)
    assert np.array_equal(results[0].train.tgt.data, results[1].train.tgt.data)
    assert [p.name for p in Path(cfgs[0].data.cache_dir).iterdir() if p.is_dir()] == [cache_key(cfgs[0])]


def test_parallel_encoding_equals_in_process(tmp_path, corpus_dir, monkeypatch):
    one = prepare_data(make_cfg(tmp_path / "one", corpus_dir), log=Log())
    monkeypatch.setattr(encode_mod, "CHUNK", 30)  # 200 pairs: 7 chunks over a pool of processes
    pool = prepare_data(make_cfg(tmp_path / "pool", corpus_dir), log=Log())
    for side in ("src", "tgt"):
        a, b = getattr(one.train, side), getattr(pool.train, side)
        assert np.array_equal(a.data, b.data) and np.array_equal(a.offsets, b.offsets)


def test_long_valid_sentences_truncated_and_counted(tmp_path, corpus_dir):
    src, tgt = make_corpus(20, 1)
    src[3] = " ".join(["the red dog"] * 60)
    write_split(corpus_dir, "val", src, tgt)
    log = Log()
    data = prepare_data(make_cfg(tmp_path, corpus_dir), log=log)
    assert data.valid.src.lengths().max() == 100 and len(data.valid) == 20
    assert data.valid.src_text[3] == src[3]  # decoding reads the whole sentence
    assert log.has("valid: 20 pairs") and log.has("1 longer than data.max_len=100 cut to it for the loss")
    assert data.tokenizer.decode_src([data.valid.src[4]]) == [src[4]]


def test_given_tokenizer_is_used_not_trained(tmp_path, corpus_dir, monkeypatch):
    parent = prepare_data(make_cfg(tmp_path / "parent", corpus_dir, vocab_size=70), log=Log())

    def fail(*args, **kwargs):
        raise AssertionError("a given tokenizer must not be retrained")

    monkeypatch.setattr(Tokenizer, "train_streaming", fail)
    cfg = make_cfg(tmp_path / "child", corpus_dir)
    data = prepare_data(cfg, log=Log(), tokenizer=parent.tokenizer)
    assert data.tokenizer.to_state() == parent.tokenizer.to_state()
    assert cache_key(cfg, parent.tokenizer) != cache_key(cfg)
    assert np.array_equal(data.train.src.data, parent.train.src.data)


def test_offsets_summed_in_blocks(tmp_path, corpus_dir, monkeypatch):
    one = prepare_data(make_cfg(tmp_path / "one", corpus_dir), log=Log())
    monkeypatch.setattr(encode_mod, "OFFSET_BLOCK", 7)  # 200 sentences: many blocks and a ragged tail
    blocks = prepare_data(make_cfg(tmp_path / "blocks", corpus_dir), log=Log())
    for side in ("src", "tgt"):
        assert np.array_equal(getattr(one.train, side).offsets, getattr(blocks.train, side).offsets)
    assert not list(Path(blocks.cache_dir).glob("*.tmp"))
