"""Longformer (Beltagy et al. 2020): RoBERTa's masked LM on long inputs, with sliding-window
(local) attention in every layer plus global attention on a few chosen tokens.

The model is transformers' LongformerForMaskedLM; its ``attention.self`` modules are
swapped for overture's faster sliding-window attention (``longformer_attention.install``,
same parameters, so ``final/`` is the stock model). The data side is RoBERTa's: byte-level
BPE, dynamic masking, FULL-SENTENCES packing, here into long blocks of
``data.max_seq_len`` (e.g. 4,096) tokens. By default ``<s>`` (the first token) attends to
and is attended by every token (``global_attention_mask``), as Longformer's sequence
classifiers use it; ``objective.global_attention: none`` trains local attention only, as
the paper's MLM pretraining.

Positions start after the padding id, as RoBERTa: ``model.max_position_embeddings`` is the
number of tokens, the table holds ``max_position_embeddings + pad_id + 1`` rows (4,098 for
4,096 tokens with <pad> = 1, as allenai/longformer-base-4096).

``model.init_from`` continues pretraining from a LongformerForMaskedLM folder, e.g. a
RoBERTa made long by ``overture convert-long`` (pretrain/text/convert_long.py), as the
paper does: its weights, sizes and tokenizer (overture.pretrain.text.continued).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...config import ConfigError, Phase, choice, fraction, positive
from .common import transformer_flops_per_token
from .masking import IGNORE_INDEX
from .mlm import MaskedLMCollator, MaskedLMModule
from .roberta import Roberta, RobertaObjectiveConfig


def per_layer(value: Any, layers: int) -> list:
    """An int or a per-layer list -> one value per layer."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * layers


@dataclass
class LongformerModelConfig:
    """model: section of a Longformer recipe (transformers' LongformerConfig names)."""

    hidden_size: int = 768
    """Width of the hidden states."""
    num_hidden_layers: int = 12
    """Number of encoder layers."""
    num_attention_heads: int = 12
    """Attention heads per layer; must divide hidden_size."""
    intermediate_size: int = 3072
    """Width of the feed-forward layer."""
    max_position_embeddings: int = 4096
    """Longest input in tokens (the position table holds this + pad_id + 1 rows)."""
    attention_window: Any = 512
    """Sliding-window size (tokens attended, both sides together): an even positive int,
    or a list with one per layer."""
    attention_dilation: Any = 1
    """Gaps in the window (1: none; d attends every d-th token, widening the reach d
    times): an int >= 1, or a list with one per layer. Plain transformers loads final/ but ignores it."""
    hidden_dropout_prob: float = 0.1
    """Dropout on hidden states."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on attention probabilities."""
    initializer_range: float = 0.02
    """Std of the truncated-normal weight initialisation."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (RoBERTa / allenai Longformer: 1e-5)."""

    architecture: ClassVar[tuple[str, ...]] = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "layer_norm_eps")
    """Keys that model.init_from's config fixes; window, dilation and dropout are the
    recipe's."""
    init_from: str | None = None
    """A LongformerForMaskedLM folder (e.g. from `overture convert-long`) whose weights,
    sizes and tokenizer start training (a size above that disagrees is refused); window,
    dilation and dropout are taken from here."""

    def validate(self) -> None:
        positive(self, "model", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "layer_norm_eps")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}")
        fraction(self, "model", "hidden_dropout_prob", "attention_probs_dropout_prob")
        for key, minimum, rule in (("attention_window", 2, "an even positive integer"),
                                   ("attention_dilation", 1, "an integer >= 1")):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):
                if len(value) != self.num_hidden_layers:
                    raise ConfigError(
                        f"model.{key} lists {len(value)} values; give one per layer "
                        f"(model.num_hidden_layers={self.num_hidden_layers}) or one integer")
                items = [(f"model.{key}[{i}]", v) for i, v in enumerate(value)]
            else:
                items = [(f"model.{key}", value)]
            for name, v in items:
                if (not isinstance(v, int) or isinstance(v, bool) or v < minimum
                        or (key == "attention_window" and v % 2)):
                    raise ConfigError(f"{name}={v!r} must be {rule}")

    def position_limit(self) -> tuple[str, int]:
        """(key, value) bounding every phase's max_seq_len."""
        return "max_position_embeddings", self.max_position_embeddings

    @property
    def windows(self) -> list[int]:
        return per_layer(self.attention_window, self.num_hidden_layers)

    @property
    def dilations(self) -> list[int]:
        return per_layer(self.attention_dilation, self.num_hidden_layers)


@dataclass
class LongformerObjectiveConfig(RobertaObjectiveConfig):
    """objective: section of a Longformer recipe (RoBERTa's, plus global attention)."""

    name: str = "longformer"
    global_attention: str = "first"
    """Tokens with global attention: first (<s>, where Longformer's classifiers put it) or
    none (local attention only, as the paper's MLM pretraining)."""

    def validate(self) -> None:
        super().validate()
        choice(self, "objective", "global_attention", ("first", "none"))


def install_attention(model, dilation: list[int]):
    """Swap in overture's fast sliding-window attention (same parameters, so the
    state_dict is the stock model's); a dilation other than 1 goes to config.json."""
    from .longformer_attention import install

    heads = model.config.num_attention_heads
    if len(set(dilation)) == 1:
        return install(model, dilation=dilation[0])
    # one entry per layer, each a per-head list: never mistaken for a per-head list
    return install(model, dilation=[[d] * heads for d in dilation])


def freeze_global_projections(model) -> None:
    """With no global token, the global query / key / value projections never run:
    frozen (``requires_grad`` off), DDP does not wait for their gradients, which it would
    at the second step ("parameters that were not used in producing loss"), and AdamW
    leaves them as they are, as it leaves a parameter without a gradient. They stay in
    the state dict, for a later run with global tokens."""
    for layer in model.longformer.encoder.layer:
        attention = layer.attention.self
        for projection in (attention.query_global, attention.key_global,
                           attention.value_global):
            projection.requires_grad_(False)


class LongformerCollator(MaskedLMCollator):
    """RoBERTa's batches (dynamic masks) plus ``global_attention_mask``, padded to a
    multiple of the attention window (the model would pad to it anyway)."""

    def __init__(self, *args, global_first: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.global_first = global_first

    def __call__(self, rows: dict) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        glob = torch.zeros_like(batch["attention_mask"])
        if self.global_first:
            glob[:, 0] = 1
        batch["global_attention_mask"] = glob
        return batch


class LongformerModule(MaskedLMModule):
    """LongformerForMaskedLM for training: MLM head at the masked positions only."""

    def __init__(self, model):
        super().__init__(model, "longformer", "lm_head")

    def forward(self, input_ids, attention_mask, labels,
                global_attention_mask=None) -> dict[str, torch.Tensor]:
        out = self.model.longformer(input_ids=input_ids, attention_mask=attention_mask,
                                    global_attention_mask=global_attention_mask)
        selected = labels != IGNORE_INDEX  # [B, L]
        logits = self.model.lm_head(out.last_hidden_state[selected])  # [M, V]
        targets = labels[selected]  # [M]
        return {"mlm_loss_sum": F.cross_entropy(logits.float(), targets, reduction="sum"),
                "mlm_correct": (logits.argmax(-1) == targets).sum()}



class Longformer(Roberta):
    """Longformer: RoBERTa's data and masking on long packed inputs, local + global
    attention."""

    model_types = ("longformer",)

    @staticmethod
    def convert_from(checkpoint, output, max_length: int, window: int):
        """``overture convert-long``: a BERT / RoBERTa masked LM made a Longformer."""
        from .convert_long import convert_to_long

        return convert_to_long(checkpoint, output, max_length, window)

    model_config = LongformerModelConfig
    objective_config = LongformerObjectiveConfig
    auto_class = "AutoModelForMaskedLM"

    # ------------------------------------------------------------------ data
    def collator(self, phase: Phase) -> LongformerCollator:
        tok = self.tokenizer
        spec = self.masking_spec(phase) if self.recipe.objective.masking == "dynamic" else None
        return LongformerCollator(tok.pad_token_id, tuple(sorted(set(tok.all_special_ids))),
                                  spec, seed=self.recipe.train.seed,
                                  pad_to_multiple_of=max(self.recipe.model.windows),
                                  global_first=self.recipe.objective.global_attention == "first")

    # ------------------------------------------------------------------ model
    def hf_model(self, vocab_size: int, fresh: bool = True) -> LongformerModule:
        from transformers import LongformerConfig, LongformerForMaskedLM

        m = self.recipe.model
        pad = self.special_id("pad_token")
        config = LongformerConfig(
            vocab_size=vocab_size, hidden_size=m.hidden_size,
            num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
            intermediate_size=m.intermediate_size,
            max_position_embeddings=m.max_position_embeddings + pad + 1,
            attention_window=m.windows, hidden_dropout_prob=m.hidden_dropout_prob,
            attention_probs_dropout_prob=m.attention_probs_dropout_prob,
            initializer_range=m.initializer_range, layer_norm_eps=m.layer_norm_eps,
            type_vocab_size=1, pad_token_id=pad, bos_token_id=self.special_id("bos_token"),
            eos_token_id=self.special_id("eos_token"),
            sep_token_id=self.special_id("sep_token"))
        # model.init_from: the checkpoint's weights, with the recipe's window and dropout
        model = self.instantiate(LongformerForMaskedLM, config, {"lm_head": "the MLM head"},
                                 fresh)
        model = install_attention(model, m.dilations)
        if self.recipe.objective.global_attention == "none":
            freeze_global_projections(model)
        return LongformerModule(model)

    def flops_per_unit(self, phase: Phase) -> float:
        """As an encoder whose attention spans the window (+1 global token), not the
        whole input."""
        m = self.recipe.model
        span = min(phase.max_seq_len, sum(m.windows) // len(m.windows) + 1)
        return transformer_flops_per_token(m.num_hidden_layers, m.hidden_size,
                                           m.intermediate_size, span)
