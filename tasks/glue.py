"""Loading task rows: the official GLUE distribution (TSV files), the Hub ``glue``
dataset, and the rows' common form."""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

from overture.config import ConfigError

from .table import Split, Task


class TaskDataError(ConfigError):
    """A task file that cannot be read as declared; the message names file and line."""


@dataclass
class Rows:
    """One split of a task: ids, one or two texts per row, labels (class index, float
    for regression, None when unlabelled)."""

    ids: list[str] = field(default_factory=list)
    texts: list[tuple[str, ...]] = field(default_factory=list)
    labels: list = field(default_factory=list)
    skipped: int = 0
    """Rows skipped as malformed (only when the caller asked to skip them)."""
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, id_: str, texts: tuple[str, ...], label) -> None:
        self.ids.append(id_)
        self.texts.append(texts)
        self.labels.append(label)


def parse_label(task: Task, value, where: str):
    """A label field -> class index (classification) or float (regression)."""
    value = str(value).strip()
    if task.is_regression:
        try:
            return float(value)
        except ValueError:
            raise TaskDataError(f"{where}: label {value!r} is not a number") from None
    if value not in task.labels:
        raise TaskDataError(f"{where}: label {value!r} is not one of {list(task.labels)}")
    return task.labels.index(value)


def read_glue_split(data_dir: Path | str, task: Task, split: Split,
                    skip_bad_rows: bool = False) -> Rows:
    """One split of the official GLUE distribution: ``DATA_DIR/<folder>/<file>``.

    Fields are tab-separated with no quoting (sentences contain ``"``); every row must
    have the header's number of fields. CoLA's train / dev files have no header.
    """
    path = Path(data_dir) / task.folder / split.file
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file (task {task.name}, split "
                                f"{split.name}); --data-dir should hold {task.folder}/")
    rows = Rows(source=str(path))
    labelled = split.labelled and task.label_column is not None
    # utf-8-sig: a byte-order mark would otherwise start the first column's name
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.header or not split.labelled:
            header = next(reader, None) or []
            columns = {name: i for i, name in enumerate(header)}
            width = len(header)
        else:  # positions are given; the widest row decides the width
            columns = dict(task.positions)
            width = None
        wanted = [*task.text_columns, *([task.label_column] if labelled else [])]
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise TaskDataError(f"{path}:1: header lacks {missing} (has {list(columns)})")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                if width is None:
                    width = max(columns.values()) + 1
                if len(row) != width:
                    raise TaskDataError(f"{where}: {len(row)} fields, expected {width}")
                label = (parse_label(task, row[columns[task.label_column]], where)
                         if labelled else None)
            except TaskDataError:
                if not skip_bad_rows:
                    raise
                rows.skipped += 1
                continue
            id_ = (row[columns[task.id_column]] if task.id_column in columns
                   else str(len(rows)))
            rows.append(id_, tuple(row[columns[c]] for c in task.text_columns), label)
    if rows.skipped:
        print(f"{path}: skipped {rows.skipped} malformed rows", file=sys.stderr)
    return rows


def read_hub_split(task: Task, split: Split, source: str = "nyu-mll/glue") -> Rows:
    """One split of the Hub ``glue`` dataset (``source`` may be a local copy of it)."""
    from datasets import load_dataset

    data = load_dataset(source, task.hub_config, split=split.hub)
    hub_labels = task.hub_labels or task.labels
    rows = Rows(source=f"{source}:{task.hub_config}:{split.hub}")
    for i, example in enumerate(data):
        label = example.get("label")
        if label is None or label == -1 or not split.labelled:
            label = None
        elif task.is_regression:
            label = float(label)
        else:
            label = task.labels.index(hub_labels[int(label)])
        rows.append(str(example.get("idx", i)),
                    tuple(example[c] for c in task.hub_columns), label)
    return rows
