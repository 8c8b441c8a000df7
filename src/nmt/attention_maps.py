"""Attention maps of one sentence pair: encoder self-, decoder self- and cross-attention weights.

The weights come from ``Transformer.attention_maps`` (the explicit-softmax path, used only when
asked for). Without a reference the target is the model's own greedy translation. Rows of the
decoder maps are labelled with the token being predicted at that position (``y_t``); the columns of
decoder self-attention are the decoder inputs (``<s> y_1 .. y_{t-1}``), so a row only sees the
tokens before the one it predicts. The heatmaps (``nmt.attention_plot``) and the server's page
(``nmt.serve``) both draw from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nmt.config import DecodeConfig
from nmt.decoding import greedy_search, model_max_positions
from nmt.errors import NMTError
from nmt.model.layers import AttentionMaps
from nmt.special import BOS_ID, EOS_ID, PAD_ID

BOS, EOS = "<s>", "</s>"


@dataclass
class SentenceAttention:
    """Attention of one sentence pair; every map is [heads, queries, keys] (float32, CPU)."""

    source: list[str]  # source pieces + </s>: the encoder positions
    decoder_in: list[str]  # <s> + target pieces: the decoder input positions
    decoder_out: list[str]  # target pieces + </s>: the token predicted at each decoder position
    target: str  # the target text (reference, or the greedy translation)
    maps: AttentionMaps

    def labels(self, kind: str) -> tuple[list[str], list[str]]:
        """(row labels, column labels) of the maps of ``kind``."""
        return {"encoder": (self.source, self.source),
                "decoder_self": (self.decoder_out, self.decoder_in),
                "cross": (self.decoder_out, self.source)}[kind]


def sentence_attention(model, tokenizer, source: str, target: str | None = None,
                       decode: DecodeConfig | None = None,
                       device: str | torch.device = "cpu") -> SentenceAttention:
    """Attention maps of ``source`` with ``target`` teacher-forced (greedy translation if None)."""
    if not source.strip():
        raise NMTError("the source sentence is empty")
    device = torch.device(device)
    cap = model_max_positions(model)
    limit = cap - 1 if cap is not None else None  # room for EOS (source) or BOS (target)
    src_ids = tokenizer.encode_src([source])[0][:limit]
    src_labels = tokenizer.src_pieces(source)[:limit]
    src = torch.tensor([[*src_ids, EOS_ID]], device=device)
    if target is None:
        tgt_ids = _greedy(model, src, decode or DecodeConfig())[:limit]
        tgt_labels = _piece_lookup(tokenizer)(tgt_ids)
        target = tokenizer.decode_tgt([tgt_ids])[0]
    else:
        tgt_ids = tokenizer.encode_tgt([target])[0][:limit]
        tgt_labels = tokenizer.tgt_pieces(target)[:limit]
    tgt_in = torch.tensor([[BOS_ID, *tgt_ids]], device=device)
    maps = model.attention_maps(src, tgt_in)
    maps = {kind: [w[0].float().cpu() for w in layers] for kind, layers in maps.items()}
    return SentenceAttention([*src_labels, EOS], [BOS, *tgt_labels], [*tgt_labels, EOS], target, maps)


@torch.no_grad()
def _greedy(model, src: torch.Tensor, decode: DecodeConfig) -> list[int]:
    was_training = model.training
    model.eval()
    try:
        hyp = greedy_search(model, src, src.eq(PAD_ID), decode.max_len_a, decode.max_len_b, decode.min_len,
                            decode.no_repeat_ngram)[0]
    finally:
        model.train(was_training)
    return hyp.tokens


def _piece_lookup(tokenizer):
    """ids -> target subword pieces, for token ids the model generated (not re-segmented text)."""
    import sentencepiece as spm

    state = tokenizer.to_state()
    sp = spm.SentencePieceProcessor(model_proto=state.get("joint", state.get("tgt")))
    return lambda ids: [sp.id_to_piece(int(i)) for i in ids]
