"""Cleaning of the training pairs and truncation of the loss targets."""

from __future__ import annotations

import pytest
from tests.unit.prepare_helpers import Log, make_cfg, make_corpus, write_split

from nmt.data.prepare import prepare_data
from nmt.errors import NMTError


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


def test_empty_corpus_after_cleaning(tmp_path, corpus_dir):
    write_split(corpus_dir, "train", ["", " ", "x"], ["a", "", "  "])
    with pytest.raises(NMTError, match="empty after cleaning"):
        prepare_data(make_cfg(tmp_path, corpus_dir), log=Log())


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
