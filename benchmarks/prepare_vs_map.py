"""Data preparation speed: ``overture prepare`` against a plain ``datasets`` map with the
same tokenizer (run by hand).

The corpus is WikiText-2 (../shared/data) repeated to --size-mb, or the embedded default
corpus. Each family's tokenizer is trained once, outside the timing. Then, alternating,
with a fresh cache each run:
- overture: the family's whole preparation (read, split into sentences, tokenize, build
  examples: NSP pairs with static masks for BERT (one copy: --dupe-factor), full-sentence
  packing for RoBERTa, blocks for GPT; write the Arrow cache);
- map: ``load_dataset("text", data_files=...)`` then ``Dataset.map(tokenizer,
  batched=True, num_proc=N)``: tokens only, no examples.

    .venv/bin/python -m benchmarks.prepare_vs_map --size-mb 20 --family bert gpt
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import (SHARED_DATA, alternate, cli, fmt, machine, quiet, record,
                               spread, table)

RECIPES = {"bert": "bert-base", "roberta": "roberta-base", "gpt": "gpt2-small"}


def build_corpus(path: Path, size_mb: float) -> None:
    wikitext = SHARED_DATA / "wikitext-2"
    if wikitext.is_dir():
        text = "".join((wikitext / n).read_text(encoding="utf-8") for n in ("valid.txt", "test.txt"))
    else:
        from overture.data.corpus import default_corpus_path

        text = default_corpus_path(path.parent).read_text(encoding="utf-8")
    target, written = int(size_mb * 2**20), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            f.write(text)
            written += len(text.encode("utf-8"))


def overture_run(objective, phase) -> float:
    started = time.perf_counter()
    data = objective.prepare(phase, progress=False)
    seconds = time.perf_counter() - started
    shutil.rmtree(data.folder)  # the next run builds it again
    return seconds


def map_run(tokenizer, corpus: Path, workers: int, work: Path) -> float:
    import datasets

    cache = work / "hf"
    started = time.perf_counter()
    lines = datasets.load_dataset("text", data_files=str(corpus), split="train",
                                  cache_dir=str(cache))
    lines.map(lambda b: tokenizer(b["text"]), batched=True, num_proc=workers or None,
              remove_columns=["text"])
    seconds = time.perf_counter() - started
    shutil.rmtree(cache)
    return seconds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=["bert", "gpt"], choices=sorted(RECIPES))
    parser.add_argument("--size-mb", type=float, default=20)
    parser.add_argument("--num-proc", type=int, default=0, help="0: one per core")
    parser.add_argument("--dupe-factor", type=int, default=1,
                        help="BERT's copies of the examples, each with other masks")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    quiet()
    import os

    from overture.config import load_recipe
    from overture.registry import build_objective

    os.environ.pop("OVERTURE_CACHE", None)
    workers = args.num_proc or os.cpu_count()
    info = machine()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "corpus.txt"
        build_corpus(corpus, args.size_mb)
        megabytes = corpus.stat().st_size / 2**20
        for family in args.family:
            recipe = load_recipe(RECIPES[family], [
                f"data.corpus=[{corpus}]", f"data.cache_dir={work / 'cache'}",
                f"data.num_proc={workers}", "tokenizer.train_max_mb=8", "phases=[]",
                # one pass of examples over the corpus (bert-base draws 10, each with its
                # own static masks: 10x the pairing and masking; --dupe-factor to see it)
                f"data.dupe_factor={args.dupe_factor}",
                "train.max_steps=1", f"output_dir={work / 'run'}"])
            objective = build_objective(recipe)
            objective.load_tokenizer()  # trained once, outside the timing
            phase = recipe.resolved_phases()[0]
            runs = alternate({"overture": lambda: overture_run(objective, phase),
                              "map": lambda: map_run(objective.tokenizer, corpus, workers, work)},
                             args.repeats)
            ours = spread([megabytes / s for s in runs["overture"]])
            theirs = spread([megabytes / s for s in runs["map"]])
            results.append({"family": family, "megabytes": megabytes, "overture": ours,
                            "map": theirs, "ratio": ours["median"] / theirs["median"]})
            print(f"{family}: overture {fmt(ours, 2)} MB/s, map {fmt(theirs, 2)} MB/s, "
                  f"{results[-1]['ratio']:.2f}x", flush=True)
    rows = [[r["family"], fmt(r["overture"], 2), fmt(r["map"], 2), f"{r['ratio']:.2f}x"]
            for r in results]
    print(f"\n{info['cpu']}, {workers} processes, {megabytes:.0f} MB; MB/s median (min-max) "
          f"of {args.repeats}")
    print(table(["family (examples)", "overture prepare", "load_dataset + map(tokenizer)",
                 "ratio"], rows))
    print(f"recorded in {record('prepare_vs_map', vars(args), results, info)}")
    return results


if __name__ == "__main__":
    cli(main)
