"""Masked-LM corruption: select tokens, then 80% [MASK] / 10% random / 10% unchanged.

One vectorized function serves both static masking (applied once at preprocessing) and
dynamic masking (applied by the collator every time a batch is drawn).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingSpec:
    """What to mask and how (the objective's settings plus the tokenizer's ids)."""

    mask_token_id: int
    random_token_ids: torch.Tensor
    """1-D ids a "random" replacement is drawn from (the vocabulary minus special tokens)."""
    mlm_probability: float = 0.15
    max_predictions_per_seq: int = 20
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1


def non_special_ids(tokenizer) -> torch.Tensor:
    """Ids a "random" replacement may take: the vocabulary minus special tokens."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor(sorted(i for i in tokenizer.get_vocab().values() if i not in special))


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, spec: MaskingSpec,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a batch for masked-LM training.

    input_ids:    [B, L] token ids (padding included).
    special_mask: [B, L] True where a token may never be selected ([CLS], [SEP], padding).

    As in BERT's create_pretraining_data.py, each sequence gets a fixed number of
    predictions, ``mlm_probability`` of its candidates capped at
    ``max_predictions_per_seq``; the fractional part is rounded stochastically so the
    expected rate is exactly ``mlm_probability``. Returns (corrupted ids [B, L],
    labels [B, L]) with labels = original id where selected and -100 elsewhere.
    """
    batch, length = input_ids.shape
    candidates = (~special_mask).sum(dim=1)  # [B]
    expected = candidates.to(torch.float64) * spec.mlm_probability
    count = expected.floor() + (torch.rand(batch, generator=generator, dtype=torch.float64)
                                < expected - expected.floor())
    count = count.clamp(max=spec.max_predictions_per_seq).to(torch.long)  # [B]

    # A random permutation of each row's candidates: rank tokens by a random score, with
    # special tokens scored above every candidate so they rank last.
    scores = torch.rand(batch, length, generator=generator)
    scores.masked_fill_(special_mask, 2.0)
    order = scores.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(length).expand(batch, length))
    selected = ranks < count[:, None]  # [B, L]

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    decision = torch.rand(batch, length, generator=generator)
    to_mask = selected & (decision < spec.mask_replace_prob)
    to_random = selected & ~to_mask & (
        decision < spec.mask_replace_prob + spec.random_replace_prob)
    pick = torch.randint(len(spec.random_token_ids), (batch, length), generator=generator)
    corrupted = torch.where(to_mask, spec.mask_token_id, input_ids)
    corrupted = torch.where(to_random, spec.random_token_ids[pick], corrupted)
    return corrupted, labels
