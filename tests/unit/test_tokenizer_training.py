"""SentencePiece trained on the streamed training split."""

from __future__ import annotations

import pytest
from tests.unit.prepare_helpers import Log, make_cfg, make_corpus

from nmt.data import tokenizer_training as training_mod
from nmt.data.prepare import prepare_data
from nmt.errors import NMTError


def test_a_large_corpus_trains_its_tokenizer_in_another_process_to_the_same_model(tmp_path, corpus_dir,
                                                                                  monkeypatch):
    here = prepare_data(make_cfg(tmp_path / "here", corpus_dir), log=Log()).tokenizer
    monkeypatch.setattr(training_mod, "APART_MIN", 50)  # the corpus's 200 pairs now count as large
    monkeypatch.setattr(training_mod, "train_here", None)  # would fail in this process
    apart = prepare_data(make_cfg(tmp_path / "apart", corpus_dir), log=Log()).tokenizer
    assert apart.to_state() == here.to_state()


def test_separate_tokenizers(tmp_path, corpus_dir):
    data = prepare_data(make_cfg(tmp_path, corpus_dir, vocab_size=40, joint=False,
                                 model_type="unigram"), log=Log())
    assert not data.tokenizer.joint
    assert data.tokenizer.src_vocab_size == data.tokenizer.tgt_vocab_size == 40
    assert data.tokenizer.decode_tgt([data.train.tgt[0]]) == [make_corpus(200, 0)[1][0]]


def test_vocab_too_large(tmp_path, corpus_dir):
    with pytest.raises(NMTError, match=r"tokenizer.vocab_size=3000 is too large for this corpus; try <="):
        prepare_data(make_cfg(tmp_path, corpus_dir, vocab_size=3000), log=Log())


def test_a_pair_tokenizer_of_a_masked_lm_reads_both_languages_and_the_model_only_its_own(tmp_path, corpus_dir):
    def mlm(text: str):
        cfg = make_cfg(tmp_path / text, corpus_dir, vocab_size=120, text=text)
        cfg.task, cfg.model.arch, cfg.data.lang = "mlm", "encoder_only", "en"
        return prepare_data(cfg, log=Log())

    own, pair = mlm("task"), mlm("pair")
    german = make_corpus(50, 3)[1]
    pieces = {name: sum(map(len, data.tokenizer.encode_tgt(german))) for name, data in (("task", own), ("pair", pair))}
    assert pieces["pair"] < 0.8 * pieces["task"], pieces
    assert pair.tokenizer.mask_id == own.tokenizer.mask_id == 4  # <mask> still reserved
    assert pair.train.tgt.lengths().max() == 0  # the model still trains on English only
    assert len(pair.train.src.lengths()) == len(own.train.src.lengths())
