"""``python -m benchmarks``: every side-by-side comparison of the performance goals, one
after the other (never two at once: they would share the cores). Each prints its table
and appends a JSON record to benchmarks/results/ (benchmarks/README.md: the latest).

    .venv/bin/python -m benchmarks                       # the whole suite (about an hour on 2 cores)
    .venv/bin/python -m benchmarks --only trainer_pretrain features_vs_st
    .venv/bin/python -m benchmarks --features-checkpoint runs/all-MiniLM-L6-v2

Run one comparison with its own options: ``python -m benchmarks.NAME --help``.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from benchmarks.common import cli

# (name, the arguments of one of its runs) in the suite's order (each script's --help
# lists more); Longformer's Trainer comparison runs on its own 1,024-token inputs
SUITE = [
    ("trainer_pretrain", ["--family", "bert", "roberta", "albert", "gpt",
                          "--size", "128x2", "256x4"]),
    ("trainer_pretrain", ["--family", "longformer", "--size", "128x2", "256x4", "--seq", "1024",
                          "--batch", "4", "--warmup", "5", "--steps", "20"]),
    ("prepare_vs_map", ["--family", "bert", "gpt", "--size-mb", "20"]),
    ("image_vs_loop", []),
    ("longformer_attention", ["--lengths", "4096", "--windows", "64", "128", "256",
                              "--scopes", "layer", "--no-memory", "--repeats", "5"]),
    ("features_vs_st", []),
]
FEATURES_CHECKPOINT = Path("runs/all-MiniLM-L6-v2")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = list(dict.fromkeys(name for name, _ in SUITE))
    parser.add_argument("--only", nargs="+", choices=names, default=names)
    parser.add_argument("--features-checkpoint", default=str(FEATURES_CHECKPOINT),
                        help="the sentence encoder features_vs_st compares on")
    args = parser.parse_args(argv)
    for name, arguments in SUITE:
        if name not in args.only:
            continue
        extra = list(arguments)
        if name == "features_vs_st":
            if not Path(args.features_checkpoint).is_dir():
                print(f"\n## {name}: skipped, no checkpoint at {args.features_checkpoint} "
                      "(--features-checkpoint DIR: a sentence-transformers model folder)")
                continue
            extra += ["--checkpoint", args.features_checkpoint]
        print(f"\n## {name} {' '.join(extra)}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main(extra)


if __name__ == "__main__":
    cli(main)
