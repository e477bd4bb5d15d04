"""Tokenizer: train a WordPiece, byte-level BPE or Unigram vocabulary with `tokenizers`,
carrying the special tokens and pair template the family needs, or load an existing one.

Trained tokenizers are cached by a fingerprint of corpus + settings + family spec and
saved as a `transformers` fast tokenizer of the family's class, so
`AutoTokenizer.from_pretrained` loads them anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import COMPLETE, building_dir, publish_dir
from ..config import ConfigError, DataConfig, TokenizerConfig
from .corpus import CorpusStats, Source, corpus_fingerprint, iter_documents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerSpec:
    """What a family needs from its tokenizer."""

    kind: str
    """Default kind: wordpiece, bpe or unigram."""
    lowercase: bool
    """Default lowercasing."""
    special_tokens: dict[str, str]
    """Role -> token, e.g. {"cls_token": "[CLS]"}; trained vocabularies give them the
    first ids, in this order."""
    single: str | None = None
    """Template for one text (TemplateProcessing syntax), e.g. "[CLS] $A [SEP]"."""
    pair: str | None = None
    """Template for a pair, e.g. "[CLS] $A [SEP] $B:1 [SEP]:1"."""
    transformers_class: str = "PreTrainedTokenizerFast"
    """The transformers tokenizer class the trained tokenizer is saved as."""
    required: tuple[str, ...] = field(default=())
    """Roles a loaded tokenizer must have (e.g. mask_token for masked LM)."""


def load_or_train_tokenizer(cfg: TokenizerConfig, data: DataConfig, sources: list[Source],
                            spec: TokenizerSpec):
    """Return a transformers fast tokenizer: loaded from ``cfg.name_or_path`` or trained
    on the corpus (cached under ``data.cache_dir/tokenizers/<fingerprint>``)."""
    from transformers import AutoTokenizer

    if cfg.name_or_path:
        from ..hub import load_tokenizer, looks_like_path

        local = Path(cfg.name_or_path).expanduser()
        if not local.exists() and looks_like_path(cfg.name_or_path):  # not a Hub name
            raise ConfigError(f"tokenizer.name_or_path={cfg.name_or_path!r}: no such folder")
        tok = load_tokenizer(cfg.name_or_path, "tokenizer.name_or_path")
        missing = [role for role in spec.required if getattr(tok, role, None) is None]
        if missing or not tok.is_fast:
            raise ConfigError(f"tokenizer.name_or_path={cfg.name_or_path!r} must be a fast "
                              f"tokenizer with {', '.join(spec.required)}; missing: {missing}")
        return tok
    kind = cfg.kind or spec.kind
    lowercase = spec.lowercase if cfg.lowercase is None else cfg.lowercase
    key = hashlib.sha256(json.dumps(
        [corpus_fingerprint(sources), kind, lowercase, cfg.vocab_size, cfg.min_frequency,
         cfg.train_max_mb, asdict(spec)], sort_keys=True).encode()).hexdigest()[:16]
    folder = data.resolved_cache_dir / "tokenizers" / key
    if not (folder / COMPLETE).exists():
        _train(cfg, kind, lowercase, spec, data, sources, folder)
    return AutoTokenizer.from_pretrained(folder)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full serialized definition (vocab, normalizer, ...)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _train(cfg: TokenizerConfig, kind: str, lowercase: bool, spec: TokenizerSpec,
           data: DataConfig, sources: list[Source], folder: Path) -> None:
    import transformers
    from tokenizers import Tokenizer, processors

    budget = int(cfg.train_max_mb * 2**20)
    stats = CorpusStats()

    def lines(stats: CorpusStats) -> Iterator[str]:
        for source in sources:
            for doc in iter_documents(source, data.text_column, data.hf_split, stats):
                yield from doc
                if stats.bytes >= budget:
                    return

    specials = list(spec.special_tokens.values())
    specials = list(dict.fromkeys(specials))  # GPT-2 uses one token for several roles
    trainer = _trainer(kind, lowercase, specials)
    extra = {"unk_token": spec.special_tokens["unk_token"]} if kind == "unigram" else {
        "min_frequency": cfg.min_frequency}
    try:
        trainer.train_from_iterator(lines(stats), vocab_size=cfg.vocab_size,
                                    special_tokens=specials, show_progress=False, **extra)
        too_small = False
    except Exception as err:  # tokenizers raises a bare Exception
        if "not large enough" not in str(err):  # Unigram: fewer entries than characters
            raise
        too_small = True
    if stats.documents == 0:
        raise ConfigError(f"data.corpus {data.corpus}: the corpus holds no text "
                          f"(empty lines skipped: {stats.empty_lines_skipped})")
    if too_small or trainer.get_vocab_size() > cfg.vocab_size:
        # The trainers silently grow a too-small vocabulary to hold every special token
        # and every character of the corpus (WordPiece also its "##" forms, byte-level
        # BPE all 256 bytes); Unigram refuses, and needs one more entry than that.
        minimum = trainer.get_vocab_size() if kind != "unigram" else (
            len(_alphabet(trainer, lines(CorpusStats()))) + len(specials) + 1)
        raise ConfigError(f"tokenizer.vocab_size={cfg.vocab_size} is too small for this "
                          f"corpus: a {kind} vocabulary of its characters and special tokens "
                          f"needs at least {minimum}; set tokenizer.vocab_size={minimum} or "
                          "more (thousands, for useful subwords)")
    backend = Tokenizer.from_str(trainer.to_str())
    if spec.single:
        ids = [(t, backend.token_to_id(t)) for t in specials]
        backend.post_processor = processors.TemplateProcessing(
            single=spec.single, pair=spec.pair, special_tokens=ids)
    # The family's class rebuilds its own pipeline around the vocabulary (GPT2Tokenizer
    # assumes BPE); another kind is saved as the generic class, which keeps it as trained.
    tok_class = getattr(transformers, spec.transformers_class if kind == spec.kind
                        else "PreTrainedTokenizerFast")
    tok = tok_class(tokenizer_object=backend, **spec.special_tokens)
    with building_dir(folder) as tmp:
        tok.save_pretrained(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"trained_on_bytes": stats.bytes,
                                                "vocab_size": len(tok), "kind": kind}))
        publish_dir(tmp, folder, replace=False)  # a concurrent trainer's result is as good
    log.info("trained %s vocabulary of %d on %.1f MB -> %s", kind, len(tok),
             stats.bytes / 2**20, folder)


def _alphabet(trainer, lines: Iterator[str]) -> set[str]:
    """The characters the trainer sees: the text after its normalizer and pre-tokenizer."""
    chars: set[str] = set()
    for line in lines:
        for word, _ in trainer.pre_tokenizer.pre_tokenize_str(
                trainer.normalizer.normalize_str(line)):
            chars.update(word)
    return chars


def _trainer(kind: str, lowercase: bool, specials: list[str]):
    from tokenizers import normalizers
    from tokenizers.implementations import (BertWordPieceTokenizer, ByteLevelBPETokenizer,
                                            SentencePieceUnigramTokenizer)

    if kind == "wordpiece":
        return BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase)
    if kind == "bpe":
        return ByteLevelBPETokenizer(lowercase=lowercase)
    unigram = SentencePieceUnigramTokenizer()
    if lowercase:
        unigram.normalizer = normalizers.Sequence([unigram.normalizer, normalizers.Lowercase()])
    return unigram
