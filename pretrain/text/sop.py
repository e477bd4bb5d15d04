"""Sentence-order prediction pairs (ALBERT, Lan et al. 2020).

A and B are always two consecutive spans of one document. For half the examples they are
swapped (label 1); the model must tell the order, not the topic, as NSP's random partners
let it. Chunks are cut as in BERT's create_pretraining_data.py (segments accumulated to a
target length, split at a random segment boundary); a chunk of a single segment is split
at a random token, so a one-segment document still gives an ordered pair and never falls
back to a random partner. A document of fewer than two tokens gives no pair.
"""

from __future__ import annotations

import random

from .nsp import PairExample, _truncate_pair, target_length

IN_ORDER, SWAPPED = 0, 1


def create_sop_pairs(documents: list[list[list[int]]], max_seq_len: int,
                     short_seq_prob: float, rng: random.Random) -> list[PairExample]:
    """Cut SOP pairs from every document (each a list of segments of token ids)."""
    max_tokens = max_seq_len - 3  # [CLS] A [SEP] B [SEP]
    out: list[PairExample] = []
    for document in documents:
        target = target_length(max_tokens, short_seq_prob, rng)
        chunk: list[list[int]] = []
        length = 0
        for i, segment in enumerate(document):
            chunk.append(segment)
            length += len(segment)
            if i < len(document) - 1 and length < target:
                continue
            tokens = [t for seg in chunk for t in seg]
            if len(chunk) >= 2:
                a_end = rng.randint(1, len(chunk) - 1)
                cut = sum(len(seg) for seg in chunk[:a_end])
            elif len(tokens) >= 2:
                cut = rng.randint(1, len(tokens) - 1)
            else:
                cut = 0
            if 0 < cut < len(tokens):
                tokens_a, tokens_b = tokens[:cut], tokens[cut:]
                _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
                if rng.random() < 0.5:
                    out.append(PairExample(tokens_b, tokens_a, SWAPPED))
                else:
                    out.append(PairExample(tokens_a, tokens_b, IN_ORDER))
            chunk, length = [], 0
    return out
