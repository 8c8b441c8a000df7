from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nmt.loss import label_smoothed_nll
from nmt.tokenizer import PAD_ID


def test_padding_is_ignored_and_nll_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    target = torch.tensor([[4, 5, PAD_ID], [6, PAD_ID, PAD_ID]])
    loss, nll = label_smoothed_nll(logits, target, 0.0)
    expected = F.cross_entropy(logits.view(-1, 7), target.view(-1), ignore_index=PAD_ID, reduction="sum")
    assert torch.allclose(nll, expected) and torch.allclose(loss, expected)
    changed = logits.clone()
    changed[0, 2] += 100.0  # a padded position
    assert torch.allclose(label_smoothed_nll(changed, target, 0.1)[0], label_smoothed_nll(logits, target, 0.1)[0])


def test_smoothing_matches_torch_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    target = torch.randint(1, 11, (3, 5))
    loss, _ = label_smoothed_nll(logits, target, 0.1)
    expected = F.cross_entropy(logits.view(-1, 11), target.view(-1), label_smoothing=0.1, reduction="sum")
    assert torch.allclose(loss, expected, atol=1e-5)


def test_smoothed_loss_is_minimal_at_the_smoothed_distribution():
    vocab, eps = 10, 0.1
    target = torch.tensor([[3]])
    probs = torch.full((vocab,), eps / vocab)
    probs[3] += 1 - eps
    best, _ = label_smoothed_nll(probs.log().view(1, 1, -1), target, eps)
    onehot = torch.full((vocab,), -20.0)
    onehot[3] = 0.0
    worse, _ = label_smoothed_nll(onehot.log_softmax(-1).view(1, 1, -1), target, eps)
    assert best < worse and math.isfinite(best.item())


def _reference(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """The loss through autograd's own log_softmax / nll_loss, padded rows dropped."""
    keep = target.ne(PAD_ID)
    return F.cross_entropy(logits[keep], target[keep], label_smoothing=eps, reduction="sum")


def test_gradient_equals_autograd_through_log_softmax():
    torch.manual_seed(0)
    for eps in (0.0, 0.1):
        logits = torch.randn(6, 13, dtype=torch.float64) * 3
        target = torch.tensor([4, PAD_ID, 12, 1, PAD_ID, 7])
        ours = logits.clone().requires_grad_()
        theirs = logits.clone().requires_grad_()
        label_smoothed_nll(ours, target, eps)[0].mul(0.5).backward()
        _reference(theirs, target, eps).mul(0.5).backward()
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-12)
        assert ours.grad[1].abs().max() == 0  # a padded row gets no gradient


def test_loss_stays_finite_when_the_gold_token_is_far_below_the_rest():
    logits = torch.zeros(2, 9)
    logits[:, 5] = -1000.0  # exp underflows to 0 in float32
    target = torch.tensor([5, 2])
    loss, nll = label_smoothed_nll(logits, target, 0.1)
    assert torch.allclose(loss, _reference(logits, target, 0.1))
    assert torch.allclose(nll, _reference(logits, target, 0.0)) and math.isfinite(nll.item())
