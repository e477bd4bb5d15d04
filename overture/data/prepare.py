"""Streaming preprocessing, generic over an example builder: documents -> windows ->
worker processes -> Arrow record batches -> a cache folder published atomically.

The main process reads documents and groups them into windows of ``data.chunk_mb``;
worker processes turn each window into drafted examples with the family's
``ExampleBuilder`` (NSP pairs, SOP pairs, packed blocks, ...) and finish them (static
masks) unless the main process does (``MAIN_FINISHES``); the main process writes their
record batches to Arrow streams in window order. At most two windows per worker are in
flight, so peak memory does not grow with the corpus, and the output does not depend on
the number of workers (each window has its own seeded RNG).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import sys
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from ..atomic import COMPLETE, building_dir, publish_dir
from ..config import ConfigError, DataConfig
from ..interrupts import interrupts_raise, interruptions_deferred
from ..workers import worker_pool
from .corpus import CorpusStats, corpus_fingerprint, iter_documents, resolve_sources

log = logging.getLogger(__name__)

FORMAT_VERSION = 4
"""Part of every cache key: bumped when the same settings give other examples (3: special
tokens written in the text are encoded as text; every maskable row gets an MLM target;
4: a loaded tokenizer's own padding / truncation settings are not applied)."""


class ExampleBuilder(Protocol):
    """Turns a window of documents into examples. Pickled once into each worker."""

    def schema(self) -> pa.Schema:
        """The Arrow schema of the examples."""

    def cache_key(self) -> dict:
        """Every setting that changes the examples (the tokenizer's fingerprint too)."""

    def setup(self) -> None:
        """Load what the worker needs (a tokenizer) once, in the worker process."""

    def draft(self, docs: list[list[str]], tag: str,
              copies: int) -> tuple[list[tuple[str, pa.RecordBatch]], Counter]:
        """Examples from ``docs`` (each a list of lines), in a worker: ``copies`` passes
        with different randomness seeded by ``tag``, each a (tag, record batch) for
        ``finish``; and counters (summed into stats.json)."""

    def finish(self, tag: str, batch: pa.RecordBatch) -> pa.RecordBatch:
        """A drafted batch completed (static masks, with torch), in a worker or, with few
        workers and copies, in the main process (``MAIN_FINISHES``)."""

    def build(self, docs: list[list[str]], tag: str,
              copies: int) -> tuple[list[pa.RecordBatch], Counter]:
        """``draft`` then ``finish``, in one process."""


@dataclass
class PreparedData:
    """Cached examples for one phase, memory-mapped."""

    folder: Path
    train: "datasets.Dataset"  # noqa: F821
    eval: "datasets.Dataset"  # noqa: F821
    stats: dict


def prepare_examples(builder: ExampleBuilder, data: DataConfig,
                     progress: bool = True) -> PreparedData:
    """Build (or reuse) the cached examples of ``builder`` on the recipe's corpus."""
    import datasets

    cache = data.resolved_cache_dir
    sources = resolve_sources(data.corpus, cache, data.task_dir)
    eval_sources = (resolve_sources(data.eval_corpus, cache, data.task_dir)
                    if data.eval_corpus else [])
    key = {
        "format": FORMAT_VERSION, "corpus": corpus_fingerprint(sources),
        "eval_corpus": corpus_fingerprint(eval_sources) if eval_sources else None,
        "builder": builder.cache_key(),
        "data": {k: getattr(data, k) for k in ("text_column", "hf_split", "dupe_factor",
                                              "eval_fraction", "eval_max_examples",
                                              "chunk_mb", "seed")},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache / "examples" / digest
    if not (folder / COMPLETE).exists():
        _build(builder, data, sources, eval_sources, folder, progress)
    stats = json.loads((folder / "stats.json").read_text())
    return PreparedData(folder=folder,
                        train=datasets.Dataset.from_file(str(folder / "train.arrow")),
                        eval=datasets.Dataset.from_file(str(folder / "eval.arrow")),
                        stats=stats)


def pad_rows(rows, value: int, multiple: int = 8):
    """Variable-length rows of ids -> one [B, L] long tensor, padded with ``value`` to the
    longest row rounded up to ``multiple`` (tensor-core friendly shapes)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence

    padded = pad_sequence([torch.as_tensor(r, dtype=torch.long) for r in rows],
                          batch_first=True, padding_value=value)  # [B, L]
    return F.pad(padded, (0, -padded.shape[1] % multiple), value=value)


class IndexedDataset:
    """A datasets.Dataset fetched a batch at a time, its indices passed to the collator
    (dynamic masks are seeded by them).

    With ``epoch_tagged``, the sampler's items are ``epoch * len + index`` (the engine's
    training sampler): the batch then tells its epoch to the collator, which a loader
    worker kept alive across epochs could not learn otherwise."""

    def __init__(self, dataset, epoch_tagged: bool = False):
        self.dataset, self.epoch_tagged = dataset, epoch_tagged

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict:
        if not self.epoch_tagged:
            return {"columns": self.dataset[list(indices)], "indices": list(indices)}
        size = len(self.dataset)
        plain = [i % size for i in indices]
        return {"columns": self.dataset[plain], "indices": plain, "epoch": indices[0] // size}


def _windows(data: DataConfig, sources, eval_sources,
             stats: CorpusStats) -> Iterator[tuple[int, list, int, float]]:
    """(window index, documents, bytes read, eval fraction) of about ``chunk_mb`` each:
    the corpus first, then the eval corpus (all held out) when there is one."""
    budget = int(data.chunk_mb * 2**20)
    index = 0
    streams = [(sources, 0.0 if eval_sources else data.eval_fraction), (eval_sources, 1.0)]
    for group, fraction in streams:
        docs: list[list[str]] = []
        start = stats.bytes
        for source in group:
            for doc in iter_documents(source, data.text_column, data.hf_split, stats):
                docs.append(doc)
                if stats.bytes - start >= budget:
                    yield index, docs, stats.bytes - start, fraction
                    index, docs, start = index + 1, [], stats.bytes
        if docs:
            yield index, docs, stats.bytes - start, fraction
            index += 1


def _build(builder: ExampleBuilder, data: DataConfig, sources, eval_sources, folder: Path,
           progress: bool) -> None:
    from tqdm.auto import tqdm

    sizes = [s.size_bytes() for s in [*sources, *eval_sources]]
    total = None if None in sizes else sum(sizes)
    workers = data.num_proc or os.cpu_count() or 1
    if total is not None:  # no point spawning more workers than windows
        workers = max(1, min(workers, -(-total // int(data.chunk_mb * 2**20))))
    with building_dir(folder) as tmp:
        corpus = CorpusStats()
        counts: Counter = Counter()
        schema = builder.schema()
        # the bar is closed before any error is printed (the error stays the last line);
        # SIGTERM stops the build with an exception, so that the folder is removed
        with interrupts_raise(signal.SIGTERM), \
                tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                     desc="prepare", disable=not progress, dynamic_ncols=True) as bar, \
                pa.OSFile(str(tmp / "train.arrow"), "wb") as ftrain, \
                pa.OSFile(str(tmp / "eval.arrow"), "wb") as feval, \
                pa.ipc.new_stream(ftrain, schema) as wtrain, \
                pa.ipc.new_stream(feval, schema) as weval:
            windows = _windows(data, sources, eval_sources, corpus)
            in_main = main_finishes(workers, data)
            finish = builder.finish if in_main else (lambda tag, batch: batch)
            for nbytes, (train_batches, eval_batches, window_counts) in _map_windows(
                    windows, builder, data, workers, workers_finish=not in_main):
                counts["windows"] += 1
                counts.update(window_counts)
                for tag, batch in train_batches:
                    wtrain.write_batch(finish(tag, batch))
                    counts["train_examples"] += batch.num_rows
                for tag, batch in eval_batches:
                    room = data.eval_max_examples - counts["eval_examples"]
                    if room > 0 and batch.num_rows:
                        weval.write_batch(finish(tag, batch).slice(0, room))
                        counts["eval_examples"] += min(room, batch.num_rows)
                bar.update(nbytes)
        if corpus.documents == 0:
            raise ConfigError(f"data.corpus {data.corpus}: the corpus is empty (documents: 0, "
                              f"empty lines skipped: {corpus.empty_lines_skipped})")
        if counts["train_examples"] == 0:
            raise ConfigError(f"data.corpus {data.corpus}: no training example could be cut "
                              f"from {corpus.documents} documents" + (
                                  f" (data.eval_fraction={data.eval_fraction} holds them all out)"
                                  if data.eval_fraction >= 1 and not eval_sources else ""))
        if eval_sources and counts["eval_examples"] == 0:
            raise ConfigError(f"data.eval_corpus {data.eval_corpus}: no evaluation example "
                              "could be cut from it")
        # eval_examples is there when 0 too (data.eval_fraction=0): the readers expect it
        stats = {"corpus": asdict(corpus), "eval_examples": 0, **counts, "workers": workers}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        (tmp / COMPLETE).write_text("")
        publish_dir(tmp, folder, replace=False)  # the cache is either whole or absent
    log.info("prepared %d train / %d eval examples from %d documents (%.1f MB); skipped %d "
             "empty lines, %d empty documents; replaced %d invalid UTF-8 sequences",
             counts["train_examples"], counts["eval_examples"], corpus.documents,
             corpus.bytes / 2**20, corpus.empty_lines_skipped, corpus.empty_documents_skipped,
             corpus.invalid_utf8_replaced)


MAIN_FINISHES = 8
"""The main process finishes the workers' drafts (draws static masks) when workers x
data.dupe_factor is at most this; above, each worker does. Drawn in the main process,
the masks spare every worker importing torch (1.2 s of a core, once: 10% of preparing 20
MB on 2 cores); but they are one process's work, about 0.03 s per MB and copy against a
worker's 0.55 s per MB plus 0.08 per copy (2 cores, WikiText), so the main process
would become the bottleneck with many workers or copies (bert-base draws 10). At 8 it
is busy at most about 40% of the time."""


def main_finishes(workers: int, data: DataConfig) -> bool:
    """Whether the main process draws the static masks (``MAIN_FINISHES``)."""
    return workers * data.dupe_factor <= MAIN_FINISHES


def _map_windows(windows, builder: ExampleBuilder, data: DataConfig, workers: int,
                 workers_finish: bool):
    """Yield (bytes, result) for each window in order, using ``workers`` processes, which
    finish their drafts when ``workers_finish``."""
    settings = (data.seed, data.dupe_factor, workers_finish)
    if workers == 1:
        _init_worker(builder, settings, threads=None)
        for index, docs, nbytes, fraction in windows:
            yield nbytes, _process_window(index, docs, fraction)
        return
    # spawn, not fork: the parent has torch and tokenizers thread pools running
    with worker_pool(workers, _worker_ended, start="spawn", initializer=_init_worker,
                     initargs=(builder, settings, 1)) as pool:
        pending: deque = deque()
        for index, docs, nbytes, fraction in windows:
            with interruptions_deferred():  # submit() may spawn a worker: not cut short
                future = pool.submit(_process_window, index, docs, fraction)
            pending.append((nbytes, future))
            if len(pending) >= 2 * workers:  # bound what is in flight
                nbytes, future = pending.popleft()
                yield nbytes, future.result()
        while pending:
            nbytes, future = pending.popleft()
            yield nbytes, future.result()


def _worker_ended() -> str:
    """The one-line reason a preparation worker could not finish its window."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    path = getattr(main, "__file__", None)
    # a user's script, not the overture command (python -m overture, or bin/overture)
    script = (path is not None and not (spec and spec.name.split(".")[0] == "overture")
              and Path(path).name != "overture")
    guard = ("If this is a Python script calling overture, put the call under `if "
             "__name__ == \"__main__\":` (workers are spawned and re-import the script, "
             "which then runs again in each of them). Otherwise the worker " if script
             else "The worker ")
    return ("data preparation: a worker process ended before its window was done (an "
            f"error it raised is printed above). {guard}may have been killed, perhaps "
            "out of memory. data.num_proc=1 prepares in this process, without workers")


_WORKER: dict = {}


def _init_worker(builder: ExampleBuilder, settings: tuple[int, int, bool],
                 threads: int | None) -> None:
    if threads is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # torch reads this when first imported (a builder drawing static masks imports it;
        # the others never pay for importing it in every worker)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    builder.setup()
    _WORKER["builder"], _WORKER["settings"] = builder, settings


def _process_window(index: int, docs: list[list[str]], eval_fraction: float):
    """One window -> (train drafts, eval drafts, counters); drafts are (tag, batch)."""
    builder: ExampleBuilder = _WORKER["builder"]
    seed, dupe_factor, finishes = _WORKER["settings"]
    rng = random.Random(f"{seed}-split-{index}")
    is_eval = [rng.random() < eval_fraction for _ in docs]
    train_docs = [d for d, e in zip(docs, is_eval) if not e]
    eval_docs = [d for d, e in zip(docs, is_eval) if e]
    train, train_counts = builder.draft(train_docs, f"{seed}-train-{index}", dupe_factor)
    evaluation, _ = builder.draft(eval_docs, f"{seed}-eval-{index}", 1)
    if finishes:
        train, evaluation = ([(tag, builder.finish(tag, batch)) for tag, batch in drafts]
                             for drafts in (train, evaluation))
    return train, evaluation, Counter({f"train_{k}": v for k, v in train_counts.items()})
