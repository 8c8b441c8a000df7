"""Sampling from a language model (task lm): continuations of a prompt, decoded by the sampling
search of translation. A language model is a decoder-only translator with an empty source, so
it reads ``</s> <s> prompt``, and its continuation is the rest of that target sentence."""

from __future__ import annotations

import torch

from nmt.decoding import sample_continuations
from nmt.errors import NMTError
from nmt.runtime import autocast_context
from nmt.special import BOS_ID, EOS_ID
from nmt.translate import SamplingOptions


def generate(model, tokenizer, prompt: str, num: int, max_len: int, max_positions: int,
             sampling: SamplingOptions, device: str | torch.device = "cpu", precision: str = "fp32") -> list[str]:
    """``num`` samples of ``prompt`` and its continuation of at most ``max_len`` pieces,
    detokenized; ``max_positions`` is the model's whole sequence (``model.max_positions``). The same
    ``sampling.seed`` gives the same samples."""
    if num < 1 or max_len < 1:
        raise NMTError(f"--num and --max-len must be >= 1, got {num} and {max_len}")
    ids = tokenizer.encode_tgt([prompt])[0] if prompt.strip() else []
    sequence = [EOS_ID, BOS_ID, *ids]  # the empty source, then the target so far
    room = max_positions - len(sequence)
    if room < 1:
        raise NMTError(f"the prompt is {len(ids)} pieces long; this model reads at most "
                       f"{max_positions - len(sequence) + len(ids) - 1}")
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    prompts = torch.tensor([sequence] * num, dtype=torch.long, device=device)  # [num, P]
    was_training = model.training
    model.eval()
    try:
        with autocast_context(device, precision):
            hyps = sample_continuations(model, prompts, min(max_len, room), sampling.temperature, sampling.top_k,
                                        sampling.top_p, min_len=0 if ids else 1, generator=generator)
    finally:
        model.train(was_training)
    return tokenizer.decode_tgt([ids + h.tokens for h in hyps])
