"""`overture report RUN_DIR`: PNG curves of loss, learning rate and throughput."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .atomic import atomic_file
from .config import ConfigError
from .metrics_log import read_records

# Panels in this order: the loss, the learning rate, throughput (<unit>_per_s), each head's
# loss and accuracy (<head>_loss / <head>_accuracy), perplexity, image top-1 / top-5, the
# share of time waiting for data.
FIRST = ("loss", "lr")
LAST = ("perplexity", "top1", "top5", "alignment", "data_wait_fraction")


def read_metrics(run_dir: Path) -> dict[str, dict[int, dict]]:
    """Records of metrics.jsonl by split then step; a later record for the same step
    (written after a resume) replaces the earlier one. Torn lines (a run killed
    mid-write) are skipped and named on stderr."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path}: no metrics log here; is {run_dir} a run folder?")
    records, torn = read_records(path)
    if torn:
        print(f"{path}: skipped torn line(s) {', '.join(map(str, torn))} (a run stopped "
              "mid-write); the next run on this folder removes them", file=sys.stderr)
    by_split: dict[str, dict[int, dict]] = {}
    for record in records:
        by_split.setdefault(record.get("split", "train"), {})[record["step"]] = record
    return by_split


def _panels(by_split: dict) -> list[tuple[str, str]]:
    """(metric key, title) of every plottable metric the log holds, in a stable order."""
    # an eval record's train_loss repeats the train records' loss (averaged between
    # evaluations): the loss panel already draws it
    keys = {k for records in by_split.values() for r in records.values() for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "train_loss"}
    middle = sorted(k for k in keys if k.endswith("_per_s")) + sorted(
        k for k in keys if k.endswith(("_loss", "_accuracy")))
    ordered = [k for k in (*FIRST, *middle, *LAST) if k in keys]
    titles = {"lr": "learning rate"}
    return [(k, titles.get(k, k.replace("_per_s", " / s").replace("_", " "))) for k in ordered]


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    """Draw every known metric against the step into one PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_split = read_metrics(run_dir)
    panels = _panels(by_split)
    if not panels:
        raise ConfigError(f"{run_dir}/metrics.jsonl holds no metric to plot")
    output = _output_path(run_dir, output)  # before drawing: a bad path is one line
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for split, records in sorted(by_split.items()):
            points = sorted((s, r[key]) for s, r in records.items() if key in r)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if split == "eval" else None, markersize=3,
                        label=split)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(Path(run_dir).resolve().name)
    fig.tight_layout()
    try:
        with atomic_file(output) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    except OSError as err:  # e.g. the disk filled up while writing
        raise ConfigError(f"{output}: cannot write the report ({err.strerror or err})"
                          ) from err
    finally:
        plt.close(fig)
    return output


def _output_path(run_dir: Path, output: Path | str | None) -> Path:
    """The report's path: ``output`` (its missing parent folders are created, as for
    every file overture writes) or RUN_DIR/report.png. A folder, or a place that cannot
    be written (a parent that is a file, no permission), is refused in one line."""
    path = Path(output) if output else Path(run_dir) / "report.png"
    name = f"--output {path}" if output else str(path)
    if path.is_dir():
        raise ConfigError(f"{name} is a folder; give a file path (e.g. {path / 'report.png'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{name}: cannot create its folder {path.parent} "
                          f"({err.strerror or err}); choose another path") from err
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: cannot write into {path.parent} (permission denied); "
                          "choose another path")
    return path
