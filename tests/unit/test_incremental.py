from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmt.model.incremental import DecoderCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("steps", [5, 20])  # 20: the buffer grows past its first capacity (16)
@torch.no_grad()
def test_self_attention_one_step_at_a_time_equals_causal_attention(steps):
    # no source: the cache of a decoder without cross-attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, steps, 8, generator=gen) for _ in range(3))  # [R, H, T, dk]
    cache = DecoderCache((2, 3, 4, 8), torch.float32, torch.device("cpu"))
    outs = []
    for t in range(steps):
        cache.start_step()
        outs.append(cache.attend_self(1, *(x[:, :, t : t + 1] for x in (q, k, v))))
        cache.finish_step()
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(torch.cat(outs, dim=2), expected, atol=1e-5, rtol=0)
    assert cache.length == steps and cache.cross_kv is None


@torch.no_grad()
def test_beam_rows_attend_over_their_own_history_after_reorder():
    gen = torch.Generator().manual_seed(1)
    cache = DecoderCache((1, 2, 2, 4), torch.float32, torch.device("cpu"))
    k, v = torch.randn(2, 2, 1, 4, generator=gen), torch.randn(2, 2, 1, 4, generator=gen)
    cache.start_step()
    cache.attend_self(0, k, k, v)
    cache.finish_step()
    history = [[(k[r], v[r])] for r in range(2)]  # per row: (k, v) [H, 1, dk] of each position
    cache.expand(3)  # rows 0-2 sentence 0, rows 3-5 sentence 1
    history = [history[r // 3] for r in range(6)]
    index = torch.tensor([2, 2, 0, 5, 3, 4])
    cache.reorder(index, same_sources=True)
    history = [list(history[i]) for i in index.tolist()]
    for _ in range(3):
        q, k, v = (torch.randn(6, 2, 1, 4, generator=gen) for _ in range(3))
        cache.start_step()
        out = cache.attend_self(0, q, k, v)
        cache.finish_step()
        for r in range(6):
            history[r].append((k[r], v[r]))
            keys = torch.cat([h[0] for h in history[r]], dim=1)  # [H, T, dk]
            values = torch.cat([h[1] for h in history[r]], dim=1)
            torch.testing.assert_close(out[r], F.scaled_dot_product_attention(q[r], keys, values))
        index = torch.tensor([1, 0, 0, 4, 4, 3])
        cache.reorder(index, same_sources=True)
        history = [list(history[i]) for i in index.tolist()]


@torch.no_grad()
def test_a_padded_prefix_is_never_attended_and_shifts_the_positions_after_it():
    gen = torch.Generator().manual_seed(2)
    pad = torch.tensor([[False, False, True, True], [False, False, False, False]])  # [B, P]
    cache = DecoderCache((1, 2, 2, 4), torch.float32, torch.device("cpu"), prefix_pad=pad)
    pk, pv = torch.randn(2, 2, 4, 4, generator=gen), torch.randn(2, 2, 4, 4, generator=gen)  # [B, H, P, dk]
    cache.start_prefix(4)
    cache.store_prefix(0, pk, pv)
    cache.finish_step(4)
    assert cache.length == 4 and cache.position_shift().tolist() == [2, 0]
    cache.expand(2)  # rows 0-1 sentence 0, rows 2-3 sentence 1
    assert cache.position_shift().tolist() == [2, 2, 0, 0]
    q, k, v = (torch.randn(4, 2, 1, 4, generator=gen) for _ in range(3))
    cache.start_step()
    out = cache.attend_self(0, q, k, v)
    cache.finish_step()
    for r in range(4):
        real = 2 if r < 2 else 4  # the prefix positions row r may see
        keys = torch.cat([pk[r // 2, :, :real], k[r]], dim=1)  # [H, real + 1, dk]
        values = torch.cat([pv[r // 2, :, :real], v[r]], dim=1)
        torch.testing.assert_close(out[r], F.scaled_dot_product_attention(q[r], keys, values))
    cache.reorder(torch.tensor([3, 2]))  # sentence 0 finished: sentence 1 remains, its 2 rows
    assert cache.position_shift().tolist() == [0, 0]


def test_an_unpadded_prefix_needs_no_mask_or_shift():
    cache = DecoderCache((1, 2, 2, 4), torch.float32, torch.device("cpu"), prefix_pad=torch.zeros(2, 3, dtype=torch.bool))
    assert cache.prefix_pad is None and cache.position_shift() is None
