"""GPT (Radford et al. 2018, 2019): causal language modelling on transformers'
GPT2LMHeadModel (SDPA attention), byte-level BPE, documents joined by <|endoftext|> and
cut into full blocks (no padding), labels = inputs (the model predicts the next token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, Phase, choice, fraction, positive
from ...data.tokenizer import TokenizerSpec
from ...dropout import use_cheaper_dropout
from ...objective import Update
from .builders import CausalBlocks
from .common import TextFamily, transformer_flops_per_token
from .cpu_attention import FP32_ON_CPU
from .losses import linear_cross_entropy

EOT = "<|endoftext|>"


@dataclass
class GptModelConfig:
    """model: section of a GPT recipe (GPT2Config names)."""

    n_embd: int = 768
    """Width of the hidden states."""
    n_layer: int = 12
    """Number of decoder blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_inner: int | None = None
    """Width of the feed-forward layer (null: 4 x n_embd)."""
    n_positions: int = 1024
    """Longest sequence the position table holds (covers every phase's max_seq_len)."""
    resid_pdrop: float = 0.1
    """Dropout on residual branches."""
    embd_pdrop: float = 0.1
    """Dropout on embeddings."""
    attn_pdrop: float = 0.1
    """Dropout on attention probabilities."""
    initializer_range: float = 0.02
    """Std of the normal weight initialisation."""
    activation_function: str = "gelu_pytorch_tanh"
    """The feed-forward activation (transformers' ACT2FN names). gelu_pytorch_tanh is
    GPT-2's gelu_new (the tanh approximation) in one fused kernel: the same function to
    1e-6, and on 2 CPU cores the tiny GPT's step took 187 ms instead of 205 with
    gelu_new's five elementwise operations."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa (torch scaled_dot_product_attention) or eager."""
    init_from: str | None = None
    """Continue pretraining from a GPT-2 checkpoint: an overture final/ (or the run folder
    holding it), a transformers folder or a Hub name (gpt2). Its config sets the sizes (a
    recipe size that disagrees is refused) and its tokenizer is used as it is; dropout
    and attention kernel stay the recipe's."""

    architecture: ClassVar[tuple[str, ...]] = ("n_embd", "n_layer", "n_head", "n_inner",
                                               "n_positions")
    """Keys that a checkpoint's config fixes (model.init_from)."""

    def hf_settings(self) -> dict:
        """The section as GPT2Config keyword arguments."""
        return {k: v for k, v in vars(self).items() if k != "init_from"}

    def validate(self) -> None:
        positive(self, "model", "n_embd", "n_layer", "n_head", "n_positions")
        if self.n_inner is not None:
            positive(self, "model", "n_inner")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not divisible by "
                              f"model.n_head={self.n_head}")
        choice(self, "model", "attn_implementation", ("sdpa", "eager"))
        from transformers.activations import ACT2FN

        choice(self, "model", "activation_function", tuple(ACT2FN))
        fraction(self, "model", "resid_pdrop", "embd_pdrop", "attn_pdrop")

    def position_limit(self) -> tuple[str, int]:
        return "n_positions", self.n_positions


@dataclass
class GptObjectiveConfig:
    """objective: section of a GPT recipe (next-token prediction has no settings)."""

    name: str = "gpt"

    def validate(self) -> None:
        choice(self, "objective", "name", ("gpt",))


class BlockCollator:
    """Stacks full blocks: input_ids [B, L], labels = input_ids, attention_mask ones."""

    def set_epoch(self, epoch: int) -> None:
        pass  # nothing random

    def __call__(self, rows: dict) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(rows["columns"]["input_ids"], dtype=torch.long)  # [B, L]
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


class CausalLMModule(nn.Module):
    """Training view of GPT2LMHeadModel: summed next-token loss over the batch, through
    the fused LM head + cross-entropy (losses.py); the accuracy, an argmax over the whole
    vocabulary, is counted at evaluation only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        use_cheaper_dropout(model)  # the residual and embedding dropouts' masks
        if model.config._attn_implementation == "sdpa":  # fp32 on a CPU under bf16 autocast
            model.set_attn_implementation(FP32_ON_CPU)
        # DeepSpeed ZeRO-3 gathers a weight only inside its module's own forward: there the
        # head runs as a module, unfused
        from transformers.integrations import is_deepspeed_zero3_enabled

        self.fused = not is_deepspeed_zero3_enabled()

    def forward(self, input_ids, labels, attention_mask=None) -> dict[str, torch.Tensor]:
        hidden = self.model.transformer(input_ids=input_ids).last_hidden_state  # [B, L, H]
        # Position i predicts token i + 1: the last position has no target.
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [B(L-1), H]
        targets = labels[:, 1:].reshape(-1)  # [B(L-1)]
        head = self.model.lm_head  # weight [V, H], tied to the input embeddings
        if self.fused:
            loss, correct = linear_cross_entropy(hidden, head.weight, targets, head.bias,
                                                 count_correct=not self.training)
        else:
            logits = head(hidden)  # [B(L-1), V]
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            correct = (logits.argmax(-1) == targets).sum()
        if self.training:
            return {"lm_loss_sum": loss}
        return {"lm_loss_sum": loss, "lm_correct": correct}


class Gpt(TextFamily):
    """The objective contract for causal LM (GPT-2 architecture)."""

    model_types = ("gpt2",)

    @staticmethod
    def sample(checkpoint, prompt: str, **options) -> str:
        """``overture generate``: the prompt and its sampled continuation."""
        from ...generate import generate

        return generate(checkpoint, prompt, **options)

    model_config = GptModelConfig
    objective_config = GptObjectiveConfig
    tokenizer_spec = TokenizerSpec(
        kind="bpe", lowercase=False,
        special_tokens={"bos_token": EOT, "eos_token": EOT, "unk_token": EOT},
        transformers_class="GPT2TokenizerFast", required=("eos_token",))
    lm_head = "lm"

    def builder(self, phase: Phase) -> CausalBlocks:
        return CausalBlocks(**self.builder_settings(phase),
                            end_of_text_id=self.special_id("eos_token"))

    def collator(self, phase: Phase) -> BlockCollator:
        return BlockCollator()

    def build_models(self, vocab_size: int | None = None) -> dict[str, nn.Module]:
        from transformers import GPT2Config, GPT2LMHeadModel

        eot = self.special_id("eos_token")
        m = self.recipe.model
        config = GPT2Config(vocab_size=vocab_size or len(self.tokenizer),
                            bos_token_id=eot, eos_token_id=eot, **m.hf_settings())
        model = self.instantiate(GPT2LMHeadModel, config, {"lm_head": "the LM head"},
                                 fresh=vocab_size is not None)
        return {"model": CausalLMModule(model)}

    def updates(self) -> list[Update]:
        return [Update("model", ("model",), ("lm",))]

    def forward(self, models, batch, update) -> dict[str, torch.Tensor]:
        return models["model"](**batch)

    def target_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]
        return {"lm": torch.tensor(ids.shape[0] * (ids.shape[1] - 1), device=ids.device)}

    def flops_per_unit(self, phase: Phase) -> float:
        m = self.recipe.model
        return transformer_flops_per_token(m.n_layer, m.n_embd, m.n_inner or 4 * m.n_embd,
                                           phase.max_seq_len)

    def data_report(self, data, phase: Phase) -> dict[str, float]:
        """Block counts and how much of the stream the last partial block of each
        window drops."""
        stats = data.stats
        kept = stats["train_tokens"]
        dropped = stats.get("train_tokens_dropped", 0)
        return {"train_examples": stats["train_examples"],
                "eval_examples": stats.get("eval_examples", 0), "block_size": phase.max_seq_len,
                "train_tokens": kept, "dropped_fraction": dropped / max(kept + dropped, 1)}
