"""The training data stream: a seeded per-epoch order shared by every process, batches
that run from one epoch into the next through one loader iterator (its workers prefetch
across the epoch's end), and the micro-batch stream that keeps the run's data position
(so that a resume neither replays nor skips a batch)."""

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


class EpochBatches(torch.utils.data.Sampler):
    """The batches of one epoch after another, without end, from a data position on.

    Each epoch is ``order``'s permutation for that epoch cut into batches of
    ``batch_size``, as many as fill whole groups of ``processes`` batches (the rest of the
    epoch dropped): Accelerate's ``BatchSamplerShard`` deals each group out, one batch per
    process, so a group never spans two epochs. That is what a ``BatchSampler`` with
    ``drop_last`` gives per epoch; one stream of every epoch lets one loader iterator
    (and its workers' prefetch) run across the epoch's end, where a fresh iterator per
    epoch waited for its first batch.
    """

    drop_last = True  # read by BatchSamplerShard: only whole groups of batches

    def __init__(self, order: EpochSampler, batch_size: int, processes: int):
        self.order, self.batch_size, self.processes = order, batch_size, processes
        self.per_process = len(order) // (batch_size * processes)
        """Batches of one process in an epoch (the engine's steps_per_epoch counts these)."""
        self.epoch = self.skip = 0

    def start_at(self, epoch: int, batch_in_epoch: int) -> None:
        """Start the next iteration at ``epoch``, after the ``batch_in_epoch`` batches
        of each process already consumed (not replayed)."""
        self.epoch, self.skip = epoch, batch_in_epoch * self.processes

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip, size = self.epoch, self.skip, self.batch_size
        while True:
            self.order.set_epoch(epoch)
            indices = list(self.order)
            for b in range(skip, self.per_process * self.processes):
                yield indices[b * size:(b + 1) * size]
            epoch, skip = epoch + 1, 0


def train_loader(dataset, collator, phase: Phase, recipe: Recipe,
                 accelerator) -> tuple[torch.utils.data.DataLoader, EpochBatches]:
    """The training loader of ``phase`` (prepared by Accelerate) and its batches, which
    ``micro_batches`` starts at the run's data position."""
    check_one_batch(len(dataset), phase, accelerator.num_processes)
    lengths = None
    if recipe.train.group_by_length:
        if "length" not in dataset.column_names:
            raise ConfigError(f"train.group_by_length: objective {recipe.objective.name!r} "
                              "gives its examples no length column; set it to false")
        lengths = dataset["length"]
    order = EpochSampler(len(dataset), recipe.train.seed, lengths,
                         group=50 * phase.batch_size * accelerator.num_processes, tagged=True)
    batches = EpochBatches(order, phase.batch_size, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(
        IndexedDataset(dataset, epoch_tagged=True), batch_sampler=batches,
        # each batch carries its epoch to the workers' copy of the collator (EpochCollate)
        collate_fn=EpochCollate(collator), num_workers=recipe.train.num_workers,
        pin_memory=torch.cuda.is_available(),  # asynchronous host-to-GPU copies
        # its own generator, so creating an iterator never draws from the global RNG
        # (which drives dropout and must match between a straight and a resumed run)
        generator=torch.Generator().manual_seed(recipe.train.seed))
    return accelerator.prepare(loader), batches


class EpochCollate:
    """The collate function of the training loader: sets the collator's epoch from the
    batch (IndexedDataset(epoch_tagged=True)), then collates."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows: dict) -> dict:
        if "epoch" in rows:
            self.collator.set_epoch(rows.pop("epoch"))
        return self.collator(rows)


def micro_batches(loader, batches: EpochBatches, state: TrainState) -> Iterator[dict]:
    """Endless stream of micro-batches that keeps ``state`` at the data position (each
    batch tells the collator its epoch: EpochCollate). One iterator of ``loader`` runs
    through every epoch."""
    batches.start_at(state.epoch, state.batch_in_epoch)
    for batch in loader:
        if state.batch_in_epoch == batches.per_process:  # the epoch's last was consumed
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        state.batch_in_epoch += 1
        yield batch
