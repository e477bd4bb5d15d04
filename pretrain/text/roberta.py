"""RoBERTa (Liu et al. 2019): BERT's masked LM without NSP, masks re-drawn every time a
sequence is seen, inputs packed from whole sentences, byte-level BPE, large batches.

The model is transformers' RobertaForMaskedLM. Its positions start after the padding
id (position = pad_id + 1 + index), so its table holds max_position_embeddings +
pad_id + 1 rows: 514 for 512 tokens with <pad> = 1, as roberta-base's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import Phase, choice
from ...data.tokenizer import TokenizerSpec
from .builders import PackedSentences
from .mlm import EncoderConfig, MaskedLMConfig, MaskedLMFamily, MaskedLMModule


@dataclass
class RobertaObjectiveConfig(MaskedLMConfig):
    """objective: section of a RoBERTa recipe."""

    name: str = "roberta"
    masking: str = "dynamic"
    packing: str = "full_sentences"
    """full_sentences: inputs filled with contiguous sentences, crossing documents (an
    extra </s> between them); doc_sentences: never crossing a document boundary."""

    def validate(self) -> None:
        super().validate()
        choice(self, "objective", "packing", ("full_sentences", "doc_sentences"))


class Roberta(MaskedLMFamily):
    """RoBERTa: byte-level BPE, <s> sentences </s> inputs, dynamic MLM."""

    model_types = ("roberta",)

    model_config = EncoderConfig
    objective_config = RobertaObjectiveConfig
    # <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, as roberta-base
    tokenizer_spec = TokenizerSpec(
        kind="bpe", lowercase=False,
        special_tokens={"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>",
                        "unk_token": "<unk>", "mask_token": "<mask>", "cls_token": "<s>",
                        "sep_token": "</s>"},
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        transformers_class="RobertaTokenizerFast",
        required=("cls_token", "sep_token", "mask_token", "pad_token"))

    def builder(self, phase: Phase):
        return PackedSentences(
            **self.builder_settings(phase), cls_id=self.special_id("cls_token"),
            sep_id=self.special_id("sep_token"),
            cross_documents=self.recipe.objective.packing == "full_sentences")

    @classmethod
    def checkpoint_values(cls, config) -> dict:
        """As every family's, with the position table counted in tokens (its rows less
        the padding id and the one before it)."""
        values = super().checkpoint_values(config)
        values["max_position_embeddings"] -= config.pad_token_id + 1
        return values

    def hf_model(self, vocab_size: int, fresh: bool = True) -> MaskedLMModule:
        from transformers import RobertaConfig, RobertaForMaskedLM

        pad = self.special_id("pad_token")
        settings = self.recipe.model.hf_settings()
        settings["max_position_embeddings"] += pad + 1
        config = RobertaConfig(vocab_size=vocab_size, type_vocab_size=1, pad_token_id=pad,
                               bos_token_id=self.special_id("bos_token"),
                               eos_token_id=self.special_id("eos_token"), **settings)
        model = self.instantiate(RobertaForMaskedLM, config, {"lm_head": "the MLM head"}, fresh)
        return self.training_module(model, "roberta", "lm_head")
