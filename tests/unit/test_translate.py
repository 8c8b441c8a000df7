"""translate_lines: order, line count, empty and over-long lines, token-based batching, formats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmt.config import DecodeConfig, ModelConfig, TokenizerConfig
from nmt.errors import NMTError
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt.translate import Translation, length_batches, translate, translate_lines

WORDS = [f"w{i}" for i in range(40)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class WordTokenizer:
    """Whitespace words <-> ids 4.. (fixed vocabulary); same vocabulary on both sides."""

    def __init__(self) -> None:
        self.ids = {w: i + 4 for i, w in enumerate(WORDS)}
        self.words = {i: w for w, i in self.ids.items()}
        self.src_vocab_size = self.tgt_vocab_size = len(WORDS) + 4
        self.encoded: list[str] = []

    def encode_src(self, lines: list[str]) -> list[list[int]]:
        self.encoded.extend(lines)
        return [[self.ids.get(w, 1) for w in line.split()] for line in lines]

    def decode_tgt(self, ids: list[list[int]]) -> list[str]:
        return [" ".join(self.words.get(i, "<unk>") for i in row if i not in (PAD_ID, BOS_ID, EOS_ID))
                for row in ids]


class CopyCache:
    def __init__(self, rows: list[list[int]]) -> None:
        self.rows, self.length = rows, 0

    def reorder(self, index: torch.Tensor, same_sources: bool = False) -> None:
        self.rows = [self.rows[i] for i in index.tolist()]

    def expand(self, beam: int) -> None:
        self.rows = [r for r in self.rows for _ in range(beam)]


class CopyModel(nn.Module):
    """Emits its source (which ends with EOS) token by token; records the batch shapes it encodes."""

    def __init__(self, vocab: int, max_positions: int = 16) -> None:
        super().__init__()
        self.vocab, self.max_positions = vocab, max_positions
        self.shapes: list[tuple[int, int]] = []
        self.modes: list[bool] = []

    def encode(self, src: torch.Tensor, src_pad_mask: torch.Tensor) -> torch.Tensor:
        assert src.size(1) <= self.max_positions
        self.shapes.append(tuple(src.shape))
        self.modes.append(self.training)
        return src.float()[:, :, None]

    def init_cache(self, memory: torch.Tensor, src_pad_mask: torch.Tensor,
                   max_len: int = 0) -> CopyCache:
        rows = [[int(t) for t, pad in zip(row, m, strict=True) if not pad]
                for row, m in zip(memory[:, :, 0].tolist(), src_pad_mask.tolist(), strict=True)]
        return CopyCache(rows)

    def decode_step(self, tokens: torch.Tensor, cache: CopyCache) -> torch.Tensor:
        assert cache.length < self.max_positions
        logits = torch.full((tokens.size(0), self.vocab), -10.0)
        for r, row in enumerate(cache.rows):
            logits[r, row[cache.length] if cache.length < len(row) else EOS_ID] = 10.0
        cache.length += 1
        return logits


LINES = ["w1 w2 w3", "", "w4", "   ", " ".join(WORDS), "w5 w6 w7 w8 w9 w10", "w11 w12", "w13",
         "w14 w15 w16 w17", ""]
EXPECTED = [" ".join(line.split()) for line in LINES]
EXPECTED[4] = " ".join(WORDS[:15])  # truncated: 15 words + EOS = max_positions (16)


@pytest.mark.parametrize("search", ["beam", "greedy", "sample"])
def test_order_count_empty_and_long_lines(search):
    tok = WordTokenizer()
    model = CopyModel(tok.tgt_vocab_size)
    cfg = DecodeConfig(beam=3, batch_tokens=12)
    out = list(translate_lines(model, tok, iter(LINES), cfg, "cpu", "fp32", search=search,
                               chunk_lines=3))
    assert out == EXPECTED
    assert "" not in tok.encoded and "   " not in tok.encoded  # empty lines never reach the model
    assert sum(b for b, _ in model.shapes) == len([x for x in LINES if x.strip()])


def test_batches_respect_batch_tokens_and_mode_is_restored():
    tok = WordTokenizer()
    model = CopyModel(tok.tgt_vocab_size).train()
    lines = [" ".join(WORDS[: (i * 7) % 12 + 1]) for i in range(30)]
    out = list(translate_lines(model, tok, lines, DecodeConfig(beam=2, batch_tokens=20), "cpu"))
    assert out == lines
    assert all(b * s <= 20 or b == 1 for b, s in model.shapes)
    assert len(model.shapes) > 3 and max(b for b, _ in model.shapes) > 1
    assert model.modes == [False] * len(model.shapes) and model.training


def test_scores_and_nbest_formats():
    tok = WordTokenizer()
    model = CopyModel(tok.tgt_vocab_size)
    cfg = DecodeConfig(beam=3, nbest=2, lenpen=0.0)
    out = list(translate_lines(model, tok, ["w1 w2", ""], cfg, "cpu", with_scores=True))
    best, second = out[0].split("\n")
    score, text = best.split("\t")
    assert text == "w1 w2" and float(score) == pytest.approx(0.0, abs=1e-3)
    assert float(second.split("\t")[0]) < float(score)
    assert out[1] == "0.0000\t\n0.0000\t"  # empty line: as many (empty) hypotheses as the others
    [result] = list(translate(model, tok, ["w3"], cfg))
    assert isinstance(result, Translation) and result.text == "w3" and len(result.nbest) == 2


def test_length_batches():
    lengths = [3, 9, 1, 9, 4, 30]
    batches = length_batches(lengths, batch_tokens=20)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [5]  # longer than batch_tokens: alone, first
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 20


def test_bad_arguments_raise_nmt_error():
    tok = WordTokenizer()
    model = CopyModel(tok.tgt_vocab_size)
    with pytest.raises(NMTError):
        list(translate_lines(model, tok, ["w1"], DecodeConfig(), search="topk"))
    with pytest.raises(NMTError):
        list(translate_lines(model, tok, ["w1"], DecodeConfig(), precision="fp8"))


def test_real_model_and_tokenizer_bf16():
    from nmt.model import build_model
    from nmt.tokenizer import Tokenizer

    corpus = [f"a small house number {i} stands by the river {i % 7}" for i in range(60)]
    tokenizer = Tokenizer.train(corpus, corpus, TokenizerConfig(vocab_size=60, input_sentence_size=0))
    torch.manual_seed(0)
    mcfg = ModelConfig(encoder_layers=1, decoder_layers=1, d_model=16, heads=2, d_ff=32,
                       max_positions=12)
    model = build_model(mcfg, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    lines = ["a small house", "", " ".join(corpus[:5]), "the river 3"]
    cfg = DecodeConfig(beam=2, max_len_a=1.0, max_len_b=2, batch_tokens=30)
    out = list(translate_lines(model, tokenizer, lines, cfg, "cpu", "bf16"))
    assert len(out) == 4 and out[1] == ""


@pytest.mark.parametrize("argv, device, major, expected", [
    ([], "cuda", 8, "bf16"),  # the default: auto
    ([], "cuda", 7, "fp32"),
    ([], "cpu", 0, "fp32"),
    (["--precision", "fp32"], "cuda", 8, "fp32"),
    (["--precision", "fp16"], "cpu", 0, "fp16"),
])
def test_cli_decodes_in_the_resolved_precision(monkeypatch, argv, device, major, expected):
    from types import SimpleNamespace

    import nmt.translate
    from nmt import cli

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(major=major))
    monkeypatch.setattr("nmt.runtime.configure_math", lambda *a: None)  # no TF32 flags flipped for the process
    seen = []
    monkeypatch.setattr(nmt.translate, "translate_lines", lambda *a, **k: seen.append(a[5]) or iter(()))
    for command in (["translate", "-m", "x.pt"], ["evaluate", "-m", "x.pt"]):
        args = cli.build_parser().parse_args([*command, *argv])
        list(cli._translate(args, None, None, DecodeConfig(), "beam", torch.device(device), []))
    assert seen == [expected, expected]
