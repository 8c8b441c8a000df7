from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmt.model import linear as linear_module
from nmt.model.linear import Linear

pytestmark = pytest.mark.usefixtures("one_torch_thread")
packing = pytest.mark.skipif(not linear_module._PACKING, reason="this torch build has no oneDNN")


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
def test_relu_output_on_both_paths(inference):
    torch.manual_seed(0)
    layer = Linear(16, 40)
    x = torch.randn(6, 1, 16)
    with torch.inference_mode(inference):
        out = layer(x, relu=True)
    expected = F.relu(F.linear(x, layer.weight.detach(), layer.bias.detach()))
    assert (out == 0).any() and (out > 0).any()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (layer._packed is not None) == (inference and linear_module._PACKING)
