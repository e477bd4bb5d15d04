"""Packing sentences into fixed-length inputs (no NSP pairs).

- ``full_sentences`` (RoBERTa, Liu et al. 2019): whole sentences taken contiguously, from
  one or more documents; where a document ends and the next begins inside an input, an
  extra separator token stands between them. An input is closed when the next sentence
  would not fit, so every input is full to within one sentence.
- ``doc_sentences``: the same, but an input never crosses a document boundary (inputs at
  the end of a document may be shorter).
- ``blocks`` (GPT): documents joined with an end-of-text token into one stream, cut into
  blocks of exactly ``block_size`` tokens; no padding, no sentence boundaries.

Documents are lists of segments (sentences) of token ids, each segment no longer than
an input's capacity. What does not fill a last input of a window is dropped and counted.
"""

from __future__ import annotations

import itertools
from collections import Counter


def pack_sentences(documents: list[list[list[int]]], capacity: int, separator: int,
                   cross_documents: bool, counts: Counter) -> list[list[int]]:
    """Inputs of at most ``capacity`` tokens (the caller adds <s> ... </s> around each)."""
    blocks: list[list[int]] = []
    current: list[int] = []
    for document in documents:
        if not cross_documents and current:
            blocks.append(current)
            current = []
        for i, sentence in enumerate(document):
            joint = [separator] if (i == 0 and current) else []
            if len(current) + len(joint) + len(sentence) > capacity and current:
                blocks.append(current)
                current, joint = [], []
            current = current + joint + sentence
    if current:
        if cross_documents:  # not full: the next window's sentences cannot join it
            counts["tokens_dropped"] += len(current)
        else:
            blocks.append(current)
    return blocks


def pack_blocks(documents: list[list[list[int]]], block_size: int, end_of_text: int,
                counts: Counter) -> list[list[int]]:
    """Documents joined by ``end_of_text`` and cut into blocks of exactly ``block_size``."""
    stream = list(itertools.chain.from_iterable(
        itertools.chain(itertools.chain.from_iterable(document), (end_of_text,))
        for document in documents))
    full = len(stream) // block_size * block_size
    counts["tokens_dropped"] += len(stream) - full
    return [stream[i:i + block_size] for i in range(0, full, block_size)]
