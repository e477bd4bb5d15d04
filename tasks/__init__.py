"""Task definitions for fine-tuning and evaluation: the GLUE table (``table.py``), its
metrics (``metrics.py``), loaders for the official distribution and the Hub
(``glue.py``), custom tasks in YAML (``custom.py``) and leaderboard files
(``submission.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from overture.config import ConfigError

from .glue import Rows, TaskDataError, read_glue_split, read_hub_split
from .table import GLUE, SCORED, Split, Task, get_task

__all__ = ["GLUE", "SCORED", "Rows", "Split", "Task", "TaskDataError", "TaskSource",
           "get_task", "load_task"]


@dataclass
class TaskSource:
    """A task and where its rows come from: a custom task's files, the official GLUE
    distribution under ``data_dir``, or the Hub dataset ``hub_dataset``."""

    task: Task
    data_dir: str | None = None
    hub_dataset: str = "nyu-mll/glue"
    skip_bad_rows: bool = False
    custom: bool = False

    def read(self, split: Split) -> Rows:
        """The rows of one split."""
        if self.custom:
            from .custom import read_rows

            return read_rows(Path(split.file), self.task, labelled=split.labelled,
                             skip_bad_rows=self.skip_bad_rows,
                             what=f"task {self.task.name}: {split.name}")
        if self.data_dir:
            return read_glue_split(self.data_dir, self.task, split, self.skip_bad_rows)
        return read_hub_split(self.task, split, self.hub_dataset)

    def path(self, split: Split) -> Path | None:
        """The file of a split (None for the Hub)."""
        if self.custom:
            return Path(split.file)
        if self.data_dir:
            return Path(self.data_dir) / self.task.folder / split.file
        return None

    def has(self, split: Split) -> bool:
        path = self.path(split)
        return path is None or path.is_file()

    def fingerprint(self) -> list:
        """Identity of the task's files (path, size, mtime), or of the Hub source."""
        out = []
        for split in self.task.splits:
            path = self.path(split)
            if path is None:
                out.append([self.hub_dataset, self.task.hub_config, split.hub])
            elif path.is_file():
                st = path.stat()
                out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        return out


def load_task(spec: str, data_dir: str | None = None, hub_dataset: str = "nyu-mll/glue",
              skip_bad_rows: bool = False) -> TaskSource:
    """A GLUE task by name, or a custom task from its YAML file."""
    if str(spec).endswith((".yaml", ".yml")):
        from .custom import load_custom_task

        custom = load_custom_task(spec)
        return TaskSource(custom.task, skip_bad_rows=skip_bad_rows or custom.config.skip_bad_rows,
                          custom=True)
    try:
        task = get_task(spec)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    return TaskSource(task, data_dir, hub_dataset, skip_bad_rows)
