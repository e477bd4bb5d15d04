"""BERT-style encoder layers run by torch's fused inference kernel, for feature extraction.

``torch.nn.TransformerEncoderLayer`` has an inference fast path: in eval mode, without
gradients, a whole post-norm layer (query, key and value in one product, attention,
output projection, add & LayerNorm, feed-forward with an exact GELU or a ReLU, add &
LayerNorm) is one native call, ``torch._transformer_encoder_layer_fwd``. That is the
arithmetic of transformers' ``BertLayer`` in another order: the layers below share the
checkpoint's weights (only query, key and value are concatenated, a copy) and give the
same hidden states to float rounding (5e-6 on all-MiniLM-L6-v2). On a 2-core CPU a
forward pass of MiniLM-L6 at batch 32, 14 tokens per text, took 34-35 ms against
transformers' 44-45 ms.

Only the model types whose layers are exactly BERT's are converted; any other model, an
approximate (tanh) GELU, a decoder or cross-attention keeps transformers' forward.
"""

from __future__ import annotations

# model types whose encoder layers are BertLayer's post-norm arithmetic, with absolute
# positions added in the embeddings (nothing inside the layer but the attention mask)
NATIVE_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
# transformers' hidden_act names that are torch's exact functions ("gelu" is erf GELU)
NATIVE_ACTIVATIONS = ("gelu", "relu")


def weights_key(model) -> tuple:
    """What ``native_layers(model)`` was built from: the model and each parameter's
    storage, version (bumped by in-place writes such as load_state_dict), dtype and
    device. The fused layers hold a copy of query, key and value, so a changed key means
    they must be built again."""
    return id(model), tuple((p.data_ptr(), p._version, p.dtype, p.device)
                            for p in model.parameters())


def native_layers(model):
    """``model``'s encoder layers as ``nn.TransformerEncoderLayer`` modules in eval mode
    (an ``nn.ModuleList``) sharing its weights, or None when ``model`` (a transformers base
    model) is not a BERT-style post-norm encoder with an exact GELU or ReLU."""
    import torch
    from torch import nn

    config = model.config
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if (config.model_type not in NATIVE_TYPES
            or getattr(config, "hidden_act", None) not in NATIVE_ACTIVATIONS
            or getattr(config, "is_decoder", False)
            or getattr(config, "add_cross_attention", False)
            or layers is None or getattr(model, "embeddings", None) is None
            # torch's attention splits the width into equal heads; transformers allows
            # a remainder when the config has an embedding_size
            or config.hidden_size % config.num_attention_heads):
        return None
    native = nn.ModuleList()
    for layer in layers:
        attention, ffn_in, ffn_out = layer.attention, layer.intermediate.dense, layer.output
        projections = (attention.self.query, attention.self.key, attention.self.value)
        # built on the meta device: every parameter is replaced below, none is initialised
        fused = nn.TransformerEncoderLayer(
            config.hidden_size, config.num_attention_heads, ffn_in.out_features,
            dropout=0.0, activation=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
            batch_first=True, device="meta")
        with torch.no_grad():
            qkv = torch.cat([p.weight for p in projections])  # [3 * hidden, hidden]
            qkv_bias = torch.cat([p.bias for p in projections])
        fused.self_attn.in_proj_weight = nn.Parameter(qkv, requires_grad=False)
        fused.self_attn.in_proj_bias = nn.Parameter(qkv_bias, requires_grad=False)
        fused.self_attn.out_proj.weight = attention.output.dense.weight
        fused.self_attn.out_proj.bias = attention.output.dense.bias
        fused.norm1.weight = attention.output.LayerNorm.weight
        fused.norm1.bias = attention.output.LayerNorm.bias
        fused.linear1.weight, fused.linear1.bias = ffn_in.weight, ffn_in.bias
        fused.linear2.weight, fused.linear2.bias = ffn_out.dense.weight, ffn_out.dense.bias
        fused.norm2.weight = ffn_out.LayerNorm.weight
        fused.norm2.bias = ffn_out.LayerNorm.bias
        native.append(fused.eval())
    return native


def native_forward(model, layers, input_ids, attention_mask, token_type_ids=None,
                   hidden_states: bool = False, pooler: bool = False):
    """What ``model(input_ids, attention_mask, token_type_ids)`` returns (last_hidden_state,
    hidden_states when asked, pooler_output when asked), computed by ``layers``
    (``native_layers(model)``); call under ``torch.inference_mode()``."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # [B, L, H]
    padding = attention_mask == 0  # [B, L], True where a key is padding
    # a row without a single token (an empty text, from a tokenizer that adds no special
    # tokens) attends to its first slot: all keys masked would give NaN, where
    # transformers gives finite values; pooling ignores the row's slots either way
    padding[:, 0] &= ~padding.all(dim=1)
    states = [x]
    for layer in layers:
        x = layer(x, src_key_padding_mask=padding)
        states.append(x)
    pooled = model.pooler(x) if pooler and getattr(model, "pooler", None) is not None else None
    return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled,
                                      hidden_states=tuple(states) if hidden_states else None)
