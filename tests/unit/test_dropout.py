from __future__ import annotations

import pytest
import torch

from nmt.model.attention import attend
from nmt.model.dropout import Dropout, dropout, keep_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_keep_rate_is_one_minus_p_in_every_lane_and_kept_values_are_rescaled():
    torch.manual_seed(0)
    x = torch.rand(4096, 256) + 0.5
    out = dropout(x, 0.1)
    kept = out != 0
    _, rate = keep_mask(x.shape, 0.1, x.device)
    assert rate == pytest.approx(0.9, abs=1e-4)
    # each 64-bit draw feeds four neighbouring elements: every lane must drop at the rate p
    per_lane = kept.view(-1, 4).float().mean(dim=0)
    assert torch.allclose(per_lane, torch.full((4,), rate), atol=0.003), per_lane
    torch.testing.assert_close(out[kept], x[kept] / rate)
    assert out.mean().item() == pytest.approx(x.mean().item(), rel=0.005)  # expectation kept


def test_masks_follow_the_torch_seed():
    x = torch.ones(1000)
    torch.manual_seed(3)
    first = dropout(x, 0.5)
    second = dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5), first) and not torch.equal(first, second)


def test_gradient_is_the_scaled_mask_and_eval_is_the_identity():
    x = torch.randn(64, 33, requires_grad=True)
    layer = Dropout(0.25)
    out = layer(x)
    out.sum().backward()
    kept = out.detach() != 0
    _, rate = keep_mask(x.shape, 0.25, x.device)
    torch.testing.assert_close(x.grad, kept.float() / rate)
    assert layer.eval()(x) is x and dropout(x, 0.0) is x


def test_attention_dropout_drops_softmax_weights():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3))
    torch.manual_seed(1)
    out, _ = attend(q, k, v, dropout_p=0.4)
    torch.manual_seed(1)
    weights = (q @ k.transpose(-2, -1) / 8**0.5).softmax(dim=-1)
    torch.testing.assert_close(out, dropout(weights, 0.4) @ v)
