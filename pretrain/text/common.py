"""What every text family shares: tokenizer + example cache, metrics, HF export."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ...config import ConfigError, Phase, Recipe
from ...data.corpus import resolve_sources
from ...data.prepare import PreparedData, prepare_examples
from ...data.tokenizer import TokenizerSpec, load_or_train_tokenizer, tokenizer_fingerprint


class TextFamily:
    """Base of the text objectives: subclasses give the tokenizer spec, the example
    builder, the models and the forward pass."""

    unit: ClassVar[str] = "tokens"
    tokenizer_spec: ClassVar[TokenizerSpec]
    auto_class: ClassVar[str] = "AutoModelForPreTraining"
    lm_head: ClassVar[str]
    """The language-modelling head whose loss gives the perplexity."""
    model_types: ClassVar[tuple[str, ...]] = ()
    """transformers ``model_type`` values whose checkpoints are this family's
    (``overture.registry.checkpoint_family``)."""

    @staticmethod
    def encoder(checkpoint, **options):
        """An ``overture.features.Encoder`` of a checkpoint of this family (``overture
        features``): its base model, task heads dropped."""
        from ...features import load

        return load(checkpoint, **options)

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.tokenizer = None
        self.heads: tuple[str, ...] = (self.lm_head,)

    # ------------------------------------------------------------------ model.init_from
    @classmethod
    def continue_from(cls, raw: dict, where) -> dict:
        """The raw recipe completed from its ``model.init_from`` checkpoint (its sizes and
        tokenizer; overture.pretrain.text.continued)."""
        from .continued import continue_from

        return continue_from(cls, raw, where)

    @classmethod
    def checkpoint_values(cls, config) -> dict:
        """The ``model:`` section's values that a transformers config of this family
        holds, under the section's names (the attention kernel is the recipe's)."""
        names = {f.name for f in dataclasses.fields(cls.model_config)} - {
            "init_from", "attn_implementation", "unpadded"}
        return {k: getattr(config, k) for k in names if hasattr(config, k)}

    def instantiate(self, model_class, config, heads: dict[str, str], fresh: bool):
        """``model_class(config)`` for a fresh model (``fresh``, or no model.init_from);
        else model.init_from's weights in ``model_class``, with ``heads`` (attribute path
        -> name) created fresh where the checkpoint has none."""
        if fresh or not getattr(self.recipe.model, "init_from", None):
            return model_class(config)
        from .continued import load_weights

        return load_weights(self, model_class, heads)

    def prepare(self, phase: Phase, progress: bool = True) -> PreparedData:
        """Cached examples for ``phase`` (the tokenizer trained or loaded on first call)."""
        self.load_tokenizer()
        return prepare_examples(self.builder(phase), self.recipe.data, progress)

    def load_tokenizer(self):
        """The tokenizer: trained on the corpus (cached) or loaded, once."""
        if self.tokenizer is None:
            data = self.recipe.data
            sources = resolve_sources(data.corpus, data.resolved_cache_dir, data.task_dir)
            self.tokenizer = load_or_train_tokenizer(self.recipe.tokenizer, data, sources,
                                                     self.tokenizer_spec)
        return self.tokenizer

    def builder(self, phase: Phase):
        raise NotImplementedError

    def builder_settings(self, phase: Phase) -> dict:
        """The TextBuilder fields every text family fills the same way."""
        tok = self.tokenizer
        return {"tokenizer_json": tok.backend_tokenizer.to_str(),
                "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                "max_seq_len": phase.max_seq_len,
                "special_ids": tuple(sorted(set(tok.all_special_ids)))}

    def special_id(self, role: str) -> int:
        """Id of a special token ("pad_token"): the tokenizer's, or before one exists (size
        estimates) its place in the spec, where trained vocabularies put it."""
        if self.tokenizer is not None:
            return getattr(self.tokenizer, f"{role}_id")
        tokens = list(dict.fromkeys(self.tokenizer_spec.special_tokens.values()))
        return tokens.index(self.tokenizer_spec.special_tokens[role])

    def frozen_models(self) -> dict[str, nn.Module]:
        return {}

    def count_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["attention_mask"].sum()

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        """Loss and accuracy (where counted) per head, their total as "loss", and the LM
        perplexity."""
        out = {}
        for head in self.heads:
            n = max(counts.get(head, 0.0), 1.0)
            out[f"{head}_loss"] = sums[f"{head}_loss_sum"] / n
            if f"{head}_correct" in sums:  # a full-vocabulary argmax: evaluation only
                out[f"{head}_accuracy"] = sums[f"{head}_correct"] / n
        out["loss"] = sum(out[f"{h}_loss"] for h in self.heads)
        out["perplexity"] = math.exp(min(out[f"{self.lm_head}_loss"], 50.0))
        return out

    def max_length(self) -> int:
        """Longest input the model takes (the exported tokenizer's model_max_length)."""
        return self.recipe.model.position_limit()[1]

    def export(self, models: dict[str, nn.Module], state_dicts: dict[str, dict],
               folder: Path) -> None:
        """final/: the transformers model (safetensors) and its tokenizer."""
        module = models["model"]
        state = {k.removeprefix("model."): v for k, v in state_dicts["model"].items()}
        module.model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        self.tokenizer.model_max_length = self.max_length()
        self.tokenizer.save_pretrained(folder)


def transformer_flops_per_token(layers: int, hidden: int, intermediate: int,
                                seq_len: int) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + attention scores
    (Kaplan et al. 2020 / PaLM appendix B)."""
    per_layer = 4 * hidden**2 + 2 * hidden * intermediate
    return 6 * layers * per_layer + 12 * layers * hidden * seq_len


def read_phrases(path: str | None) -> tuple[str, ...]:
    """A phrase / entity list, one per line (blank lines and # comments skipped)."""
    if not path:
        return ()
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"objective.knowledge_phrases={path!r}: cannot read it ({err})")
    phrases = tuple(dict.fromkeys(
        s.strip() for s in text.splitlines() if s.strip() and not s.startswith("#")))
    if not phrases:
        raise ConfigError(f"objective.knowledge_phrases={path!r}: the file lists no phrase")
    return phrases
