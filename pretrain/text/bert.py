"""BERT (Devlin et al. 2019): masked LM (80/10/10, static masks) + next-sentence
prediction, on transformers' BertForPreTraining with a WordPiece vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import Phase
from ...data.tokenizer import TokenizerSpec
from .builders import PackedSentences, SentencePairs
from .mlm import EncoderConfig, MaskedLMConfig, MaskedLMFamily, MaskedLMModule


@dataclass
class BertObjectiveConfig(MaskedLMConfig):
    """objective: section of a BERT recipe."""

    name: str = "bert"
    nsp: bool = True
    """Next-sentence prediction on [CLS] A [SEP] B [SEP] pairs (B random half the time);
    false: masked LM only, on full-sentence inputs (BertForMaskedLM)."""


class Bert(MaskedLMFamily):
    """BERT: WordPiece, [CLS] A [SEP] B [SEP] pairs, MLM + NSP."""

    model_types = ("bert",)

    model_config = EncoderConfig
    objective_config = BertObjectiveConfig
    tokenizer_spec = TokenizerSpec(
        kind="wordpiece", lowercase=True,
        special_tokens={"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                        "sep_token": "[SEP]", "mask_token": "[MASK]"},
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        transformers_class="BertTokenizerFast",
        required=("cls_token", "sep_token", "mask_token", "pad_token"))

    @property
    def sentence_task(self) -> str | None:
        return "nsp" if self.recipe.objective.nsp else None

    @property
    def token_types(self) -> bool:
        return self.sentence_task is not None

    def builder(self, phase: Phase):
        settings = {**self.builder_settings(phase), "cls_id": self.special_id("cls_token"),
                    "sep_id": self.special_id("sep_token")}
        if self.sentence_task:
            return SentencePairs(**settings, task="nsp",
                                 short_seq_prob=self.recipe.data.short_seq_prob)
        return PackedSentences(**settings, cross_documents=True)

    def hf_model(self, vocab_size: int, fresh: bool = True) -> MaskedLMModule:
        from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

        config = BertConfig(vocab_size=vocab_size, pad_token_id=self.special_id("pad_token"),
                            **self.recipe.model.hf_settings())
        mlm = {"cls.predictions": "the MLM head"}
        if self.sentence_task:
            model = self.instantiate(BertForPreTraining, config, {
                **mlm, "cls.seq_relationship": "the NSP head",
                "bert.pooler": "the pooler under the NSP head"}, fresh)
            return self.training_module(model, "bert", "cls.predictions",
                                        "cls.seq_relationship", "nsp")
        model = self.instantiate(BertForMaskedLM, config, mlm, fresh)
        return self.training_module(model, "bert", "cls.predictions")
