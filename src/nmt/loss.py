"""Label-smoothed cross-entropy over non-pad target tokens, fused with the output projection.

The [N, V] logits are the largest tensors of a training step. Here they exist one block of rows at
a time: each block is projected, turned into its loss and its gradient (softmax - smoothed target),
and that gradient is pushed through the projection at once, so backward only rescales two stored
gradients. Autograd's log_softmax, nll_loss and sum would build three [N, V] gradients and add
them; an unblocked projection would keep the whole [N, V] logits alive for backward. No [N, V]
tensor outlives its block (docs/benchmarks.md has the measurements).
"""

from __future__ import annotations

import torch
from torch import nn

from nmt.tokenizer import PAD_ID

BLOCK_ROWS = 2048
"""Rows per block: large enough for full-speed matmuls, small enough for the CPU cache to help."""


def _block_loss(
    z: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, eps: float, work: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits z [n, V] (any float dtype) -> (summed loss, summed NLL, softmax [n, V] in ``work``).

    The softmax is built in place in the one ``work`` copy of z (z itself when it is already in
    ``work``): a half-precision block costs a single [n, V] float32 tensor, not a cast copy plus
    the softmax (``softmax(dtype=float32)`` casts to a copy first except for fp16 on CUDA)."""
    x = z.to(work)
    zmax = x.amax(dim=-1, keepdim=True)  # amax rather than max, which also computes indices
    gold = x.gather(1, target[:, None]).squeeze(1)
    mean = x.mean(dim=-1)
    probs = x.sub_(zmax).exp_()  # [n, V], each row's largest term is 1: the sum never underflows
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    lse = (zmax + total.log()).squeeze(1)
    nll = ((lse - gold) * keep).sum()
    # eps / V on every class: sum_v -(eps / V) log p_v = eps * (lse - mean z)
    loss = nll + eps * ((gold - mean) * keep).sum()
    return loss, nll, probs


def _smoothed_target_gradient_(
    probs: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, eps: float
) -> torch.Tensor:
    """d loss / d z = softmax(z) - (1 - eps) onehot(target) - eps / V on non-pad rows, in place."""
    if eps:
        probs.sub_(eps / probs.size(-1))
    probs[torch.arange(probs.size(0), device=probs.device), target] -= 1.0 - eps
    return probs.mul_(keep[:, None])


class _ProjectedSmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, eps: float,
                grad_scale: torch.Tensor | None):
        # hidden [N, D], weight [V, D], target [N]; matmuls in the autocast dtype, the rest in fp32
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        work = torch.promote_types(dtype, torch.float32)  # softmax, loss and gradient sums
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            keep = target.ne(PAD_ID)
            loss = nll = torch.zeros((), dtype=work, device=hidden.device)
            grad_h = torch.empty(hidden.shape, dtype=work, device=hidden.device) if need_grad else None
            grad_w = torch.zeros(weight.shape, dtype=work, device=hidden.device) if need_grad else None
            for start in range(0, h.size(0), BLOCK_ROWS):
                rows = slice(start, start + BLOCK_ROWS)
                block_loss, block_nll, probs = _block_loss(h[rows] @ w.t(), target[rows], keep[rows], eps, work)
                loss, nll = loss + block_loss, nll + block_nll
                if need_grad:
                    g = _smoothed_target_gradient_(probs, target[rows], keep[rows], eps)
                    if grad_scale is not None:
                        # scaled before the cast, as autograd would see it: eps / V is subnormal in fp16
                        g.mul_(grad_scale)
                    g = g.to(dtype)
                    grad_h[rows] = g @ w  # [n, D]
                    grad_w += g.t() @ h[rows]  # [V, D]
        ctx.save_for_backward(grad_h, grad_w, grad_scale if grad_scale is not None else torch.ones((), device=hidden.device))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(nll)  # reported, never trained on
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        grad_h, grad_w, grad_scale = ctx.saved_tensors  # grad_h, grad_w already carry grad_scale
        h_dtype, w_dtype = ctx.dtypes
        factor = grad_loss / grad_scale  # 1 when the caller's grad_scale is what backward receives
        return (grad_h * factor).to(h_dtype), (grad_w * factor).to(w_dtype), None, None, None


def label_smoothed_nll(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, smoothing: float,
    grad_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed loss, plain NLL) of logits ``hidden @ weight.T``, both summed over non-pad tokens.

    hidden: [N, D] final decoder states; weight: [V, D] the output projection; target: [N]. The
    softmax is computed in fp32 even under autocast, since it loses precision over a large
    vocabulary in half precision. Smoothing spreads eps over the vocabulary as in the paper (and
    fairseq): eps / V per class. The gradients are computed during the forward pass (when autograd
    needs them), so calling backward twice on one graph is not supported.

    grad_scale: the gradient that backward will receive for the loss (a 0-dim float tensor: the
    fp16 loss scale times the per-token normalisation), when the caller knows it. The [N, V]
    gradient is multiplied by it before its cast to the autocast dtype, as plain autograd would
    have it; in fp16 the unscaled gradient underflows. Any other incoming gradient stays exact.
    """
    loss, nll = _ProjectedSmoothedCrossEntropy.apply(hidden, weight, target, smoothing, grad_scale)
    return loss, nll.detach()


class Objective(nn.Module):
    """What the trainer calls (and DDP wraps): the model's states at the target positions, then
    the loss with the output projection fused in. -> (loss, NLL), summed over the N targets."""

    def __init__(self, model: nn.Module, smoothing: float) -> None:
        super().__init__()
        self.model = model
        self.smoothing = smoothing

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
        grad_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """src [B, S], tgt_in [B, T], positions Long [N] into B*T, targets [N]; grad_scale: see
        ``label_smoothed_nll``."""
        hidden = self.model.target_states(src, tgt_in, positions)  # [N, D]
        return label_smoothed_nll(hidden, self.model.output_proj.weight, targets, self.smoothing, grad_scale)
