"""When a run stops early: SIGINT / SIGTERM (after the current step, with a checkpoint),
the time budget, and non-finite losses (skipped within ``train.max_nonfinite_steps``,
otherwise the end of the run). Every process agrees on a stop at the same step."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint
from .errors import NonFiniteLoss
from .state import TrainState

log = logging.getLogger(__name__)


class StopSignals:
    """SIGINT / SIGTERM ask the run to stop after the current step and save a checkpoint.

    A third signal exits at once (saves are atomic, so nothing half-written is ever
    taken for whole). Installed only in the main thread, where Python delivers signals.
    """

    def __init__(self):
        self.signum: int | None = None
        self.received = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received += 1
        self.signum = self.signum or signum
        if self.received == 1:
            log.warning("%s received: stopping after this step and saving a checkpoint "
                        "(send it twice more to quit at once)", signal.Signals(signum).name)
        elif self.received >= 3:
            os._exit(128 + signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def agree_to_stop(deadline: float | None, stop: StopSignals, accelerator) -> tuple[bool, bool]:
    """(out of time, signalled), the same on every process: true everywhere once any
    process passed the deadline or got a signal (processes must stop on the same step,
    or their collectives would not match)."""
    late, signalled = deadline is not None and time.monotonic() >= deadline, stop.signum is not None
    if accelerator.num_processes == 1:  # nothing to agree on: no device copy, no sync
        return late, signalled
    flags = accelerator.reduce(torch.tensor([float(late), float(signalled)],
                                            device=accelerator.device), "max")
    if flags[1] and stop.signum is None:  # another process was signalled
        stop.signum = signal.SIGTERM
    return bool(flags[0]), bool(flags[1])


def count_skips(stats: dict, state: TrainState, cfg, run_dir: Path) -> None:
    """Count the steps skipped for a non-finite loss (stopping past the allowance) and
    the fp16 scaler's skips; a skipped step's sums are kept out of the metrics."""
    nonfinite, scaler = stats.pop("nonfinite"), stats.pop("scaler_skipped")
    state.scaler_skipped_steps += int(scaler)
    if not nonfinite:
        return
    state.nonfinite_steps += 1
    losses = {k: float(v) for k, v in stats.items() if k.endswith("_loss_sum")}
    if state.nonfinite_steps > cfg.max_nonfinite_steps:
        latest = latest_checkpoint(run_dir)
        kept = (f"the last checkpoint, {latest}, is intact" if latest else
                "no checkpoint was saved before it")
        shown = ", ".join(f"{k.removesuffix('_sum')}={v}" for k, v in losses.items())
        raise NonFiniteLoss(f"non-finite loss at step {state.step} ({shown}): the step was not "
                            f"applied and the run stopped; {kept}. Lower train.lr, or allow "
                            "skips with train.max_nonfinite_steps")
    log.warning("step %d: non-finite loss (%s), skipped (%d of train.max_nonfinite_steps=%d)",
                state.step, losses, state.nonfinite_steps, cfg.max_nonfinite_steps)
    for key in list(stats):
        if key not in ("units", "data_seconds"):
            stats[key] = torch.zeros_like(torch.as_tensor(stats[key]))
