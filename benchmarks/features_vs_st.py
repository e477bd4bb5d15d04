"""Feature extraction speed: ``overture features`` (overture.features.Encoder) against
sentence-transformers' ``encode`` on the same checkpoint and texts (run by hand).

Both sort the texts by length and embed them in batches of --batch-size with mean
pooling; the results must agree (the largest absolute difference is printed). Texts: the
sentences of SST-2 (../shared/data), else lines of the embedded default corpus.
Texts/s; the two sides alternate, --repeats rounds, after one warm-up round.

    .venv/bin/python -m benchmarks.features_vs_st --checkpoint runs/all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import csv
import time

from benchmarks.common import (SHARED_DATA, alternate, cli, fmt, machine, quiet, record,
                               spread, table)


def texts(count: int) -> list[str]:
    sst2 = SHARED_DATA / "glue" / "SST-2" / "train.tsv"
    if sst2.is_file():
        with open(sst2, encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            return [r["sentence"] for _, r in zip(range(count), rows)]
    import tempfile
    from pathlib import Path

    from overture.data.corpus import default_corpus_path

    lines = default_corpus_path(Path(tempfile.gettempdir())).read_text().splitlines()
    return [line for line in lines if line.strip()][:count]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a sentence encoder folder (transformers format)")
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    quiet()

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from overture.features import load

    corpus = texts(args.texts)
    ours = load(args.checkpoint, device="cpu")
    theirs = SentenceTransformer(args.checkpoint, device="cpu")
    theirs.max_seq_length = ours.max_length  # the same truncation on both sides
    info = machine()
    embedded = {}
    # a sentence-transformers folder may end in a Normalize module: compared normalised
    normalize = any(type(m).__name__ == "Normalize" for m in theirs)

    def overture_run() -> float:
        started = time.perf_counter()
        embedded["overture"] = ours.encode(corpus, pooling="mean", batch_size=args.batch_size,
                                           normalize=normalize)
        return len(corpus) / (time.perf_counter() - started)

    def st_run() -> float:
        started = time.perf_counter()
        embedded["st"] = theirs.encode(corpus, batch_size=args.batch_size,
                                       convert_to_numpy=True, normalize_embeddings=False,
                                       show_progress_bar=False)
        return len(corpus) / (time.perf_counter() - started)

    sides = {"overture": overture_run, "sentence-transformers": st_run}
    alternate(sides, 1)  # warm-up round
    runs = alternate(sides, args.repeats)
    st_pooled = [m for m in theirs if type(m).__name__ == "Pooling"]
    # the work done: 2 FLOPs per weight (embeddings excluded) per real token, a forward
    # pass; against the measured matmul peak it says how much room is left at all
    model = ours.model
    weights = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    tokens = sum(len(ids) for ids in ours.tokenizer(corpus, truncation=True,
                                                    max_length=ours.max_length)["input_ids"])
    flops = 2 * weights * tokens
    difference = float(np.abs(embedded["overture"] - embedded["st"]).max())
    ours_s, theirs_s = spread(runs["overture"]), spread(runs["sentence-transformers"])
    result = {"checkpoint": args.checkpoint, "texts": len(corpus), "overture": ours_s,
              "sentence_transformers": theirs_s, "ratio": ours_s["median"] / theirs_s["median"],
              "max_abs_difference": difference, "normalized": normalize,
              "overture_tflops": flops * ours_s["median"] / len(corpus) / 1e12,
              "st_pooling": str(getattr(st_pooled[0], "pooling_mode", None)) if st_pooled else None}
    print(f"\n{info['cpu']}, {info['threads']} threads, torch {info['torch']}; "
          f"{len(corpus)} texts, batch {args.batch_size}, mean pooling; texts/s median "
          f"(min-max) of {args.repeats}")
    share = result["overture_tflops"] / info["peak_tflops"]
    print(table(["checkpoint", "overture features", "sentence-transformers encode", "ratio",
                 "max |difference|", "overture TFLOP/s (of peak)"],
                [[args.checkpoint, fmt(ours_s), fmt(theirs_s), f"{result['ratio']:.2f}x",
                  f"{difference:.1e}", f"{result['overture_tflops']:.3f} ({share:.0%})"]]))
    print(f"recorded in {record('features_vs_st', vars(args), [result], info)}")
    return [result]


if __name__ == "__main__":
    cli(main)
