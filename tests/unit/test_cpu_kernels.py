from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmt.model import cpu_kernels
from nmt.model.cpu_kernels import (
    Dropout,
    Linear,
    attention_with_weights,
    dropout,
    keep_mask,
    scaled_dot_product_attention,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
packing = pytest.mark.skipif(not cpu_kernels._PACKING, reason="this torch build has no oneDNN")


@packing
@pytest.mark.parametrize("bias", [True, False])
def test_packed_inference_equals_the_plain_product(bias):
    torch.manual_seed(0)
    layer = Linear(16, 40, bias=bias)
    for shape in [(5, 16), (3, 1, 16), (0, 16)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            out = layer(x)
        assert layer._packed is not None  # the packed path ran
        torch.testing.assert_close(out, F.linear(x, layer.weight.detach(), layer.bias), atol=1e-5, rtol=1e-5)


@packing
def test_updated_weights_are_repacked_and_training_takes_the_plain_path():
    torch.manual_seed(0)
    layer = Linear(8, 12)
    x = torch.randn(4, 8)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2.0)  # what an optimizer step or load_state_dict does: in place
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    out = layer(x)
    assert out.grad_fn is not None and layer._packed is None
    out.sum().backward()
    assert layer.weight.grad is not None


@packing
def test_returning_to_training_drops_the_packed_weight():
    torch.manual_seed(0)
    layer = Linear(8, 12).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        layer(x)
        layer.weight.data.mul_(2.0)  # in place through .data: the version counter does not move
    layer.train()
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inference", [True, False])
def test_linear_keeps_nn_linear_interface_and_results(inference):
    torch.manual_seed(0)
    layer = Linear(16, 40)
    plain = torch.nn.Linear(16, 40)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(6, 1, 16)
    with torch.inference_mode(inference):
        out, expected = layer(x), plain(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (layer._packed is not None) == (inference and cpu_kernels._PACKING)


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


def test_dropout_is_an_nn_dropout():
    layer = Dropout(0.3)
    assert isinstance(layer, torch.nn.Dropout) and layer.p == 0.3


def _qkv(queries: int, keys: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, 8, generator=gen) for n in (queries, keys, keys)]


def _masks(queries: int, keys: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    bool_mask = torch.rand(2, 1, queries, keys, generator=gen) < 0.7
    bool_mask[..., 0] = True  # no fully masked row
    additive = torch.zeros(bool_mask.shape).masked_fill_(~bool_mask, float("-inf"))
    return [{}, {"attn_mask": bool_mask}, {"attn_mask": additive}]


@pytest.mark.parametrize("queries", [5, 16, 40])  # explicit CPU kernel up to FEW_QUERIES, then SDPA
@torch.no_grad()
def test_attention_equals_torch_sdpa(queries):
    for keys, kwargs in [*((23, m) for m in _masks(queries, 23)), (queries, {"is_causal": True})]:
        q, k, v = _qkv(queries, keys)
        expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
        out = scaled_dot_product_attention(q, k, v, **kwargs)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("queries", [5, 40])  # the maps take the explicit path whatever the size
def test_attention_with_weights_returns_the_softmax_that_gives_the_output(queries):
    for keys, kwargs in [*((23, m) for m in _masks(queries, 23)), (queries, {"is_causal": True})]:
        q, k, v = _qkv(queries, keys)
        out, weights = attention_with_weights(q, k, v, **kwargs)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kwargs),
                                   atol=1e-5, rtol=1e-5)
        assert weights.shape == (*q.shape[:-1], keys)
        torch.testing.assert_close(weights.sum(-1), torch.ones(q.shape[:-1]))
        torch.testing.assert_close(weights @ v, out)


def test_attention_dropout_drops_softmax_weights_on_the_cpu():
    q, k, v = _qkv(5, 5)
    torch.manual_seed(1)
    out = scaled_dot_product_attention(q, k, v, dropout_p=0.4, is_causal=True)
    torch.manual_seed(1)
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    weights = (q @ k.transpose(-2, -1) / 8**0.5).masked_fill(future, float("-inf")).softmax(dim=-1)
    torch.testing.assert_close(out, dropout(weights, 0.4) @ v)


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_other_devices_get_torch_sdpa_unchanged(monkeypatch, dropout_p):
    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *args: calls.append(args) or args[0])
    q, k, v = (t.to("meta") for t in _qkv(3, 7))  # a device that is not the CPU
    with torch.no_grad():  # few queries without autograd: the explicit kernel's case on the CPU
        assert scaled_dot_product_attention(q, k, v, None, dropout_p, False) is q
    assert len(calls) == 1 and calls[0][3:] == (None, dropout_p, False)


@pytest.mark.parametrize("device, grad", [("cpu", True), ("meta", False)])  # training; a non-CPU device
def test_compiled_attention_is_not_specialised_on_the_query_count(device, grad):
    # Only CPU inference reads the query count (explicit kernel up to FEW_QUERIES): elsewhere a
    # compiled graph must not guard on it, or every length across FEW_QUERIES recompiles.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    attend = torch.compile(lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True),
                           dynamic=True, backend="eager")
    with torch.set_grad_enabled(grad):
        for length in (4, 9, 20, 33):  # both sides of FEW_QUERIES
            q, k, v = (t.to(device).requires_grad_(grad) for t in _qkv(length, length))
            attend(q, k, v)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
