"""End-to-end preparation of local and Hub corpora."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from tests.unit.prepare_helpers import Log, make_cfg, make_corpus

from nmt.config import Config, DataConfig, TokenizerConfig
from nmt.data.cache import cache_key
from nmt.data.prepare import prepare_data
from nmt.errors import NMTError
from nmt.tokenizer import Tokenizer


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


def test_missing_valid_file(tmp_path, corpus_dir):
    (corpus_dir / "val.de").unlink()
    with pytest.raises(NMTError, match=str(corpus_dir / "val.de")):
        prepare_data(make_cfg(tmp_path, corpus_dir), log=Log())


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
