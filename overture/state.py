"""Where a run is: the step, the data position and the counters saved with every
checkpoint, so that a resume continues exactly where the run stopped."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass
class TrainState:
    """Where the run is: saved with every checkpoint, so resume continues the data stream."""

    step: int = 0
    phase: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """Micro-batches of this epoch already consumed (per process)."""
    units_seen: int = 0
    """Units (tokens, images) trained on so far, all processes, counted every step."""
    best_value: float | None = None
    """Best ``train.best_metric`` so far, and the step of that evaluation."""
    best_step: int = -1
    evals_since_best: int = 0
    """Evaluations since the best one (early stopping)."""
    world_size: int = 1
    batch_size: int = 0
    """Processes and per-process micro-batch when saved: a resume on another number of
    processes or batch size re-shards the data position (``reshard``)."""
    finished: bool = False
    """The run reached its last step (or stopped early): re-running it changes nothing."""
    nonfinite_steps: int = 0
    """Steps skipped because the loss was NaN / infinite (train.max_nonfinite_steps)."""
    scaler_skipped_steps: int = 0
    """fp16 steps the loss scaler skipped (overflowing gradients; normal early on)."""
    interval: dict | None = None
    """Sums since the last metrics record, so that the first record after a resume
    averages the same steps as an uninterrupted run would."""
    since_eval: dict | None = None
    """Loss sums since the last evaluation (its record's ``train_loss``), kept the same
    way through a checkpoint."""

    def reshard(self, world_size: int, batch_size: int) -> None:
        """Express the data position in micro-batches of ``batch_size`` on ``world_size``
        processes. Every process takes its own batch from one shared order, so the first
        ``batch_in_epoch * world_size * batch_size`` examples of the epoch are consumed."""
        if not self.batch_size or (world_size, batch_size) == (self.world_size, self.batch_size):
            return
        consumed = self.batch_in_epoch * self.world_size * self.batch_size
        if consumed % (world_size * batch_size):
            raise ConfigError(
                f"cannot resume at this data position with {world_size} process(es) x batch "
                f"{batch_size}: the checkpoint consumed {consumed} examples of the epoch "
                f"({self.world_size} x {self.batch_size} per step), not a multiple of "
                f"{world_size * batch_size}; resume with the original layout, or a batch "
                "layout that divides it")
        self.batch_in_epoch = consumed // (world_size * batch_size)
        self.world_size, self.batch_size = world_size, batch_size
