"""Image families on the bundled digits, end to end, with the commands a user runs:

1. `overture pretrain resnet-tiny-digits`: held-out top-1 vs chance (10%), images/s and
   the share of step time spent waiting for data;
2. `overture pretrain simclr-tiny-digits` (labels unused);
3. `overture probe` (logistic regression on frozen features, the recipes' held-out 20%)
   for the same backbone at random init (several seeds), supervised and SimCLR;
4. transfer: a backbone trained on digits 0-4 only, fine-tuned on digits 5-9 (a new
   classifier) with `overture finetune --images`, vs the same architecture from scratch
   (`--random-init`), same budget, several seeds.

usage: python benchmarks/image_evidence.py [--work DIR] [--seeds 3] [--labelled 100]
Writes DIR/evidence.json and prints a Markdown summary. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def overture(*args: str) -> str:
    """Run the overture CLI; its stdout (stderr shown on failure)."""
    done = subprocess.run([sys.executable, "-m", "overture", *args], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.exit(f"overture {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def records(run: Path, split: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def pretrain(recipe: str, run: Path, cache: Path, *overrides: str) -> dict:
    started = time.perf_counter()
    overture("pretrain", recipe, f"output_dir={run}", f"data.cache_dir={cache}", *overrides)
    train = records(run, "train")
    steady = train[1:]  # the first interval includes start-up
    return {"seconds": time.perf_counter() - started, "eval": records(run, "eval")[-1],
            "images_per_s": statistics.fmean(r["images_per_s"] for r in steady),
            "data_wait_fraction": statistics.fmean(r["data_wait_fraction"] for r in steady)}


def probe(checkpoint: Path, cache: Path, *extra: str) -> float:
    out = overture("probe", "--checkpoint", str(checkpoint), "--data", "digits",
                   "--eval-fraction", "0.2", "--cache-dir", str(cache), *extra)
    return json.loads(out)["top1"]


def split_digits(folder: Path) -> tuple[Path, Path]:
    """The bundled digits as two ImageFolder trees: classes 0-4 and classes 5-9."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        half = folder / ("0-4" if label < 5 else "5-9") / str(label)
        half.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), "L").save(
            half / f"{i:04d}.png")
    return folder / "0-4", folder / "5-9"


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/image-evidence")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--labelled", type=int, default=100,
                        help="labelled training images of digits 5-9 for the transfer runs")
    parser.add_argument("--epochs", type=int, default=10, help="transfer budget")
    args = parser.parse_args()
    work = Path(args.work)
    cache = work / "cache"
    result: dict = {}

    result["supervised"] = pretrain("resnet-tiny-digits", work / "supervised", cache)
    result["simclr"] = pretrain("simclr-tiny-digits", work / "simclr", cache)

    seeds = list(range(args.seeds))
    result["probe"] = {
        "random": [probe(work / "supervised", cache, "--random-init", "--seed", str(s))
                   for s in seeds],
        "supervised": probe(work / "supervised", cache),
        "simclr": probe(work / "simclr", cache)}

    low, high = split_digits(work / "digits")
    result["transfer_source"] = pretrain("resnet-tiny-digits", work / "pretrained-0-4", cache,
                                         f"data.source=[{low}]")
    runs: dict[str, list[float]] = {"pretrained": [], "scratch": []}
    for seed in seeds:
        for kind in runs:
            out = overture("finetune", "--checkpoint", str(work / "pretrained-0-4"),
                           "--images", str(high), "--seed", str(seed),
                           *(["--random-init"] if kind == "scratch" else []),
                           f"output_dir={work / f'transfer-{kind}-{seed}'}",
                           f"data.cache_dir={cache}", f"train.epochs={args.epochs}",
                           f"data.max_train_examples={args.labelled}", "train.batch_size=16",
                           "train.best_metric=null")  # the last epoch: no selection on held-out
            runs[kind].append(json.loads(out[out.index("{"):])["top1"])
    result["transfer"] = runs
    (work / "evidence.json").write_text(json.dumps(result, indent=2))

    sup, ssl = result["supervised"], result["simclr"]
    print(f"| run | held-out | images/s | data wait | wall |\n|---|---|---|---|---|\n"
          f"| resnet-tiny-digits | top-1 {100 * sup['eval']['top1']:.1f}% (chance 10%) | "
          f"{sup['images_per_s']:.0f} | {100 * sup['data_wait_fraction']:.0f}% | "
          f"{sup['seconds']:.0f} s |\n"
          f"| simclr-tiny-digits | partner accuracy "
          f"{100 * ssl['eval']['contrastive_accuracy']:.1f}% | "
          f"{ssl['images_per_s']:.0f} | {100 * ssl['data_wait_fraction']:.0f}% | "
          f"{ssl['seconds']:.0f} s |\n")
    p = result["probe"]
    print("| linear probe (digits held-out 20%) | top-1 |\n|---|---|\n"
          f"| random init ({len(seeds)} seeds) | {mean_std(p['random'])} |\n"
          f"| supervised | {100 * p['supervised']:.1f} |\n| SimCLR | {100 * p['simclr']:.1f} |\n")
    print(f"| digits 5-9, {args.labelled} labelled images, {args.epochs} epochs | top-1 "
          f"({len(seeds)} seeds) |\n|---|---|\n"
          f"| fine-tuned from the digits 0-4 backbone | {mean_std(runs['pretrained'])} |\n"
          f"| from scratch | {mean_std(runs['scratch'])} |")


if __name__ == "__main__":
    main()
