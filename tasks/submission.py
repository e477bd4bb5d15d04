"""Test-split predictions in the GLUE leaderboard's submission format: one TSV per task
(CoLA.tsv, SST-2.tsv, ..., MNLI-m.tsv, MNLI-mm.tsv, AX.tsv) with the header
``index<TAB>prediction``; label strings as in the official files (0/1, entailment, ...),
STS-B scores clipped to [0, 5]."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from overture.atomic import write_text_atomic

from .table import Split, Task


def prediction_strings(task: Task, predictions) -> list[str]:
    """Model outputs (class indices, or scores for regression) -> the leaderboard's
    strings."""
    predictions = np.asarray(predictions)
    if task.is_regression:
        return [f"{v:.3f}" for v in np.clip(predictions.astype(float), 0.0, 5.0)]
    return [task.labels[int(i)] for i in predictions]


def write_submission(folder: Path | str, task: Task, split: Split, ids: list[str],
                     predictions) -> Path:
    """Write one task's test predictions as ``folder/<submission file>``; returns it."""
    if split.submission is None:
        raise ValueError(f"{task.name}:{split.name} has no leaderboard file")
    lines = ["index\tprediction"]
    lines += [f"{i}\t{p}" for i, p in zip(ids, prediction_strings(task, predictions),
                                           strict=True)]
    path = Path(folder) / split.submission
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
