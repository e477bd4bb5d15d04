"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
Training"): every image the discriminator sees, real or generated, in the discriminator's
step and in the generator's, goes through the same kind of random, differentiable
augmentation. The discriminator then cannot memorise a small training set (1,437 digits),
and the generator still learns the un-augmented images, because the augmentation is
applied to its output, not to the targets it must match.

The random numbers are not drawn here: the collator draws ``width(policy)`` uniforms per
image from the example's own (seed, epoch, index) generator, as every other random choice
of a step, so that a resumed run and an accumulated step are the uninterrupted run and the
one big batch. ``augment`` is then a pure function of the images and those numbers. One
set serves the real images and one the generated ones of a step (D's and G's update, and
GAN-INT-CLS's interpolated images, alike), where the paper draws afresh at every call.

The operations and their ranges are the paper's (images in [-1, 1]):
  color:       brightness + (u - 0.5); saturation x (2u); contrast x (u + 0.5)
  translation: a shift of up to 1/8 of the side in each direction, zeros fill the border
  cutout:      a square of half the side, centred anywhere, set to 0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPERATIONS = {"color": 3, "translation": 2, "cutout": 2}
"""Each operation and how many uniforms it reads per image."""


def width(policy: list[str]) -> int:
    """Uniforms per image that ``policy`` reads."""
    return sum(OPERATIONS[name] for name in policy)


def augment(x: torch.Tensor, u: torch.Tensor, policy: list[str]) -> torch.Tensor:
    """``x`` [B, C, H, W] augmented by ``policy`` (applied in order), reading the
    uniforms ``u`` [B, width(policy)] in [0, 1). Differentiable in ``x``. Shifts and
    positions are computed from ``u`` in float32 (bf16 would round u near 1 up to 1)."""
    u = u.float()
    for name in policy:
        k = OPERATIONS[name]
        x = _APPLY[name](x, u[:, :k])
        u = u[:, k:]
    return x


def _color(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    b = u[:, :, None, None].to(x.dtype)  # [B, 3, 1, 1]
    x = x + (b[:, 0:1] - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (2 * b[:, 1:2]) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * (b[:, 2:3] + 0.5) + mean


def _translation(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    sy, sx = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
    # integer shifts in [-s, s]: out[i, j] = x[i - dy, j - dx], zero where that is outside
    dy = (u[:, 0] * (2 * sy + 1)).long().clamp(max=2 * sy) - sy  # [B]
    dx = (u[:, 1] * (2 * sx + 1)).long().clamp(max=2 * sx) - sx
    padded = F.pad(x, (sx, sx, sy, sy))  # [B, C, H + 2sy, W + 2sx]
    rows = torch.arange(h, device=x.device)[None] - dy[:, None] + sy  # [B, H]
    cols = torch.arange(w, device=x.device)[None] - dx[:, None] + sx  # [B, W]
    x = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * sx))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def _cutout(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    # the square's centre in [0, side + 1 - cut % 2), as the paper draws it
    cy = (u[:, 0] * (h + 1 - ch % 2)).long().clamp(max=h - ch % 2)  # [B]
    cx = (u[:, 1] * (w + 1 - cw % 2)).long().clamp(max=w - cw % 2)
    ys = torch.arange(h, device=x.device)[None] - (cy - ch // 2)[:, None]  # [B, H]
    xs = torch.arange(w, device=x.device)[None] - (cx - cw // 2)[:, None]  # [B, W]
    inside = ((ys >= 0) & (ys < ch))[:, :, None] & ((xs >= 0) & (xs < cw))[:, None, :]
    return x * (~inside)[:, None].to(x.dtype)


_APPLY = {"color": _color, "translation": _translation, "cutout": _cutout}
