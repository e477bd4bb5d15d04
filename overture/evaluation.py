"""Evaluation on held-out examples: every head's loss and the objective's metrics, each
example counted once whatever the number of processes.

An evaluation runs under ``torch.random.fork_rng``: drawing noise or masks at evaluation
never changes the training stream, so a run with evaluations, one without and a resumed
one train alike. An objective may write artefacts after each evaluation (a sample grid)
with the optional hook ``after_evaluate(models, step, run_dir) -> {name: PNG path}``; it
runs on the main process and the images also go to the trackers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import Phase, Recipe
from .data.prepare import IndexedDataset
from .metrics_log import MetricsLog, log_record

log = logging.getLogger(__name__)


def eval_size(recipe: Recipe, phase: Phase) -> int:
    """Held-out examples per evaluation: ``train.eval_examples``, or ``train.eval_batches``
    batches of the phase."""
    cfg = recipe.train
    if cfg.eval_examples is not None:
        return cfg.eval_examples
    return cfg.eval_batches * phase.batch_size


def eval_loader(dataset, collator, phase: Phase, recipe: Recipe, accelerator):
    """The first ``eval_size`` held-out examples in order, sharded over the processes
    (the same examples whatever their number)."""
    collator.set_epoch(-1)  # fixed masks: evaluations are comparable across steps
    dataset = dataset.select(range(min(len(dataset), eval_size(recipe, phase))))
    loader = torch.utils.data.DataLoader(
        IndexedDataset(dataset), batch_size=phase.batch_size, shuffle=False,
        collate_fn=collator, generator=torch.Generator().manual_seed(0))
    return accelerator.prepare(loader)


class Evaluator:
    """Evaluates the trainer's models at a step and logs the record: the held-out loader
    of the current phase, the metrics log, and the objective's ``after_evaluate``."""

    def __init__(self, trainer, accelerator, metrics_log: MetricsLog | None, run_dir: Path):
        self.trainer, self.accelerator = trainer, accelerator
        self.metrics_log, self.run_dir = metrics_log, Path(run_dir)
        self.loader = None

    def set_phase(self, dataset, collator, phase: Phase, recipe: Recipe) -> None:
        """The held-out examples of a phase; none (an empty set) turns evaluation off."""
        self.loader = (eval_loader(dataset, collator, phase, recipe, self.accelerator)
                       if len(dataset) else None)

    @property
    def enabled(self) -> bool:
        return self.loader is not None

    def run(self, step: int, train_loss: float | None = None) -> dict[str, float]:
        """Metrics at ``step`` (logged as an "eval" record, with ``train_loss``: the mean
        training loss since the previous evaluation), with the training RNG untouched;
        then the objective's artefacts."""
        if self.loader is None:
            return {}
        accelerator, objective = self.accelerator, self.trainer.objective
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            metrics = evaluate(self.trainer, self.loader, accelerator)
            trained = {} if train_loss is None else {"train_loss": train_loss}
            log_record({"split": "eval", "step": step, **metrics, **trained},
                       self.metrics_log, accelerator, step)
            if hasattr(objective, "after_evaluate") and accelerator.is_main_process:
                models = {n: accelerator.unwrap_model(m) for n, m in self.trainer.models.items()}
                for module in models.values():
                    module.eval()
                try:
                    with torch.no_grad():
                        images = objective.after_evaluate(models, step, self.run_dir) or {}
                finally:
                    for module in models.values():
                        module.train()
                _log_images(accelerator, images, step)
        return metrics


def _log_images(accelerator, images: dict[str, Path], step: int) -> None:
    """PNG artefacts to the trackers that take images (TensorBoard, W&B, ...)."""
    if not images or not accelerator.trackers:
        return
    import numpy as np
    from PIL import Image

    arrays = {name: np.asarray(Image.open(path).convert("RGB")) for name, path in images.items()}
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):
            continue
        if tracker.name == "tensorboard":  # a batch of one image, height x width x channels
            tracker.log_images({k: v[None] for k, v in arrays.items()}, step=step,
                               dataformats="NHWC")
        elif tracker.name in ("aim", "clearml"):  # these take one image per name
            tracker.log_images(arrays, step=step)
        else:
            tracker.log_images({k: [v] for k, v in arrays.items()}, step=step)


@torch.no_grad()
def evaluate(trainer, loader, accelerator) -> dict[str, float]:
    """Held-out metrics of every head (and the objective's summary) over the evaluation
    loader (``eval_loader``), each example counted once whatever the number of
    processes."""
    objective, models = trainer.objective, trainer.models
    per_example = getattr(objective, "example_outputs", ())
    for module in models.values():
        module.eval()
    totals: dict[str, torch.Tensor] = {}
    examples: dict[str, list[torch.Tensor]] = {k: [] for k in per_example}
    for batch in loader:
        if accelerator.num_processes > 1 and accelerator.gradient_state.end_of_dataloader:
            # Accelerate completes the last batch of every process with copies of the
            # first examples; per-example sums let gather_for_metrics drop them.
            out = per_example_sums(objective, models, batch, accelerator)
        else:
            out = objective.forward(models, batch, None)
            out.update({f"{h}_count": c for h, c in objective.target_counts(batch).items()})
        for key in per_example:  # gathered in order; the shards' padding dropped
            examples[key].append(accelerator.gather_for_metrics(out.pop(key)).cpu())
        for key, value in out.items():
            totals[key] = totals.get(key, 0) + value.detach().float().to(accelerator.device)
    for module in models.values():
        module.train()
    if not totals:
        return {}
    keys = sorted(totals)
    values = dict(zip(keys, accelerator.reduce(torch.stack([totals[k] for k in keys]),
                                               "sum").tolist()))
    heads = objective.heads
    if not values.get(f"{heads[0]}_count"):
        return {}
    metrics = objective.summarize(values, {h: values[f"{h}_count"] for h in heads})
    if per_example:
        metrics.update(objective.score({k: torch.cat(v).numpy() for k, v in examples.items()}))
    return metrics


def per_example_sums(objective, models, batch: dict, accelerator) -> dict[str, torch.Tensor]:
    """Sums and target counts of ``batch`` one example at a time, gathered over processes
    without Accelerate's padding copies; the totals land on the main process only (the
    caller reduces by sum)."""
    size = len(next(iter(batch.values())))
    rows = []
    for i in range(size):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        out = objective.forward(models, one, None)
        out.update({f"{h}_count": c for h, c in objective.target_counts(one).items()})
        rows.append(out)
    per_example = set(getattr(objective, "example_outputs", ()))
    result = {}
    for key in rows[0]:
        if key in per_example:  # the caller gathers these itself
            result[key] = torch.cat([r[key] for r in rows])
            continue
        stacked = torch.cat([r[key].detach().float().reshape(1, -1) for r in rows])
        total = accelerator.gather_for_metrics(stacked).sum()
        result[key] = total if accelerator.is_main_process else torch.zeros_like(total)
    return result
