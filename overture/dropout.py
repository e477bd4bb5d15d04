"""Dropout at about a quarter of torch's cost on a CPU.

On 2 CPU cores, ``bernoulli_`` (the mask of ``nn.Dropout`` and of SDPA's attention
dropout) was 16-22% of a BERT 256 x 4 training step: torch's CPU generator draws one
32-bit number per element and converts it to a float. Here one draw of 64 random bits
gives four elements a 16-bit uniform number each, compared with ``p`` quantized to
1/65536 (p = 0.1 keeps with probability 0.8999939 instead of 0.9, and the kept values
are scaled by the inverse of that), and the 0 / 1 mask multiplies the values. Forward
and backward of 4.2 M elements took 8.2 ms, where ``F.dropout`` took 28.7. The masks
come from torch's generator, so ``torch.manual_seed`` and the engine's saved RNG state
reproduce them. On other devices (CUDA's fused Philox dropout is already cheap) it is
``F.dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 16
"""The keep mask compares a 16-bit uniform number with round(p * LEVELS)."""


def threshold(p: float) -> int:
    """round(p * LEVELS): an element is kept when its 16-bit number, counted from 0, is at
    least this."""
    return round(p * LEVELS)


def keep_mask(shape: torch.Size, p: float, device: torch.device,
              dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """A mask of ``shape``, 1 (True) with probability 1 - threshold(p) / LEVELS and 0
    elsewhere, in ``dtype``. A mask in the values' own floating-point dtype costs more to
    make than a bool one (4.2 M elements: 9.8 ms against 4.6), but is applied by a
    multiplication instead of a selection: making it and applying it forward and
    backward took 13.6 ms, against 21.0 with a bool mask and ``torch.where``."""
    if not 0 <= threshold(p) < LEVELS:
        raise ValueError(f"keep_mask: p={p} must be in [0, 1) after rounding to "
                         f"1/{LEVELS}")
    n = shape.numel()
    # 64 uniform bits per draw (the full int64 range: torch's default range would leave
    # the top bit 0, and its draw costs more), read as four signed 16-bit numbers,
    # uniform on [-LEVELS/2, LEVELS/2): at least threshold - LEVELS/2 with probability
    # 1 - threshold / LEVELS. One comparison; a bool mask of 8M elements took 9.8 ms on 2
    # cores, where two elements per 31-bit draw, masked to 15 bits, took 14.9 and
    # bernoulli_ 58.
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    quarters = bits.view(torch.int16)[:n]
    limit = threshold(p) - LEVELS // 2
    if dtype == torch.bool:
        return (quarters >= limit).view(shape)
    return torch.ge(quarters, limit, out=torch.empty(n, dtype=dtype, device=device)).view(shape)


def _kept_scale(p: float) -> float:
    """1 / (1 - p'), p' = threshold(p) / LEVELS the rate drawn: the expectation stays x."""
    return LEVELS / (LEVELS - threshold(p))


class _KeepScaled(torch.autograd.Function):
    """x / (1 - p') where kept, 0 elsewhere; the 0 / 1 mask alone is kept for backward,
    as native dropout keeps its own, but in x's dtype (4 bytes an element in fp32, where
    a bool mask takes 1: the price of multiplying instead of selecting). The product and
    the scale are one ``addcmul`` each way, in the dtype's compute precision."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device, x.dtype)
        ctx.save_for_backward(keep)
        ctx.scale = _kept_scale(p)
        return torch.addcmul(x.new_zeros(()), x, keep, value=ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, keep, value=ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with the cheaper mask for a floating-point tensor on
    a CPU (p rounded to a multiple of 1/LEVELS: one that rounds to 1 is torch's)."""
    _check(p)
    if not training or not _cheaper(x, p):
        return F.dropout(x, p, training)
    return _KeepScaled.apply(x, p)


def _check(p: float) -> None:
    """Refuse p outside [0, 1], in F.dropout's words (its int16 threshold would wrap)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def _cheaper(x: torch.Tensor, p: float) -> bool:
    """Whether dropping ``x`` at ``p`` takes the cheaper mask: a floating-point tensor on a
    CPU, and a p that does not round to 1 (nor to 0: p = 0 is the identity)."""
    return (x.device.type == "cpu" and x.is_floating_point() and p != 0.0
            and threshold(p) < LEVELS)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, p: float,
              scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=scale)``
    computed as SDPA's math path does, with ``dropout``'s mask on the probabilities: a CPU
    SDPA with dropout draws it with ``bernoulli_``, and F.dropout's whole cost is about
    3.5 times this module's ``dropout``.

    q: [B, h, Lq, d]; k, v: [B, h, Lk, d]; bias: additive, [B or 1, h or 1, Lq or 1, Lk]
    (expanded over the heads, it is copied once per head).
    """
    _check(p)
    if q.dtype == torch.float16:
        # as SDPA's math path: in fp32, where a mask of finfo(fp16).min plus a score below
        # -16 does not overflow to -inf (a fully masked row would give NaN, and its
        # gradient would reach the values through the zeroed output)
        return attention(q.float(), k.float(), v.float(), bias.float(), p, scale).half()
    batch, heads, lq, width = q.shape
    lk = k.shape[2]
    bias = bias.expand(batch, heads, bias.shape[2], lk).reshape(batch * heads, -1, lk)
    scores = torch.baddbmm(bias, q.reshape(batch * heads, lq, width),
                           k.reshape(batch * heads, lk, width).transpose(1, 2), alpha=scale)
    probs = scores.softmax(-1)  # [B*h, Lq, Lk]
    v = v.reshape(batch * heads, lk, width)
    if not _cheaper(probs, p):
        out = torch.bmm(F.dropout(probs, p), v)
    else:
        # the kept probabilities' scale moves to the output, Lk / d times smaller
        keep = keep_mask(probs.shape, p, probs.device, probs.dtype)  # 0 / 1
        out = torch.bmm(probs * keep, v) * _kept_scale(p)
    return out.view(batch, heads, lq, width)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the cheaper CPU mask (no weights: state dicts are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # the in-place form keeps torch's kernel
            return super().forward(x)
        return dropout(x, self.p, self.training)


def use_cheaper_dropout(model: nn.Module) -> int:
    """Make every plain ``nn.Dropout`` in ``model`` a ``Dropout`` (in place; subclasses
    such as Dropout2d are left). Returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = Dropout
            changed += 1
    return changed
