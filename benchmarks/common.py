"""What every benchmark shares: quiet libraries, the machine description, alternating
runs, median / min-max tables and the JSON record appended to benchmarks/results/."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def quiet() -> None:
    """No library warnings or progress bars in a benchmark's table."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "accelerate", "overture", "timm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def machine() -> dict:
    """The device, the CPU, the thread count and the library versions."""
    import torch

    import accelerate
    import transformers

    from overture.peak import cpu_model, measured_peak

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info["peak_tflops"], info["peak_source"] = measured_peak(device, remeasure=True)
    return info


def alternate(sides: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every side once per round, ``repeats`` rounds (A B A B ...: a slow spell of the
    machine hits both); each call returns the figure measured."""
    results: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            results[name].append(run())
    return results


def spread(values: list[float]) -> dict:
    """Median, min and max of a list of runs."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def fmt(stats: dict, digits: int = 0) -> str:
    """``median (min-max)``."""
    return (f"{stats['median']:,.{digits}f} ({stats['min']:,.{digits}f}-"
            f"{stats['max']:,.{digits}f})")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def source_version() -> dict | None:
    """The commit of the code measured, and whether its tracked files (the recorded
    results aside) differ from that commit; None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": bool(changed)}


def record(name: str, settings: dict, results: list[dict], info: dict | None = None) -> Path:
    """Append one JSON line (the benchmark, its settings, the code's commit, the machine,
    the results) to benchmarks/results/NAME.jsonl; returns the file."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.jsonl"
    line = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": source_version(), "machine": info or machine(), "settings": settings,
            "results": results}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return path


def engine_run(recipe, steps: int, warmup: int, run_dir: Path) -> dict:
    """Train ``recipe`` with overture's engine for ``warmup + steps`` steps in
    ``run_dir`` (emptied first); from its metrics records after ``warmup``: units per
    second, mean MFU and TFLOP/s, and the share of time spent waiting for data."""
    import dataclasses
    import shutil

    from overture.engine import train
    from overture.metrics_log import read_records
    from overture.registry import get_family

    unit = get_family(recipe.objective.name).unit
    shutil.rmtree(run_dir, ignore_errors=True)
    # a record at the last warm-up step: no warm-up (compiling) step is timed
    log_every = math.gcd(warmup, recipe.train.log_every) or recipe.train.log_every
    run = dataclasses.replace(recipe, output_dir=str(run_dir), train=dataclasses.replace(
        recipe.train, max_steps=warmup + steps, log_every=log_every))
    train(run, progress=False)
    records = [r for r in read_records(run_dir / "metrics.jsonl")[0] if r.get("split") == "train"]
    units = seconds = waited = 0.0
    previous = 0
    mfu, tflops = [], []
    for r in records:
        seen = r[f"{unit}_seen"]
        if r["step"] > warmup:
            span = (seen - previous) / r[f"{unit}_per_s"]
            units, seconds = units + seen - previous, seconds + span
            waited += r["data_wait_fraction"] * span
            mfu.append(r["mfu"])
            tflops.append(r["tflops"])
        previous = seen
    return {"per_s": units / seconds, "mfu": sum(mfu) / len(mfu),
            "tflops": sum(tflops) / len(tflops),
            "data_wait_fraction": waited / seconds}


def cli(main: Callable[[], object]) -> None:
    """Run a benchmark's ``main`` from the command line: a bad input (overture's
    ConfigError: a missing checkpoint, an unknown recipe key) is one line on stderr and
    exit 2, as with ``overture``."""
    import sys

    from overture.errors import ConfigError

    try:
        main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
