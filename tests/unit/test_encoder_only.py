from __future__ import annotations

import pytest
import torch

from nmt.config import ModelConfig
from nmt.mlm import MaskedLMObjective
from nmt.model import EncoderOnlyTransformer, Transformer, build_model
from nmt.special import EOS_ID, PAD_ID

VOCAB = 23

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(arch="encoder_only", encoder_layers=2, d_model=32, heads=4, d_ff=64, dropout=0.0,
                attention_dropout=0.0, max_positions=64)
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> EncoderOnlyTransformer:
    torch.manual_seed(seed)
    model = build_model(tiny_cfg(**overrides), VOCAB, VOCAB).eval()
    assert isinstance(model, EncoderOnlyTransformer)
    return model


def padded(lengths: list[int], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(5, VOCAB, (len(lengths), max(lengths)), generator=gen)
    for row, n in enumerate(lengths):
        src[row, n - 1] = EOS_ID
        src[row, n:] = PAD_ID
    return src


@pytest.mark.parametrize("norm_first", [False, True])
def test_padding_is_never_attended(norm_first):
    model = tiny_model(norm_first=norm_first)
    src = padded([7, 4])
    states = model.encode(src, src.eq(PAD_ID))
    other = src.clone()
    other[1, 4:] = 9  # other tokens in the padded positions, still marked as padding
    changed = model.encode(other, src.eq(PAD_ID))
    assert torch.allclose(states[1, :4], changed[1, :4], atol=1e-6)
    alone = model.encode(src[1:, :4], src[1:, :4].eq(PAD_ID))  # the sentence without padding
    assert torch.allclose(states[1, :4], alone[0], atol=1e-5)


def test_bidirectional_a_later_token_changes_earlier_states():
    model = tiny_model()
    src = padded([6])
    other = src.clone()
    other[0, 4] = 5 if src[0, 4] != 5 else 6
    first = model.encode(src, src.eq(PAD_ID))
    second = model.encode(other, other.eq(PAD_ID))
    assert not torch.allclose(first[0, 0], second[0, 0], atol=1e-4)


def test_head_is_tied_and_objective_equals_cross_entropy_at_positions():
    model = tiny_model()
    assert model.output_proj.weight is model.encoder.embed.token.weight
    assert tiny_model(tie_embeddings=False).output_proj.weight is not None
    src = padded([7, 5])
    positions = torch.tensor([1, 3, 8])  # flat indices into B*S
    targets = torch.tensor([6, 7, 8])
    loss, nll = MaskedLMObjective(model, 0.0)(src, src, positions, targets)
    logits = model.head(model.encode(src, src.eq(PAD_ID))).flatten(0, 1)[positions]
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert torch.allclose(loss, expected, atol=1e-4) and torch.allclose(nll, expected, atol=1e-4)


def test_parameter_names_are_the_translators_encoder():
    encoder_only = set(tiny_model().state_dict())
    translator = set(Transformer(tiny_cfg(arch="encoder_decoder"), VOCAB, VOCAB).state_dict())
    assert {k for k in encoder_only if k != "output_proj.weight"} == {k for k in translator if k.startswith("encoder.")}


def test_the_precision_probe_steps_the_masked_lm_objective():
    from nmt.precision import synthetic_step

    model = tiny_model().train()
    synthetic_step(model, VOCAB, VOCAB, 64, length=8)()  # train.precision=auto times this step
    assert model.encoder.embed.token.weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if "decoder" in n)


def test_bf16_autocast_objective_is_close_to_fp32():
    model = tiny_model()
    src = padded([7, 5])
    positions, targets = torch.tensor([1, 3, 8]), torch.tensor([6, 7, 8])
    full = MaskedLMObjective(model, 0.1)(src, src, positions, targets)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = MaskedLMObjective(model, 0.1)(src, src, positions, targets)[0]
    assert half.dtype == torch.float32 and torch.allclose(half, full, rtol=0.05)
