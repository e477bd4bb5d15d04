"""Next-sentence-prediction pairs, following google-research/bert create_pretraining_data.py.

Documents are lists of segments (sentences), each a list of token ids. Segments are
accumulated into a chunk until it reaches a target length; the chunk is split at a random
segment boundary into A and B. With probability 1/2, B is the actual continuation
(label 0, "is next"); otherwise B is taken from a random other document (label 1) and the
unused segments of the chunk are put back for the next pair.

One departure, for an exact 50/50 label balance: the reference code forces "random" when a
chunk holds a single segment, which skews the labels on corpora with long or few sentences.
Here the coin is flipped first; a single-segment chunk that draws "is next" is split at a
random token boundary instead (A and B are still consecutive text of one document: BERT's
"sentences" are arbitrary spans of contiguous text).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

IS_NEXT, IS_RANDOM = 0, 1

@dataclass
class PairExample:
    tokens_a: list[int]
    tokens_b: list[int]
    label: int


def create_pairs(documents: list[list[list[int]]], max_seq_len: int, short_seq_prob: float,
                 rng: random.Random) -> list[PairExample]:
    """Cut NSP pairs from every document; random partners are drawn from ``documents``."""
    examples: list[PairExample] = []
    for index in range(len(documents)):
        examples.extend(_pairs_from_document(documents, index, max_seq_len, short_seq_prob, rng))
    return examples


def target_length(max_tokens: int, short_seq_prob: float, rng: random.Random) -> int:
    """Mostly fill the sequence, but sometimes train on shorter ones so that the model sees
    the short inputs of fine-tuning (the reference's short_seq_prob)."""
    if rng.random() < short_seq_prob:
        return rng.randint(2, max_tokens)
    return max_tokens


def _pairs_from_document(documents, index, max_seq_len, short_seq_prob, rng):
    document = documents[index]
    max_tokens = max_seq_len - 3  # [CLS] A [SEP] B [SEP]
    target = target_length(max_tokens, short_seq_prob, rng)

    out: list[PairExample] = []
    chunk: list[list[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            is_random = rng.random() < 0.5
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for seg in chunk[:a_end] for t in seg]
            if is_random or (len(chunk) == 1 and len(tokens_a) < 2):
                tokens_b = _random_segment_tokens(documents, index, target - len(tokens_a), rng)
                is_random = True
                i -= len(chunk) - a_end  # unused segments go back for the next pair
            elif len(chunk) == 1:
                cut = rng.randint(1, len(tokens_a) - 1)
                tokens_a, tokens_b = tokens_a[:cut], tokens_a[cut:]
            else:
                tokens_b = [t for seg in chunk[a_end:] for t in seg]
            _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
            if tokens_a and tokens_b:
                out.append(PairExample(tokens_a, tokens_b, IS_RANDOM if is_random else IS_NEXT))
            chunk, length = [], 0
        i += 1
    return out


def _random_segment_tokens(documents, index, target_len, rng) -> list[int]:
    # Ten tries at a document other than this one, as the reference does; with no other
    # document there is no random partner (an empty B drops the pair).
    other = index
    for _ in range(10):
        other = rng.randint(0, len(documents) - 1)
        if other != index:
            break
    if other == index:
        return []
    doc = documents[other]
    tokens: list[int] = []
    for segment in doc[rng.randint(0, len(doc) - 1):]:
        tokens.extend(segment)
        if len(tokens) >= target_len:
            break
    return tokens


def _truncate_pair(tokens_a: list[int], tokens_b: list[int], max_tokens: int,
                   rng: random.Random) -> None:
    """Trim the longer side one token at a time, from its front or back at random (so the
    model does not learn that sequences always end at a sentence boundary)."""
    while len(tokens_a) + len(tokens_b) > max_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
