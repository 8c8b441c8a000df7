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


# A custom op, not an autograd.Function: Dynamo traces an autograd.Function's forward, and its
# block loop (ceil(N / BLOCK_ROWS) iterations) specialised the compiled graph on N, the target token
# count, so that compiled training recompiled for nearly every batch. A custom op is one opaque node
# of the graph with symbolic shapes; its loop runs eagerly inside, and it needs no graph break.
@torch.library.custom_op("nmt::projected_smoothed_ce", mutates_args=())
def _projected_smoothed_ce(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, eps: float,
                           grad_scale: torch.Tensor | None, dtype: torch.dtype, need_grad: bool,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, NLL, d loss/d hidden, d loss/d weight), gradients times grad_scale ([0] without need_grad).

    hidden [N, D], weight [V, D], target [N]; matmuls in ``dtype`` (the caller's autocast dtype),
    the rest in at least fp32."""
    work = torch.promote_types(dtype, torch.float32)  # softmax, loss and gradient sums
    device = hidden.device
    with torch.autocast(device.type, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        keep = target.ne(PAD_ID)
        loss = nll = torch.zeros((), dtype=work, device=device)
        grad_h = torch.empty(hidden.shape if need_grad else (0,), dtype=work, device=device)
        grad_w = torch.zeros(weight.shape if need_grad else (0,), dtype=work, device=device)
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
    return loss, nll, grad_h, grad_w


@_projected_smoothed_ce.register_fake
def _(hidden, weight, target, eps, grad_scale, dtype, need_grad):
    work = torch.promote_types(dtype, torch.float32)
    return (hidden.new_empty((), dtype=work), hidden.new_empty((), dtype=work),
            hidden.new_empty(hidden.shape if need_grad else (0,), dtype=work),
            hidden.new_empty(weight.shape if need_grad else (0,), dtype=work))


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, _, _, grad_scale, _, _ = inputs
    _, _, grad_h, grad_w = output
    ctx.save_for_backward(grad_h, grad_w, grad_scale if grad_scale is not None else torch.ones((), device=hidden.device))
    ctx.dtypes = (hidden.dtype, weight.dtype)


def _backward(ctx, grad_loss, _grad_nll, _grad_gh, _grad_gw):
    grad_h, grad_w, grad_scale = ctx.saved_tensors  # grad_h, grad_w already carry grad_scale
    h_dtype, w_dtype = ctx.dtypes
    factor = grad_loss / grad_scale  # 1 when the caller's grad_scale is what backward receives
    return (grad_h * factor).to(h_dtype), (grad_w * factor).to(w_dtype), None, None, None, None, None


_projected_smoothed_ce.register_autograd(_backward, setup_context=_setup_context)


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
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, nll, _, _ = _projected_smoothed_ce(hidden, weight, target, smoothing, grad_scale, dtype, need_grad)
    return loss, nll.detach()  # the NLL is reported, never trained on


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
        hidden = self.states(src, tgt_in, positions)  # [N, D]
        return label_smoothed_nll(hidden, self.model.output_proj.weight, targets, self.smoothing, grad_scale)

    def states(self, src: torch.Tensor, tgt_in: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The final states [N, D] that predict the N targets."""
        return self.model.target_states(src, tgt_in, positions)
