"""torch's fused encoder layers for feature extraction (overture/native_encoder.py): the
same hidden states and pooler output as transformers' forward, the fused kernel really
runs, and every model it does not fit keeps transformers' forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import overture
from overture.native_encoder import native_forward, native_layers


def tiny_model(kind: str, **config):
    from transformers import AlbertConfig, AlbertModel, BertConfig, BertModel, RobertaConfig, \
        RobertaModel

    torch.manual_seed(0)
    sizes = {**dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=48, max_position_embeddings=64,
                    layer_norm_eps=0.1), **config}  # an eps that shows if it is lost
    model = {"bert": lambda: BertModel(BertConfig(**sizes)),
             "roberta": lambda: RobertaModel(RobertaConfig(pad_token_id=1, **sizes)),
             "albert": lambda: AlbertModel(AlbertConfig(embedding_size=16, **sizes))}[kind]()
    return model.eval()


def padded_batch(pad: int, lengths=(9, 4, 1, 7)):
    """Random ids [B, L], right-padded with ``pad``, and their attention mask."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


@pytest.mark.parametrize("kind, act", [("bert", "gelu"), ("bert", "relu"), ("roberta", "gelu")])
def test_fused_layers_give_transformers_hidden_states_and_pooler(kind, act):
    model = tiny_model(kind, hidden_act=act)
    layers = native_layers(model)
    assert layers is not None and len(layers) == 3
    ids, mask = padded_batch(model.config.pad_token_id)
    segments = torch.zeros_like(ids).masked_fill(torch.arange(ids.shape[1]) >= 3, 1)
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=segments,
                         output_hidden_states=True)
        got = native_forward(model, layers, ids, mask, segments, hidden_states=True,
                             pooler=True)
    real = mask.bool()  # padding positions are never read (pooling masks them)
    assert len(got.hidden_states) == len(expected.hidden_states) == 4
    for mine, theirs in zip(got.hidden_states, expected.hidden_states):
        assert torch.allclose(mine[real], theirs[real], atol=1e-5)
    assert torch.allclose(got.last_hidden_state[real], expected.last_hidden_state[real],
                          atol=1e-5)
    # the pooler reads position 0, a real token in every row
    assert torch.allclose(got.pooler_output, expected.pooler_output, atol=1e-5)
    # and padding changes nothing: each row alone gives its batch result
    with torch.inference_mode():
        alone = native_forward(model, layers, ids[2:3, :1], mask[2:3, :1], segments[2:3, :1])
    assert torch.allclose(alone.last_hidden_state[0, 0], got.last_hidden_state[2, 0], atol=1e-5)


def test_the_fused_kernel_runs_once_per_layer(monkeypatch):
    model = tiny_model("bert")
    layers = native_layers(model)
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def counted(*args):
        calls.append(args[0].shape)
        return fused(*args)

    # nn.TransformerEncoderLayer looks the kernel up on every call; a model that left its
    # fast path (training mode, odd heads, autocast...) would compute in Python instead
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counted)
    ids, mask = padded_batch(0)
    with torch.inference_mode():
        native_forward(model, layers, ids, mask)
    assert calls == [ids.shape + (32,)] * 3


@pytest.mark.parametrize("kind, config", [
    ("bert", {"hidden_act": "gelu_new"}),  # tanh GELU: the fused kernel has only erf GELU
    ("bert", {"is_decoder": True}),
    ("albert", {}),  # shared layers of another shape
    # heads of unequal width (transformers allows it when the config has embedding_size)
    ("bert", {"hidden_size": 30, "embedding_size": 30}),
])
def test_models_the_fused_layers_do_not_fit_keep_transformers_forward(kind, config):
    assert native_layers(tiny_model(kind, **config)) is None


def test_features_use_the_fused_layers_and_equal_transformers_features(trained):
    encoder = overture.load(trained("bert"))
    assert encoder.fused_layers() is not None
    texts = ["The war ended in the spring.", "Rain.", "A short one, with a comma.",
             "Music was played at the festival every evening for a week."]
    options = [dict(pooling="mean"), dict(pooling="cls"), dict(pooling="max"),
               dict(pooling="pooler"), dict(pooling="mean", layer=[0, -2], normalize=True)]
    fused = [encoder.encode(texts, batch_size=3, **o) for o in options]
    encoder.fused = False  # transformers' own forward
    for got, o in zip(fused, options):
        assert np.allclose(got, encoder.encode(texts, batch_size=3, **o), atol=1e-5), o


def test_a_row_without_tokens_stays_finite_and_leaves_the_others_alone():
    """An empty text under a tokenizer that adds no special tokens is a row of padding
    only: every key masked made the fused kernel return NaN."""
    model = tiny_model("bert")
    ids, mask = padded_batch(0, lengths=(6, 0, 3))
    with torch.inference_mode():
        got = native_forward(model, native_layers(model), ids, mask).last_hidden_state
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(got).all()
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5)


def test_the_fused_layers_follow_the_model_when_its_weights_change(trained):
    """The fused layers copy query, key and value: new weights loaded into the model,
    or the model cast to another dtype, must not leave them stale."""
    encoder = overture.load(trained("bert"))
    texts = ["The war ended in the spring.", "Rain.", "A short one, with a comma."]
    before = encoder.encode(texts)
    generator = torch.Generator().manual_seed(0)
    changed = {k: v + 0.05 * torch.randn(v.shape, generator=generator)
               if v.is_floating_point() else v for k, v in encoder.model.state_dict().items()}
    encoder.model.load_state_dict(changed)
    after = encoder.encode(texts)
    encoder.fused = False
    stock = encoder.encode(texts)
    assert not np.allclose(before, after, atol=1e-3)
    assert np.allclose(after, stock, atol=1e-5)
    encoder.fused = True
    encoder.model.to(torch.float64)
    assert np.allclose(encoder.encode(texts), stock, atol=1e-5)
    assert encoder.fused_layers()[0].self_attn.in_proj_weight.dtype == torch.float64


def test_mean_and_max_of_a_text_without_tokens_are_zero():
    from types import SimpleNamespace

    from overture.features import pool

    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    output = SimpleNamespace(last_hidden_state=hidden)
    for pooling in ("mean", "max"):
        pooled = pool(output, mask, pooling, [-1], (-1,))
        assert torch.equal(pooled[1], torch.zeros(4))
    assert torch.allclose(pool(output, mask, "max", [-1], (-1,))[0], hidden[0, :2].max(0).values)
