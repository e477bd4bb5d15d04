"""Text example builders for the generic preprocessing pipeline (overture.data.prepare).

Each builder tokenizes a window of documents once (lines encoded whole, then split into
sentences by character offsets, so byte-level BPE keeps its leading-space tokens) and
cuts examples from the sentences: NSP or SOP pairs, packed sentences, or GPT blocks.
That is the draft, made in a worker; static masks are drawn by ``finish``, in the main
process when the workers and copies are few (overture.data.prepare.MAIN_FINISHES: then
no worker imports torch), else in the workers.

For whole-word and knowledge masking a ``unit_start`` column (1 where a token starts a
word or a listed phrase) travels with ``input_ids``. While examples are cut, each token is
carried as ``id * 2 + unit_start`` so that pairing and truncation need not know about it.
"""

from __future__ import annotations

import hashlib
import itertools
from bisect import bisect_left, bisect_right
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa

from .nsp import create_pairs
from .packing import pack_blocks, pack_sentences
from .sop import create_sop_pairs

# the end mark is matched, not looked behind for: the scan jumps to each ".", "!" or "?"
# (half the time of a look-behind at every character; the same match ends)
_SENTENCE_END = re.compile(r"[.!?]\s+(?=\S)")


def sentence_starts(line: str) -> list[int]:
    """Character offsets where the sentences of a line start: after ``.``, ``!`` or
    ``?`` followed by white space."""
    return [0] + [m.end() for m in _SENTENCE_END.finditer(line)]


def sentence_cuts(line: str, enc) -> list[int]:
    """Token indices where the second and later sentences of ``line`` start, given its
    encoding ``enc``: a token belongs to the sentence its first character is in. A line
    of one sentence (a third of WikiText's) never reads the offsets."""
    starts = sentence_starts(line)
    if len(starts) == 1:
        return []
    token_starts = [start for start, _ in enc.offsets]
    if token_starts != sorted(token_starts):  # never seen; then token by token
        sentence = [bisect_right(starts, t) for t in token_starts]
        return [i for i in range(1, len(sentence)) if sentence[i] != sentence[i - 1]]
    return [bisect_left(token_starts, s) for s in starts[1:]]


@dataclass
class StaticMasking:
    """Masks drawn once at preprocessing (BERT's static masking); picklable settings."""

    mask_token_id: int
    random_token_ids: tuple[int, ...]
    mlm_probability: float
    max_predictions_per_seq: int
    mask_replace_prob: float
    random_replace_prob: float
    max_ngram: int

    def spec(self):
        """The masking.MaskingSpec of these settings."""
        import torch

        from .masking import MaskingSpec

        return MaskingSpec(self.mask_token_id, torch.tensor(self.random_token_ids),
                           self.mlm_probability, self.max_predictions_per_seq,
                           self.mask_replace_prob, self.random_replace_prob, self.max_ngram)


@dataclass
class TextBuilder:
    """Shared by every text builder: tokenization, units, Arrow output, static masks."""

    tokenizer_json: str
    tokenizer_fingerprint: str
    max_seq_len: int
    special_ids: tuple[int, ...]
    """Ids never masked (cls, sep, pad, ...)."""
    units: str = "token"
    """token, word (whole-word masking) or knowledge (listed phrases are units)."""
    phrases: tuple[str, ...] = ()
    """Phrases / entities for knowledge masking, matched on word boundaries."""
    lowercase: bool = False
    """Match phrases case-insensitively (the tokenizer lowercases)."""
    static_masking: StaticMasking | None = None
    label_column: str | None = field(default=None, init=False)
    sentences: ClassVar[bool] = True
    """Whether examples are cut from sentences (pairs, packing); GPT's blocks ignore them,
    so its lines are not split (the same tokens, less work)."""

    # ------------------------------------------------------------------ pipeline protocol
    def schema(self) -> pa.Schema:
        cols = [("input_ids", pa.list_(pa.int32()))]
        if self.units != "token":
            cols.append(("unit_start", pa.list_(pa.int8())))
        if self.label_column:
            cols.append((self.label_column, pa.int8()))
        if self.static_masking:
            cols += [("mlm_positions", pa.list_(pa.int16())), ("mlm_ids", pa.list_(pa.int32()))]
        return pa.schema(cols)

    def cache_key(self) -> dict:
        key = {k: v for k, v in vars(self).items()
               if not k.startswith("_") and k != "tokenizer_json"}
        key["phrases"] = hashlib.sha256("\n".join(self.phrases).encode()).hexdigest()
        key["builder"] = type(self).__name__
        key["static_masking"] = vars(self.static_masking) if self.static_masking else None
        return key

    def setup(self) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(_text_only(self.tokenizer_json))
        # a saved tokenizer may pad and cut every encoding to a fixed length (those of
        # sentence-transformers: 128): lines are encoded whole here, examples cut later
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        # "[SEP]", "<s>", "<|endoftext|>" ... written in the corpus are text: encoded as
        # their characters, never as the special ids that frame an example.
        self._tokenizer.encode_special_tokens = True
        self._phrase_re = None
        if self.phrases:
            alternatives = "|".join(re.escape(p) for p in sorted(self.phrases, key=len,
                                                                   reverse=True))
            self._phrase_re = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)",
                                         re.IGNORECASE if self.lowercase else 0)

    def draft(self, docs, tag, copies):
        counts: Counter = Counter()
        tokenized = self.tokenize(docs, self.piece_length(), counts)
        drafts = []
        for copy in range(copies):
            rows, labels = self.examples(tokenized, random.Random(f"{tag}-{copy}"), counts)
            drafts.append((f"{tag}-{copy}", self.to_batch(rows, labels)))
            counts["tokens"] += sum(map(len, rows))
        return drafts, counts

    def finish(self, tag: str, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The static masks drawn into a drafted batch (seeded by ``tag``): the corrupted
        ``input_ids``, ``mlm_positions`` and ``mlm_ids``."""
        if not self.static_masking:
            return batch
        if "mlm_ids" in batch.schema.names:  # masks drawn twice would corrupt twice
            raise RuntimeError(f"finish: batch {tag} is finished already")
        tokens = batch.column("input_ids")
        lengths = np.diff(tokens.offsets.to_numpy()).astype(np.int64)
        flat = tokens.values.to_numpy().astype(np.int64)
        units = batch.column("unit_start").values.to_numpy() if self.units != "token" else None
        if len(lengths):
            flat, positions, ids, counts = self._mask(flat, lengths, units, tag)
        else:
            positions = ids = counts = np.zeros(0, np.int64)
        columns = {name: batch.column(name) for name in batch.schema.names}
        columns["input_ids"] = _list_array(lengths, flat.astype(np.int32))
        columns["mlm_positions"] = _list_array(counts, positions.astype(np.int16))
        columns["mlm_ids"] = _list_array(counts, ids.astype(np.int32))
        schema = self.schema()
        return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)

    def build(self, docs, tag, copies):
        drafts, counts = self.draft(docs, tag, copies)
        return [self.finish(t, batch) for t, batch in drafts], counts

    # ------------------------------------------------------------------ family specifics
    def piece_length(self) -> int:
        """Longest segment an example can hold (longer sentences are cut into pieces)."""
        raise NotImplementedError

    def examples(self, documents, rng: random.Random,
                 counts: Counter) -> tuple[list[list[int]], list[int] | None]:
        """Rows of encoded tokens (specials included) and their labels, if any."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared steps
    def encode(self, token_id: int) -> int:
        """A special token in the encoded form (starts its own unit)."""
        return token_id * 2 + 1 if self.units != "token" else token_id

    def tokenize(self, docs: list[list[str]], piece: int,
                 counts: Counter) -> list[list[list[int]]]:
        """Documents -> lists of sentences -> token ids (encoded with units when needed)."""
        lines = [line for doc in docs for line in doc]
        owners = [d for d, doc in enumerate(docs) for _ in doc]
        encodings = self._tokenizer.encode_batch(lines, add_special_tokens=False)
        out: list[list[list[int]]] = [[] for _ in docs]
        whole_lines = not self.sentences and self.units == "token"
        for d, line, enc in zip(owners, lines, encodings):
            if not enc.ids:
                continue
            if whole_lines:  # one segment per line, never cut: the blocks join them all
                out[d].append(enc.ids)
                continue
            values = enc.ids
            if self.units != "token":
                values = (np.asarray(values, dtype=np.int64) * 2
                          + self._unit_starts(line, enc, counts)).tolist()
            # sentences, then pieces of at most `piece` tokens (list slices: a line is
            # too short for numpy's per-call cost to pay)
            cuts = sentence_cuts(line, enc)
            for first, end in zip([0, *cuts], [*cuts, len(values)]):
                for start in range(first, end, piece):
                    chunk = values[start:min(start + piece, end)]
                    if self.units != "token":
                        chunk[0] |= 1  # a cut piece starts a unit
                    out[d].append(chunk)
        return [doc for doc in out if doc]

    def _unit_starts(self, line: str, enc, counts: Counter) -> np.ndarray:
        words = np.asarray([-1 if w is None else w for w in enc.word_ids])
        starts = np.r_[True, words[1:] != words[:-1]]
        if self._phrase_re is not None:
            token_starts = np.asarray([o[0] for o in enc.offsets])
            for match in self._phrase_re.finditer(line):
                inside = np.flatnonzero((token_starts >= match.start())
                                        & (token_starts < match.end()))
                if len(inside) > 1:
                    starts[inside[1:]] = False  # the phrase is one unit
                counts["phrases_matched"] += 1
        return starts.astype(np.int64)

    def to_batch(self, rows: list[list[int]], labels: list[int] | None) -> pa.RecordBatch:
        """Rows -> one Arrow record batch from flat arrays and offsets, without static
        masks (``finish`` draws them)."""
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64,
                           count=int(lengths.sum()))
        columns = {}
        if self.units != "token":
            columns["unit_start"] = _list_array(lengths, (flat & 1).astype(np.int8))
            flat = flat >> 1
        if self.label_column:
            columns[self.label_column] = pa.array(labels, pa.int8())
        columns["input_ids"] = _list_array(lengths, flat.astype(np.int32))
        fields = [f for f in self.schema() if f.name in columns]
        return pa.RecordBatch.from_arrays([columns[f.name] for f in fields],
                                          schema=pa.schema(fields))

    def _mask(self, flat, lengths, unit_starts, tag):
        # torch only here (finish): a worker that never finishes never imports it
        import torch

        from .masking import IGNORE_INDEX, mask_tokens

        width = int(lengths.max()) if len(lengths) else 0
        real = np.arange(width)[None, :] < lengths[:, None]  # [N, W]
        ids = np.zeros((len(lengths), width), dtype=np.int64)
        ids[real] = flat
        ids = torch.from_numpy(ids)
        special = torch.from_numpy(np.isin(ids.numpy(), self.special_ids) | ~real)
        units = None
        if unit_starts is not None:
            units = np.zeros((len(lengths), width), dtype=np.int8)
            units[real] = unit_starts
            units = torch.from_numpy(units)
        seed = int.from_bytes(hashlib.sha256(f"mask-{tag}".encode()).digest()[:8],
                              "little") & (2**63 - 1)
        corrupted, labels = mask_tokens(ids, special, self.static_masking.spec(),
                                        torch.Generator().manual_seed(seed), units)
        selected = labels.numpy() != IGNORE_INDEX
        _, cols = np.nonzero(selected)
        return (corrupted.numpy()[real], cols, labels.numpy()[selected],
                selected.sum(axis=1))


@dataclass
class SentencePairs(TextBuilder):
    """[CLS] A [SEP] B [SEP] pairs with a sentence label: NSP (BERT) or SOP (ALBERT)."""

    task: str = "nsp"
    cls_id: int = 0
    sep_id: int = 0
    short_seq_prob: float = 0.1

    def __post_init__(self):
        self.label_column = "sentence_label"

    def piece_length(self) -> int:
        return self.max_seq_len - 3

    def examples(self, documents, rng, counts):
        make = create_pairs if self.task == "nsp" else create_sop_pairs
        pairs = make(documents, self.max_seq_len, self.short_seq_prob, rng)
        cls, sep = self.encode(self.cls_id), self.encode(self.sep_id)
        rows = [[cls, *p.tokens_a, sep, *p.tokens_b, sep] for p in pairs]
        labels = [p.label for p in pairs]
        counts["label_1"] += sum(labels)
        counts["label_0"] += len(labels) - sum(labels)
        return rows, labels


@dataclass
class PackedSentences(TextBuilder):
    """<s> sentences ... </s> inputs: RoBERTa's FULL-SENTENCES or DOC-SENTENCES."""

    cls_id: int = 0
    sep_id: int = 0
    cross_documents: bool = True

    def piece_length(self) -> int:
        return self.max_seq_len - 2

    def examples(self, documents, rng, counts):
        cls, sep = self.encode(self.cls_id), self.encode(self.sep_id)
        blocks = pack_sentences(documents, self.max_seq_len - 2, sep, self.cross_documents,
                                counts)
        return [[cls, *block, sep] for block in blocks], None


@dataclass
class CausalBlocks(TextBuilder):
    """GPT: documents joined with end-of-text, cut into full blocks of max_seq_len."""

    end_of_text_id: int = 0
    sentences: ClassVar[bool] = False

    def piece_length(self) -> int:
        return self.max_seq_len

    def examples(self, documents, rng, counts):
        return pack_blocks(documents, self.max_seq_len, self.encode(self.end_of_text_id),
                           counts), None


def _text_only(tokenizer_json: str) -> str:
    """The tokenizer with its special tokens out of reach of a Unigram model's Viterbi.

    A Unigram vocabulary (ours or a converted SentencePiece one) holds the special tokens
    as pieces with score 0, the most likely there is, so even with ``encode_special_tokens``
    the model would cut "<pad>" out of the text as the special piece. Scored far below
    any path of ordinary pieces (log-probabilities), they are never chosen for text.
    """
    spec = json.loads(tokenizer_json)
    if spec["model"]["type"] != "Unigram":
        return tokenizer_json
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    for piece in spec["model"]["vocab"]:
        if piece[0] in specials:
            piece[1] = -1e6
    return json.dumps(spec)


def _list_array(lengths, values) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
