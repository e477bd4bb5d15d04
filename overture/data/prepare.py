"""Streaming preprocessing: documents -> tokenized NSP pairs (statically masked if asked)
-> Arrow files cached on disk under a fingerprint of corpus + tokenizer + settings.

The main process reads documents and groups them into windows of ``data.chunk_mb``;
worker processes split sentences, tokenize, cut NSP pairs and mask; the main process
writes their record batches to an Arrow stream in window order. At most two windows per
worker are in flight, so peak memory does not grow with the corpus, and the output does
not depend on the number of workers (each window has its own seeded RNG).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import random
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from ..config import ConfigError, Phase, Recipe
from .corpus import CorpusStats, corpus_fingerprint, iter_documents, resolve_sources
from .tokenizer import load_or_train_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"


@dataclass
class PreparedData:
    """Cached examples for one phase, memory-mapped."""

    folder: Path
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset"  # noqa: F821
    tokenizer: object
    stats: dict


@dataclass(frozen=True)
class _WindowSettings:
    """What a worker needs to turn a window of documents into examples."""

    tokenizer_json: str
    max_seq_len: int
    short_seq_prob: float
    dupe_factor: int
    eval_fraction: float
    seed: int
    cls_id: int
    sep_id: int
    pad_id: int
    static_masking: bool
    mask_id: int
    random_token_ids: tuple[int, ...]
    mlm_probability: float
    max_predictions_per_seq: int
    mask_replace_prob: float
    random_replace_prob: float


def prepare(recipe: Recipe, phase: Phase | None = None, progress: bool = True) -> PreparedData:
    """Build (or reuse) the cached examples for ``phase`` (default: the first phase)."""
    import datasets

    phase = phase or recipe.resolved_phases()[0]
    data, objective = recipe.data, recipe.objective
    cache = data.resolved_cache_dir
    sources = resolve_sources(data.corpus, cache)
    tokenizer = load_or_train_tokenizer(recipe.tokenizer, data, sources)
    settings = _window_settings(recipe, phase, tokenizer)
    key = {
        "format": FORMAT_VERSION, "corpus": corpus_fingerprint(sources),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": {k: getattr(data, k) for k in ("text_column", "hf_split", "short_seq_prob",
                                              "dupe_factor", "eval_fraction",
                                              "eval_max_examples", "chunk_mb", "seed")},
        "max_seq_len": phase.max_seq_len,
        "masking": None if not settings.static_masking else {
            k: getattr(settings, k) for k in ("mlm_probability", "max_predictions_per_seq",
                                              "mask_replace_prob", "random_replace_prob")},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache / "examples" / digest
    if not (folder / COMPLETE).exists():
        _build(recipe, sources, settings, folder, progress)
    stats = json.loads((folder / "stats.json").read_text())
    return PreparedData(folder=folder,
                        train=datasets.Dataset.from_file(str(folder / "train.arrow")),
                        eval=datasets.Dataset.from_file(str(folder / "eval.arrow")),
                        tokenizer=tokenizer, stats=stats)


def _window_settings(recipe: Recipe, phase: Phase, tokenizer) -> _WindowSettings:
    from overture.pretrain.text.masking import non_special_ids

    return _WindowSettings(
        tokenizer_json=tokenizer.backend_tokenizer.to_str(),
        max_seq_len=phase.max_seq_len, short_seq_prob=recipe.data.short_seq_prob,
        dupe_factor=recipe.data.dupe_factor, eval_fraction=recipe.data.eval_fraction,
        seed=recipe.data.seed, cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id,
        pad_id=tokenizer.pad_token_id, static_masking=recipe.objective.masking == "static",
        mask_id=tokenizer.mask_token_id,
        random_token_ids=tuple(non_special_ids(tokenizer).tolist()),
        mlm_probability=recipe.objective.mlm_probability,
        max_predictions_per_seq=phase.max_predictions_per_seq,
        mask_replace_prob=recipe.objective.mask_replace_prob,
        random_replace_prob=recipe.objective.random_replace_prob)


def _schema(static: bool) -> pa.Schema:
    cols = [("input_ids", pa.list_(pa.int32())), ("next_sentence_label", pa.int8())]
    if static:
        cols += [("mlm_positions", pa.list_(pa.int16())), ("mlm_ids", pa.list_(pa.int32()))]
    return pa.schema(cols)


def _windows(recipe: Recipe, sources, stats: CorpusStats) -> Iterator[tuple[int, list, int]]:
    """(window index, documents, bytes read) of about ``data.chunk_mb`` each."""
    budget = int(recipe.data.chunk_mb * 2**20)
    docs: list[list[str]] = []
    start = stats.bytes
    index = 0
    for source in sources:
        for doc in iter_documents(source, recipe.data.text_column, recipe.data.hf_split, stats):
            docs.append(doc)
            if stats.bytes - start >= budget:
                yield index, docs, stats.bytes - start
                index, docs, start = index + 1, [], stats.bytes
    if docs:
        yield index, docs, stats.bytes - start


def _build(recipe: Recipe, sources, settings: _WindowSettings, folder: Path,
           progress: bool) -> None:
    from tqdm.auto import tqdm

    sizes = [s.size_bytes() for s in sources]
    total = None if None in sizes else sum(sizes)
    workers = recipe.data.num_proc or os.cpu_count() or 1
    if total is not None:  # no point spawning more workers than windows
        workers = max(1, min(workers, -(-total // int(recipe.data.chunk_mb * 2**20))))
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    corpus = CorpusStats()
    counts = {"train_examples": 0, "eval_examples": 0, "train_tokens": 0,
              "is_next": 0, "is_random": 0, "windows": 0}
    schema = _schema(settings.static_masking)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
               desc="prepare", disable=not progress, dynamic_ncols=True)
    with pa.OSFile(str(tmp / "train.arrow"), "wb") as ftrain, \
            pa.OSFile(str(tmp / "eval.arrow"), "wb") as feval, \
            pa.ipc.new_stream(ftrain, schema) as wtrain, \
            pa.ipc.new_stream(feval, schema) as weval:
        for nbytes, (train_batch, eval_batch) in _map_windows(
                _windows(recipe, sources, corpus), settings, workers):
            counts["windows"] += 1
            wtrain.write_batch(train_batch)
            counts["train_examples"] += train_batch.num_rows
            labels = train_batch.column("next_sentence_label").to_numpy()
            counts["is_random"] += int(labels.sum())
            counts["is_next"] += int(len(labels) - labels.sum())
            counts["train_tokens"] += len(train_batch.column("input_ids").values)
            room = recipe.data.eval_max_examples - counts["eval_examples"]
            if room > 0 and eval_batch.num_rows:
                eval_batch = eval_batch.slice(0, room)
                weval.write_batch(eval_batch)
                counts["eval_examples"] += eval_batch.num_rows
            bar.update(nbytes)
    bar.close()
    if corpus.documents == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"data.corpus {recipe.data.corpus}: the corpus is empty (documents: 0, "
                          f"empty lines skipped: {corpus.empty_lines_skipped})")
    if counts["train_examples"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"data.corpus {recipe.data.corpus}: no training example could be cut "
                          f"from {corpus.documents} documents")
    stats = {"corpus": asdict(corpus), **counts, "max_seq_len": settings.max_seq_len,
             "static_masking": settings.static_masking, "workers": workers}
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    (tmp / COMPLETE).write_text("")
    try:
        os.replace(tmp, folder)  # atomic: the cache is either whole or absent
    except OSError:  # another process published the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %d train / %d eval examples from %d documents (%.1f MB); skipped %d "
             "empty lines, %d empty documents; replaced %d invalid UTF-8 sequences",
             counts["train_examples"], counts["eval_examples"], corpus.documents,
             corpus.bytes / 2**20, corpus.empty_lines_skipped, corpus.empty_documents_skipped,
             corpus.invalid_utf8_replaced)


def _map_windows(windows, settings: _WindowSettings, workers: int):
    """Yield (bytes, result) for each window in order, using ``workers`` processes."""
    if workers == 1:
        _init_worker(settings, threads=None)
        for index, docs, nbytes in windows:
            yield nbytes, _process_window(index, docs)
        return
    # spawn, not fork: the parent has torch and tokenizers thread pools running.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(settings, 1)) as pool:
        pending: deque = deque()
        for index, docs, nbytes in windows:
            pending.append((nbytes, pool.apply_async(_process_window, (index, docs))))
            if len(pending) >= 2 * workers:  # bound what is in flight
                nbytes, result = pending.popleft()
                yield nbytes, result.get()
        while pending:
            nbytes, result = pending.popleft()
            yield nbytes, result.get()


_WORKER: dict = {}


def _init_worker(settings: _WindowSettings, threads: int | None) -> None:
    import torch
    from tokenizers import Tokenizer

    if threads is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        torch.set_num_threads(threads)
    _WORKER["settings"] = settings
    _WORKER["tokenizer"] = Tokenizer.from_str(settings.tokenizer_json)


def _process_window(index: int, docs: list[list[str]]) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """Turn one window of documents into (train, eval) record batches."""
    from overture.pretrain.text.nsp import create_pairs, split_sentences

    s: _WindowSettings = _WORKER["settings"]
    rng = random.Random(f"{s.seed}-split-{index}")
    is_eval = [rng.random() < s.eval_fraction for _ in docs]

    # Sentences of every document, tokenized in one batch call.
    sentences, owner = [], []
    for d, doc in enumerate(docs):
        for line in doc:
            for sentence in split_sentences(line):
                sentences.append(sentence)
                owner.append(d)
    encodings = _WORKER["tokenizer"].encode_batch(sentences, add_special_tokens=False)
    max_piece = s.max_seq_len - 3
    tokenized: list[list[list[int]]] = [[] for _ in docs]
    for d, enc in zip(owner, encodings):
        ids = enc.ids
        # A sentence longer than a whole example is cut into example-sized spans, so its
        # text is used rather than truncated away.
        for start in range(0, len(ids), max_piece):
            tokenized[d].append(ids[start:start + max_piece])
    train_docs = [t for t, e in zip(tokenized, is_eval) if t and not e]
    eval_docs = [t for t, e in zip(tokenized, is_eval) if t and e]

    train_pairs = []
    for dupe in range(s.dupe_factor):
        train_pairs += create_pairs(train_docs, s.max_seq_len, s.short_seq_prob,
                                    random.Random(f"{s.seed}-pairs-{index}-{dupe}"))
    eval_pairs = (create_pairs(eval_docs, s.max_seq_len, s.short_seq_prob,
                               random.Random(f"{s.seed}-eval-{index}"))
                  if len(eval_docs) >= 2 else [])
    return _to_batch(train_pairs, s, f"train-{index}"), _to_batch(eval_pairs, s, f"eval-{index}")


def _to_batch(pairs, s: _WindowSettings, tag: str) -> pa.RecordBatch:
    """Pairs -> one Arrow record batch, built from flat arrays and offsets (no per-token
    Python work); with static masking the masks are drawn here, once."""
    import numpy as np
    import torch

    from overture.pretrain.text.masking import MaskingSpec, mask_tokens

    lengths = np.fromiter((len(p.tokens_a) + len(p.tokens_b) + 3 for p in pairs),
                          dtype=np.int64, count=len(pairs))
    flat = np.fromiter(itertools.chain.from_iterable(
        (s.cls_id, *p.tokens_a, s.sep_id, *p.tokens_b, s.sep_id) for p in pairs),
        dtype=np.int32, count=int(lengths.sum()))
    columns = {"next_sentence_label": pa.array([p.label for p in pairs], pa.int8())}
    if s.static_masking and len(pairs):
        width = int(lengths.max())
        real = np.arange(width)[None, :] < lengths[:, None]  # [N, W]
        ids = np.full((len(pairs), width), s.pad_id, dtype=np.int64)
        ids[real] = flat
        ids = torch.from_numpy(ids)
        special = (ids == s.cls_id) | (ids == s.sep_id) | torch.from_numpy(~real)
        spec = MaskingSpec(s.mask_id, torch.tensor(s.random_token_ids), s.mlm_probability,
                           s.max_predictions_per_seq, s.mask_replace_prob, s.random_replace_prob)
        seed = int.from_bytes(hashlib.sha256(f"{s.seed}-mask-{tag}".encode()).digest()[:8],
                              "little") & (2**63 - 1)
        corrupted, labels = mask_tokens(ids, special, spec, torch.Generator().manual_seed(seed))
        flat = corrupted.numpy()[real].astype(np.int32)  # row-major: rows stay in order
        selected = labels.numpy() != -100
        _, cols = np.nonzero(selected)
        counts = selected.sum(axis=1)
        columns["mlm_positions"] = _list_array(counts, cols.astype(np.int16))
        columns["mlm_ids"] = _list_array(counts, labels.numpy()[selected].astype(np.int32))
    elif s.static_masking:
        columns["mlm_positions"] = _list_array(lengths, np.zeros(0, np.int16))
        columns["mlm_ids"] = _list_array(lengths, np.zeros(0, np.int32))
    columns["input_ids"] = _list_array(lengths, flat)
    schema = _schema(s.static_masking)
    return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)


def _list_array(lengths, values) -> pa.ListArray:
    import numpy as np

    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
