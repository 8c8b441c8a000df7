from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nmt.config import ModelConfig
from nmt.errors import NMTError
from nmt.model import Transformer, build_model, count_parameters
from nmt.model.cpu_kernels import scaled_dot_product_attention
from nmt.model.incremental import additive_mask
from nmt.tokenizer import BOS_ID, PAD_ID

VOCAB = 23
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(
        encoder_layers=2,
        decoder_layers=2,
        d_model=32,
        heads=4,
        d_ff=64,
        dropout=0.0,
        attention_dropout=0.0,
        max_positions=64,
    )
    return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**overrides), VOCAB, VOCAB).eval()


def random_tokens(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    return torch.randint(4, VOCAB, (rows, cols), generator=gen)


def padded_src(gen: torch.Generator, lengths: list[int]) -> torch.Tensor:
    """[B, max(lengths)] random real tokens, right-padded with PAD_ID."""
    src = random_tokens(gen, len(lengths), max(lengths))
    for row, n in enumerate(lengths):
        src[row, n:] = PAD_ID
    return src


def target_prefix(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    tgt = random_tokens(gen, rows, cols)
    tgt[:, 0] = BOS_ID
    return tgt


def test_base_config_has_about_63m_parameters():
    model = build_model(ModelConfig(), 37_000, 37_000)
    assert abs(count_parameters(model) - 63e6) < 2e6


@pytest.mark.parametrize("norm_first", [False, True])
def test_future_target_tokens_do_not_change_earlier_outputs(norm_first):
    model = tiny_model(norm_first=norm_first)
    gen = torch.Generator().manual_seed(1)
    src, tgt = padded_src(gen, [7, 4, 6]), target_prefix(gen, 3, 8)
    changed = tgt.clone()
    changed[:, 5] = (tgt[:, 5] - 4 + 1) % (VOCAB - 4) + 4
    with torch.no_grad():
        before, after = model(src, tgt), model(src, changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], atol=ATOL, rtol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:], atol=1e-3)


def test_future_target_tokens_do_not_change_earlier_outputs_in_training_with_dropout():
    # training with dropout takes the explicit attention kernel on the CPU, which builds its own mask
    model = tiny_model(dropout=0.3, attention_dropout=0.3).train()
    gen = torch.Generator().manual_seed(1)
    src, tgt = padded_src(gen, [7, 4, 6]), target_prefix(gen, 3, 8)
    changed = tgt.clone()
    changed[:, 5] = (tgt[:, 5] - 4 + 1) % (VOCAB - 4) + 4
    with torch.no_grad():
        torch.manual_seed(5)  # the same dropout masks for both
        before = model(src, tgt)
        torch.manual_seed(5)
        after = model(src, changed)
        unmasked = model.eval()(src, tgt)
    torch.testing.assert_close(before[:, :5], after[:, :5], atol=ATOL, rtol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:], atol=1e-3)
    assert not torch.allclose(before, unmasked, atol=1e-3)  # dropout was really applied


@pytest.mark.parametrize("norm_first", [False, True])
def test_padded_source_positions_do_not_change_real_outputs(norm_first):
    model = tiny_model(norm_first=norm_first)
    gen = torch.Generator().manual_seed(2)
    src, tgt = padded_src(gen, [7, 3, 5]), target_prefix(gen, 3, 6)
    pad_mask = src.eq(PAD_ID)
    garbage = torch.where(pad_mask, random_tokens(gen, *src.shape), src)
    with torch.no_grad():
        memory, memory2 = model.encode(src, pad_mask), model.encode(garbage, pad_mask)
        logits, logits2 = model.decode(tgt, memory, pad_mask), model.decode(tgt, memory2, pad_mask)
    real = ~pad_mask
    torch.testing.assert_close(memory[real], memory2[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, logits2, atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm_first", [False, True])
def test_incremental_decoding_matches_full_decoding(norm_first):
    model = tiny_model(norm_first=norm_first)
    gen = torch.Generator().manual_seed(3)
    src, tgt = padded_src(gen, [5, 9, 2]), target_prefix(gen, 3, 20)  # 20 > initial capacity 16
    pad_mask = src.eq(PAD_ID)
    with torch.no_grad():
        memory = model.encode(src, pad_mask)
        full = model.decode(tgt, memory, pad_mask)
        cache = model.init_cache(memory, pad_mask)
        capacities = set()
        for t in range(tgt.size(1)):
            step = model.decode_step(tgt[:, t], cache)
            torch.testing.assert_close(step, full[:, t], atol=ATOL, rtol=0)
            capacities.add(cache.self_kv.size(4))
    assert cache.length == tgt.size(1)
    assert len(capacities) <= 2  # the buffer grows geometrically, not once per step


def _check_steps(model, cache, src, tgt, start):
    """Run decode_step over tgt[:, start:] and compare with full decoding of (src, tgt)."""
    pad_mask = src.eq(PAD_ID)
    full = model.decode(tgt, model.encode(src, pad_mask), pad_mask)
    for t in range(start, tgt.size(1)):
        torch.testing.assert_close(
            model.decode_step(tgt[:, t], cache), full[:, t], atol=ATOL, rtol=0
        )


def _fresh_cache(model, src):
    pad_mask = src.eq(PAD_ID)
    return model.init_cache(model.encode(src, pad_mask), pad_mask)


@torch.no_grad()
def test_cache_reorder_expand_permute_and_shrink():
    model = tiny_model(norm_first=True)
    gen = torch.Generator().manual_seed(4)
    src, tgt = padded_src(gen, [6, 3, 8]), target_prefix(gen, 3, 5)
    cache = _fresh_cache(model, src)
    _check_steps(model, cache, src, tgt, 0)

    index = torch.tensor([1, 0, 0, 2])  # beam-style: permute and duplicate rows
    cache.reorder(index)
    src, tgt = src[index], torch.cat([tgt[index], random_tokens(gen, 4, 9)], dim=1)
    _check_steps(model, cache, src, tgt, 5)

    index = torch.tensor([3, 1])  # finished rows dropped
    cache.reorder(index)
    src, tgt = src[index], torch.cat([tgt[index], random_tokens(gen, 2, 6)], dim=1)
    _check_steps(model, cache, src, tgt, 14)  # 20 positions: buffer grows after the reorders
    assert cache.length == 20


@torch.no_grad()
def test_beam_cache_moves_history_indexes_and_whole_sentences(nan_filled_new_empty):
    model = tiny_model(norm_first=False)
    gen = torch.Generator().manual_seed(7)
    src, tgt = padded_src(gen, [5, 7, 3]), target_prefix(gen, 3, 2)
    cache = model.init_cache(model.encode(src, src.eq(PAD_ID)), src.eq(PAD_ID))
    _check_steps(model, cache, src, tgt, 0)  # two steps with one row per sentence
    cache.expand(2)
    assert cache.cross_kv.size(2) == 3  # once per sentence, not per row
    rows = torch.tensor([0, 0, 1, 1, 2, 2])  # two hypotheses per sentence, same history so far
    src = src[rows]
    tgt = torch.cat([tgt[rows], random_tokens(gen, 6, 1)], dim=1)
    _check_steps(model, cache, src, tgt, 2)
    cross_before, self_before = cache.cross_kv, cache.self_kv
    index = torch.tensor([1, 1, 3, 2, 4, 5])  # hypotheses swapped and duplicated within sentences
    cache.reorder(index, same_sources=True)
    assert cache.cross_kv is cross_before and cache.self_kv is self_before  # no K/V copied
    tgt = torch.cat([tgt[index], random_tokens(gen, 6, 4)], dim=1)
    _check_steps(model, cache, src, tgt, 3)
    index = torch.tensor([5, 4, 0, 0])  # sentence 1 finished; sentences 2 and 0 swap places
    cache.reorder(index)
    assert cache.cross_kv.size(2) == 2
    src, tgt = src[index], torch.cat([tgt[index], random_tokens(gen, 4, 9)], dim=1)
    _check_steps(model, cache, src, tgt, 7)
    index = torch.tensor([1, 0, 3, 3])
    cache.reorder(index, same_sources=True)
    tgt = torch.cat([tgt[index], random_tokens(gen, 4, 4)], dim=1)
    _check_steps(model, cache, src, tgt, 16)  # 20 positions: the buffer grew past 16
    assert cache.self_kv.size(4) == 32


def test_target_states_project_to_the_full_logits_there():
    model = tiny_model().eval()
    gen = torch.Generator().manual_seed(8)
    src, tgt = padded_src(gen, [6, 3, 5]), padded_src(gen, [4, 7, 2])
    positions = tgt.flatten().ne(PAD_ID).nonzero().squeeze(1)
    with torch.no_grad():
        full, states = model(src, tgt), model.target_states(src, tgt, positions)
    assert states.shape == (positions.numel(), model.output_proj.in_features)
    picked = model.output_proj(states)
    torch.testing.assert_close(picked, full.flatten(0, 1)[positions], atol=ATOL, rtol=0)


def test_overfits_a_single_small_batch():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), VOCAB, VOCAB).train()
    gen = torch.Generator().manual_seed(5)
    src, tgt_out = padded_src(gen, [6, 4, 5, 3]), padded_src(gen, [5, 6, 3, 4])
    tgt_in = torch.cat([torch.full((4, 1), BOS_ID), tgt_out[:, :-1]], dim=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=PAD_ID)
    losses = []
    for _ in range(300):
        loss = loss_fn(model(src, tgt_in).flatten(0, 1), tgt_out.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < 0.1:
            break
    assert losses[-1] < 0.1, f"loss only fell from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_positional_encoding_matches_formula_and_is_not_saved():
    model = tiny_model()
    embed = model.encoder.embed
    pe, d = embed.positions.pe, 32
    for pos in (0, 1, 7, 63):
        for i in (0, 3, 15):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert not any(key.endswith(".pe") for key in model.state_dict())
    tokens = torch.tensor([[5, 9, 4]])
    expected = embed.token.weight[tokens] * math.sqrt(d) + pe[:3]
    torch.testing.assert_close(embed(tokens), expected)


def test_positions_beyond_max_positions_raise():
    model = tiny_model(max_positions=8)
    assert model.max_positions == 8  # what decoding caps its output lengths by
    with pytest.raises(NMTError, match="max_positions"):
        model(torch.full((1, 9), 5), torch.full((1, 3), 5))


@torch.no_grad()
def test_bf16_autocast_on_cpu_gives_finite_outputs():
    model = tiny_model(activation="gelu")
    gen = torch.Generator().manual_seed(6)
    src, tgt = padded_src(gen, [6, 3]), target_prefix(gen, 2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(src, tgt)
        pad_mask = src.eq(PAD_ID)
        cache = model.init_cache(model.encode(src, pad_mask), pad_mask)
        steps = [model.decode_step(tgt[:, t], cache) for t in range(tgt.size(1))]
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(s).all() for s in steps)
    torch.testing.assert_close(torch.stack(steps, 1).float(), logits.float(), atol=0.1, rtol=0.05)


def test_attention_maps_are_distributions_with_masked_positions_zero():
    model = tiny_model().train()
    gen = torch.Generator().manual_seed(7)
    src, tgt = padded_src(gen, [6, 3]), target_prefix(gen, 2, 5)
    maps = model.attention_maps(src, tgt)
    assert model.training  # mode restored
    assert [len(maps[k]) for k in ("encoder", "decoder_self", "cross")] == [2, 2, 2]
    src_pad = src.eq(PAD_ID)[:, None, None, :]  # [B, 1, 1, S]
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for name, shape in (
        ("encoder", (2, 4, 6, 6)),
        ("decoder_self", (2, 4, 5, 5)),
        ("cross", (2, 4, 5, 6)),
    ):
        for weights in maps[name]:
            assert weights.shape == shape
            torch.testing.assert_close(weights.sum(-1), torch.ones(shape[:-1]))
            if name == "decoder_self":
                assert (weights[..., future] == 0).all()
            else:
                assert (weights.masked_select(src_pad) == 0).all()
                assert (weights.masked_fill(src_pad, 1) > 0).all()


@torch.no_grad()
def test_explicit_attention_path_gives_same_logits_as_sdpa():
    model = tiny_model(norm_first=True)
    gen = torch.Generator().manual_seed(8)
    src, tgt = padded_src(gen, [6, 3]), target_prefix(gen, 2, 5)
    pad_mask = src.eq(PAD_ID)
    maps = {"encoder": [], "decoder_self": [], "cross": []}
    explicit = model.decode(tgt, model.encode(src, pad_mask, maps), pad_mask, maps)
    assert len(maps["cross"]) == 2
    torch.testing.assert_close(explicit, model(src, tgt), atol=ATOL, rtol=0)


def test_tied_embeddings_share_storage():
    model = tiny_model(tie_embeddings=True)
    weights = (
        model.encoder.embed.token.weight,
        model.decoder.embed.token.weight,
        model.output_proj.weight,
    )
    assert len({w.data_ptr() for w in weights}) == 1
    untied = tiny_model(tie_embeddings=False)
    weights = (
        untied.encoder.embed.token.weight,
        untied.decoder.embed.token.weight,
        untied.output_proj.weight,
    )
    assert len({w.data_ptr() for w in weights}) == 3
    assert count_parameters(untied) - count_parameters(model) == 2 * VOCAB * 32


def test_tying_different_vocab_sizes_raises():
    with pytest.raises(NMTError, match="tie_embeddings"):
        build_model(tiny_cfg(tie_embeddings=True), VOCAB, VOCAB + 1)
    assert build_model(tiny_cfg(tie_embeddings=False), VOCAB, VOCAB + 1)(
        torch.full((1, 3), 5), torch.full((1, 2), 5)
    ).shape == (1, 2, VOCAB + 1)


def test_unknown_activation_raises():
    with pytest.raises(NMTError, match="activation"):
        build_model(tiny_cfg(activation="tanh"), VOCAB, VOCAB)


@pytest.mark.parametrize("queries", [5, 40])  # explicit CPU kernel (few queries, no grad) and SDPA
@torch.no_grad()
def test_additive_mask_blocks_like_the_bool_mask(queries):
    attend = scaled_dot_product_attention
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen) for n in (queries, 30, 30))
    mask = torch.rand(2, 1, queries, 30, generator=gen) < 0.7
    mask[..., 0] = True  # no fully masked row
    torch.testing.assert_close(attend(q, k, v, additive_mask(mask, torch.float32)), attend(q, k, v, mask),
                               atol=ATOL, rtol=0)
    keys = torch.rand(2, 1, 1, 30, generator=gen) < 0.7  # padding-like: the same for every query
    keys[..., 0] = True
    v2 = v.clone()
    v2[~keys.expand(2, 3, 1, 30).squeeze(2)] = 1e6  # [2, 3, 30]: values of the blocked keys
    torch.testing.assert_close(attend(q, k, v2, additive_mask(keys, torch.float32)),
                               attend(q, k, v, keys), atol=ATOL, rtol=0)


@pytest.mark.parametrize("padded", [True, False])
def test_training_attention_masks_take_the_forms_of_sdpas_fused_kernels(monkeypatch, padded):
    # On CUDA the memory-efficient kernel takes a broadcast mask; without
    # dropout, CPU training reaches torch's SDPA too, so the arguments are visible here.
    calls = []
    sdpa = F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        calls.append((attn_mask, is_causal))
        return sdpa(q, k, v, attn_mask, dropout_p, is_causal)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    model = tiny_model().train()
    gen = torch.Generator().manual_seed(12)
    src, tgt = padded_src(gen, [7, 4, 6] if padded else [7, 7, 7]), target_prefix(gen, 3, 5)
    model(src, tgt).sum().backward()
    causal = [mask for mask, is_causal in calls if is_causal]
    keyed = [mask for mask, is_causal in calls if not is_causal]
    assert len(causal) == 2 and all(mask is None for mask in causal)  # decoder self-attention
    assert len(keyed) == 4  # encoder self-attention and cross-attention
    for mask in keyed:  # a mask even without padding: deciding would need a host sync
        assert mask.dtype == torch.bool and mask.shape == (3, 1, 1, 7)  # broadcast over H, Tq
        assert torch.equal(mask[:, 0, 0], src.ne(PAD_ID))
