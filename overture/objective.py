"""The objective contract: the engine owns *when*, an objective owns *what*.

The engine (overture/engine.py) runs steps, accumulation, gradient sync, clipping,
optimizer and scheduler steps, logging, evaluation, checkpoints and budgets for any
family. A family is one class satisfying ``Objective`` below, registered by name in
overture/registry.py. Its recipe sections ``model:`` and ``objective:`` are typed by the
dataclasses it names in ``model_config`` and ``objective_config``.

Losses come back as *sums* with target *counts*: the engine divides each head's sum by
its count reduced over all micro-batches and processes, so gradient accumulation and data
parallelism give exactly the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class Update:
    """One optimizer: which models it steps, on which loss heads, how often.

    BERT has one update. A GAN has two: ``Update("discriminator", ("disc",), ("d",))``
    every step and ``Update("generator", ("gen",), ("g",), every=k)``; the engine runs
    them in list order within a step, on the same micro-batches.
    """

    name: str
    models: tuple[str, ...]
    """Keys of ``build_models()`` whose parameters this optimizer steps."""
    heads: tuple[str, ...]
    """Loss heads whose normalised sums are backpropagated in this update."""
    every: int = 1
    """Run on optimizer steps where ``step % every == 0`` (0-based)."""
    options: dict = field(default_factory=dict)
    """The family's optimizer settings for this update (``lr``, ``adam_beta1``, ...: the
    keys of ``overture.config.UpdateOptions``); the recipe's ``train.updates.NAME``
    overrides them, and train's settings fill the rest."""
    with_previous: bool = False
    """Share the previous update's forward and backward: this update's optimizer steps its
    own models on the gradients of the same loss, at the same weights (a text encoder
    trained on the discriminator's loss, with its own lr). Its heads and ``every`` must
    be the previous update's; ``forward`` is called with that update."""

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Update {self.name!r}: every={self.every} must be a positive integer")


def due_groups(updates: list[Update], step: int) -> list[list[Update]]:
    """The updates due at optimizer ``step``, in order, grouped by shared backward: each
    group is an update and the ``with_previous`` ones after it."""
    groups: list[list[Update]] = []
    for i, update in enumerate(updates):
        if update.with_previous:
            leader = updates[i - 1] if i else None
            if leader is None or (leader.heads, leader.every) != (update.heads, update.every):
                raise ValueError(f"Update {update.name!r}: with_previous needs a previous "
                                 "update with the same heads and every")
        if step % update.every:
            continue
        if update.with_previous:
            groups[-1].append(update)
        else:
            groups.append([update])
    return groups


class Collator(Protocol):
    """Turns dataset rows into a batch of tensors; re-seeded per epoch (dynamic masks)."""

    def __call__(self, rows: dict) -> dict[str, torch.Tensor]: ...

    def set_epoch(self, epoch: int) -> None: ...


class Objective(Protocol):
    """What a family gives the engine. Built as ``Family(recipe)``."""

    model_config: ClassVar[type]
    """Dataclass typing the recipe's ``model:`` section."""
    objective_config: ClassVar[type]
    """Dataclass typing the recipe's ``objective:`` section (its ``name`` is the family)."""
    unit: ClassVar[str]
    """What throughput counts: "tokens", "images"."""
    heads: tuple[str, ...]
    """Every loss head ``forward`` reports, e.g. ("mlm", "nsp")."""
    auto_class: ClassVar[str]
    """The transformers Auto class that loads ``final/`` (AutoModelForPreTraining)."""

    def prepare(self, phase, progress: bool = True) -> Any:
        """Cached examples for a phase (``overture.data.prepare.PreparedData``);
        trains or loads the tokenizer / transforms on first call."""

    def build_models(self, vocab_size: int | None = None) -> dict[str, nn.Module]:
        """Trainable modules by name, identically initialised on every rank (each is
        wrapped for DDP/FSDP). ``vocab_size`` overrides the tokenizer's (size estimates)."""

    def frozen_models(self) -> dict[str, nn.Module]:
        """Modules used but never trained (a frozen text encoder): kept out of DDP and of
        every optimizer, moved to the device and put in eval mode by the engine."""

    def updates(self) -> list[Update]:
        """The optimizers and what each steps, in the order they run within a step."""

    def collator(self, phase) -> Collator:
        """Rows -> batch for this phase (masking happens here when it is dynamic)."""

    def forward(self, models: dict[str, nn.Module], batch: dict[str, torch.Tensor],
                update: Update | None) -> dict[str, torch.Tensor]:
        """Summed statistics of one micro-batch: ``<head>_loss_sum`` for the heads of
        ``update`` (every head when ``update`` is None, at evaluation) and any other sums
        to report (``<head>_correct``)."""

    def target_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per head: how many targets its loss sum covers in this micro-batch."""

    def count_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many units of throughput (real tokens, images) this micro-batch holds."""

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        """Metrics from summed statistics and target counts; includes "loss"."""

    # Optional: metrics that are not sums (F1, correlations) need every prediction.
    # ``example_outputs`` names per-example tensors ``forward`` returns at evaluation
    # (update None); the engine gathers them from every process, in order, and
    # ``score(arrays)`` turns them into metrics.
    example_outputs: tuple[str, ...] = ()

    def score(self, examples: dict[str, Any]) -> dict[str, float]:
        """Metrics from the gathered per-example outputs (numpy arrays)."""

    def flops_per_unit(self, phase) -> float:
        """Training FLOPs per unit, for achieved TFLOP/s and MFU."""

    def data_report(self, data, phase) -> dict[str, float]:
        """Statistics of what training will see (``--dry-run``)."""

    # Optional hooks, for what happens around an optimizer step (image families):
    #   stateful(models) -> list: objects with state_dict / load_state_dict saved in every
    #     checkpoint beside the models (an EMA of the weights); called once, on the
    #     unwrapped models, before any resume.
    #   held_parameters(models, step) -> list: parameters not to update at this optimizer
    #     step (a backbone frozen for the first epochs of transfer); their gradients are
    #     dropped before clipping, so neither the optimizer nor weight decay moves them.
    #   after_update(update, step): after ``update``'s optimizer step (the EMA update).
    #   after_evaluate(models, step, run_dir) -> {name: PNG path}: artefacts written after
    #     each evaluation on the main process (a sample grid), also sent to the trackers;
    #     it runs under the evaluation's forked RNG (overture/evaluation.py).
    # ``batch_coupled = True`` says an example's loss depends on the other examples of
    # its micro-batch (contrastive negatives): accumulation then changes the loss.
    batch_coupled: ClassVar[bool] = False
    # ``ddp_options``: keyword arguments of torch's DistributedDataParallel for this
    # family's models (``broadcast_buffers=False`` for a BatchNorm discriminator run
    # several times before one backward, ``find_unused_parameters``), passed through
    # Accelerate's DistributedDataParallelKwargs.
    ddp_options: ClassVar[dict] = {}

    def export(self, models: dict[str, nn.Module], state_dicts: dict[str, dict],
               folder: Path) -> None:
        """Write ``final/`` into ``folder`` in the family's native library format.
        ``models`` are unwrapped; ``state_dicts`` gathered from every shard."""
