"""The padding-free forward of the masked-LM families and the cheaper CPU dropout: both
are speed work, so what they compute must equal what they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import prepare, tiny
from overture.config import ConfigError
from overture.data.prepare import IndexedDataset
from overture import dropout as dropout_module
from overture.dropout import LEVELS, dropout, keep_mask, threshold, use_cheaper_dropout
from overture.pretrain.text import unpadded
from overture.pretrain.text.masking import IGNORE_INDEX
from overture.pretrain.text.mlm import MaskedLMModule
from overture.registry import get_family, list_families

NO_DROPOUT = ("model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0")


def unpadded_families() -> list[str]:
    """Registered families whose model section has ``unpadded`` (BERT, RoBERTa, ALBERT)."""
    return [f for f in list_families()
            if "unpadded" in getattr(get_family(f).model_config, "__dataclass_fields__", {})]


def test_the_masked_lm_families_all_train_unpadded():
    assert {"bert", "roberta", "albert"} <= set(unpadded_families())


def _padded_batch(data, recipe, rows: int = 8) -> dict:
    """A collated batch whose rows differ in length: every second row is cut to a third
    (RoBERTa's rows are packed full), so that a quarter or more of it is padding."""
    got = IndexedDataset(data.train).__getitems__(list(range(rows)))
    columns = got["columns"]
    for i in range(1, rows, 2):
        keep = max(3, len(columns["input_ids"][i]) // 3)
        for name in ("input_ids", "unit_start"):
            if name in columns:
                columns[name][i] = columns[name][i][:keep]
        if "mlm_positions" in columns:  # static masks: keep the targets inside the row
            pairs = [(p, t) for p, t in zip(columns["mlm_positions"][i], columns["mlm_ids"][i])
                     if p < keep]
            columns["mlm_positions"][i] = [p for p, _ in pairs]
            columns["mlm_ids"][i] = [t for _, t in pairs]
    batch = data.objective.collator(recipe.resolved_phases()[0])(got)
    assert batch["attention_mask"].float().mean() < 0.8
    assert (batch["labels"] != IGNORE_INDEX).sum() > 0
    return batch


@pytest.mark.parametrize("family", unpadded_families())
def test_unpadded_losses_and_gradients_equal_the_padded_forwards(family, cache_dir, real_text):
    recipe = tiny(family, "unused", cache_dir, real_text, *NO_DROPOUT)
    assert recipe.model.unpadded is None and recipe.model.unpadded_forward()  # on by default
    data = prepare(recipe)
    batch = _padded_batch(data, recipe)
    fast = data.objective.build_models()["model"].train()
    assert fast.unpadded and fast.model.config._attn_implementation == unpadded.ATTENTION
    padded = tiny(family, "unused", cache_dir, real_text, *NO_DROPOUT, "model.unpadded=false")
    data.objective.recipe = padded
    slow = data.objective.build_models()["model"].train()
    assert not slow.unpadded and slow.model.config._attn_implementation == "sdpa"
    slow.load_state_dict(fast.state_dict())
    sums = {}
    for name, module in (("fast", fast), ("slow", slow)):
        out = module(**batch)
        sum(v for k, v in out.items() if k.endswith("_loss_sum")).backward()
        sums[name] = out
    assert set(sums["fast"]) == set(sums["slow"]) and len(sums["fast"]) >= 2
    for key, value in sums["slow"].items():
        assert sums["fast"][key].item() == pytest.approx(value.item(), rel=1e-5), key
    grads = {n: p.grad for n, p in slow.named_parameters() if p.grad is not None}
    assert len(grads) > 10
    for name, param in fast.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6,
                                       msg=name)
    # a padded call (any caller but the training forward) is transformers' own SDPA
    with torch.no_grad():
        ours = fast.model.base_model(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state
        stock = slow.model.base_model(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], stock[real], rtol=1e-5, atol=1e-6)


def test_unpadded_attention_with_dropout_computes_sdpas_attention(monkeypatch):
    # CPU training with dropout takes the written-out path; without the mask it must be SDPA
    torch.manual_seed(0)
    lengths = torch.tensor([7, 2, 5])
    mask = torch.arange(7)[None, :] < lengths[:, None]  # [3, 7]
    packing = unpadded.Packing.of(mask.long())
    n, heads, width = int(lengths.sum()), 4, 8
    q, k, v = (torch.randn(1, heads, n, width) for _ in range(3))
    monkeypatch.setattr(dropout_module, "keep_mask",  # a mask that keeps every probability
                        lambda shape, p, device, dtype=torch.bool: torch.ones(shape, dtype=dtype))
    out, _ = unpadded.unpadded_attention(None, q, k, v, None, dropout=0.3, scaling=0.2,
                                         packing=packing)
    out = out / (LEVELS / (LEVELS - threshold(0.3)))  # the kept probabilities' scale
    assert out.shape == (1, n, heads, width)
    start = 0
    for length in lengths.tolist():  # each row alone: attention over its own tokens only
        rows = slice(start, start + length)
        expected = F.scaled_dot_product_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows],
                                                  scale=0.2)
        torch.testing.assert_close(out[0, rows], expected[0].transpose(0, 1), rtol=1e-5,
                                   atol=1e-6)
        start += length
    eager, _ = unpadded.unpadded_attention(None, q, k, v, None, dropout=0.0, scaling=0.2,
                                           packing=packing)
    torch.testing.assert_close(eager, out, rtol=1e-5, atol=1e-6)
    assert packing.first_tokens().tolist() == [0, 7, 9]


def test_unpadded_attention_drops_probabilities_with_the_cheaper_mask(monkeypatch):
    # the real dropout, its mask recorded: each row's probabilities times mask / (1 - p)
    torch.manual_seed(3)
    lengths = torch.tensor([6, 3])
    packing = unpadded.Packing.of((torch.arange(6)[None, :] < lengths[:, None]).long())
    q, k, v = (torch.randn(1, 2, 9, 4, requires_grad=True) for _ in range(3))
    masks = []
    real = dropout_module.keep_mask
    monkeypatch.setattr(dropout_module, "keep_mask",
                        lambda *a: masks.append(real(*a)) or masks[-1])
    out, _ = unpadded.unpadded_attention(None, q, k, v, None, dropout=0.25, scaling=0.5,
                                         packing=packing)
    (keep,) = masks  # [heads * B, T, T]: heads first (Packing.heads_apart)
    assert 0.5 < keep.float().mean() < 0.95
    keep = keep.view(2, 2, 6, 6)
    scale = LEVELS / (LEVELS - threshold(0.25))
    start = 0
    for row, length in enumerate(lengths.tolist()):
        rows = slice(start, start + length)
        probs = (q[0, :, rows] @ k[0, :, rows].transpose(1, 2) * 0.5).softmax(-1)  # [h, L, L]
        dropped = probs * keep[:, row, :length, :length] * scale
        torch.testing.assert_close(out[0, rows], (dropped @ v[0, :, rows]).transpose(0, 1))
        start += length
    out.sum().backward()  # through the mask: a dropped probability passes no gradient
    assert q.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


def test_moving_rows_apart_and_back_equals_indexing_and_keeps_gradients():
    # the gathers both ways against plain indexing, in float64, with a row all padding
    # and a batch without any real token
    torch.manual_seed(4)
    for lengths in ([3, 0, 5], [0, 0]):
        mask = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
        packing = unpadded.Packing.of(mask.long())
        n = int(mask.sum())
        x = torch.randn(n, 2, 3, dtype=torch.float64, requires_grad=True)
        apart = packing.heads_apart(x)  # [heads, B, T, d]
        expected = torch.zeros(len(lengths), 5, 2, 3, dtype=torch.float64)
        expected[mask] = x.detach()
        assert torch.equal(apart, expected.permute(2, 0, 1, 3))
        assert torch.equal(packing.heads_together(apart), x.detach())
        padded = torch.randn(len(lengths), 5, 4, dtype=torch.float64, requires_grad=True)
        assert torch.equal(packing.pack(padded), padded.detach()[mask])
        if n:
            assert torch.autograd.gradcheck(packing.heads_apart, (x,))
            assert torch.autograd.gradcheck(packing.pack, (padded,))
        assert torch.equal(packing.pack(mask.long()), mask.long()[mask])  # labels: long


def test_a_decoder_checkpoint_is_refused_unpadded():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32,
                                       is_decoder=True))
    with pytest.raises(ConfigError, match="decoder.*model.unpadded=false"):
        unpadded.use_unpadded_attention(model)


def test_unpadded_needs_the_sdpa_kernel(cache_dir, real_text):
    with pytest.raises(ConfigError, match=r"model.unpadded=true .* "
                                          r"model.attn_implementation='eager'"):
        tiny("bert", "unused", cache_dir, real_text, "model.unpadded=true",
             "model.attn_implementation=eager")
    eager = tiny("bert", "unused", cache_dir, real_text, "model.attn_implementation=eager")
    assert not eager.model.unpadded_forward()  # null follows the kernel
    assert "unpadded" not in eager.model.hf_settings()  # not a transformers config key


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cheaper_dropout_keeps_each_element_with_probability_1_minus_p(p):
    torch.manual_seed(0)
    n = 1 << 20
    keep = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    expected = 1 - round(p * LEVELS) / LEVELS
    assert abs(expected - (1 - p)) < 1 / LEVELS
    rate = keep.float().mean().item()
    assert abs(rate - expected) < 4 * (expected * (1 - expected) / n) ** 0.5
    # the four quarters of one random draw, each at the rate, and independent
    quarters = keep.view(-1, 4).float()
    for rate in quarters.mean(0).tolist():
        assert abs(rate - expected) < 4 * (expected * (1 - expected) / (n / 4)) ** 0.5
    correlation = torch.corrcoef(quarters.T)[~torch.eye(4, dtype=torch.bool)]
    assert correlation.abs().max().item() < 4 / (n / 4) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(keep_mask(torch.Size([n]), p, torch.device("cpu")), keep)  # seeded


def test_cheaper_dropout_scales_the_kept_values_and_their_gradients():
    torch.manual_seed(1)
    x = torch.randn(64, 300, requires_grad=True)
    out = dropout(x, 0.2)
    kept = out != 0
    scale = LEVELS / (LEVELS - threshold(0.2))  # the inverse of the rate drawn
    assert scale == pytest.approx(1 / 0.8, rel=1e-4)
    torch.testing.assert_close(out[kept], x[kept] * scale)
    assert 0.75 < kept.float().mean().item() < 0.85
    out.backward(torch.full_like(out, 3.0))
    torch.testing.assert_close(x.grad, kept.float() * 3.0 * scale)
    assert torch.equal(dropout(x, 0.2, training=False), x)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert torch.equal(dropout(x, 0.0), x)
    # p that rounds to 1 or to 0 in 1/LEVELS steps: torch's dropout, not all kept
    assert (dropout(torch.ones(100_000), 0.99999) != 0).float().mean() < 1e-3
    tiny = dropout(torch.ones(10), 1e-6)
    assert torch.equal(tiny, torch.ones(10))  # nothing drawn as dropped, and no scaling
    for bad in (-0.1, 1.5):  # refused as F.dropout refuses it (the threshold would wrap)
        with pytest.raises(ValueError, match=f"between 0 and 1, but got {bad}"):
            dropout(x, bad)
    with pytest.raises(ValueError, match="must be in"):  # rounds to 1: torch's, above
        keep_mask(torch.Size([8]), 0.999999, torch.device("cpu"))


def test_use_cheaper_dropout_swaps_plain_dropout_only_and_keeps_the_state_dict():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.Dropout2d(0.3),
                          nn.Sequential(nn.Dropout(0.1, inplace=True)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_cheaper_dropout(model) == 2
    assert type(model[1]).__name__ == "Dropout" and model[1].p == 0.3
    assert type(model[1]) is not nn.Dropout and isinstance(model[1], nn.Dropout)
    assert type(model[2]) is nn.Dropout2d
    assert model.state_dict().keys() == before.keys()
    torch.manual_seed(2)
    x = torch.ones(1000, 4)
    zeros = (model[1](x) == 0).float().mean().item()
    assert 0.25 < zeros < 0.35
    model.eval()
    assert torch.equal(model[1](x), x)


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_the_text_modules_use_the_cheaper_dropout(family, cache_dir, real_text):
    recipe = tiny(family, "unused", cache_dir, real_text)
    module = prepare(recipe).objective.build_models()["model"]
    assert isinstance(module, MaskedLMModule) == (family == "bert")
    dropouts = [m for m in module.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is dropout_module.Dropout for m in dropouts)


def test_a_decoder_checkpoint_continues_padded_and_refuses_unpadded_before_any_work(
        trained, tmp_path, cache_dir, real_text):
    import json
    import shutil

    from helpers import continued

    decoder = tmp_path / "decoder"
    shutil.copytree(trained("bert") / "final", decoder)
    config = json.loads((decoder / "config.json").read_text())
    (decoder / "config.json").write_text(json.dumps({**config, "is_decoder": True}))
    recipe = continued("bert", decoder, tmp_path / "run", cache_dir, real_text)
    assert recipe.model.unpadded is False and not recipe.model.unpadded_forward()
    with pytest.raises(ConfigError, match=r"model.unpadded=true but model.init_from=.* is a "
                                          r"decoder .* remove model.unpadded"):
        continued("bert", decoder, tmp_path / "run", cache_dir, real_text, "model.unpadded=true")
    encoder = continued("bert", trained("bert") / "final", tmp_path / "run", cache_dir,
                        real_text)
    assert encoder.model.unpadded is None and encoder.model.unpadded_forward()


def test_a_run_may_resume_with_the_unpadded_forward_switched(trained, cache_dir, real_text):
    from overture.checkpoint import find_resume_point, latest_checkpoint

    checkpoint = latest_checkpoint(trained("bert"))
    recipe = tiny("bert", "elsewhere", cache_dir, real_text, "model.unpadded=false",
                  f"train.resume={checkpoint}")
    assert find_resume_point(recipe) == checkpoint
