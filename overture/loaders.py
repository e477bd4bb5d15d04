"""The training data stream: a seeded per-epoch order shared by every process, loader
workers that live across epochs, and the micro-batch stream that keeps the run's data
position (so that a resume neither replays nor skips a batch)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .config import ConfigError, Phase, Recipe
from .data.prepare import IndexedDataset
from .state import TrainState


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch, a pure function of (seed, epoch): every process
    agrees on it and a resumed run sees the same order.

    With ``lengths`` (group by length), the permutation is cut into groups of
    ``group`` examples and each group is sorted by length, longest first: batches hold
    similar lengths (less padding) and their order stays random. With ``tagged``, each
    index comes as ``epoch * size + index``.
    """

    def __init__(self, size: int, seed: int, lengths: list[int] | None = None,
                 group: int = 0, tagged: bool = False):
        self.size, self.seed, self.epoch = size, seed, 0
        self.lengths, self.group, self.tagged = lengths, group, tagged

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is not None:
            order = [i for start in range(0, self.size, self.group)
                     for i in sorted(order[start:start + self.group],
                                     key=lambda i: -self.lengths[i])]
        if self.tagged:  # epoch * size + index: see IndexedDataset(epoch_tagged=True)
            order = [self.epoch * self.size + i for i in order]
        return iter(order)

    def __len__(self) -> int:
        return self.size


def check_one_batch(examples: int, phase: Phase, processes: int) -> None:
    """Refuse a training set smaller than one batch of every process."""
    if examples < phase.batch_size * processes:
        raise ConfigError(f"only {examples} training examples, fewer than one batch "
                          f"(train.batch_size={phase.batch_size} x {processes} processes): "
                          "use more data or a smaller batch")


def train_loader(dataset, collator, phase: Phase, recipe: Recipe, accelerator):
    check_one_batch(len(dataset), phase, accelerator.num_processes)
    lengths = None
    if recipe.train.group_by_length:
        if "length" not in dataset.column_names:
            raise ConfigError(f"train.group_by_length: objective {recipe.objective.name!r} "
                              "gives its examples no length column; set it to false")
        lengths = dataset["length"]
    sampler = EpochSampler(len(dataset), recipe.train.seed, lengths,
                           group=50 * phase.batch_size * accelerator.num_processes,
                           tagged=True)
    workers = recipe.train.num_workers
    loader = torch.utils.data.DataLoader(
        IndexedDataset(dataset, epoch_tagged=True), batch_size=phase.batch_size,
        sampler=sampler, collate_fn=EpochCollate(collator),
        drop_last=True, num_workers=workers,
        # workers live across epochs (no restart and refill at every epoch); each batch
        # carries its epoch to their copy of the collator (EpochCollate)
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),  # asynchronous host-to-GPU copies
        # its own generator, so creating an iterator never draws from the global RNG
        # (which drives dropout and must match between a straight and a resumed run)
        generator=torch.Generator().manual_seed(recipe.train.seed))
    return accelerator.prepare(loader), sampler


class EpochCollate:
    """The collate function of the training loader: sets the collator's epoch from the
    batch (IndexedDataset(epoch_tagged=True)), then collates."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows: dict) -> dict:
        if "epoch" in rows:
            self.collator.set_epoch(rows.pop("epoch"))
        return self.collator(rows)


def micro_batches(loader, sampler: EpochSampler, state: TrainState,
                   accelerator) -> Iterator[dict]:
    """Endless stream of micro-batches that keeps ``state`` at the data position (each
    batch tells the collator its epoch: EpochCollate)."""
    while True:
        # resume mid-epoch: skip the batches this epoch already consumed (not replayed)
        epoch_loader = (accelerator.skip_first_batches(loader, state.batch_in_epoch)
                        if state.batch_in_epoch else loader)
        epoch_loader.set_epoch(state.epoch)
        # Accelerate's set_epoch does not reach a sampler under SkipBatchSampler and
        # BatchSamplerShard, so the epoch is set on ours directly too.
        sampler.set_epoch(state.epoch)
        for batch in epoch_loader:
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0
