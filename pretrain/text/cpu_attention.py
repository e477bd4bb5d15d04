"""transformers' SDPA attention, run in fp32 on a CPU when autocast gives it bf16 / fp16.

On a CPU with bf16 matrix units (AMX), bf16 autocast speeds up the linear layers several
times, but torch's CPU flash attention in bf16 took twice as long as in fp32, forward and
backward (GPT-2 small's [8, 12, 128, 64] causal attention: 18.4 ms against 8.5 on 2
cores). Here q, k and v are cast to fp32 for SDPA, autocast is off around it (its CPU rule for
SDPA would cast them back), and the output goes back to their dtype; on a GPU, or in
fp32, it is transformers' SDPA unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

FP32_ON_CPU = "overture_sdpa_fp32_on_cpu"
"""The attention implementation name (not saved in config.json: a final/ loads with
transformers' default)."""


def sdpa_fp32_on_cpu(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    """transformers' attention-interface signature: ``sdpa_attention_forward``, in fp32
    for low-precision inputs on a CPU (the output cast back to their dtype)."""
    low = query.dtype
    if query.device.type != "cpu" or low not in (torch.bfloat16, torch.float16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # an additive mask, in the scores' dtype
    # autocast off: its CPU rule for SDPA would cast the fp32 inputs back to bf16
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(),
                                              value.float(), attention_mask, **kwargs)
    return out.to(low), weights


AttentionInterface.register(FP32_ON_CPU, sdpa_fp32_on_cpu)
AttentionMaskInterface.register(FP32_ON_CPU, sdpa_mask)  # SDPA's masks
