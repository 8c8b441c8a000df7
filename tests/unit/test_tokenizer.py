from __future__ import annotations

import random

import numpy as np
import pytest
import sentencepiece as spm

from nmt.config import TokenizerConfig
from nmt.errors import NMTError
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

WORDS = "the a man woman dog cat runs sits on under red blue big small park street ball water".split()


def make_corpus(n: int = 200, seed: int = 0) -> tuple[list[str], list[str]]:
    """Synthetic pairs; the target side uses reversed words ending in 'q' (no 'q' in the source)."""
    rng = random.Random(seed)
    src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    tgt = [" ".join(w[::-1] + "q" for w in s.split()) for s in src]
    return src, tgt


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    return make_corpus()


@pytest.fixture(scope="module")
def joint(corpus) -> Tokenizer:
    return Tokenizer.train(*corpus, TokenizerConfig(vocab_size=80))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_round_trip(corpus, model_type):
    src, tgt = corpus
    tok = Tokenizer.train(src, tgt, TokenizerConfig(vocab_size=60, model_type=model_type))
    assert tok.src_vocab_size == 60
    assert tok.decode_src(tok.encode_src(src[:20])) == src[:20]
    assert tok.decode_tgt(tok.encode_tgt(tgt[:20])) == tgt[:20]


def test_special_ids_fixed(joint, corpus):
    sp = spm.SentencePieceProcessor(model_proto=joint.to_state()["joint"])
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    ids = joint.encode_tgt(corpus[1][:50])
    assert all(i not in (PAD_ID, BOS_ID, EOS_ID) for row in ids for i in row)


def test_decode_drops_special_ids(joint, corpus):
    line = corpus[1][0]
    ids = joint.encode_tgt([line])[0]
    assert joint.decode_tgt([[BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]]) == [line]


def test_state_and_save_round_trip(joint, corpus, tmp_path):
    restored = Tokenizer.from_state(joint.to_state())
    joint.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    expected = joint.encode_src(corpus[0][:30])
    assert restored.encode_src(corpus[0][:30]) == expected
    assert loaded.encode_src(corpus[0][:30]) == expected
    assert loaded.joint and loaded.tgt_vocab_size == joint.tgt_vocab_size


def test_joint_model_shares_vocabulary(joint):
    assert joint.joint and set(joint.to_state()) == {"joint"}
    assert joint.src_vocab_size == joint.tgt_vocab_size
    assert joint.encode_src(["qq"]) == joint.encode_tgt(["qq"])
    assert UNK_ID not in joint.encode_src(["qq"])[0]


def test_separate_models(corpus, tmp_path):
    tok = Tokenizer.train(*corpus, TokenizerConfig(vocab_size=50, joint=False))
    assert not tok.joint and set(tok.to_state()) == {"src", "tgt"}
    assert UNK_ID in tok.encode_src(["qq"])[0]  # 'q' only occurs on the target side
    assert UNK_ID not in tok.encode_tgt(["qq"])[0]
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).encode_tgt(["qq"]) == tok.encode_tgt(["qq"])


def test_pieces_cover_the_line(joint, corpus):
    line = corpus[0][3]
    pieces = joint.src_pieces(line)
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces).replace("\u2581", " ").strip() == line
    assert len(joint.tgt_pieces(corpus[1][3])) == len(joint.encode_tgt([corpus[1][3]])[0])


def test_vocab_too_large_is_a_one_line_error(corpus):
    with pytest.raises(NMTError, match=r"tokenizer.vocab_size=5000 is too large .* try <= \d+") as e:
        Tokenizer.train(*corpus, TokenizerConfig(vocab_size=5000))
    assert "\n" not in str(e.value)


def test_vocab_smaller_than_alphabet(corpus):
    with pytest.raises(NMTError, match=r"vocab_size=10 is too small .* use >= \d+"):
        Tokenizer.train(*corpus, TokenizerConfig(vocab_size=10))


def test_load_missing_directory(tmp_path):
    with pytest.raises(NMTError, match="no tokenizer in"):
        Tokenizer.load(tmp_path / "nowhere")


def test_deterministic_training(corpus):
    cfg = TokenizerConfig(vocab_size=60, input_sentence_size=150)  # sampled from 400 sentences
    first = Tokenizer.train(*corpus, cfg, seed=3).to_state()
    assert Tokenizer.train(*corpus, cfg, seed=3).to_state() == first


def test_tiny_input_sentence_size_rejected(corpus):
    with pytest.raises(NMTError, match="input_sentence_size"):
        Tokenizer.train(*corpus, TokenizerConfig(vocab_size=60, input_sentence_size=50))


def test_saving_over_another_layout_removes_it(joint, corpus, tmp_path):
    separate = Tokenizer.train(*corpus, TokenizerConfig(vocab_size=50, joint=False))
    joint.save(tmp_path)  # a reused run folder: tokenizer.joint switched from true to false
    separate.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.model", "tgt.model"]
    assert Tokenizer.load(tmp_path).to_state() == separate.to_state()
    assert Tokenizer.load(tmp_path, joint=False).to_state() == separate.to_state()
    with pytest.raises(NMTError, match="missing .*joint.model"):
        Tokenizer.load(tmp_path, joint=True)
    joint.save(tmp_path)  # and back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["joint.model"]
    assert Tokenizer.load(tmp_path, joint=True).to_state() == joint.to_state()


def test_load_names_the_layout_when_both_are_present(joint, corpus, tmp_path):
    Tokenizer.train(*corpus, TokenizerConfig(vocab_size=50, joint=False)).save(tmp_path)
    (tmp_path / "joint.model").write_bytes(joint.to_state()["joint"])  # left by an older version
    with pytest.raises(NMTError, match="both a joint and separate tokenizer models; say which with tokenizer.joint"):
        Tokenizer.load(tmp_path)
    assert not Tokenizer.load(tmp_path, joint=False).joint


def test_a_masked_lm_tokenizer_reserves_mask_as_one_piece(corpus, joint):
    tok = Tokenizer.train(*corpus, TokenizerConfig(vocab_size=80), mask=True)
    assert tok.mask_id == 4 and joint.mask_id is None
    ids = tok.encode_src(["the man <mask> on the ball"])[0]
    assert ids.count(4) == 1 and UNK_ID not in ids
    assert Tokenizer.from_state(tok.to_state()).mask_id == 4  # travels with the checkpoint


def test_bpe_dropout_at_alpha_zero_is_sentencepiece_encoding(joint, corpus):
    # unseen characters (unknown ids, runs of them), odd spaces, an empty line
    odd = ["  the  dog ", "", "ü the €€ dog ü", "€", "the€€€man", "balll lll eee sss"]  # ties: leftmost first
    lines = corpus[0] + corpus[1] + odd
    rng = np.random.default_rng(0)
    assert joint.sample_src(lines, 0.0, rng) == joint.encode_src(lines)
    assert any(UNK_ID in ids for ids in joint.encode_src(odd))
    tok = Tokenizer.train(*corpus, TokenizerConfig(vocab_size=250))  # many merges, long pieces
    assert tok.sample_tgt(lines, 0.0, rng) == tok.encode_tgt(lines)


def test_bpe_dropout_of_a_masked_lm_tokenizer_never_makes_a_mask(corpus):
    # masked-LM training samples segmentations of plain text; <mask> ids come from the masking only
    tok = Tokenizer.train(*corpus, TokenizerConfig(vocab_size=80), mask=True)
    src = corpus[0]
    assert tok.sample_src(src, 0.0, np.random.default_rng(0)) == tok.encode_src(src)
    sampled = tok.sample_src(src, 0.3, np.random.default_rng(0))
    assert sampled != tok.encode_src(src) and tok.decode_src(sampled) == src
    assert not any(tok.mask_id in ids for ids in sampled)


def test_bpe_dropout_differs_per_draw_and_decodes_to_the_same_text(joint, corpus):
    src = corpus[0]
    a = joint.sample_src(src, 0.1, np.random.default_rng([0, 0]))
    b = joint.sample_src(src, 0.1, np.random.default_rng([1, 0]))
    assert a != b and a != joint.encode_src(src)
    assert sum(map(len, a)) > sum(map(len, joint.encode_src(src)))  # dropped merges: more pieces
    assert joint.decode_src(a) == joint.decode_src(b) == src
    assert joint.sample_src(src, 0.1, np.random.default_rng([0, 0])) == a  # the generator fixes the draw
