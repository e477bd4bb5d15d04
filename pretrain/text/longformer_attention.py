"""A fast, blocked Longformer self-attention (sliding window + global tokens, optional
dilation) that computes the same function as transformers' ``LongformerSelfAttention``.

transformers builds the banded scores with overlapping 2w-chunks and a chain of pad /
diagonalize copies; here the (window-padded) sequence is cut into blocks of c = w/2
tokens, each query block attends to the keys of blocks [i-1, i, i+1] (3c = 1.5 w columns,
a band mask keeps |i - j| <= w/2) plus the G global tokens' keys as extra columns, in one
``scaled_dot_product_attention`` call with a small additive mask shared by the heads.
Global tokens as queries attend densely to all T tokens with the global projections and
overwrite their local output, exactly as transformers does. Time and memory are linear in
T and fall with w. Dilation d (per layer, or per head) keeps w + 1 keys per query spread
d apart (|i - j| <= d*w/2, (i - j) % d == 0): the sequence is re-ordered into its d
residue classes, and each class is plain window-w attention, so dilation costs nothing
extra. The same code runs on CPU (with backward) and CUDA (SDPA picks its kernel).

API:
    FastLongformerSelfAttention(config, layer_id, dilation=None)   # drop-in subclass
    install(model, dilation=None) -> model                          # swap every layer
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from ...dropout import attention as attention_with_dropout
from ...dropout import dropout as cheaper_dropout

logger = logging.getLogger(__name__)

__all__ = ["FastLongformerSelfAttention", "install", "normalize_dilation"]

Dilation = int | Sequence[int]


def normalize_dilation(dilation: Dilation | None, num_heads: int, where: str = "dilation") -> list[int]:
    """Per-head dilation list from an int, a per-head list, or None (= 1)."""
    if dilation is None:
        return [1] * num_heads
    if isinstance(dilation, bool):
        raise ValueError(f"{where}: expected a positive int or a list of {num_heads} positive ints, "
                         f"got {dilation!r}")
    if isinstance(dilation, int):
        values = [dilation] * num_heads
    elif isinstance(dilation, Sequence) and not isinstance(dilation, str):
        values = list(dilation)
        if len(values) != num_heads:
            raise ValueError(f"{where}: a per-head list needs {num_heads} entries (one per attention "
                             f"head), got {len(values)}: {values!r}")
    else:
        raise ValueError(f"{where}: expected a positive int or a list of {num_heads} positive ints, "
                         f"got {dilation!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: dilation values must be positive ints, got {v!r} in {dilation!r}")
    return values


def _config_dilation(config, layer_id: int) -> Dilation | None:
    dil = getattr(config, "attention_dilation", None)
    if dil is None:
        return None
    if isinstance(dil, int):
        return dil
    if layer_id >= len(dil):
        raise ValueError(f"config.attention_dilation has {len(dil)} entries but layer {layer_id} "
                         f"needs one (one entry per layer, each an int or a per-head list)")
    return dil[layer_id]


class _Windows(torch.autograd.Function):
    """(N, T, H, hd) keys -> (N, nb, H, G + 3c, hd): per block of c queries and per head,
    the G global keys then the keys of blocks i-1, i, i+1 (zeros outside the sequence),
    laid out as SDPA's (batch, heads, keys, hd) so that merging (N, nb) is a view. A plain
    cat of shifted slices costs a zero-filled buffer per slice in backward; this backward
    is one copy and two in-place adds."""

    @staticmethod
    def forward(ctx, x, extra, c):
        n, t, h, hd = x.shape
        nb = t // c
        g = 0 if extra is None else extra.shape[1]
        xb = x.view(n, nb, c, h, hd).transpose(2, 3)  # (N, nb, H, c, hd), a view
        out = x.new_empty(n, nb, h, g + 3 * c, hd)
        if g:
            out[:, :, :, :g] = extra.transpose(1, 2)[:, None]
        prev, cur, nxt = (out[:, :, :, g + i * c:g + (i + 1) * c] for i in range(3))
        prev[:, 0] = 0
        prev[:, 1:] = xb[:, :-1]
        cur.copy_(xb)
        nxt[:, -1] = 0
        nxt[:, :-1] = xb[:, 1:]
        ctx.c, ctx.g, ctx.shape = c, g, x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        c, g = ctx.c, ctx.g
        gextra = grad[:, :, :, :g].sum(1).transpose(1, 2) if g and ctx.needs_input_grad[1] \
            else None
        return _fold(grad, c, g, ctx.shape), gextra, None


def _fold(grad, c: int, g: int, shape) -> torch.Tensor:
    """The keys' gradient (N, T, H, hd) from their windows' (N, nb, H, G + 3c, hd): a
    block's keys sit in its own window and in both neighbours'."""
    n, t, h, hd = shape
    gx = grad.new_empty(n, t // c, c, h, hd)
    gxh = gx.transpose(2, 3)  # written through as (N, nb, H, c, hd)
    gxh.copy_(grad[:, :, :, g + c:g + 2 * c])
    gxh[:, :-1] += grad[:, 1:, :, g:g + c]
    gxh[:, 1:] += grad[:, :-1, :, g + 2 * c:]
    return gx.view(shape)


class _OverlappingWindows(torch.autograd.Function):
    """(N, T, H, hd) keys -> (N*nb, H, 3c, hd) windows without copying them: the rows are
    laid end to end with c zeros before and after, and each block's window is a view
    that overlaps its neighbours' (a block at a row's edge sees the next row's keys, which
    the band mask never lets a query attend: its key_ok columns are the padding's). Forward
    copies the keys once instead of three times; backward folds the windows' gradient
    over the rows end to end."""

    @staticmethod
    def forward(ctx, x, c):
        n, t, h, hd = x.shape
        flat = F.pad(x.reshape(1, n * t, h, hd), (0, 0, 0, 0, c, c))  # (1, c + N*T + c, H, hd)
        ctx.c, ctx.shape = c, x.shape
        return flat.as_strided((n * t // c, h, 3 * c, hd), (c * h * hd, hd, h * hd, 1))

    @staticmethod
    def backward(ctx, grad):
        n, t, h, hd = ctx.shape
        c = ctx.c
        flat = _fold(grad.reshape(1, n * t // c, h, 3 * c, hd), c, 0, (1, n * t, h, hd))
        return flat.view(ctx.shape), None


def _band_attention(q, k, v, key_ok, gk, gv, g_ok, c: int, dropout_p: float, scale: float):
    """Sliding-window attention with global key columns.

    q, k, v: (N, T, H, hd); T % c == 0. key_ok: (N, T) bool, keys that
    may be attended locally. gk, gv: (N, G, H, hd) or None; g_ok: (N, G) bool.
    Query t attends to keys s with |t - s| <= c and key_ok[s], and to the valid global
    columns. Returns (N, T, H, hd).
    """
    n, t, h, hd = q.shape
    nb = t // c
    dtype = q.dtype
    qb = q.reshape(n * nb, c, h, hd).transpose(1, 2)  # query blocks (N*nb, H, c, hd): a view
    if gk is None and q.device.type == "cpu":
        # overlapping views (CPU only: whether every CUDA kernel reads them is untested)
        kw, vw = _OverlappingWindows.apply(k, c), _OverlappingWindows.apply(v, c)
    else:  # global keys come first in every window: each window is its own copy
        kw = _Windows.apply(k, gk, c).view(n * nb, h, -1, hd)
        vw = _Windows.apply(v, gv, c).view(n * nb, h, -1, hd)
    okw = F.pad(key_ok, (c, c), value=False).unfold(1, 3 * c, c)  # (N, nb, 3c)
    r = torch.arange(c, device=q.device)
    col = torch.arange(3 * c, device=q.device)
    band = (col[None, :] - c - r[:, None]).abs() <= c  # (c, 3c)
    allowed = band[None, None] & okw[:, :, None, :]  # (N, nb, c, 3c)
    if gk is not None:
        allowed = torch.cat([g_ok[:, None, None, :].expand(n, nb, c, gk.shape[1]), allowed], dim=3)
    # finfo.min, not -inf: a fully masked row (a padding query) gives a uniform row, no NaN;
    # its output is zeroed by the caller, as transformers does.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=q.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)
    mask = mask.view(n * nb, 1, c, mask.shape[-1])
    if dropout_p and q.device.type == "cpu":
        # a CPU SDPA with dropout takes its math path and draws the mask with bernoulli_
        # (a sixth of a training layer's time): the same math, with the cheaper mask
        out = attention_with_dropout(qb, kw, vw, mask, dropout_p, scale)
    else:
        out = F.scaled_dot_product_attention(qb, kw, vw, attn_mask=mask, dropout_p=dropout_p,
                                             scale=scale)
    return out.view(n, nb, h, c, hd).permute(0, 1, 3, 2, 4).reshape(n, t, h, hd)


def _dilated_band_attention(q, k, v, key_ok, gk, gv, g_ok, half: int, d: int, dropout_p: float,
                            scale: float):
    """Dilation d: query t attends to keys s with (t - s) % d == 0 and |t - s| <= d*half.
    Re-order the sequence into its d residue classes; each is plain window attention."""
    if d == 1:
        return _band_attention(q, k, v, key_ok, gk, gv, g_ok, half, dropout_p, scale)
    n, t, h, hd = q.shape
    step = d * half
    pad = (-t) % step
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        key_ok = F.pad(key_ok, (0, pad), value=False)
    tp = t + pad
    m = tp // d

    def split(x):  # (N, Tp, ...) -> (N*d, Tp/d, ...), position r + d*j -> class r, index j
        return x.view(n, m, d, *x.shape[2:]).transpose(1, 2).reshape(n * d, m, *x.shape[2:])

    if gk is not None:
        gk, gv, g_ok = (x.repeat_interleave(d, dim=0) for x in (gk, gv, g_ok))
    out = _band_attention(split(q), split(k), split(v), split(key_ok), gk, gv, g_ok, half, dropout_p,
                          scale)
    out = out.view(n, d, m, h, hd).transpose(1, 2).reshape(n, tp, h, hd)
    return out[:, :t]


class FastLongformerSelfAttention(LongformerSelfAttention):
    """Drop-in for transformers' LongformerSelfAttention: same parameters, same forward
    signature and outputs; blocked SDPA formulation; optional dilation (int or per-head
    list; default ``config.attention_dilation[layer_id]`` when the config has it, else 1).
    ``output_attentions=True`` falls back to the parent implementation (undilated only)."""

    def __init__(self, config, layer_id, dilation: Dilation | None = None):
        super().__init__(config, layer_id)
        self._set_dilation(dilation if dilation is not None else _config_dilation(config, layer_id))

    def _set_dilation(self, dilation: Dilation | None) -> None:
        self.dilation = normalize_dilation(dilation, self.num_heads,
                                           where=f"attention dilation of layer {self.layer_id}")

    def extra_repr(self) -> str:
        d = self.dilation
        d = d[0] if len(set(d)) == 1 else d
        return f"window={2 * self.one_sided_attn_window_size}, dilation={d}"

    def _project_qkv(self, x):
        lin = (self.query, self.key, self.value)
        if _plain(*lin):
            # one GEMM for q, k, v (one input-gradient GEMM, no gradient sums in backward)
            weight = torch.cat([m.weight for m in lin])
            bias = torch.cat([m.bias for m in lin])
            return F.linear(x, weight, bias).split(self.embed_dim, dim=-1)
        return tuple(m(x) for m in lin)

    def forward(self, hidden_states, attention_mask=None, is_index_masked=None,
                is_index_global_attn=None, is_global_attn=None, output_attentions=False):
        if output_attentions:
            if any(d != 1 for d in self.dilation):
                raise NotImplementedError(
                    "output_attentions=True is only available for undilated attention "
                    f"(layer {self.layer_id} has dilation {self.dilation})")
            if attention_mask is None:
                attention_mask = hidden_states.new_zeros(hidden_states.shape[:2])
            if is_index_masked is None:
                is_index_masked = attention_mask < 0
            if is_index_global_attn is None:
                is_index_global_attn = attention_mask > 0
            if is_global_attn is None:
                is_global_attn = bool(is_index_global_attn.any())
            return super().forward(hidden_states, attention_mask, is_index_masked,
                                   is_index_global_attn, is_global_attn, output_attentions)

        bsz, seq_len, embed_dim = hidden_states.shape
        if embed_dim != self.embed_dim:
            raise ValueError(f"hidden_states should have embed_dim = {self.embed_dim}, but has {embed_dim}")
        half = self.one_sided_attn_window_size
        if seq_len % (2 * half):
            raise ValueError(f"sequence length {seq_len} must be a multiple of the attention window "
                             f"{2 * half} (LongformerModel pads to it)")
        if is_index_masked is None:
            is_index_masked = (attention_mask < 0) if attention_mask is not None else \
                torch.zeros(bsz, seq_len, dtype=torch.bool, device=hidden_states.device)
        if is_index_global_attn is None:
            is_index_global_attn = (attention_mask > 0) if attention_mask is not None else \
                torch.zeros(bsz, seq_len, dtype=torch.bool, device=hidden_states.device)
        if is_global_attn is None:
            is_global_attn = bool(is_index_global_attn.any())

        h, hd = self.num_heads, self.head_dim
        dropout_p = self.dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(hd)
        q, k, v = (x.view(bsz, seq_len, h, hd) for x in self._project_qkv(hidden_states))
        # SDPA keeps q for backward: a copy of q (not a view of the fused q|k|v buffer) lets
        # that buffer go, k and v live on only as their block windows
        q = q.contiguous()
        # local keys: not padding and not global (global keys come in as extra columns)
        key_ok = ~(is_index_masked | is_index_global_attn)

        gk = gv = g_ok = None
        if is_global_attn:
            counts = is_index_global_attn.sum(dim=1)
            g = int(counts.max())
            b_idx, t_idx = is_index_global_attn.nonzero(as_tuple=True)
            slot = torch.arange(g, device=hidden_states.device)
            g_ok = slot[None, :] < counts[:, None]  # (B, G)
            s_idx = g_ok.nonzero(as_tuple=True)[1]  # slot of each global token (row-major order)
            gk = k.new_zeros(bsz, g, h, hd).index_put((b_idx, s_idx), k[b_idx, t_idx])
            gv = v.new_zeros(bsz, g, h, hd).index_put((b_idx, s_idx), v[b_idx, t_idx])

        groups: dict[int, list[int]] = {}
        for head, d in enumerate(self.dilation):
            groups.setdefault(d, []).append(head)
        if len(groups) == 1:
            d = self.dilation[0]
            out = _dilated_band_attention(q, k, v, key_ok, gk, gv, g_ok, half, d, dropout_p, scale)
        else:
            parts, order = [], []
            for d, heads in groups.items():
                idx = torch.tensor(heads, device=q.device)
                sel = (lambda x: x.index_select(2, idx))
                parts.append(_dilated_band_attention(
                    sel(q), sel(k), sel(v), key_ok,
                    None if gk is None else sel(gk), None if gv is None else sel(gv), g_ok,
                    half, d, dropout_p, scale))
                order.extend(heads)
            out = torch.cat(parts, dim=2)
            inverse = torch.empty(h, dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(h)
            out = out.index_select(2, inverse.to(q.device))
        out = out.reshape(bsz, seq_len, embed_dim)
        # padding queries output 0 (transformers zeroes their probabilities)
        if bool(is_index_masked.any()):
            out = out.masked_fill(is_index_masked[:, :, None], 0.0)

        if is_global_attn:
            # global tokens as queries: dense over all T keys with the global projections
            hg = hidden_states.new_zeros(bsz, g, embed_dim).index_put(
                (b_idx, s_idx), hidden_states[b_idx, t_idx])
            gq = self.query_global(hg).view(bsz, g, h, hd).transpose(1, 2)  # (B, H, G, hd)
            gout = self._global_attention(gq, hidden_states, is_index_masked, dropout_p, scale)
            out = out.index_put((b_idx, t_idx), gout[b_idx, s_idx])
        return (out,)

    def _global_attention(self, gq, hidden_states, is_index_masked, dropout_p: float,
                          scale: float):
        """The global tokens' queries (B, H, G, hd) over all T tokens, with the global key
        and value projections -> (B, G, H * hd).

        With fewer global tokens than a head has dimensions (G < hd: a <s>, a question),
        the projections fold into the G queries instead of running on all T tokens:
        q . (W_k x_t + b_k) = (W_k^T q) . x_t + q . b_k, and sum_t p_t (W_v x_t + b_v) =
        W_v (sum_t p_t x_t) + b_v sum_t p_t. Two T x E x E matmuls per layer become
        G x T x E ones. (q . b_k is the same for every key of a query, so the softmax
        ignores it; it is kept so that b_k takes part, with transformers' gradient of
        about 0: DDP fails on a parameter that a forward does not use.)"""
        bsz, h, g, hd = gq.shape
        length = hidden_states.shape[1]
        if g == 0:  # is_global_attn passed as True with no global token
            return gq.new_zeros(bsz, 0, h * hd)
        masked = is_index_masked[:, None, None, :]  # padding keys: (B, 1, 1, T)
        if g >= hd or not _plain(self.key_global, self.value_global):
            gk = self.key_global(hidden_states).view(bsz, length, h, hd).transpose(1, 2)
            gv = self.value_global(hidden_states).view(bsz, length, h, hd).transpose(1, 2)
            gmask = torch.zeros(masked.shape, dtype=gq.dtype, device=gq.device).masked_fill_(
                masked, torch.finfo(gq.dtype).min)
            if dropout_p and gq.device.type == "cpu":  # as the band: the cheaper mask
                gout = attention_with_dropout(gq, gk, gv, gmask, dropout_p, scale)
            else:
                gout = F.scaled_dot_product_attention(gq, gk, gv, attn_mask=gmask,
                                                      dropout_p=dropout_p, scale=scale)
            return gout.transpose(1, 2).reshape(bsz, g, h * hd)
        # every head's G queries at once against the hidden states: (B, H*G, E) x (B, E, T),
        # not a broadcast over heads (that would copy the hidden states per head)
        wk = self.key_global.weight.view(h, hd, -1)  # each head's rows: (H, hd, E)
        wv = self.value_global.weight.view(h, hd, -1)
        gq = gq * scale
        bias = (gq * self.key_global.bias.view(h, 1, hd)).sum(-1)  # (B, H, G)
        scores = torch.bmm(torch.matmul(gq, wk).view(bsz, h * g, -1),
                           hidden_states.transpose(1, 2)).view(bsz, h, g, length)
        probs = (scores + bias[..., None]).masked_fill(
            masked, torch.finfo(scores.dtype).min).softmax(-1)  # (B, H, G, T)
        if dropout_p:
            probs = cheaper_dropout(probs, dropout_p)
        mixed = torch.bmm(probs.view(bsz, h * g, length), hidden_states)  # (B, H*G, E)
        gout = torch.matmul(mixed.view(bsz, h, g, -1), wv.transpose(1, 2)) + (  # (B, H, G, hd)
            self.value_global.bias.view(h, 1, hd) * probs.sum(-1, keepdim=True))
        # the fp32 bias would promote an autocast bf16 output: the local output's dtype
        return gout.transpose(1, 2).reshape(bsz, g, h * hd).to(gq.dtype)


def _plain(*linears: nn.Module) -> bool:
    """Plain nn.Linear layers with a bias and no hooks: their weights may be used directly."""
    return all(type(m) is nn.Linear and m.bias is not None and not m._forward_hooks
               and not m._forward_pre_hooks for m in linears)


def _layers(model) -> list:
    for path in ("longformer.encoder.layer", "encoder.layer"):
        obj = model
        try:
            for name in path.split("."):
                obj = getattr(obj, name)
        except AttributeError:
            continue
        return list(obj)
    raise TypeError(f"install: {type(model).__name__} has no .longformer.encoder.layer or "
                    ".encoder.layer of Longformer layers")


def install(model, dilation: Dilation | Sequence[Dilation] | None = None):
    """Replace ``attention.self`` of every Longformer layer of ``model`` with
    FastLongformerSelfAttention, in place (the parameters stay the same objects, so
    state_dict keys and values and any optimizer references are unchanged); returns model.

    dilation: None -> ``config.attention_dilation`` (one entry per layer, each an int or a
    per-head list) or 1; an int or per-head list -> every layer; a list with one entry per
    layer -> per layer (a list of ints as long as num_attention_heads is read as per-head).
    A dilation other than 1 is written to ``model.config.attention_dilation``
    (plain transformers loads such checkpoints but ignores it and attends undilated).
    """
    layers = _layers(model)
    config = model.config
    n_layers = len(layers)
    if dilation is None:
        per_layer = [_config_dilation(config, i) for i in range(n_layers)]
    elif isinstance(dilation, int) and not isinstance(dilation, bool):
        per_layer = [dilation] * n_layers
    elif isinstance(dilation, Sequence) and len(dilation) == n_layers and \
            any(not isinstance(x, int) for x in dilation):
        per_layer = list(dilation)
    elif isinstance(dilation, Sequence) and len(dilation) == config.num_attention_heads:
        per_layer = [list(dilation)] * n_layers  # one per-head list for every layer
    elif isinstance(dilation, Sequence) and len(dilation) == n_layers:
        per_layer = list(dilation)
    else:
        raise ValueError(f"install: dilation must be an int, a per-head list of "
                         f"{config.num_attention_heads}, or a per-layer list of {n_layers}; got {dilation!r}")
    values = []
    for i, layer in enumerate(layers):
        attn = layer.attention.self
        if not isinstance(attn, LongformerSelfAttention):
            raise TypeError(f"install: layer {i} attention is {type(attn).__name__}, "
                            "not a LongformerSelfAttention")
        if type(attn) is not FastLongformerSelfAttention:
            attn.__class__ = FastLongformerSelfAttention  # re-class: same parameters, same keys
        attn._set_dilation(per_layer[i])
        d = attn.dilation
        values.append(d[0] if len(set(d)) == 1 else list(d))
    if any(v != 1 for v in values):
        config.attention_dilation = values
        logger.warning(
            "Longformer attention dilation %s installed and written to config.attention_dilation; "
            "plain transformers loads these checkpoints but ignores it (computes undilated attention).",
            values)
    elif getattr(config, "attention_dilation", None) is not None:
        config.attention_dilation = values
    return model
