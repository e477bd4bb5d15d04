"""Masked-LM families (BERT, RoBERTa, ALBERT): config, collator, training module, base.

The model is a stock `transformers` masked-LM model, so `final/` loads with plain
transformers. For training it is wrapped so that the MLM head (the H x V vocabulary
projection) runs only at the ~15% selected positions, not at every token, and the losses
come back as sums (the engine divides by counts over all micro-batches and processes).
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, Phase, choice, fraction, positive
from ...data.prepare import pad_rows
from ...dropout import use_cheaper_dropout
from ...objective import Update
from .builders import StaticMasking
from .common import TextFamily, read_phrases, transformer_flops_per_token
from .masking import IGNORE_INDEX, MaskingSpec, mask_tokens, non_special_ids


@dataclass
class EncoderConfig:
    """Transformer encoder sizes (transformers' BertConfig / RobertaConfig names)."""

    hidden_size: int = 768
    """Width of the hidden states."""
    num_hidden_layers: int = 12
    """Number of encoder layers."""
    num_attention_heads: int = 12
    """Attention heads per layer; must divide hidden_size."""
    intermediate_size: int = 3072
    """Width of the feed-forward layer."""
    max_position_embeddings: int = 512
    """Longest sequence the position table holds (covers every phase's max_seq_len)."""
    hidden_dropout_prob: float = 0.1
    """Dropout on hidden states."""
    attention_probs_dropout_prob: float = 0.1
    """Dropout on attention probabilities."""
    initializer_range: float = 0.02
    """Std of the truncated-normal weight initialisation."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa (torch scaled_dot_product_attention) or eager."""
    unpadded: bool | None = None
    """Train on the real tokens only: the layers skip the batch's padding (ModernBERT's
    unpadding, pretrain/text/unpadded.py; a third of BERT's slots on WikiText-2). null:
    on with attn_implementation=sdpa, off with eager or a model.init_from decoder; true
    needs sdpa and an encoder."""
    init_from: str | None = None
    """Continue pretraining from a checkpoint of this family: an overture final/ (or the
    run folder holding it), a transformers folder or a Hub name. Its config sets the
    sizes (a recipe size that disagrees is refused) and its tokenizer is used as it is;
    dropout and attention kernel stay the recipe's."""

    architecture: ClassVar[tuple[str, ...]] = (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings")
    """Keys that a checkpoint's config fixes (model.init_from): the others are training
    settings the recipe may choose."""

    def hf_settings(self) -> dict:
        """The section as transformers config keyword arguments."""
        return {k: v for k, v in asdict(self).items() if k not in ("init_from", "unpadded")}

    def validate(self) -> None:
        positive(self, "model", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}")
        choice(self, "model", "attn_implementation", ("sdpa", "eager"))
        fraction(self, "model", "hidden_dropout_prob", "attention_probs_dropout_prob")
        if self.unpadded and self.attn_implementation != "sdpa":
            raise ConfigError(f"model.unpadded=true runs torch SDPA attention, but "
                              f"model.attn_implementation={self.attn_implementation!r}: set "
                              "model.attn_implementation=sdpa or model.unpadded=false")

    def unpadded_forward(self) -> bool:
        """``unpadded`` resolved: null is on with the SDPA kernel."""
        return self.attn_implementation == "sdpa" if self.unpadded is None else self.unpadded

    def position_limit(self) -> tuple[str, int]:
        """(key, value) bounding every phase's max_seq_len."""
        return "max_position_embeddings", self.max_position_embeddings


@dataclass
class MaskedLMConfig:
    """Masked-LM settings shared by BERT, RoBERTa and ALBERT."""

    name: str = ""
    """Family (registry name)."""
    mlm_probability: float = 0.15
    """Fraction of non-special tokens selected for prediction."""
    max_predictions_per_seq: int = 20
    """Cap on selected tokens per sequence (BERT: 20 at length 128, 80 at 512)."""
    mask_replace_prob: float = 0.8
    """Of the selected tokens, the fraction replaced by the mask token."""
    random_replace_prob: float = 0.1
    """Of the selected tokens, the fraction replaced by a random token (rest kept)."""
    masking: str = "static"
    """static: masks drawn once at preprocessing, dupe_factor copies (BERT);
    dynamic: masks re-drawn every time a sequence is seen (RoBERTa)."""
    mask_unit: str = "token"
    """token; word (whole-word masking, from the tokenizer's word ids); knowledge (ERNIE
    1.0: phrases / entities of knowledge_phrases masked whole, other words whole)."""
    max_ngram: int = 1
    """Mask spans of up to n units with p(n) ∝ 1/n (ALBERT: 3); 1: single units."""
    knowledge_phrases: str | None = None
    """File of phrases / named entities, one per line, for mask_unit=knowledge."""

    def validate(self) -> None:
        choice(self, "objective", "name", (type(self).name,))
        choice(self, "objective", "masking", ("static", "dynamic"))
        choice(self, "objective", "mask_unit", ("token", "word", "knowledge"))
        fraction(self, "objective", "mlm_probability", "mask_replace_prob",
                 "random_replace_prob")
        positive(self, "objective", "max_predictions_per_seq", "mlm_probability", "max_ngram")
        if self.mask_replace_prob + self.random_replace_prob > 1:
            raise ConfigError(
                f"objective.mask_replace_prob + objective.random_replace_prob = "
                f"{self.mask_replace_prob + self.random_replace_prob} exceeds 1")
        if (self.mask_unit == "knowledge") != bool(self.knowledge_phrases):
            raise ConfigError("objective.knowledge_phrases (a phrase list file) goes with "
                              f"objective.mask_unit=knowledge; got mask_unit="
                              f"{self.mask_unit!r}, knowledge_phrases={self.knowledge_phrases!r}")


class MaskedLMCollator:
    """Pads rows of cached examples into a batch; draws masks when masking is dynamic.

    Receives what ``IndexedDataset.__getitems__`` returns: the rows' columns and their
    dataset indices. Dynamic masks are seeded per row by (seed, epoch, index), so they are
    re-drawn every epoch, identical across worker counts, batch sizes and process
    counts, and reproduced on resume.
    """

    def __init__(self, pad_id: int, special_ids: tuple[int, ...], spec: MaskingSpec | None,
                 seed: int, sep_id: int | None = None, token_types: bool = False,
                 pad_to_multiple_of: int = 8):
        self.pad_id, self.sep_id = pad_id, sep_id
        self.special_ids = torch.tensor(special_ids)
        self.spec = spec  # None: masks were drawn at preprocessing (static)
        self.seed = seed
        self.token_types = token_types
        self.pad_to_multiple_of = pad_to_multiple_of
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pad(self, column, value: int) -> torch.Tensor:
        return pad_rows(column, value, self.pad_to_multiple_of)  # [B, L]

    def __call__(self, rows: dict) -> dict[str, torch.Tensor]:
        columns, indices = rows["columns"], rows["indices"]
        ids = self._pad(columns["input_ids"], self.pad_id)
        lengths = torch.tensor([len(s) for s in columns["input_ids"]])
        attention_mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        batch = {"attention_mask": attention_mask}
        if self.token_types:
            # [CLS] A [SEP] -> 0, B [SEP] -> 1: a token is in B once a [SEP] precedes it.
            is_sep = ids == self.sep_id
            batch["token_type_ids"] = (((is_sep.cumsum(1) - is_sep.long()) > 0).long()
                                       * attention_mask)
        if self.spec is None:  # static: scatter the stored (position, id) targets
            positions = columns["mlm_positions"]
            row = torch.repeat_interleave(torch.arange(len(positions)),
                                          torch.tensor([len(p) for p in positions]))
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[row, torch.tensor([c for p in positions for c in p], dtype=torch.long)] = (
                torch.tensor([t for ts in columns["mlm_ids"] for t in ts], dtype=torch.long))
        else:
            special = torch.isin(ids, self.special_ids) | (attention_mask == 0)
            units = self._pad(columns["unit_start"], 1) if "unit_start" in columns else None
            ids, labels = self._mask_rows(ids, special, units, indices, lengths)
        batch["input_ids"], batch["labels"] = ids, labels
        if "sentence_label" in columns:
            batch["sentence_label"] = torch.as_tensor(columns["sentence_label"],
                                                      dtype=torch.long)
        return batch

    def _mask_rows(self, ids, special, units, indices, lengths):
        """Masks from one generator per row, seeded by (seed, epoch, index), each drawing
        over its row's own length: a row's masks do not depend on the batch it falls in,
        so two processes of B mask as one of 2B, and a resume on another batch layout
        continues with the same masks."""
        generators = []
        for index in indices:
            digest = hashlib.sha256(f"{self.seed}:{self.epoch}:{index}".encode()).digest()
            generators.append(torch.Generator().manual_seed(
                int.from_bytes(digest[:8], "little") & (2**63 - 1)))
        return mask_tokens(ids, special, self.spec, generators, units, lengths.tolist())


class MaskedLMModule(nn.Module):
    """Training view of a transformers masked-LM model: batch in, summed losses out.

    ``encoder``, ``mlm_head`` and ``sentence_head`` are attribute paths inside the model
    (BertForPreTraining: "bert", "cls.predictions", "cls.seq_relationship").
    """

    def __init__(self, model: nn.Module, encoder: str, mlm_head: str,
                 sentence_head: str | None = None, sentence_task: str | None = None,
                 unpadded: bool = False):
        super().__init__()
        self.model = model
        # FSDP's auto-wrap looks for the transformer layer classes here
        self._no_split_modules = getattr(model, "_no_split_modules", None)
        self.paths = (encoder, mlm_head, sentence_head)
        self.sentence_task = sentence_task
        self.unpadded = unpadded  # model.unpadded: the layers see the real tokens only
        use_cheaper_dropout(model)
        if unpadded:
            from .unpadded import use_unpadded_attention

            use_unpadded_attention(model)

    def compile(self, *args, **kwargs) -> None:
        """``train.compile``: the encoder and the heads are compiled one by one; between
        them, the selection of the masked positions has a data-dependent shape that
        would break one graph around it. Unpadded, the embeddings and each layer are
        compiled, for a varying number of tokens."""
        encoder, *heads = (operator.attrgetter(p)(self.model) for p in self.paths if p)
        if self.unpadded:  # encode_unpadded calls the encoder's parts, not its forward
            from .unpadded import encoder_layers

            for part in (encoder.embeddings, *encoder_layers(encoder)):
                part.compile(*args, **{"dynamic": True, **kwargs})
        else:
            encoder.compile(*args, **kwargs)
        for head in heads:
            head.compile(*args, **kwargs)

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None,
                sentence_label=None) -> dict[str, torch.Tensor]:
        encoder, mlm_head, sentence_head = (operator.attrgetter(p)(self.model) if p else None
                                            for p in self.paths)
        if self.unpadded:
            from .unpadded import encode_unpadded

            hidden, pooled, packing = encode_unpadded(encoder, input_ids, attention_mask,
                                                      token_type_ids)  # [N, H], [B, H]
            labels = packing.pack(labels)  # [N], in the order of hidden's rows
        else:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            out = encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
            hidden, pooled = out.last_hidden_state, out.pooler_output  # [B, L, H], [B, H]
        selected = labels != IGNORE_INDEX  # [N] or [B, L]
        logits = mlm_head(hidden[selected])  # [M, V]
        targets = labels[selected]  # [M]
        sums = {"mlm_loss_sum": F.cross_entropy(logits.float(), targets, reduction="sum"),
                "mlm_correct": (logits.argmax(-1) == targets).sum()}
        if sentence_head is not None:
            task = self.sentence_task
            logits = sentence_head(pooled)  # [B, 2]
            sums[f"{task}_loss_sum"] = F.cross_entropy(logits.float(), sentence_label,
                                                       reduction="sum")
            sums[f"{task}_correct"] = (logits.argmax(-1) == sentence_label).sum()
        return sums


class MaskedLMFamily(TextFamily):
    """The objective contract for masked-LM families. A subclass gives its tokenizer
    spec, ``sentence_task`` (nsp, sop or None), ``builder`` and ``hf_model``."""

    lm_head = "mlm"
    token_types = False

    def __init__(self, recipe):
        super().__init__(recipe)
        if self.sentence_task:
            self.heads = ("mlm", self.sentence_task)

    @property
    def sentence_task(self) -> str | None:
        return None

    # ------------------------------------------------------------------ data
    def builder_settings(self, phase: Phase) -> dict:
        obj = self.recipe.objective
        static = None
        if obj.masking == "static":
            spec = self.masking_spec(phase)
            static = StaticMasking(spec.mask_token_id, tuple(spec.random_token_ids.tolist()),
                                   spec.mlm_probability, spec.max_predictions_per_seq,
                                   spec.mask_replace_prob, spec.random_replace_prob,
                                   spec.max_ngram)
        lowercase = self.recipe.tokenizer.lowercase
        return {**super().builder_settings(phase), "units": obj.mask_unit,
                "phrases": read_phrases(obj.knowledge_phrases),
                "lowercase": self.tokenizer_spec.lowercase if lowercase is None else lowercase,
                "static_masking": static}

    def masking_spec(self, phase: Phase) -> MaskingSpec:
        obj, tok = self.recipe.objective, self.tokenizer
        return MaskingSpec(mask_token_id=tok.mask_token_id, random_token_ids=non_special_ids(tok),
                           mlm_probability=obj.mlm_probability,
                           max_predictions_per_seq=phase.max_predictions_per_seq,
                           mask_replace_prob=obj.mask_replace_prob,
                           random_replace_prob=obj.random_replace_prob, max_ngram=obj.max_ngram)

    def collator(self, phase: Phase) -> MaskedLMCollator:
        tok = self.tokenizer
        spec = self.masking_spec(phase) if self.recipe.objective.masking == "dynamic" else None
        return MaskedLMCollator(tok.pad_token_id, tuple(sorted(set(tok.all_special_ids))), spec,
                                seed=self.recipe.train.seed, sep_id=tok.sep_token_id,
                                token_types=self.token_types)

    # ------------------------------------------------------------------ model
    def hf_model(self, vocab_size: int, fresh: bool = True) -> MaskedLMModule:
        """The training module; ``fresh``: new weights even with model.init_from (a size
        estimate)."""
        raise NotImplementedError

    def training_module(self, model: nn.Module, *paths: str) -> MaskedLMModule:
        """``MaskedLMModule(model, *paths)`` with the recipe's ``model.unpadded``."""
        return MaskedLMModule(model, *paths, unpadded=self.recipe.model.unpadded_forward())

    def build_models(self, vocab_size: int | None = None) -> dict[str, nn.Module]:
        """The model: fresh, or model.init_from's weights; ``vocab_size`` given: a size
        estimate, fresh and before any tokenizer exists."""
        return {"model": self.hf_model(vocab_size or len(self.tokenizer),
                                       fresh=vocab_size is not None)}

    def updates(self) -> list[Update]:
        return [Update("model", ("model",), self.heads)]

    def forward(self, models, batch, update) -> dict[str, torch.Tensor]:
        return models["model"](**batch)

    def target_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Masked tokens for the MLM head; sequences for the sentence head."""
        counts = {"mlm": (batch["labels"] != IGNORE_INDEX).sum()}
        if self.sentence_task:
            counts[self.sentence_task] = torch.tensor(batch["sentence_label"].numel(),
                                                      device=batch["labels"].device)
        return counts

    def flops_per_unit(self, phase: Phase) -> float:
        m = self.recipe.model
        return transformer_flops_per_token(m.num_hidden_layers, m.hidden_size,
                                           m.intermediate_size, phase.max_seq_len)

    # ------------------------------------------------------------------ --dry-run
    def data_report(self, data, phase: Phase, max_batches: int = 200) -> dict[str, float]:
        """Statistics of what training will see, from up to ``max_batches`` collated
        batches: realized mask rate and its 80/10/10 split, sentence-label balance,
        padding efficiency (real tokens / padded slots)."""
        from ...data.prepare import IndexedDataset

        collator = self.collator(phase)
        dataset = IndexedDataset(data.train)
        size = phase.batch_size
        selected = candidates = masked = kept = real = slots = 0
        for start in range(0, min(len(dataset), size * max_batches), size):
            batch = collator(dataset.__getitems__(
                list(range(start, min(start + size, len(dataset))))))
            sel = batch["labels"] != IGNORE_INDEX
            ids = batch["input_ids"]
            # a selected token may now be the (special) mask token: count it as a candidate
            candidates += int(((~torch.isin(ids, collator.special_ids)
                                & (batch["attention_mask"] == 1)) | sel).sum())
            selected += int(sel.sum())
            masked += int((ids[sel] == self.tokenizer.mask_token_id).sum())
            kept += int((ids[sel] == batch["labels"][sel]).sum())
            real += int(batch["attention_mask"].sum())
            slots += ids.numel()
        stats = data.stats
        report = {
            "train_examples": stats["train_examples"], "eval_examples": stats.get("eval_examples", 0),
            "mask_rate": selected / max(candidates, 1),
            "mask_split_mask": masked / max(selected, 1),
            "mask_split_random": (selected - masked - kept) / max(selected, 1),
            "mask_split_unchanged": kept / max(selected, 1),
            "padding_efficiency": real / max(slots, 1),
            "fill_of_max_seq_len": stats["train_tokens"] / max(
                stats["train_examples"] * phase.max_seq_len, 1),
        }
        if self.sentence_task:
            swapped = stats.get("train_label_1", 0)
            report[f"{self.sentence_task}_label_1"] = swapped / max(stats["train_examples"], 1)
        return report
