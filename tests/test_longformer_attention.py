"""FastLongformerSelfAttention computes transformers' LongformerSelfAttention (outputs and
gradients), dilation matches a dense masked reference, and install() keeps the weights."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import LongformerConfig, LongformerForMaskedLM, LongformerModel
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from overture.pretrain.text.longformer_attention import (
    FastLongformerSelfAttention, install, normalize_dilation)

TOL = 1e-4
HIDDEN, HEADS = 32, 4
NEG, POS = torch.finfo(torch.float32).min, torch.finfo(torch.float32).max


def _config(window=8, layers=1, **kw):
    windows = window if isinstance(window, list) else [window] * layers
    return LongformerConfig(
        hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=64, num_hidden_layers=len(windows),
        attention_window=windows, vocab_size=50, max_position_embeddings=128, pad_token_id=1,
        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, **kw)


def _mask(batch, length, pad_from=None, global_at=None):
    """Layer-level mask as LongformerModel builds it: finfo.min padding, 0 local, finfo.max global.
    pad_from: {row: first padded index}; global_at: {row: [indices]}."""
    mask = torch.zeros(batch, length)
    for row, start in (pad_from or {}).items():
        mask[row, start:] = NEG
    for row, idx in (global_at or {}).items():
        mask[row, idx] = POS
    return mask


def _run(module, x, mask):
    """Output and gradients (hidden states, every parameter) of a loss with random weights."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = module(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
                 is_global_attn=bool((mask > 0).any()))[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    grads = {"hidden_states": x.grad}
    for name, p in module.named_parameters():
        grads[name.removeprefix("module.")] = p.grad if p.grad is not None else torch.zeros_like(p)
    return out.detach(), grads


def _pair(config, layer_id=0, dilation=None):
    torch.manual_seed(0)
    ref = LongformerSelfAttention(config, layer_id).eval()
    fast = FastLongformerSelfAttention(config, layer_id, dilation=dilation).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _max_diffs(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    assert grads_a.keys() == grads_b.keys()
    return ((out_a - out_b).abs().max().item(),
            {k: (grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a})


def _assert_close(a, b):
    out_diff, grad_diffs = _max_diffs(a, b)
    assert out_diff <= TOL, f"output max abs diff {out_diff}"
    worst = max(grad_diffs, key=grad_diffs.get)
    assert grad_diffs[worst] <= TOL, f"gradient of {worst}: max abs diff {grad_diffs[worst]}"
    # the comparison is not vacuous: outputs and gradients are far from zero
    assert a[0].abs().max() > 0.1 and a[1]["hidden_states"].abs().max() > 0.1


CASES = {
    "local_only": dict(),
    "global_first_token": dict(global_at={0: [0], 1: [0]}),
    "global_several": dict(global_at={0: [0, 5, 6, 17, 31], 1: [12]}),
    "global_one_row_only": dict(global_at={1: [3, 30]}),
    "padding": dict(pad_from={1: 19}),
    "padding_and_global": dict(pad_from={0: 27, 1: 9}, global_at={0: [0, 26], 1: [0, 4, 8]}),
    # as many global tokens as a head has dimensions (8) or more: the global keys and
    # values are projected, not folded into the queries
    "global_many": dict(pad_from={1: 30}, global_at={0: list(range(0, 32, 3)), 1: [2]}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("window", [4, 8, 16])
def test_matches_transformers(case, window):
    config = _config(window)
    ref, fast = _pair(config)
    x = torch.randn(2, 32, HIDDEN, generator=torch.Generator().manual_seed(2))
    mask = _mask(2, 32, **CASES[case])
    _assert_close(_run(ref, x, mask), _run(fast, x, mask))


def test_whole_model_odd_length_padding_and_global():
    """Through LongformerModel (its own padding to the window), one window per layer."""
    config = _config([4, 8, 16])
    torch.manual_seed(0)
    plain = LongformerModel(config).eval()
    fast = LongformerModel(config).eval()
    fast.load_state_dict(plain.state_dict())
    install(fast)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 50, (3, 37), generator=gen)  # 37: padded to 48 by LongformerModel
    attn = torch.ones(3, 37, dtype=torch.long)
    attn[1, 30:] = 0
    attn[2, 11:] = 0
    ids[attn == 0] = config.pad_token_id
    glob = torch.zeros(3, 37, dtype=torch.long)
    glob[0, [0, 36]] = 1
    glob[1, [0, 13]] = 1
    weight = torch.randn(3, 37, HIDDEN, generator=gen)
    results = []
    for model in (plain, fast):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=attn, global_attention_mask=glob).last_hidden_state
        (out * weight).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) > 20
    out_diff, grad_diffs = _max_diffs(
        (results[0][0], results[0][1]), (results[1][0], results[1][1]))
    assert out_diff <= TOL, out_diff
    projections = {n for n in grad_diffs if ".attention.self." in n}
    assert len(projections) == 3 * 12
    worst = max(projections, key=grad_diffs.get)
    assert grad_diffs[worst] <= TOL, (worst, grad_diffs[worst])
    # the other gradients sum over every token (the token-type embedding's over all 144):
    # fp32 summation order gives ~1e-4 absolute on values of ~1e2, so compare relatively
    for name, diff in grad_diffs.items():
        scale = max(1.0, results[0][1][name].abs().max().item())
        assert diff <= TOL * scale, (name, diff, scale)
    assert all(type(layer.attention.self) is FastLongformerSelfAttention for layer in fast.encoder.layer)


def _dense_reference(module, x, mask, dilation):
    """Plain softmax over a full T x T score matrix: query i (not global) attends to key j when
    (|i - j| <= d*w/2, (i - j) % d == 0 and j is neither padding nor global) or j is global;
    global queries attend to every non-padding key with the global projections; padding
    queries output 0."""
    b, t, _ = x.shape
    h, hd = module.num_heads, module.head_dim
    half = module.one_sided_attn_window_size
    pad, glob = mask < 0, mask > 0

    def heads(y):
        return y.view(b, t, h, hd).transpose(1, 2)

    q, k, v = heads(module.query(x)), heads(module.key(x)), heads(module.value(x))
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    d = torch.tensor(dilation).view(h, 1, 1)
    band = ((i - j).abs()[None] <= half * d) & ((i - j)[None] % d == 0)  # (h, t, t)
    local_key = ~(pad | glob)
    allowed = (band[None] & local_key[:, None, None, :]) | glob[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    probs = probs.masked_fill(pad[:, None, :, None], 0.0)  # padding rows: NaN-free zeros
    out = (probs @ v).transpose(1, 2).reshape(b, t, h * hd)
    gq, gk, gv = heads(module.query_global(x)), heads(module.key_global(x)), heads(module.value_global(x))
    gscores = (gq @ gk.transpose(-1, -2)) / math.sqrt(hd)
    gout = gscores.masked_fill(pad[:, None, None, :], float("-inf")).softmax(-1) @ gv
    gout = gout.transpose(1, 2).reshape(b, t, h * hd)
    return torch.where(glob[:, :, None], gout, out)


class _Dense(torch.nn.Module):
    def __init__(self, module, dilation):
        super().__init__()
        self.module, self.dilation = module, dilation

    def forward(self, x, attention_mask=None, **_):
        return (_dense_reference(self.module, x, attention_mask, self.dilation),)


DILATION_CASES = {
    "local_only": dict(),
    "padding_and_global": dict(pad_from={1: 21}, global_at={0: [0, 9, 30], 1: [2]}),
}


@pytest.mark.parametrize("case", list(DILATION_CASES))
@pytest.mark.parametrize("dilation", [1, 2, 3, [1, 2, 3, 1], [2, 1, 4, 2]])
def test_dilation_matches_dense_reference(case, dilation):
    config = _config(8)
    _, fast = _pair(config, dilation=dilation)
    per_head = normalize_dilation(dilation, HEADS)
    x = torch.randn(2, 32, HIDDEN, generator=torch.Generator().manual_seed(4))
    mask = _mask(2, 32, **DILATION_CASES[case])
    dense = _Dense(fast, per_head)
    _assert_close(_run(dense, x, mask), _run(fast, x, mask))


def test_dense_reference_is_transformers_at_dilation_1():
    """The dense reference itself is right: at dilation 1 it is transformers' function."""
    ref, _ = _pair(_config(8))
    x = torch.randn(2, 32, HIDDEN, generator=torch.Generator().manual_seed(5))
    mask = _mask(2, 32, **DILATION_CASES["padding_and_global"])
    _assert_close(_run(ref, x, mask), _run(_Dense(ref, [1] * HEADS), x, mask))


def test_dilation_from_config_and_through_model():
    config = _config([8, 8], attention_dilation=[2, [1, 2, 1, 3]])
    model = LongformerModel(config).eval()
    install(model)
    assert [layer.attention.self.dilation for layer in model.encoder.layer] == [[2] * 4, [1, 2, 1, 3]]
    attn = FastLongformerSelfAttention(config, 1)
    assert attn.dilation == [1, 2, 1, 3]
    ids = torch.randint(3, 50, (1, 29))
    out = model(input_ids=ids).last_hidden_state
    assert out.shape == (1, 29, HIDDEN) and torch.isfinite(out).all()


def test_install_keeps_state_dict_and_writes_dilation(caplog):
    config = _config([4, 8])
    torch.manual_seed(0)
    model = LongformerForMaskedLM(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {n: p for n, p in model.named_parameters()}
    with caplog.at_level(logging.WARNING):
        assert install(model) is model
    assert not caplog.records and getattr(model.config, "attention_dilation", None) is None
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params_before[n] for n, p in model.named_parameters())  # moved, not copied
    assert all(type(layer.attention.self) is FastLongformerSelfAttention
               for layer in model.longformer.encoder.layer)

    with caplog.at_level(logging.WARNING):
        install(model, dilation=[2, [1, 2, 2, 1]])
    assert model.config.attention_dilation == [2, [1, 2, 2, 1]]
    assert any("ignores it" in r.getMessage() for r in caplog.records)
    assert list(model.state_dict()) == list(before)
    # a plain transformers model loads the state dict unchanged
    LongformerForMaskedLM(config).load_state_dict(model.state_dict())


def test_output_attentions_falls_back_to_transformers():
    ref, fast = _pair(_config(8))
    x = torch.randn(2, 32, HIDDEN)
    mask = _mask(2, 32, pad_from={1: 20}, global_at={0: [3]})
    kw = dict(attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
              is_global_attn=True, output_attentions=True)
    for a, b in zip(ref(x, **kw), fast(x, **kw)):
        assert torch.allclose(a, b, atol=1e-6)
    fast.dilation = [2] * HEADS
    with pytest.raises(NotImplementedError, match="undilated"):
        fast(x, **kw)


def test_dropout_applies_in_training_only():
    config = _config(8)
    config.attention_probs_dropout_prob = 0.5
    _, fast = _pair(config)
    x = torch.randn(1, 32, HIDDEN)
    mask = _mask(1, 32, global_at={0: [0]})
    kw = dict(attention_mask=mask)
    evald = fast(x, **kw)[0]
    assert torch.equal(evald, fast(x, **kw)[0])
    fast.train()
    assert not torch.allclose(fast(x, **kw)[0], evald)


@pytest.mark.parametrize("case", ["padding", "padding_and_global", "global_many"])
def test_bf16_autocast_matches_transformers(case):
    """Under bf16 autocast (train.mixed_precision=bf16) the output keeps autocast's dtype,
    global tokens' rows included, and equals transformers' to bf16's rounding (the
    overlapping windows, the folded and the projected global paths)."""
    ref, fast = _pair(_config(8))
    x = torch.randn(2, 32, HIDDEN, generator=torch.Generator().manual_seed(2))
    mask = _mask(2, 32, **CASES[case])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(x, attention_mask=mask, is_index_masked=mask < 0,
                       is_index_global_attn=mask > 0, is_global_attn=bool((mask > 0).any()))[0]
        out = fast(x, attention_mask=mask)[0]
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("case", ["local_only", "padding", "padding_and_global", "global_many"])
def test_training_dropout_is_transformers_attention_with_the_cheaper_mask(case, monkeypatch):
    """In training on a CPU, the attention dropout (the band's, and the global queries',
    folded or not) takes overture.dropout's mask: with one that keeps every probability,
    outputs and gradients are transformers' attention times the kept values' scale; the
    real mask drops about p of the band's probabilities."""
    from overture import dropout as dropout_module

    config = _config(8)
    config.attention_probs_dropout_prob = 0.5
    ref, fast = _pair(config)
    fast.train()
    x = torch.randn(2, 32, HIDDEN, generator=torch.Generator().manual_seed(2))
    mask = _mask(2, 32, **CASES[case])
    masks = []
    monkeypatch.setattr(dropout_module, "keep_mask", lambda shape, p, device, dtype=torch.bool: masks.append(
        torch.ones(shape, dtype=dtype)) or masks[-1])
    scale = dropout_module.LEVELS / (dropout_module.LEVELS - dropout_module.threshold(0.5))
    out, grads = _run(ref, x, mask)
    _assert_close((out * scale, {k: g * scale for k, g in grads.items()}), _run(fast, x, mask))
    g = max(len(at) for at in CASES[case].get("global_at", {0: []}).values())
    shapes = [(2 * 8 * HEADS, 4, g + 12)]  # the band: (N * blocks * heads, c, G + 3c)
    if g:
        shapes.append((2, HEADS, g, 32) if g < 8 else (2 * HEADS, g, 32))  # global queries
    assert [tuple(m.shape) for m in masks] == shapes

    monkeypatch.undo()
    real = dropout_module.keep_mask
    monkeypatch.setattr(dropout_module, "keep_mask",
                        lambda *a: masks.append(real(*a)) or masks[-1])
    torch.manual_seed(0)
    fast(x, attention_mask=mask)
    assert abs(masks[len(shapes)].float().mean().item() - 0.5) < 0.05


def test_fp16_training_with_dropout_has_finite_gradients():
    """A padding query's window is all padding; in fp16, finfo.min plus a score below -16
    is -inf, and the row's softmax NaN: the dropout path computes in fp32, as SDPA does."""
    config = _config(8)
    config.attention_probs_dropout_prob = 0.1
    _, fast = _pair(config)
    fast = fast.half().train()
    x = torch.randn(2, 32, HIDDEN, generator=torch.Generator().manual_seed(2)).half()
    x[1, 16:] = 30.0  # padding rows with large hidden states: strongly negative scores
    x.requires_grad_(True)
    mask = _mask(2, 32, pad_from={1: 16}).half()
    out = fast(x, attention_mask=mask)[0]
    out.float().square().sum().backward()
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)


def test_global_attention_flag_without_global_tokens():
    """is_global_attn=True with no global token (transformers itself raises): local only."""
    ref, fast = _pair(_config(8))
    x = torch.randn(2, 32, HIDDEN, generator=torch.Generator().manual_seed(2))
    mask = _mask(2, 32, pad_from={1: 20})
    out = fast(x, attention_mask=mask, is_index_masked=mask < 0, is_index_global_attn=mask > 0,
               is_global_attn=True)[0]
    expected = ref(x, attention_mask=mask, is_index_masked=mask < 0,
                   is_index_global_attn=mask > 0, is_global_attn=False)[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [0, [1, 2], [1, 2, 0, 1], 1.5, "2"])
def test_bad_dilation_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="dilation"):
        FastLongformerSelfAttention(_config(8), 0, dilation=bad)
