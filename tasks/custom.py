"""Custom tasks declared in a small YAML file.

```yaml
name: reviews
train: reviews/train.csv        # .csv .tsv .jsonl .parquet; paths relative to this file
dev: reviews/dev.csv
test: reviews/test.csv          # optional, unlabelled or labelled
text_columns: [title, body]     # one or two
label_column: stars
type: classification            # or regression
labels: ["1", "2", "3", "4", "5"]   # optional: the sorted labels of train
metrics: [accuracy, f1]         # optional: accuracy (classification), pearson + spearman
```
A row with more fields than the header, a missing field or an unknown label is an error
naming the file and line; ``skip_bad_rows: true`` skips and counts such rows instead.
TSV files have no quoting (a ``"`` is text, as in the GLUE files); CSV files use CSV
quoting. Files are UTF-8 (a byte-order mark is allowed).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from overture.config import ConfigError, choice_value, from_dict

from .glue import Rows, TaskDataError, parse_label
from .metrics import METRICS
from .table import Split, Task

FORMATS = (".csv", ".tsv", ".jsonl", ".parquet")


@dataclass
class CustomTaskConfig:
    """A custom task's YAML file, field for field."""

    name: str
    train: str
    dev: str
    text_columns: list[str]
    label_column: str
    test: str | None = None
    type: str = "classification"
    """classification or regression."""
    labels: list[str] | None = None
    """Label strings in output order; null: the sorted distinct labels of train."""
    metrics: list[str] = field(default_factory=list)
    """Metric names; empty: accuracy (classification) or pearson, spearman (regression)."""
    id_column: str | None = None
    skip_bad_rows: bool = False

    def validate(self, where: str) -> None:
        if not 1 <= len(self.text_columns) <= 2:
            raise ConfigError(f"{where}: text_columns must name one or two columns, "
                              f"got {self.text_columns}")
        choice_value(f"{where}: type", self.type, ("classification", "regression"))
        for name in self.metrics:
            choice_value(f"{where}: metrics", name, tuple(METRICS))
        for split in ("train", "dev", "test"):
            path = getattr(self, split)
            if path is not None and Path(path).suffix.lower() not in FORMATS:
                raise ConfigError(f"{where}: {split}: {path!r} is not one of "
                                  f"{', '.join(FORMATS)}")


@dataclass
class CustomTask:
    """A loaded custom task: its config (paths resolved) and its ``Task``."""

    config: CustomTaskConfig
    task: Task

    def read(self, split: str) -> Rows:
        """The rows of ``train``, ``dev`` or ``test``."""
        return read_rows(Path(getattr(self.config, split)), self.task,
                         labelled=split != "test", skip_bad_rows=self.config.skip_bad_rows,
                         what=f"task {self.config.name}: {split}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self.config), sort_keys=False)


def load_custom_task(path: Path | str) -> CustomTask:
    """Read and check a custom task's YAML; paths inside it are relative to it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the task file ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a task file is a mapping of keys (name, train, ...)")
    required = [f.name for f in dataclasses.fields(CustomTaskConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in raw]
    if missing:
        raise ConfigError(f"{path}: missing keys {missing}")
    config = from_dict(CustomTaskConfig, raw, str(path))
    config.validate(str(path))
    for split in ("train", "dev", "test"):
        value = getattr(config, split)
        if value is not None:
            setattr(config, split, str((path.parent / value).resolve()))
    regression = config.type == "regression"
    labels = None if regression else tuple(config.labels or _distinct_labels(config))
    metrics = tuple(config.metrics) or (("pearson", "spearman") if regression
                                        else ("accuracy",))
    splits = (Split("train", config.train, "train"), Split("dev", config.dev, "dev"),
              *([Split("test", config.test, "test", labelled=False)] if config.test else []))
    task = Task(config.name, tuple(config.text_columns), config.label_column, labels,
                metrics, splits=splits, id_column=config.id_column)
    return CustomTask(config, task)


def _distinct_labels(config: CustomTaskConfig) -> list[str]:
    # malformed rows are left to read_rows, which names them (or skips and counts them)
    seen = {str(row[config.label_column]).strip()
            for _, row, problem in _records(Path(config.train), "train")
            if not problem and isinstance(row, dict)
            and row.get(config.label_column) not in (None, "")}
    return sorted(seen)


def iter_records(path: Path, what: str = "task file") -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a CSV / TSV / JSONL / Parquet file; ``where`` is
    "file:line" (or "file: row N" for Parquet). A row that cannot be read (more fields
    than the header) is an error naming the file and line."""
    for where, record, problem in _records(path, what):
        if problem:
            raise TaskDataError(f"{where}: {problem}")
        yield where, record


def _records(path: Path, what: str) -> Iterator[tuple[str, object, str | None]]:
    """(where, row, problem) for each row; ``problem`` says why a row is malformed (the
    caller raises it, or skips and counts the row), None for a good row.

    TSV has no quoting: a ``"`` is text and every line is one row, as in the GLUE files
    (MRPC's sentences start with quotes). CSV keeps its quoting. A UTF-8 byte-order mark
    is not part of the first header name or JSON line; UTF-16 and binary files are
    refused at once."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise TaskDataError(f"{path}: no such file")
    if suffix in (".csv", ".tsv", ".jsonl"):
        from overture.data.corpus import check_text_file

        check_text_file(path, what)
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            if suffix == ".tsv":
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.reader(f)
            try:
                header = next(reader, [])
                for row in reader:
                    where = f"{path}:{reader.line_num}"
                    if not any(cell.strip() for cell in row):
                        continue
                    if len(row) > len(header):
                        tab = " (a tab inside a text?)" if suffix == ".tsv" else ""
                        yield where, {}, (f"{len(row)} fields, expected {len(header)}{tab}")
                        continue
                    # a short row lacks its last fields: they are missing, not empty
                    yield where, dict(zip(header, row)), None
            except csv.Error as e:
                raise TaskDataError(f"{path}:{reader.line_num}: not valid "
                                    f"{suffix[1:].upper()} ({e})") from None
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield f"{path}:{number}", json.loads(line), None
                    except json.JSONDecodeError as e:
                        raise TaskDataError(f"{path}:{number}: not JSON ({e.msg})") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"{path}: row {number}", row, None
    else:
        raise TaskDataError(f"{path}: unsupported format (use {', '.join(FORMATS)})")


def read_rows(path: Path, task: Task, labelled: bool = True,
              skip_bad_rows: bool = False, what: str = "task file") -> Rows:
    """A custom task file -> Rows. Rows with more fields than the header, missing or
    empty text / label fields and unknown labels are errors naming the file and line, or
    skipped and counted. ``what`` names the file in a "not a text file" error."""
    rows = Rows(source=str(path))
    wanted = [*task.text_columns, *([task.label_column] if labelled else [])]
    for where, record, problem in _records(path, what):
        try:
            if problem:
                raise TaskDataError(f"{where}: {problem}")
            if not isinstance(record, dict):
                raise TaskDataError(f"{where}: not a JSON object ({type(record).__name__})")
            missing = [c for c in wanted if record.get(c) is None or str(record[c]) == ""]
            if missing:
                raise TaskDataError(f"{where}: missing field {missing[0]!r}")
            label = parse_label(task, record[task.label_column], where) if labelled else None
        except TaskDataError:
            if not skip_bad_rows:
                raise
            rows.skipped += 1
            continue
        id_ = str(record[task.id_column]) if task.id_column in record else str(len(rows))
        rows.append(id_, tuple(str(record[c]) for c in task.text_columns), label)
    if rows.skipped:
        print(f"{path}: skipped {rows.skipped} malformed rows", file=sys.stderr)
    return rows
