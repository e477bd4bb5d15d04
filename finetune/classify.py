"""Fine-tuning an encoder checkpoint on a sentence or sentence-pair task (GLUE or a
custom task): sequence classification or regression, as one more objective on the
engine, so it inherits mixed precision, accumulation, exact resume and the contract
tests.

The checkpoint is any transformers folder with a sequence-classification head class
(an overture final/, BERT, RoBERTa, ALBERT, Longformer, ...) or a Hub name;
``objective.init: random`` keeps its architecture and tokenizer but not its weights (the
baseline pretraining is measured against). final/ is a plain transformers folder that
``AutoModelForSequenceClassification`` loads, with the task's label names.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from overture.atomic import COMPLETE, building_dir, publish_dir
from overture.config import Phase, choice, fraction
from overture.errors import ConfigError, first_line
from overture.data.prepare import PreparedData, pad_rows
from overture.data.tokenizer import tokenizer_fingerprint
from overture.objective import Update
from overture.tasks import Rows, Task, load_task
from overture.tasks.metrics import compute, task_score

log = logging.getLogger(__name__)

SMALL_WIDTH = 384
"""Hidden sizes up to this need a larger fine-tuning lr than BERT-base's 2e-5."""
LR_GRID = "overture glue --grid train.lr=2e-5,5e-5,1e-4,3e-4"
"""The learning rates to try, as the warnings say (BERT's paper tried 2e-5 to 5e-5)."""
FORMAT_VERSION = 2  # 2: stats count the squared lengths (the FLOPs of attention)


@dataclass
class ClassifierModelConfig:
    """model: section of a fine-tuning recipe (the architecture is the checkpoint's)."""

    classifier_dropout: float | None = None
    """Dropout before the classification head; null: the checkpoint's setting."""

    def validate(self) -> None:
        if self.classifier_dropout is not None:
            fraction(self, "model", "classifier_dropout")

    def position_limit(self) -> tuple[str, int]:
        # the checkpoint's limit is checked when its tokenizer is loaded (prepare)
        return "max_position_embeddings (of the checkpoint)", 1 << 30


@dataclass
class ClassifyConfig:
    """objective: section of a fine-tuning recipe."""

    name: str = "classify"
    checkpoint: str = ""
    """The model to fine-tune: a final/ folder, a run folder holding one, a transformers
    folder or a Hub model name."""
    init: str = "pretrained"
    """pretrained: the checkpoint's weights; random: its architecture, fresh weights."""
    task: str = "sst2"
    """A GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) or a custom
    task's YAML file."""
    data_dir: str | None = None
    """The official GLUE distribution (holding SST-2/train.tsv, ...); null: the Hub
    dataset ``hub_dataset``."""
    hub_dataset: str = "nyu-mll/glue"
    """Hub name (or local copy) of the GLUE dataset, used when data_dir is null."""
    skip_bad_rows: bool = False
    """Skip and count malformed rows instead of stopping at the first one."""

    def validate(self) -> None:
        choice(self, "objective", "name", ("classify",))
        if not self.checkpoint:
            raise ConfigError("objective.checkpoint is required: a final/ folder, a "
                              "transformers model folder or a Hub model name")
        choice(self, "objective", "init", ("pretrained", "random"))


class ClassifierModule(nn.Module):
    """Training view of a transformers sequence classifier: summed loss, correct count,
    and per-example predictions for the metrics that need them."""

    def __init__(self, model: nn.Module, regression: bool):
        super().__init__()
        self.model, self.regression = model, regression

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            **extra).logits.float()  # [B, C]
        if self.regression:
            predictions = logits[:, 0]  # [B]
            loss = F.mse_loss(predictions, labels.float(), reduction="sum")
            correct = torch.zeros((), device=logits.device)
        else:
            predictions = logits.argmax(-1)  # [B]
            loss = F.cross_entropy(logits, labels, reduction="sum")
            correct = (predictions == labels).sum()
        return {"task_loss_sum": loss, "task_correct": correct,
                "predictions": predictions.detach(), "references": labels}


class ClassifyCollator:
    """Dynamic padding: each batch is padded to its longest row (a multiple of 8)."""

    def __init__(self, pad_id: int, regression: bool):
        self.pad_id, self.regression = pad_id, regression

    def set_epoch(self, epoch: int) -> None:
        pass

    def __call__(self, rows: dict) -> dict[str, torch.Tensor]:
        columns = rows["columns"]
        ids = pad_rows(columns["input_ids"], self.pad_id)  # [B, L]
        lengths = torch.tensor([len(s) for s in columns["input_ids"]])
        batch = {"input_ids": ids,
                 "attention_mask": (torch.arange(ids.shape[1])[None] < lengths[:, None]).long(),
                 "labels": torch.tensor(columns["label"],
                                        dtype=torch.float if self.regression else torch.long),
                 "eval_split": torch.tensor(columns["split"], dtype=torch.long)}
        if "token_type_ids" in columns:
            batch["token_type_ids"] = pad_rows(columns["token_type_ids"], 0)
        return batch


class Classify:
    """The objective contract for sequence classification / regression."""

    model_config = ClassifierModelConfig
    objective_config = ClassifyConfig
    unit: ClassVar[str] = "examples"
    heads = ("task",)
    example_outputs = ("predictions", "references", "eval_split")
    auto_class: ClassVar[str] = "AutoModelForSequenceClassification"

    @staticmethod
    def encoder(checkpoint, **options):
        """An ``overture.features.Encoder`` of a fine-tuned classifier: its encoder's
        features, the classification head dropped."""
        from overture.features import load

        return load(checkpoint, **options)

    def __init__(self, recipe):
        from overture.hub import resolve_checkpoint

        self.recipe = recipe
        obj = recipe.objective
        refuse_image_checkpoint(obj.checkpoint, "objective.checkpoint")
        self.source = load_task(obj.task, obj.data_dir, obj.hub_dataset, obj.skip_bad_rows)
        self.task = self.source.task
        if self.task.predict_with:
            raise ConfigError(f"objective.task={obj.task!r} has no training data; it is "
                              f"predicted by a {self.task.predict_with} model (overture glue "
                              f"does this)")
        for split in (self.task.split("train"), *self.task.dev_splits):
            if not self.source.has(split):
                raise ConfigError(f"task {self.task.name}: {self.source.path(split)} not "
                                  f"found (objective.data_dir={obj.data_dir!r})")
        self.checkpoint = resolve_checkpoint(obj.checkpoint)
        self.tokenizer = None
        self.load_tokenizer()  # a wrong checkpoint is reported now, not after setup
        self.test: dict[str, object] = {}
        """Test splits by name (datasets, with their row ids), after prepare."""
        self.stats: dict = {}
        """The prepared examples' counts (train_examples, train_tokens, ...)."""
        self.shape: tuple[int, int, int] | None = None
        """(layers, hidden, feed-forward width) of the checkpoint, once built."""

    # ------------------------------------------------------------------ data
    def load_tokenizer(self):
        """The checkpoint's tokenizer, once. One without a padding token (GPT-2 style)
        pads with its end-of-text token, which final/ saves as its pad token so that the
        exported classifier takes padded batches in plain transformers."""
        if self.tokenizer is None:
            from overture.hub import load_tokenizer

            tok = load_tokenizer(self.checkpoint, "objective.checkpoint")
            if tok.pad_token is None and tok.eos_token is not None:
                tok.pad_token = tok.eos_token
            self.tokenizer = tok
        return self.tokenizer

    def max_length(self) -> int:
        limit = self.load_tokenizer().model_max_length
        return limit if limit < 1_000_000 else 512

    def prepare(self, phase: Phase, progress: bool = True) -> PreparedData:
        """Tokenized train / dev / test rows, cached by the task files, the tokenizer and
        max_seq_len."""
        import datasets

        tok = self.load_tokenizer()
        if phase.max_seq_len > self.max_length():
            raise ConfigError(f"data.max_seq_len={phase.max_seq_len} exceeds the checkpoint's "
                              f"limit of {self.max_length()} tokens")
        key = {"format": FORMAT_VERSION, "task": asdict(self.task),
               "files": self.source.fingerprint(), "tokenizer": tokenizer_fingerprint(tok),
               "max_seq_len": phase.max_seq_len,
               "skip_bad_rows": self.recipe.objective.skip_bad_rows}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()
                                ).hexdigest()[:16]
        folder = self.recipe.data.resolved_cache_dir / "finetune" / digest
        if not (folder / COMPLETE).exists():
            self._build(folder, phase.max_seq_len)
        stats = json.loads((folder / "stats.json").read_text())
        self.stats = stats
        load = lambda name: datasets.Dataset.from_file(str(folder / f"{name}.arrow"))  # noqa: E731
        for split in self.task.test_splits:
            if (folder / f"{split.name}.arrow").exists():
                self.test[split.name] = load(split.name)
        return PreparedData(folder=folder, train=load("train"), eval=load("dev"), stats=stats)

    def _build(self, folder: Path, max_len: int) -> None:
        with building_dir(folder) as tmp:
            stats: Counter = Counter()
            ids: dict[str, list[str]] = {}
            devs = self.task.dev_splits
            if not devs:
                raise ConfigError(f"task {self.task.name!r} has no dev split to evaluate on")
            parts = {"train": [self.task.split("train")], "dev": list(devs)}
            parts.update({s.name: [s] for s in self.task.test_splits})
            for name, splits in parts.items():
                tables = []
                for index, split in enumerate(splits):
                    if not split.labelled and not self.source.has(split):
                        continue  # a test split may be absent (the dev sets are enough)
                    rows = self.source.read(split)
                    tables.append(self._encode(rows, index, max_len, stats, name))
                    ids[split.name] = rows.ids
                    stats[f"{name}_skipped"] += rows.skipped
                if not tables:
                    continue
                table = pa.concat_tables(tables)
                if name in ("train", "dev") and table.num_rows == 0:
                    raise ConfigError(f"task {self.task.name!r}: the {name} split has no rows")
                _write_arrow(tmp / f"{name}.arrow", table)
                stats[f"{name}_examples"] = table.num_rows
            stats["eval_examples"] = stats["dev_examples"]
            (tmp / "ids.json").write_text(json.dumps(ids))
            (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
            (tmp / COMPLETE).write_text("")
            publish_dir(tmp, folder, replace=False)
        if stats["train_truncated"]:
            log.info("%d of %d training examples were truncated to %d tokens",
                     stats["train_truncated"], stats["train_examples"], max_len)

    def _encode(self, rows: Rows, split_index: int, max_len: int, stats: Counter,
                name: str) -> pa.Table:
        tok = self.tokenizer
        columns = list(zip(*rows.texts)) or [(), ()][:len(self.task.text_columns)]
        first, second = (list(columns[0]), list(columns[1]) if len(columns) > 1 else None)
        enc = tok(first, second, truncation=False, verbose=False)
        long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > max_len]
        stats[f"{name}_truncated"] += len(long)
        if long:  # only the rows that need it are encoded again, cut by the tokenizer
            cut = tok([first[i] for i in long],
                      None if second is None else [second[i] for i in long],
                      truncation=True, max_length=max_len)
            for key in enc:
                for i, value in zip(long, cut[key]):
                    enc[key][i] = value
        lengths = [len(ids) for ids in enc["input_ids"]]
        stats[f"{name}_tokens"] += sum(lengths)
        stats[f"{name}_tokens_squared"] += sum(n * n for n in lengths)
        regression = self.task.is_regression
        # unlabelled (test) rows: NaN, or the index cross-entropy ignores
        labels = [(np.nan if regression else -100) if y is None else y for y in rows.labels]
        if not regression:
            for y in labels:
                stats[f"{name}_label_{y}"] += 1
        data = {"input_ids": pa.array(enc["input_ids"], pa.list_(pa.int32())),
                "label": pa.array(labels, pa.float32() if regression else pa.int64()),
                "length": pa.array([len(x) for x in enc["input_ids"]], pa.int32()),
                "split": pa.array([split_index] * len(rows), pa.int8()),
                "row": pa.array(range(len(rows)), pa.int64())}
        if "token_type_ids" in enc:
            data["token_type_ids"] = pa.array(enc["token_type_ids"], pa.list_(pa.int8()))
        return pa.table(data)

    def collator(self, phase: Phase) -> ClassifyCollator:
        tok = self.load_tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return ClassifyCollator(pad, self.task.is_regression)

    # ------------------------------------------------------------------ model
    def build_models(self, vocab_size: int | None = None) -> dict[str, nn.Module]:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        task = self.task
        labels = task.labels or ("score",)
        try:
            config = AutoConfig.from_pretrained(
                self.checkpoint, num_labels=task.num_labels,
                id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
                problem_type=("regression" if task.is_regression
                              else "single_label_classification"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"objective.checkpoint={self.recipe.objective.checkpoint!r}: "
                              f"cannot load it ({first_line(err)})") from err
        hidden = config.hidden_size
        self.shape = (config.num_hidden_layers, hidden,
                      getattr(config, "intermediate_size", None)
                      or getattr(config, "n_inner", None) or 4 * hidden)
        if hidden <= SMALL_WIDTH and self.recipe.train.lr <= 3e-5 and _main_process():
            log.warning("train.lr=%g is BERT-base's; a model %d wide barely moves at it in a "
                        "few epochs: try 1e-4 or more, or a grid: %s", self.recipe.train.lr,
                        hidden, LR_GRID)
        if self.recipe.model.classifier_dropout is not None:
            config.classifier_dropout = self.recipe.model.classifier_dropout
        if config.pad_token_id is None:  # GPT-style classifiers find the last real token
            config.pad_token_id = self.load_tokenizer().pad_token_id
        meta = torch.empty(0).device.type == "meta"  # size estimates: no weights to read
        if self.recipe.objective.init == "random" or meta:
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            from overture.hub import load_pretrained

            try:  # one INFO line ("cls.* unused; classifier.* new"), not the LOAD REPORT
                model = load_pretrained(AutoModelForSequenceClassification, self.checkpoint,
                                        config=config)
            except OSError as err:  # no weights file, or an unreadable one
                raise ConfigError(f"objective.checkpoint={self.recipe.objective.checkpoint!r}:"
                                  f" cannot load its weights ({first_line(err)})") from None
        return {"model": ClassifierModule(model, task.is_regression)}

    def frozen_models(self) -> dict[str, nn.Module]:
        return {}

    def updates(self) -> list[Update]:
        return [Update("model", ("model",), self.heads)]

    def forward(self, models, batch, update) -> dict[str, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels",
                                         "token_type_ids") if k in batch}
        out = models["model"](**inputs)
        if update is not None:  # training: sums only
            del out["predictions"], out["references"]
        else:
            out["eval_split"] = batch["eval_split"]
        return out

    def target_counts(self, batch) -> dict[str, torch.Tensor]:
        return {"task": torch.tensor(len(batch["labels"]), device=batch["labels"].device)}

    def count_units(self, batch) -> torch.Tensor:
        return torch.tensor(len(batch["labels"]))

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        n = max(counts.get("task", 0.0), 1.0)
        out = {"task_loss": sums["task_loss_sum"] / n}
        if not self.task.is_regression:
            out["task_accuracy"] = sums["task_correct"] / n
        out["loss"] = out["task_loss"]
        return out

    def score(self, examples: dict[str, np.ndarray]) -> dict[str, float]:
        """The task's official metrics on every dev split, and "score" (their mean, as
        the leaderboard counts the task; MNLI: the mean of matched and mismatched)."""
        return score_splits(self.task, examples["predictions"], examples["references"],
                            examples["eval_split"])

    def flops_per_unit(self, phase: Phase) -> float:
        """Training FLOPs of the mean training example: per token 6 x the layers'
        weights (Kaplan et al. 2020), plus attention over the example's own length T
        (12 x layers x hidden x T per token), so 6 N E[T] + 12 L H E[T^2]; the
        embeddings and the classifier are left out, as for pretraining. 0 before the
        model is built or the examples counted."""
        examples = self.stats.get("train_examples", 0)
        if self.shape is None or not examples:
            return 0.0
        from overture.pretrain.text.common import transformer_flops_per_token

        mean_tokens = self.stats["train_tokens"] / examples
        mean_squared = self.stats.get("train_tokens_squared", 0) / examples
        # per token at length E[T^2] / E[T], times E[T] tokens: 6 N E[T] + 12 L H E[T^2]
        return transformer_flops_per_token(*self.shape, mean_squared / mean_tokens) * mean_tokens

    def data_report(self, data, phase: Phase) -> dict[str, float]:
        stats = data.stats
        train = max(stats["train_examples"], 1)
        report = {"train_examples": stats["train_examples"],
                  "eval_examples": stats["dev_examples"],
                  "test_examples": sum(stats.get(f"{s.name}_examples", 0)
                                       for s in self.task.test_splits),
                  "truncated_fraction": stats.get("train_truncated", 0) / train,
                  "mean_tokens": stats.get("train_tokens", 0) / train,
                  "skipped_rows": stats.get("train_skipped", 0)}
        for i, label in enumerate(self.task.labels or ()):
            report[f"label_{label}"] = stats.get(f"train_label_{i}", 0) / train
        return report

    def export(self, models: dict[str, nn.Module], state_dicts: dict[str, dict],
               folder: Path) -> None:
        """final/: the transformers classifier (safetensors, label names) + tokenizer."""
        state = {k.removeprefix("model."): v for k, v in state_dicts["model"].items()}
        models["model"].model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        self.load_tokenizer().save_pretrained(folder)


def _main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def refuse_image_checkpoint(checkpoint: str, option: str) -> None:
    """An image (timm / torchvision) checkpoint is fine-tuned on images, not on a task:
    say so at once (it has no tokenizer to load)."""
    from overture.pretrain.image.models import final_folder, is_image_checkpoint

    if is_image_checkpoint(final_folder(Path(str(checkpoint)))):
        raise ConfigError(f"{option} {checkpoint}: an image checkpoint (timm / torchvision) "
                          "has no tokenizer; fine-tune it on labelled images with "
                          "--images DIR instead of --task")


def score_splits(task: Task, predictions, references, splits) -> dict[str, float]:
    """Metrics per dev split; with several (MNLI), each prefixed by its name and the
    unprefixed metric is their mean."""
    devs = task.dev_splits
    per_split = []
    for index, split in enumerate(devs):
        keep = splits == index
        per_split.append(compute(task.metrics, predictions[keep], references[keep]))
    out: dict[str, float] = {}
    if len(devs) > 1:
        for split, metrics in zip(devs, per_split):
            out.update({f"{split.name}_{k}": v for k, v in metrics.items()})
    for name in task.metrics:
        out[name] = float(np.mean([m[name] for m in per_split]))
    out["score"] = task_score(out, task.metrics)
    return out


def _write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
