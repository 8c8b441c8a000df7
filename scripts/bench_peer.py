"""The Hugging Face peer of ``scripts/bench.py``: a ``MarianMTModel`` of the same size as an nmt model.

Nothing is downloaded: the model is built from a ``MarianConfig`` with random weights. It matches
nmt's post-norm Transformer: same vocabulary, d_model, layers, heads and FFN width, ReLU, the same
dropout, tied source/target/output embeddings, embeddings scaled by sqrt(d_model) and static
sinusoidal positions (Marian's). Differences that remain: Marian has separate Q/K/V projections
(nmt fuses them), a ``final_logits_bias`` buffer added to the logits, and HF's own attention masks.

Training is a plain PyTorch loop (forward under autocast, label-smoothed cross-entropy summed over
non-pad tokens and divided by their number, backward, gradient clipping, Adam, LR schedule) on
exactly the batches nmt's ``Trainer`` sees; decoding is ``generate``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from nmt.config import ModelConfig
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID


def import_transformers():
    """``transformers`` with its logging quietened, or None when it is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    return transformers


def marian_config_kwargs(cfg: ModelConfig, vocab_size: int) -> dict[str, Any]:
    """``MarianConfig`` arguments for a model of the same size as nmt's ``cfg`` (a pure function)."""
    if cfg.norm_first:
        raise ValueError("Marian is post-norm: the peer needs model.norm_first=false")
    return dict(
        vocab_size=vocab_size,
        decoder_vocab_size=vocab_size,
        max_position_embeddings=cfg.max_positions,
        d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        activation_function=cfg.activation,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        scale_embedding=True,
        share_encoder_decoder_embeddings=cfg.tie_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=None,
        use_cache=True,
    )


def build_marian(cfg: ModelConfig, vocab_size: int, device: torch.device):
    transformers = import_transformers()
    if transformers is None:
        raise RuntimeError("the peer needs transformers: pip install -e '.[bench]'")
    config = transformers.MarianConfig(**marian_config_kwargs(cfg, vocab_size))
    model = transformers.MarianMTModel(config)
    if cfg.tie_embeddings:
        out = model.get_output_embeddings().weight
        assert out.data_ptr() == model.model.shared.weight.data_ptr(), "output embedding is not tied"
    return model.to(device)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


class PeerTrainer:
    """A plain PyTorch training loop around the Marian model (the same work as nmt's train_step)."""

    def __init__(self, model, lr_lambda, label_smoothing: float, clip_norm: float,
                 betas: tuple[float, float], eps: float, precision: str, device: torch.device):
        self.model = model
        self.label_smoothing = label_smoothing
        self.clip_norm = clip_norm
        self.precision = precision
        self.device = device
        # A plain Adam with the same settings (torch picks its default implementation).
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=betas, eps=eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.loss_sum = torch.zeros((), device=device)
        model.train()

    def step(self, batch) -> None:
        """batch: nmt's Batch (src, tgt_in, tgt_out, n_tgt_tokens) on the CPU."""
        b = batch.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            logits = self.model(input_ids=b.src, attention_mask=b.src.ne(PAD_ID),
                                decoder_input_ids=b.tgt_in, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), b.tgt_out.reshape(-1),
                               ignore_index=PAD_ID, label_smoothing=self.label_smoothing,
                               reduction="sum")
        (loss / b.n_tgt_tokens).backward()
        if self.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.loss_sum += loss.detach()


@torch.inference_mode()
def generate(model, src: torch.Tensor, beam: int, length: int, precision: str,
             device: torch.device) -> torch.Tensor:
    """Exactly ``length`` new tokens per sentence (min_new_tokens = max_new_tokens); [B, 1 + length]."""
    with autocast(device, precision):
        return model.generate(
            input_ids=src, attention_mask=src.ne(PAD_ID), num_beams=beam, do_sample=False,
            min_new_tokens=length, max_new_tokens=length, early_stopping=True, length_penalty=1.0,
            num_return_sequences=1, use_cache=True, decoder_start_token_id=BOS_ID,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, forced_eos_token_id=None,
        )
