"""End-to-end preparation of local and Hub corpora."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
from tests.unit.prepare_helpers import Log, make_cfg, make_corpus

from nmt.config import Config, DataConfig, TokenizerConfig
from nmt.data.cache import cache_key
from nmt.data.prepare import prepare_data, prepare_on_each_machine
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


def _machine_process(cfg: Config, machine: Path, rank: int, local_rank: int, barrier, results) -> None:
    os.environ["XDG_CACHE_HOME"] = str(machine)  # each machine has its own data.cache_dir
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank))
    try:
        data = prepare_on_each_machine(cfg, local_rank, barrier.wait, log=lambda _: None)
        results.put((machine.name, local_rank, str(data.cache_dir), len(data.train)))
    except Exception as e:
        barrier.abort()
        results.put((machine.name, local_rank, repr(e), 0))


def test_the_first_process_on_each_machine_prepares_its_data(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    cfg.data.cache_dir = None
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    ranks = [(tmp_path / "machine_a", 0), (tmp_path / "machine_a", 1), (tmp_path / "machine_b", 0)]
    processes = [context.Process(target=_machine_process, args=(cfg, machine, rank, local_rank, barrier, results))
                 for rank, (machine, local_rank) in enumerate(ranks)]
    for process in processes:
        process.start()
    got = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=30)
    key = cache_key(cfg)
    assert got == [(machine.name, local_rank, str(machine / "nmt" / "data" / key), 200)
                   for machine, local_rank in sorted(ranks)]


def test_a_reused_run_dir_holds_only_the_configured_tokenizer(tmp_path, corpus_dir):
    prepare_data(make_cfg(tmp_path, corpus_dir), log=Log())
    separate = make_cfg(tmp_path, corpus_dir, vocab_size=40, joint=False)  # same run_dir, joint switched off
    data = prepare_data(separate, log=Log())
    saved = Path(separate.run_dir) / "tokenizer"
    assert sorted(p.name for p in saved.iterdir()) == ["src.model", "tgt.model"]
    assert Tokenizer.load(saved, joint=False).to_state() == data.tokenizer.to_state()


def test_lm_corpus_is_pairs_with_an_empty_source(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    cfg.task, cfg.model.arch, cfg.data.lang, cfg.data.max_len_ratio = "lm", "decoder_only", "de", 1.0
    (corpus_dir / "test.de").unlink()
    # a one-word line: no length ratio to the empty source drops it
    (corpus_dir / "train.de").write_text((corpus_dir / "train.de").read_text() + "\nhundq\n")
    data = prepare_data(cfg, log=Log())
    tgt = make_corpus(200, 0)[1] + ["hundq"]
    assert len(data.train) == 201 and data.train.src.lengths().max() == 0
    assert data.tokenizer.decode_tgt([data.train.tgt[200]]) == ["hundq"]
    assert data.tokenizer.decode_tgt([data.train.tgt[7]]) == [tgt[7]]
    assert data.valid.src_text == [""] * 20 and data.valid.tgt_text == make_corpus(20, 1)[1]
    assert data.test is None  # no test.de


def test_mlm_corpus_is_pairs_with_an_empty_target(tmp_path, corpus_dir):
    cfg = make_cfg(tmp_path, corpus_dir)
    cfg.task, cfg.model.arch, cfg.data.lang = "mlm", "encoder_only", "en"
    data = prepare_data(cfg, log=Log())
    assert len(data.train) == 200 and data.train.tgt.lengths().max() == 0
    assert data.tokenizer.decode_src([data.train.src[3]]) == [make_corpus(200, 0)[0][3]]
    assert data.test.src_text == make_corpus(20, 2)[0]
