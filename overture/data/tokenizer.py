"""Tokenizer: train a WordPiece vocabulary on the corpus, or load an existing tokenizer.

Trained tokenizers are cached by a fingerprint of corpus + settings and saved as a
`transformers` fast tokenizer, so `AutoTokenizer.from_pretrained` loads them anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..config import ConfigError, DataConfig, TokenizerConfig
from .corpus import CorpusStats, Source, corpus_fingerprint, iter_documents

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
COMPLETE = "COMPLETE"


def load_or_train_tokenizer(cfg: TokenizerConfig, data: DataConfig, sources: list[Source]):
    """Return a transformers fast tokenizer: loaded from ``cfg.name_or_path`` or trained
    on the corpus (cached under ``data.cache_dir/tokenizers/<fingerprint>``)."""
    from transformers import AutoTokenizer

    if cfg.name_or_path:
        try:
            tok = AutoTokenizer.from_pretrained(cfg.name_or_path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"tokenizer.name_or_path={cfg.name_or_path!r} could not be "
                              f"loaded: {err}") from err
        missing = [t for t in ("cls_token", "sep_token", "mask_token", "pad_token")
                   if getattr(tok, t) is None]
        if missing or not tok.is_fast:
            raise ConfigError(f"tokenizer.name_or_path={cfg.name_or_path!r} must be a fast "
                              f"tokenizer with [CLS]/[SEP]/[MASK]/[PAD]; missing: {missing}")
        return tok
    key = hashlib.sha256(json.dumps(
        [corpus_fingerprint(sources), cfg.vocab_size, cfg.lowercase, cfg.min_frequency,
         cfg.train_max_mb]).encode()).hexdigest()[:16]
    folder = data.resolved_cache_dir / "tokenizers" / key
    if not (folder / COMPLETE).exists():
        _train(cfg, data, sources, folder)
    return AutoTokenizer.from_pretrained(folder)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full serialized definition (vocab, normalizer, ...)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _train(cfg: TokenizerConfig, data: DataConfig, sources: list[Source], folder: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    budget = int(cfg.train_max_mb * 2**20)
    stats = CorpusStats()

    def lines() -> Iterator[str]:
        for source in sources:
            for doc in iter_documents(source, data.text_column, data.hf_split, stats):
                yield from doc
                if stats.bytes >= budget:
                    return

    wordpiece = BertWordPieceTokenizer(lowercase=cfg.lowercase, strip_accents=cfg.lowercase)
    wordpiece.train_from_iterator(lines(), vocab_size=cfg.vocab_size,
                                  min_frequency=cfg.min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False)
    if stats.documents == 0:
        raise ConfigError(f"data.corpus {data.corpus}: the corpus holds no text "
                          f"(empty lines skipped: {stats.empty_lines_skipped})")
    tok = BertTokenizerFast(tokenizer_object=Tokenizer.from_str(wordpiece.to_str()),
                            do_lower_case=cfg.lowercase)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    (tmp / COMPLETE).write_text(json.dumps({"trained_on_bytes": stats.bytes,
                                            "vocab_size": len(tok)}))
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same tokenizer first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("trained WordPiece vocabulary of %d on %.1f MB -> %s", len(tok),
             stats.bytes / 2**20, folder)
