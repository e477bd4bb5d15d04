"""The task table: what a classification / regression task is, and every GLUE task.

A ``Task`` says where its texts and label are (in the official GLUE distribution's TSV
files and in the Hub ``glue`` dataset), its label strings (``None`` for regression), the
metrics the leaderboard reports and the name of its submission file.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Split:
    """One file of a task: its name in the task ("dev_matched"), TSV file, Hub split."""

    name: str
    file: str
    hub: str
    labelled: bool = True
    submission: str | None = None
    """Leaderboard file for this split's predictions (test splits only)."""


@dataclass(frozen=True)
class Task:
    """A sentence or sentence-pair task."""

    name: str
    text_columns: tuple[str, ...]
    """One or two text columns (names in the official TSV header)."""
    label_column: str | None
    labels: tuple[str, ...] | None
    """Label strings in model-output order; None: regression (one output)."""
    metrics: tuple[str, ...]
    """Names from ``overture.tasks.metrics.METRICS``; the first picks the best epoch."""
    folder: str = ""
    """Folder of the official distribution ("SST-2")."""
    splits: tuple[Split, ...] = ()
    header: bool = True
    """False: the TSV has no header and ``positions`` names its columns (CoLA)."""
    positions: dict[str, int] = field(default_factory=dict)
    hub_config: str = ""
    hub_columns: tuple[str, ...] = ()
    """The text columns' names in the Hub dataset."""
    id_column: str | None = "index"
    """Column holding the row id the leaderboard expects (test files)."""
    epochs: int = 3
    """Default fine-tuning epochs (more for the small tasks)."""
    predict_with: str | None = None
    """A task without training data predicts with another task's model (AX uses MNLI)."""
    hub_labels: tuple[str, ...] | None = None
    """The label string of each Hub class index, when it differs from ``labels``."""

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def split(self, name: str) -> Split:
        for s in self.splits:
            if s.name == name:
                return s
        raise KeyError(f"task {self.name!r} has no split {name!r}")

    @property
    def dev_splits(self) -> tuple[Split, ...]:
        return tuple(s for s in self.splits if s.name.startswith("dev"))

    @property
    def test_splits(self) -> tuple[Split, ...]:
        return tuple(s for s in self.splits if s.name.startswith("test"))


def _splits(submission: str, dev: tuple[str, ...] = ("dev",), hub_dev=("validation",),
            test: tuple[str, ...] = ("test",), hub_test=("test",),
            submissions: tuple[str, ...] | None = None) -> tuple[Split, ...]:
    subs = submissions or (submission,)
    return (Split("train", "train.tsv", "train"),
            *(Split(d, f"{d}.tsv", h) for d, h in zip(dev, hub_dev)),
            *(Split(t, f"{t}.tsv", h, labelled=False, submission=s)
              for t, h, s in zip(test, hub_test, subs)))


BINARY = ("0", "1")
ENTAILMENT = ("entailment", "not_entailment")
NLI = ("contradiction", "entailment", "neutral")
HUB_NLI = ("entailment", "neutral", "contradiction")  # the Hub dataset's class order

GLUE: dict[str, Task] = {t.name: t for t in [
    # CoLA's train/dev files have no header: source, label, original label, sentence.
    Task("cola", ("sentence",), "label", BINARY, ("matthews_correlation",), "CoLA",
         _splits("CoLA.tsv"), header=False, positions={"sentence": 3, "label": 1},
         hub_config="cola", hub_columns=("sentence",), epochs=10),
    Task("sst2", ("sentence",), "label", BINARY, ("accuracy",), "SST-2",
         _splits("SST-2.tsv"), hub_config="sst2", hub_columns=("sentence",)),
    Task("mrpc", ("#1 String", "#2 String"), "Quality", BINARY, ("f1", "accuracy"), "MRPC",
         _splits("MRPC.tsv"), hub_config="mrpc", hub_columns=("sentence1", "sentence2"),
         epochs=5),
    Task("stsb", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"), "STS-B",
         _splits("STS-B.tsv"), hub_config="stsb", hub_columns=("sentence1", "sentence2"),
         epochs=10),
    Task("qqp", ("question1", "question2"), "is_duplicate", BINARY, ("f1", "accuracy"),
         "QQP", _splits("QQP.tsv"), hub_config="qqp", hub_columns=("question1", "question2"),
         id_column="id"),
    Task("mnli", ("sentence1", "sentence2"), "gold_label", NLI, ("accuracy",), "MNLI",
         _splits("", dev=("dev_matched", "dev_mismatched"),
                 hub_dev=("validation_matched", "validation_mismatched"),
                 test=("test_matched", "test_mismatched"),
                 hub_test=("test_matched", "test_mismatched"),
                 submissions=("MNLI-m.tsv", "MNLI-mm.tsv")),
         hub_config="mnli", hub_columns=("premise", "hypothesis"), hub_labels=HUB_NLI),
    Task("qnli", ("question", "sentence"), "label", ENTAILMENT, ("accuracy",), "QNLI",
         _splits("QNLI.tsv"), hub_config="qnli", hub_columns=("question", "sentence")),
    Task("rte", ("sentence1", "sentence2"), "label", ENTAILMENT, ("accuracy",), "RTE",
         _splits("RTE.tsv"), hub_config="rte", hub_columns=("sentence1", "sentence2"),
         epochs=10),
    Task("wnli", ("sentence1", "sentence2"), "label", BINARY, ("accuracy",), "WNLI",
         _splits("WNLI.tsv"), hub_config="wnli", hub_columns=("sentence1", "sentence2"),
         epochs=10),
    # The diagnostic set: test only, predicted by the MNLI model, not in the GLUE score.
    Task("ax", ("sentence1", "sentence2"), None, NLI, (), "diagnostic",
         (Split("test", "diagnostic.tsv", "test", labelled=False, submission="AX.tsv"),),
         hub_config="ax", hub_columns=("premise", "hypothesis"), predict_with="mnli",
         hub_labels=HUB_NLI, id_column="index"),
]}

# Tasks averaged into the GLUE score (AX is diagnostic only).
SCORED = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


def get_task(name: str) -> Task:
    """A GLUE task by name ("sst2", "SST-2" and "sst-2" all work); unknown names suggest
    the nearest."""
    key = name.lower().replace("-", "")
    if key in GLUE:
        return GLUE[key]
    close = difflib.get_close_matches(key, list(GLUE), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise KeyError(f"unknown task {name!r}{hint}; GLUE tasks: {', '.join(GLUE)}, or a "
                   f"custom task's YAML file")
