"""Padding-free training forward for the masked-LM encoders (BERT, RoBERTa, ALBERT).

A third of a BERT batch on WikiText-2 is padding (real tokens / slots: 0.69): a pair
ends at its document's last sentence, and 10% are drawn short (``short_seq_prob``). The
stock forward runs every linear layer, GELU, LayerNorm and dropout on those slots too.
Here, as ModernBERT does, the real tokens of the batch are packed into one sequence of N
before the first layer, so that every per-token operation runs on N rows instead of B x T.
Only attention needs the rows apart: it puts q, k, v back in [heads, B, T, d] (zeros at
the padding), runs torch SDPA with the key-padding mask, and takes the real rows out.

The model stays the stock transformers one: its own embeddings, layers and pooler run
(FSDP's per-layer hooks fire as usual), and ``final/`` loads with plain transformers. The
only change is the attention function its layers look up: ``ATTENTION``, registered with
transformers' ``AttentionInterface`` (with SDPA's mask), which is transformers' own SDPA
when it is called without a ``packing`` (a padded batch from any other caller).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ...config import ConfigError
from ...dropout import attention as attention_with_dropout

ATTENTION = "overture_unpadded"
"""The attention implementation name set on a model trained padding-free (not saved in its
config.json: transformers does not write the attention implementation)."""


def _select(x: torch.Tensor, dim: int, index: torch.Tensor,
            zeros: torch.Tensor | None) -> torch.Tensor:
    """``x.index_select(dim, index)``, then zeros at the positions ``zeros`` along ``dim``
    (the padding slots, whose index is any valid one)."""
    if x.shape[dim] == 0:  # a batch without a real token: every slot is padding
        return x.new_zeros(x.shape[:dim] + index.shape + x.shape[dim + 1:])
    out = x.index_select(dim, index)
    return out if zeros is None else out.index_fill_(dim, zeros, 0)


class _MoveRows(torch.autograd.Function):
    """Rows moved between the packed and the padded layout along ``dim``: the forward
    selects ``there`` (zeros at ``zero_there``), the backward selects ``back`` (the
    inverse move, one slot per real token; zeros at ``zero_back``), so that neither
    direction scatters. Writing into zeros with ``index_put``, and its gradient, took
    more than three times as long (7 ms against 2 for one [N, 4, 64] tensor apart and
    together, forward and backward, N = 3,100 of 4,096 slots)."""

    @staticmethod
    def forward(ctx, x, dim: int, there, back, zero_there, zero_back):
        ctx.save_for_backward(back, zero_back)
        ctx.dim = dim
        return _select(x, dim, there, zero_there)

    @staticmethod
    def backward(ctx, grad):
        back, zero_back = ctx.saved_tensors
        return _select(grad, ctx.dim, back, zero_back), None, None, None, None, None


@dataclass(frozen=True)
class Packing:
    """Where the N real tokens of a right-padded [B, T] batch sit."""

    key_mask: torch.Tensor
    """[B, 1, 1, T] True at a real token (the keys attention may read)."""
    slots: torch.Tensor
    """[N] each real token's slot in the flattened batch (row * T + column), in row
    order: the packed order."""
    sources: torch.Tensor
    """[B * T] the real token in each slot (0 at a padding slot)."""
    padding: torch.Tensor
    """[B * T - N] the padding slots."""

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:
        real = attention_mask.bool()  # [B, T]
        # nonzero: N must be known on the host (one sync on a GPU, as varlen kernels need)
        slots = real.flatten().nonzero().flatten()
        sources = torch.zeros(real.numel(), dtype=torch.long, device=real.device)
        sources[slots] = torch.arange(len(slots), device=real.device)
        # of known size: no second sync
        padding = torch.nonzero_static(~real.flatten(), size=real.numel() - len(slots))
        return cls(real[:, None, None, :], slots, sources, padding.flatten())

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]: the real tokens only."""
        return _MoveRows.apply(x.flatten(0, 1), 0, self.slots, self.sources, None,
                               self.padding)

    def heads_apart(self, x: torch.Tensor) -> torch.Tensor:
        """[N, heads, d] -> [heads, B, T, d], contiguous, zeros at the padding: heads
        first, so that merging heads and rows for bmm is a view."""
        batch, _, _, length = self.key_mask.shape
        apart = _MoveRows.apply(x.transpose(0, 1), 1, self.sources, self.slots, self.padding,
                                None)
        return apart.view(x.shape[1], batch, length, x.shape[2])

    def heads_together(self, x: torch.Tensor) -> torch.Tensor:
        """[heads, B, T, d] -> [N, heads, d] (a transposed view): the real rows."""
        together = _MoveRows.apply(x.flatten(1, 2), 1, self.slots, self.sources, None,
                                   self.padding)
        return together.transpose(0, 1)

    def first_tokens(self) -> torch.Tensor:
        """[B] the packed position of each row's first token ([CLS], read by the pooler)."""
        lengths = self.key_mask.flatten(1).sum(1)
        return lengths.cumsum(0) - lengths


def unpadded_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: torch.Tensor | None,
                       dropout: float = 0.0, scaling: float | None = None,
                       packing: Packing | None = None, **kwargs):
    """transformers' attention-interface signature. With ``packing``: query, key, value
    are [1, heads, N, d], the packed real tokens; returns ([1, N, heads, d], None).
    Without: transformers' SDPA on a padded batch."""
    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    # [1, heads, N, d] -> [N, heads, d] (the projection's own layout) -> [heads, B, T, d];
    # heads play the batch and the rows the heads of SDPA's [batch, heads, T, d]
    q, k, v = (packing.heads_apart(x.squeeze(0).transpose(0, 1)) for x in (query, key, value))
    key_mask = packing.key_mask.transpose(0, 1)  # [1, B, 1, T], as q, k and v
    if dropout and q.device.type == "cpu":
        # SDPA's math path with the cheaper dropout mask (overture.dropout): SDPA would
        # draw it with bernoulli_, the largest single cost of a CPU step
        bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~key_mask, float("-inf"))
        scale = q.shape[-1] ** -0.5 if scaling is None else scaling
        out = attention_with_dropout(q, k, v, bias, dropout, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout,
                                             scale=scaling)
    return packing.heads_together(out)[None], None  # out: [heads, B, T, d]


AttentionInterface.register(ATTENTION, unpadded_attention)
# a padded call builds SDPA's mask (an unknown name would pass the [B, T] mask on as it is)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def is_decoder(config) -> bool:
    """Whether a transformers config asks for causal or cross attention, which the unpadded
    forward (bidirectional self-attention) does not implement."""
    return bool(getattr(config, "is_decoder", False)
                or getattr(config, "add_cross_attention", False))


def use_unpadded_attention(model: nn.Module) -> None:
    """Make ``model``'s layers look up ``unpadded_attention`` (in place); a decoder's config
    is refused (``model.init_from`` resolves ``model.unpadded`` off for one first)."""
    if is_decoder(model.config):
        raise ConfigError("model.unpadded: the checkpoint's config is a decoder's "
                          "(is_decoder / add_cross_attention), whose attention the unpadded "
                          "forward does not implement; set model.unpadded=false")
    model.set_attn_implementation(ATTENTION)


def encode_unpadded(encoder: nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
    """A BertModel / RobertaModel / AlbertModel forward over the real tokens only.

    Returns (hidden [N, H] of the real tokens in row order, pooled [B, H] or None, the
    ``Packing``). The embeddings run on the padded batch, as stock (RoBERTa numbers its
    positions from the padding); everything after them on the N real tokens.
    """
    packing = Packing.of(attention_mask)
    extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    embedded = encoder.embeddings(input_ids=input_ids, **extra)  # [B, T, E]
    hidden = encoder.encoder(packing.pack(embedded)[None], None,
                             packing=packing).last_hidden_state[0]  # [N, H]
    return hidden, pool(encoder, hidden, packing), packing


def encoder_layers(encoder: nn.Module) -> list[nn.Module]:
    """The transformer layers of a BertModel / RobertaModel (encoder.layer) or AlbertModel
    (its layer groups' layers, each shared across depth): what ``train.compile``
    compiles one by one (the encoder's own forward, under transformers' deprecation
    wrapper, recompiles for every caller of that wrapper)."""
    inner = encoder.encoder
    if hasattr(inner, "albert_layer_groups"):
        return [layer for group in inner.albert_layer_groups for layer in group.albert_layers]
    return list(inner.layer)


def pool(encoder: nn.Module, hidden: torch.Tensor, packing: Packing) -> torch.Tensor | None:
    """The model's own pooler on each row's first token of ``hidden`` [N, H] (None for a
    model without one)."""
    if getattr(encoder, "pooler", None) is None:
        return None
    first = hidden[packing.first_tokens()]  # [B, H]
    if getattr(encoder, "pooler_activation", None) is not None:  # ALBERT: Linear, then tanh
        return encoder.pooler_activation(encoder.pooler(first))
    return encoder.pooler(first[:, None])  # BertPooler reads position 0 of [B, T, H]
