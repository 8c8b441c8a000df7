"""Faster CPU kernels behind torch's own interfaces: the one place where the model picks kernels.

The paper modules (attention, feed-forward, layers, embeddings) use ``Linear``, ``Dropout`` and
``scaled_dot_product_attention`` from here exactly as they would use ``nn.Linear``, ``nn.Dropout``
and ``F.scaled_dot_product_attention``. Each call picks its kernel from the device of its input and
the mode (training or inference, autocast); everywhere the CPU kernels do not apply, torch's own
kernel runs, so a CUDA model is the plain torch model. Replacing these three imports with torch's
gives the same results, only slower on the CPU. docs/benchmarks.md has the measurements behind
each choice.

- ``Linear``: CPU fp32 inference multiplies by a oneDNN copy of the weight packed once per weight
  version. Decoding calls every linear once per step with few rows, where the packing pays off.
- ``Dropout``: on the CPU torch draws one random number per element, serially; here each 64-bit
  draw gives four 16-bit uniforms (``keep_mask``).
- ``scaled_dot_product_attention``: explicit matmuls and softmax for few queries without autograd
  (a decoding step, or the beam hypotheses of one sentence in cross-attention), where SDPA's fused
  CPU kernel has a fixed cost that dominates, and for attention dropout on the CPU, where SDPA
  falls back to the same matmuls with torch's costlier dropout mask.
- ``attention_with_weights``: that explicit path on every device, also returning the softmax
  weights, for the attention maps (no fused kernel keeps them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PACKING = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_ROWS_HINT = 64  # rows per call the packed layout is tuned for; any row count works
_LEVELS = 1 << 16  # values of one 16-bit lane
FEW_QUERIES = 16  # up to this many queries per row, CPU inference takes the explicit attention


def _cpu_fp32_inference(x: torch.Tensor) -> bool:
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


class Linear(nn.Linear):
    """``nn.Linear`` (same constructor, parameters and forward) on pre-packed weights in CPU fp32
    inference. Training, autocast, other devices and builds without oneDNN run ``F.linear``."""

    _packed: tuple[tuple[int, int], torch.Tensor] | None = None  # ((data_ptr, version), packed weight)

    def train(self, mode: bool = True) -> Linear:
        # Back to training drops the packed copy too: a weight may change in place without moving
        # its version counter (torch's fused CPU Adam does that), and a tied output projection is
        # used by the loss without ever calling forward in training.
        self._packed = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if _PACKING and _cpu_fp32_inference(x) and self.weight.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")
        self._packed = None  # training changes the weights: do not keep a stale copy alive
        return F.linear(x, self.weight, self.bias)

    def _packed_weight(self) -> torch.Tensor:
        # the version counter moves on every in-place update (optimizer step, load_state_dict)
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _ROWS_HINT))
        return self._packed[1]


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Bool mask of ``shape`` with True (keep) at rate 1 - round(p * 65536) / 65536, and that rate.

    ``p`` is rounded to a multiple of 1/65536 (0.1 -> 0.100006); ``dropout`` scales kept elements
    by the inverse of this exact rate, which leaves the expectation unchanged."""
    dropped = round(p * _LEVELS)
    numel = shape.numel()
    # full-range int64 draws: every bit uniform, so each int16 lane is uniform on [-32768, 32767]
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:numel].view(shape)
    return lanes >= dropped - _LEVELS // 2, 1.0 - dropped / _LEVELS


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """``F.dropout``: zero elements with probability ~p, scale the rest by 1 / keep rate."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():  # compiled: inductor's own RNG
        return F.dropout(x, p, training=True)
    keep, rate = keep_mask(x.shape, p, x.device)
    # where() keeps only the bool mask for backward (1 byte per element, as F.dropout does)
    return torch.where(keep, x * (1.0 / rate), 0.0)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the cheaper CPU mask of ``dropout`` (always out of place)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, the same arguments and results (is_causal aligned top
    left, as torch's; attn_mask bool with True = attend, or float added to the scores)."""
    # device and grad mode first: the query count is only read where it decides, so compiled training
    # (and any CUDA graph) is not specialised on the sequence length
    cpu = q.device.type == "cpu"
    few = cpu and not torch.is_grad_enabled() and q.size(-2) <= FEW_QUERIES
    if not cpu or not (few or dropout_p > 0.0):
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    return _explicit_attention(q, k, v, attn_mask, dropout_p, is_causal)[0]


def attention_with_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scaled_dot_product_attention`` without dropout, on any device, also returning the weights
    softmax(QK^T / sqrt(d_k)) [B, H, Tq, Tk] (for the attention maps: no fused kernel keeps them)."""
    return _explicit_attention(q, k, v, attn_mask, 0.0, is_causal)


def _explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention spelled out as matmuls and softmax -> (output [B, H, Tq, dv], weights)."""
    scores = (q * q.size(-1) ** -0.5) @ k.transpose(-2, -1)  # [B, H, Tq, Tk]
    if is_causal:
        future = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).triu(1)
        scores.masked_fill_(future, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores.masked_fill_(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores += attn_mask
    weights = scores.softmax(dim=-1)
    return dropout(weights, dropout_p) @ v, weights
