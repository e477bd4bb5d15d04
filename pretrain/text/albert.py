"""ALBERT (Lan et al. 2020): factorized embeddings (V x E then E x H), one set of layer
weights shared across depth, sentence-order prediction, n-gram masking (n <= 3,
p(n) ∝ 1/n), on transformers' AlbertForPreTraining with a Unigram vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import Phase, choice, positive
from ...data.tokenizer import TokenizerSpec
from .builders import SentencePairs
from .mlm import EncoderConfig, MaskedLMConfig, MaskedLMFamily, MaskedLMModule


@dataclass
class AlbertModelConfig(EncoderConfig):
    """model: section of an ALBERT recipe (AlbertConfig names)."""

    embedding_size: int = 128
    """E: width of the token embeddings, projected to hidden_size (E << H)."""
    num_hidden_groups: int = 1
    """Groups of layers with their own weights; 1 = all layers share one set."""
    inner_group_num: int = 1
    """Layers inside a group."""
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    classifier_dropout_prob: float = 0.0
    """Dropout before the SOP head: none, as everywhere in ALBERT (Lan et al. 2020 4.7;
    transformers' default is 0.1)."""
    hidden_act: str = "gelu_pytorch_tanh"
    """The feed-forward activation (transformers' ACT2FN names). gelu_pytorch_tanh is
    ALBERT's gelu_new (the tanh approximation of google-research/albert) in one fused
    kernel: the same function to 1e-6, where gelu_new's five elementwise operations took
    a sixth of an ALBERT 256 x 4 step on 2 CPU cores. A model.init_from checkpoint's
    own activation is kept unless the recipe sets this."""

    architecture: ClassVar[tuple[str, ...]] = (
        *EncoderConfig.architecture, "embedding_size", "num_hidden_groups", "inner_group_num")

    def validate(self) -> None:
        super().validate()
        positive(self, "model", "embedding_size", "num_hidden_groups", "inner_group_num")
        from transformers.activations import ACT2FN

        choice(self, "model", "hidden_act", tuple(ACT2FN))


@dataclass
class AlbertObjectiveConfig(MaskedLMConfig):
    """objective: section of an ALBERT recipe."""

    name: str = "albert"
    max_ngram: int = 3


class Albert(MaskedLMFamily):
    """ALBERT: Unigram, [CLS] A [SEP] B [SEP] pairs, n-gram MLM + SOP."""

    model_types = ("albert",)

    model_config = AlbertModelConfig
    objective_config = AlbertObjectiveConfig
    # <pad>=0 <unk>=1 [CLS]=2 [SEP]=3 [MASK]=4, as albert-base-v2
    tokenizer_spec = TokenizerSpec(
        kind="unigram", lowercase=True,
        special_tokens={"pad_token": "<pad>", "unk_token": "<unk>", "cls_token": "[CLS]",
                        "sep_token": "[SEP]", "mask_token": "[MASK]"},
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        transformers_class="AlbertTokenizerFast",
        required=("cls_token", "sep_token", "mask_token", "pad_token"))
    token_types = True

    @property
    def sentence_task(self) -> str:
        return "sop"

    def builder(self, phase: Phase):
        return SentencePairs(**self.builder_settings(phase), task="sop",
                             cls_id=self.special_id("cls_token"),
                             sep_id=self.special_id("sep_token"),
                             short_seq_prob=self.recipe.data.short_seq_prob)

    def hf_model(self, vocab_size: int, fresh: bool = True) -> MaskedLMModule:
        from transformers import AlbertConfig, AlbertForPreTraining

        config = AlbertConfig(vocab_size=vocab_size, pad_token_id=self.special_id("pad_token"),
                              bos_token_id=self.special_id("cls_token"),
                              eos_token_id=self.special_id("sep_token"),
                              **self.recipe.model.hf_settings())
        model = self.instantiate(AlbertForPreTraining, config, {
            "predictions": "the MLM head", "sop_classifier": "the SOP head",
            "albert.pooler": "the pooler under the SOP head"}, fresh)
        return self.training_module(model, "albert", "predictions", "sop_classifier", "sop")

    def flops_per_unit(self, phase: Phase) -> float:
        m = self.recipe.model  # + the E x H projection of every token
        return super().flops_per_unit(phase) + 6 * m.embedding_size * m.hidden_size
