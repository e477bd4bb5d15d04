"""Preprocessing throughput and peak memory on a large corpus (run by hand).

Builds a corpus of about --size-mb by repeating WikiText-2 (../shared/data), trains the
tokenizer on its first few MB, then times `prepare` (tokenize + NSP pairs + static masks
+ Arrow cache) and samples the resident memory of the main process and its workers.

    python benchmarks/prepare_throughput.py --size-mb 1024
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil

from overture.config import load_recipe
from overture.registry import build_objective

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def build_corpus(path: Path, size_mb: float) -> None:
    text = "".join((WIKITEXT / name).read_text(encoding="utf-8") for name in ("valid.txt", "test.txt"))
    target = int(size_mb * 2**20)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < target:
            f.write(text)
            written += len(text.encode("utf-8"))


class PeakRSS(threading.Thread):
    """Samples the memory of this process plus all its children every 0.5 s: as PSS
    (shared pages, such as the torch libraries every worker maps, counted once in all)
    and as the largest single-process RSS."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.peak_rss, self.stop = 0, 0, False

    def run(self):
        me = psutil.Process()
        while not self.stop:
            procs = [me, *me.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    total += info.pss
                    self.peak_rss = max(self.peak_rss, info.rss)
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=float, default=1024)
    ap.add_argument("--num-proc", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="overture-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    if not corpus.exists() or corpus.stat().st_size < args.size_mb * 2**20:
        build_corpus(corpus, args.size_mb)
    size = corpus.stat().st_size
    recipe = load_recipe("bert-base", [
        f"data.corpus=[{corpus}]", f"data.cache_dir={work / 'cache'}", f"data.num_proc={args.num_proc}",
        "data.dupe_factor=1", "tokenizer.train_max_mb=16", "phases=[]", "train.max_steps=1"])
    os.environ.pop("OVERTURE_CACHE", None)
    objective = build_objective(recipe)  # BERT: NSP pairs, static masks
    phase = recipe.resolved_phases()[0]
    t = time.perf_counter()
    objective.load_tokenizer()
    print(f"tokenizer (16 MB sample): {time.perf_counter() - t:.1f} s")
    monitor = PeakRSS()
    monitor.start()
    t = time.perf_counter()
    data = objective.prepare(phase)
    elapsed = time.perf_counter() - t
    monitor.stop = True
    monitor.join()
    print(f"corpus {size / 2**20:.0f} MB, workers {data.stats['workers']}, "
          f"{data.stats['train_examples']:,} examples (seq 128, static masks, dupe_factor 1)")
    print(f"prepare: {elapsed:.0f} s = {size / 2**20 / elapsed:.2f} MB/s; "
          f"peak memory: PSS of main + workers {monitor.peak / 2**20:.0f} MB, "
          f"largest single-process RSS {monitor.peak_rss / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
