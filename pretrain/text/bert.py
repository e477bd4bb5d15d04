"""BERT pretraining: masked LM (80/10/10) + next-sentence prediction on BertForPreTraining.

The model is the stock `transformers.BertForPreTraining` (SDPA attention), so `final/`
loads with plain transformers. For training it is wrapped so that the MLM head (the
H x V vocabulary projection) runs only at the ~15% selected positions, not at every token,
and the loss comes back as sums plus target counts: the engine divides by the counts
summed over all micro-batches and processes, so accumulation and data parallelism give
exactly the gradient of one big batch.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ...config import Phase, Recipe
from .masking import IGNORE_INDEX, MaskingSpec, mask_tokens, non_special_ids


class BertPretrainingModule(nn.Module):
    """Training view of a BertForPreTraining: batch in, summed losses and counts out."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # transformers.BertForPreTraining

    def forward(self, input_ids, attention_mask, token_type_ids, labels,
                next_sentence_label) -> dict[str, torch.Tensor]:
        bert, heads = self.model.bert, self.model.cls
        out = bert(input_ids=input_ids, attention_mask=attention_mask,
                   token_type_ids=token_type_ids)
        hidden, pooled = out.last_hidden_state, out.pooler_output  # [B, L, H], [B, H]
        selected = labels != IGNORE_INDEX  # [B, L]
        mlm_logits = heads.predictions(hidden[selected])  # [M, V]
        mlm_targets = labels[selected]  # [M]
        nsp_logits = heads.seq_relationship(pooled)  # [B, 2]
        return {
            "mlm_loss_sum": F.cross_entropy(mlm_logits.float(), mlm_targets, reduction="sum"),
            "mlm_correct": (mlm_logits.argmax(-1) == mlm_targets).sum(),
            "nsp_loss_sum": F.cross_entropy(nsp_logits.float(), next_sentence_label,
                                            reduction="sum"),
            "nsp_correct": (nsp_logits.argmax(-1) == next_sentence_label).sum(),
        }


class PretrainingCollator:
    """Pads rows of cached examples into a batch; draws masks when masking is dynamic.

    Receives what ``IndexedDataset.__getitems__`` returns: the rows' columns and their
    dataset indices. Dynamic masks are seeded by (seed, epoch, indices), so they are
    re-drawn every epoch, identical across worker counts, and reproduced on resume.
    """

    def __init__(self, pad_id: int, cls_id: int, sep_id: int, spec: MaskingSpec | None,
                 seed: int, pad_to_multiple_of: int = 8):
        self.pad_id, self.cls_id, self.sep_id = pad_id, cls_id, sep_id
        self.spec = spec  # None: masks were drawn at preprocessing (static)
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.epoch = 0

    def __call__(self, rows: dict) -> dict[str, torch.Tensor]:
        columns, indices = rows["columns"], rows["indices"]
        seqs = [torch.as_tensor(s, dtype=torch.long) for s in columns["input_ids"]]
        ids = pad_sequence(seqs, batch_first=True, padding_value=self.pad_id)  # [B, L]
        ids = F.pad(ids, (0, -ids.shape[1] % self.pad_to_multiple_of), value=self.pad_id)
        width = ids.shape[1]
        lengths = torch.tensor([len(s) for s in seqs])
        attention_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        is_sep = ids == self.sep_id
        # [CLS] A [SEP] -> 0, B [SEP] -> 1: a token is in B once a [SEP] precedes it.
        token_type_ids = ((is_sep.cumsum(1) - is_sep.long()) > 0).long() * attention_mask
        if self.spec is None:  # static: scatter the stored (position, id) targets
            positions = columns["mlm_positions"]
            rows = torch.repeat_interleave(torch.arange(len(positions)),
                                           torch.tensor([len(p) for p in positions]))
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[rows, torch.tensor([c for p in positions for c in p], dtype=torch.long)] = (
                torch.tensor([t for ts in columns["mlm_ids"] for t in ts], dtype=torch.long))
        else:
            special = (ids == self.cls_id) | is_sep | (attention_mask == 0)
            generator = torch.Generator().manual_seed(self._batch_seed(indices))
            ids, labels = mask_tokens(ids, special, self.spec, generator)
        return {"input_ids": ids, "attention_mask": attention_mask,
                "token_type_ids": token_type_ids, "labels": labels,
                "next_sentence_label": torch.as_tensor(columns["next_sentence_label"],
                                                       dtype=torch.long)}

    def _batch_seed(self, indices) -> int:
        digest = hashlib.sha256(f"{self.seed}:{self.epoch}:{list(indices)}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class IndexedDataset(torch.utils.data.Dataset):
    """A datasets.Dataset fetched a batch at a time, its indices passed to the collator."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict:
        return {"columns": self.dataset[list(indices)], "indices": list(indices)}


class BertObjective:
    """What the engine needs from the BERT recipe: data, model, collator, metrics."""

    heads = ("mlm", "nsp")

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.tokenizer = None

    def prepare(self, phase: Phase, progress: bool = True):
        """Cached examples for ``phase`` (tokenizer trained or loaded on first call)."""
        from overture.data.prepare import prepare

        data = prepare(self.recipe, phase, progress=progress)
        self.tokenizer = data.tokenizer
        return data

    def build_model(self) -> BertPretrainingModule:
        from transformers import BertConfig, BertForPreTraining

        m = self.recipe.model
        config = BertConfig(
            vocab_size=len(self.tokenizer), hidden_size=m.hidden_size,
            num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
            intermediate_size=m.intermediate_size,
            max_position_embeddings=m.max_position_embeddings,
            hidden_dropout_prob=m.hidden_dropout_prob,
            attention_probs_dropout_prob=m.attention_probs_dropout_prob,
            initializer_range=m.initializer_range, pad_token_id=self.tokenizer.pad_token_id,
            attn_implementation=m.attn_implementation)
        return BertPretrainingModule(BertForPreTraining(config))

    def collator(self, phase: Phase) -> PretrainingCollator:
        tok, obj = self.tokenizer, self.recipe.objective
        spec = None
        if obj.masking == "dynamic":
            spec = MaskingSpec(
                mask_token_id=tok.mask_token_id,
                random_token_ids=non_special_ids(tok),
                mlm_probability=obj.mlm_probability,
                max_predictions_per_seq=phase.max_predictions_per_seq,
                mask_replace_prob=obj.mask_replace_prob,
                random_replace_prob=obj.random_replace_prob)
        return PretrainingCollator(tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, spec,
                                   seed=self.recipe.train.seed)

    @staticmethod
    def target_counts(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """How many targets each head's summed loss covers in this micro-batch."""
        return {"mlm": (batch["labels"] != IGNORE_INDEX).sum(),
                "nsp": torch.tensor(batch["next_sentence_label"].numel(),
                                    device=batch["labels"].device)}

    def loss_heads(self) -> tuple[str, ...]:
        return self.heads if self.recipe.objective.nsp else ("mlm",)

    @staticmethod
    def summarize(sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        """Metrics from summed losses / correct counts and target counts."""
        import math

        out = {}
        for head in BertObjective.heads:
            n = max(counts.get(head, 0.0), 1.0)
            out[f"{head}_loss"] = sums[f"{head}_loss_sum"] / n
            out[f"{head}_accuracy"] = sums[f"{head}_correct"] / n
        out["perplexity"] = math.exp(min(out["mlm_loss"], 50.0))
        return out

    def data_report(self, data, phase: Phase, max_batches: int = 200) -> dict[str, float]:
        """Statistics of what training will see, from up to ``max_batches`` collated
        batches: realized mask rate and its 80/10/10 split, NSP label balance, padding
        efficiency (real tokens / padded slots)."""
        collator = self.collator(phase)
        dataset = IndexedDataset(data.train)
        size = phase.batch_size
        selected = candidates = masked = randomized = kept = real = slots = 0
        for start in range(0, min(len(dataset), size * max_batches), size):
            rows = dataset.__getitems__(list(range(start, min(start + size, len(dataset)))))
            batch = collator(rows)
            sel = batch["labels"] != IGNORE_INDEX
            ids = batch["input_ids"]
            special = ((ids == collator.cls_id) | (ids == collator.sep_id)
                       | (batch["attention_mask"] == 0))
            candidates += int((~special).sum())
            selected += int(sel.sum())
            masked += int((ids[sel] == self.tokenizer.mask_token_id).sum())
            kept += int((ids[sel] == batch["labels"][sel]).sum())
            real += int(batch["attention_mask"].sum())
            slots += ids.numel()
        randomized = selected - masked - kept
        stats = data.stats
        pairs = max(stats["is_next"] + stats["is_random"], 1)
        return {
            "train_examples": stats["train_examples"], "eval_examples": stats["eval_examples"],
            "mask_rate": selected / max(candidates, 1),
            "mask_split_mask": masked / max(selected, 1),
            "mask_split_random": randomized / max(selected, 1),
            "mask_split_unchanged": kept / max(selected, 1),
            "nsp_is_next": stats["is_next"] / pairs, "nsp_is_random": stats["is_random"] / pairs,
            "padding_efficiency": real / max(slots, 1),
            "fill_of_max_seq_len": stats["train_tokens"] / (pairs * phase.max_seq_len),
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x non-embedding parameters + attention scores
        (Kaplan et al. 2020 / PaLM appendix B)."""
        m = self.recipe.model
        per_layer = 4 * m.hidden_size**2 + 2 * m.hidden_size * m.intermediate_size
        return 6 * m.num_hidden_layers * per_layer + 12 * m.num_hidden_layers * m.hidden_size * seq_len
