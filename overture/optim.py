"""Optimizers (AdamW, LAMB) and learning-rate schedules for the engine."""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig


def build_optimizer(modules: list[nn.Module], cfg: TrainConfig, device: torch.device):
    """AdamW (fused kernel where the device has one) or LAMB (timm) over the trainable
    parameters of ``modules``, with weight decay off for biases and normalisation
    weights, as BERT does."""
    decay, no_decay = [], []
    seen: set[int] = set()  # a module may be listed twice or share weights
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            # 1-D: biases and LayerNorm gains
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "lamb":
        from timm.optim import Lamb

        # Clipping is the engine's (train.max_grad_norm), not LAMB's own. timm applies the
        # per-layer trust ratio only to groups with weight decay unless always_adapt: the
        # weight matrices are adapted even at weight_decay=0 (biases and norms are not,
        # as in the reference implementation).
        groups[0]["always_adapt"] = True
        return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_epsilon, max_grad_norm=None)
    fused = device.type in ("cuda", "cpu", "xpu", "mps")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_epsilon, fused=fused)


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup then linear / cosine decay to zero (or constant), over all phases."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.lr_schedule, cfg.lr_schedule)
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=total_steps)
