from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nmt.loss
from nmt.loss import label_smoothed_nll
from nmt.tokenizer import PAD_ID


def _logits_loss(logits: torch.Tensor, target: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, V] given directly: the projection is the identity."""
    return label_smoothed_nll(logits, torch.eye(logits.size(-1), dtype=logits.dtype), target, eps)


def _reference(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """The loss through autograd's own log_softmax / nll_loss, padded rows dropped."""
    keep = target.ne(PAD_ID)
    return F.cross_entropy(logits[keep], target[keep], label_smoothing=eps, reduction="sum")


def test_padding_is_ignored_and_nll_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 7)
    target = torch.tensor([4, 5, PAD_ID, 6, PAD_ID, PAD_ID])
    loss, nll = _logits_loss(logits, target, 0.0)
    expected = F.cross_entropy(logits, target, ignore_index=PAD_ID, reduction="sum")
    assert torch.allclose(nll, expected) and torch.allclose(loss, expected)
    changed = logits.clone()
    changed[2] += 100.0  # a padded position
    assert torch.allclose(_logits_loss(changed, target, 0.1)[0], _logits_loss(logits, target, 0.1)[0])


def test_smoothing_matches_torch_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(15, 11)
    target = torch.randint(1, 11, (15,))
    loss, _ = _logits_loss(logits, target, 0.1)
    expected = F.cross_entropy(logits, target, label_smoothing=0.1, reduction="sum")
    assert torch.allclose(loss, expected, atol=1e-5)


def test_smoothed_loss_is_minimal_at_the_smoothed_distribution():
    vocab, eps = 10, 0.1
    target = torch.tensor([3])
    probs = torch.full((vocab,), eps / vocab)
    probs[3] += 1 - eps
    best, _ = _logits_loss(probs.log().view(1, -1), target, eps)
    onehot = torch.full((vocab,), -20.0)
    onehot[3] = 0.0
    worse, _ = _logits_loss(onehot.log_softmax(-1).view(1, -1), target, eps)
    assert best < worse and math.isfinite(best.item())


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_gradients_equal_autograd_through_linear_and_log_softmax(monkeypatch, eps):
    monkeypatch.setattr(nmt.loss, "BLOCK_ROWS", 4)  # 11 rows: three blocks, the last one short
    torch.manual_seed(0)
    hidden = torch.randn(11, 6, dtype=torch.float64)
    weight = torch.randn(13, 6, dtype=torch.float64)
    target = torch.tensor([4, PAD_ID, 12, 1, PAD_ID, 7, 3, 3, 9, 2, PAD_ID])
    ours = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    theirs = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss, _ = label_smoothed_nll(*ours, target, eps)
    expected = _reference(F.linear(*theirs), target, eps)
    torch.testing.assert_close(loss, expected)
    loss.mul(0.5).backward()
    expected.mul(0.5).backward()
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-12, rtol=1e-9)
    assert ours[0].grad[1].abs().max() == 0  # a padded row gets no gradient


def test_loss_stays_finite_when_the_gold_token_is_far_below_the_rest():
    logits = torch.zeros(2, 9)
    logits[:, 5] = -1000.0  # exp underflows to 0 in float32
    target = torch.tensor([5, 2])
    loss, nll = _logits_loss(logits, target, 0.1)
    assert torch.allclose(loss, _reference(logits, target, 0.1))
    assert torch.allclose(nll, _reference(logits, target, 0.0)) and math.isfinite(nll.item())


def test_bf16_autocast_projects_in_bf16_and_returns_fp32_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    target = torch.randint(1, 30, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = label_smoothed_nll(hidden, weight, target, 0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    reference = _reference(hidden.detach() @ weight.detach().t(), target, 0.1)
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
    assert loss.item() != reference.item()  # the projection really ran in bf16


def _projection_grad(hidden, weight, target, dtype, grad_scale):
    """d(loss * grad_scale)/d weight, unscaled again: what the optimizer sees after GradScaler."""
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = label_smoothed_nll(hidden, w, target, 0.1, grad_scale)
    (loss * grad_scale).backward()
    return w.grad / grad_scale


def test_fp16_projection_gradient_keeps_the_smoothing_term_at_a_32k_vocabulary():
    # Peaked logits: most classes get softmax < 1e-9 in every row, so their gradient is the smoothing
    # term -eps / V = -3.1e-6 alone: subnormal in fp16 (spacing 6.0e-8, about 2% of it) when cast
    # unscaled. Scaled first (GradScaler's 65536 / N tokens) it is a normal fp16 number. Classes with
    # a real probability are left out: fp16 logits move their softmax whatever the scaling.
    torch.manual_seed(0)
    n, d, v = 64, 16, 32_000
    hidden = torch.randn(n, d) * 4
    weight = torch.randn(v, d)
    target = torch.randint(4, v, (n,))
    grad_scale = torch.tensor(65536.0 / n)
    exact = _projection_grad(hidden, weight, target, torch.float32, torch.tensor(1.0 / n))
    half = _projection_grad(hidden, weight, target, torch.float16, grad_scale)
    others = torch.softmax(hidden @ weight.t(), dim=-1).amax(dim=0) < 1e-9
    others[target] = False
    assert others.sum() > v // 2
    rel = ((half - exact).norm(dim=1) / exact.norm(dim=1))[others]
    # fp16 rounds three times on the way (the gradient, the hidden states, the product), each at
    # most 2^-11 relative: 3 * 2^-11 = 1.5e-3 bounds the error per row; unscaled it is ~1e-2.
    assert rel.max() < 3 * 2.0**-11, rel.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_block_allocates_one_fp32_logits_sized_tensor(dtype):
    # The softmax is built in place in the float32 copy of the logits: a cast copy next to a
    # separate softmax would be two [n, V] float32 tensors per block.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.float32 = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inplace = func._schema.name.endswith("_") or any(a.is_out for a in func._schema.arguments)
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and not inplace:
                self.float32.append((str(func), tuple(out.shape)))
            return out

    torch.manual_seed(0)
    z = torch.randn(9, 30).to(dtype)  # a block of logits as the projection returns it
    target = torch.randint(1, 30, (9,))
    expected_probs, expected_loss = torch.softmax(z.float(), dim=-1), _reference(z.float(), target, 0.1)
    with Allocations() as seen:  # in float32 the softmax overwrites z itself
        loss, _, probs = nmt.loss._block_loss(z, target, target.ne(PAD_ID), 0.1, torch.float32)
    assert [op for op, shape in seen.float32 if shape == (9, 30)] == (
        ["aten._to_copy.default"] if dtype != torch.float32 else []), seen.float32
    torch.testing.assert_close(probs, expected_probs)
    torch.testing.assert_close(loss, expected_loss)


@pytest.mark.slow  # compiles
def test_compiled_objective_compiles_once_for_batches_of_every_shape():
    # The fused loss loops over blocks of target tokens; traced by Dynamo that loop specialised the
    # graph on N, and each new batch shape recompiled. 20 batches, every B, S, T and N different.
    from torch._dynamo.utils import counters

    from nmt.config import ModelConfig
    from nmt.loss import Objective
    from nmt.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_layers=1, decoder_layers=1, d_model=16, heads=2, d_ff=32,
                                    dropout=0.0, attention_dropout=0.0), 40, 40)
    objective = Objective(model, 0.1)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(objective, dynamic=True, backend="aot_eager")  # as train.compile does
    for i in range(20):
        b, s, t = 2 + i % 3, 5 + i, 4 + (i * 7) % 19  # lengths on both sides of cpu_kernels.FEW_QUERIES
        src, tgt = torch.randint(4, 40, (b, s)), torch.randint(4, 40, (b, t))
        positions = torch.randperm(b * t)[: b * t - i % 5].sort().values  # N: some targets are padding
        targets = torch.randint(4, 40, (positions.numel(),))
        model.zero_grad()
        loss, nll = compiled(src, tgt, positions, targets)
        loss.backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    compiled_grad = model.output_proj.weight.grad.clone()
    model.zero_grad()
    eager_loss, eager_nll = objective(src, tgt, positions, targets)
    eager_loss.backward()
    torch.testing.assert_close((loss, nll), (eager_loss, eager_nll))
    torch.testing.assert_close(compiled_grad, model.output_proj.weight.grad)
