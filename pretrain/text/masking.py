"""Masked-LM corruption: select tokens, then 80% [MASK] / 10% random / 10% unchanged.

One function serves static masking (applied once at preprocessing) and dynamic masking
(applied by the collator every time a batch is drawn), for every selection scheme:

- token level (BERT, RoBERTa): each non-special token is a candidate;
- whole-word (``unit_start`` from the tokenizer's word ids) and knowledge masking (ERNIE
  1.0: a listed phrase or entity is one unit), where a unit is masked whole or not at all;
- n-gram spans (ALBERT): spans of n units, n <= max_ngram drawn with p(n) ∝ 1/n.

In every scheme the number of selected tokens per sequence is ``mlm_probability`` of its
candidates (the fraction rounded stochastically, so the expected rate is exact), at
least one when the row has a candidate (as Google's BERT), capped at
``max_predictions_per_seq``, and the 80/10/10 split is drawn per selected token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    max_ngram: int = 1
    """Longest span, in units; 1 masks units independently."""


def non_special_ids(tokenizer) -> torch.Tensor:
    """Ids a "random" replacement may take: the vocabulary minus special tokens."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor(sorted(i for i in tokenizer.get_vocab().values() if i not in special))


def ngram_probabilities(max_ngram: int) -> np.ndarray:
    """p(n) ∝ 1/n for n = 1..max_ngram (ALBERT, Lan et al. 2020)."""
    weights = 1.0 / np.arange(1, max_ngram + 1)
    return weights / weights.sum()


class _Draws:
    """The random numbers of ``mask_tokens``: from one generator for the whole batch, or
    from one generator per row, each drawing over its own row's length (``lengths``), so
    that a row's masks do not depend on the batch it falls in."""

    def __init__(self, generator, batch: int, length: int, lengths=None):
        self.per_row = isinstance(generator, (list, tuple))
        self.generator, self.batch, self.length = generator, batch, length
        self.lengths = [length] * batch if lengths is None else [int(n) for n in lengths]

    def _tokens(self, draw, fill, dtype) -> torch.Tensor:
        """[B, L]: ``draw(n, generator)`` per row over its length, ``fill`` beyond it."""
        out = torch.full((self.batch, self.length), fill, dtype=dtype)
        for row, (g, n) in enumerate(zip(self.generator, self.lengths)):
            out[row, :n] = draw(n, g)
        return out

    def rows(self) -> torch.Tensor:  # [B] float64
        if not self.per_row:
            return torch.rand(self.batch, generator=self.generator, dtype=torch.float64)
        return torch.cat([torch.rand(1, generator=g, dtype=torch.float64)
                          for g in self.generator])

    def uniform(self) -> torch.Tensor:  # [B, L] float32
        if not self.per_row:
            return torch.rand(self.batch, self.length, generator=self.generator)
        return self._tokens(lambda n, g: torch.rand(n, generator=g), 1.0, torch.float32)

    def integers(self, high: int) -> torch.Tensor:  # [B, L] in [0, high)
        if not self.per_row:
            return torch.randint(high, (self.batch, self.length), generator=self.generator)
        return self._tokens(lambda n, g: torch.randint(high, (n,), generator=g), 0,
                            torch.long)

    def numpy_rngs(self) -> list:
        """One numpy Generator per row (the same object for every row of a batch)."""
        def rng(g):
            return np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
        if not self.per_row:
            return [rng(self.generator)] * self.batch
        return [rng(g) for g in self.generator]


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, spec: MaskingSpec,
                generator: torch.Generator | list[torch.Generator],
                unit_start: torch.Tensor | None = None,
                lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a batch for masked-LM training.

    input_ids:    [B, L] token ids (padding included).
    special_mask: [B, L] True where a token may never be selected (specials, padding).
    generator:    one torch.Generator for the batch, or one per row with ``lengths`` (the
                  rows' unpadded lengths): then each row draws from its own generator
                  over its own length only, so its masks do not depend on the padding.
    unit_start:   [B, L] optional; 1 where a token starts a unit (word or phrase), 0 where
                  it continues the previous token's unit. None: every token is a unit.

    Returns (corrupted ids [B, L], labels [B, L]) with labels = original id where
    selected and -100 elsewhere.
    """
    batch, length = input_ids.shape
    draws = _Draws(generator, batch, length, lengths)
    candidates = (~special_mask).sum(dim=1)  # [B]
    expected = candidates.to(torch.float64) * spec.mlm_probability
    count = expected.floor() + (draws.rows() < expected - expected.floor())
    # At least one target in a row that has a candidate, as Google's BERT does
    # (max(1, round(n * p))): otherwise ~1.5% of short rows would teach nothing.
    count = torch.maximum(count, (candidates > 0).to(count.dtype))
    count = count.clamp(max=spec.max_predictions_per_seq).to(torch.long)  # [B]
    if unit_start is None and spec.max_ngram == 1:
        selected = _select_tokens(special_mask, count, draws.uniform())
    else:
        selected = _select_spans(special_mask, unit_start, count, spec, draws.numpy_rngs())

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    decision = draws.uniform()
    to_mask = selected & (decision < spec.mask_replace_prob)
    to_random = selected & ~to_mask & (
        decision < spec.mask_replace_prob + spec.random_replace_prob)
    pick = draws.integers(len(spec.random_token_ids))
    corrupted = torch.where(to_mask, spec.mask_token_id, input_ids)
    corrupted = torch.where(to_random, spec.random_token_ids[pick], corrupted)
    return corrupted, labels


def _select_tokens(special_mask: torch.Tensor, count: torch.Tensor,
                   scores: torch.Tensor) -> torch.Tensor:
    """``count[b]`` distinct candidate tokens per row, uniformly (vectorized), from
    uniform ``scores`` [B, L]."""
    batch, length = special_mask.shape
    # A random permutation of each row's candidates: rank tokens by a random score, with
    # special tokens scored above every candidate so they rank last.
    scores = scores.masked_fill(special_mask, 2.0)
    order = scores.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(length).expand(batch, length))
    return ranks < count[:, None]  # [B, L]


def _select_spans(special_mask: torch.Tensor, unit_start: torch.Tensor | None,
                  count: torch.Tensor, spec: MaskingSpec, rngs: list) -> torch.Tensor:
    """Whole units, in spans of n units with p(n) ∝ 1/n, until ``count[b]`` tokens.

    n is drawn first and a span of that length is then placed uniformly among the free
    places (not overlapping nor touching an earlier span, within one segment), so the
    span lengths follow p(n) and not the leftovers of a crowded row. The last span, when
    it would pass the row's budget, is kept with probability (budget left) / (its tokens),
    which keeps the expected number of selected tokens equal to the budget.
    """
    cdf = np.cumsum(ngram_probabilities(spec.max_ngram))
    special = special_mask.numpy()
    flags = np.ones_like(special) if unit_start is None else unit_start.numpy().astype(bool)
    selected = np.zeros_like(special)
    for b in range(special.shape[0]):
        rng = rngs[b]
        budget = int(count[b])
        positions = np.flatnonzero(~special[b])
        if budget == 0 or len(positions) == 0:
            continue
        # A candidate token starts a unit when flagged or when a special token precedes it
        # (specials also separate segments: spans never cross them).
        after_gap = np.r_[True, special[b][:-1]][positions]
        starts = flags[b][positions] | after_gap
        unit_of_token = np.cumsum(starts) - 1
        first = np.flatnonzero(starts)
        unit_tokens = np.diff(np.r_[first, len(positions)])
        segment = np.cumsum(after_gap)[first]
        units = len(first)
        free = np.ones(units + 2, dtype=bool)  # free[u + 1]: unit u; both ends padded
        taken = 0
        while taken < budget:
            n = int(np.searchsorted(cdf, rng.random(), side="right")) + 1
            u = np.arange(max(units - n + 1, 0))
            blocked = np.r_[0, np.cumsum(~free)]
            # units u-1 .. u+n must be free: the span and a gap on each side
            ok = (blocked[u + n + 2] - blocked[u] == 0) & (segment[u] == segment[u + n - 1])
            valid = u[ok]
            if len(valid) == 0:
                if n == 1:
                    break  # the row is full
                continue
            s = int(valid[rng.integers(len(valid))])
            cost = int(unit_tokens[s:s + n].sum())
            if taken + cost > budget:
                # the first span is always kept: every row with a candidate gets a target
                keep = taken == 0 or rng.random() < (budget - taken) / cost
                if taken == 0 and cost > spec.max_predictions_per_seq and n > 1:
                    continue  # too long for the cap: draw again (a shorter span may fit)
                if not keep or taken + cost > spec.max_predictions_per_seq:
                    break
            free[s + 1:s + n + 1] = False
            taken += cost
        chosen = ~free[1:-1]
        selected[b, positions[chosen[unit_of_token]]] = True
    return torch.from_numpy(selected)
