"""``metrics.jsonl``: one JSON record per log step and per evaluation, appended by the
main process; read back by ``overture report`` and the tests. The training records are
built here too: ``Interval`` sums a head's statistics between two records, and
``UnitCounter`` counts the units (tokens, images) seen.

A kill -9 or a full disk mid-write can leave a torn last line. Appending to it would glue
the next record onto it, so a run that starts on an existing log first cuts it back to
its complete records, and drops the records past the step it resumes from (those steps
are trained and logged again).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from .atomic import write_text_atomic
from .config import Phase
from .state import TrainState

log = logging.getLogger(__name__)


def read_records(path: Path) -> tuple[list[dict], list[int]]:
    """(the complete records of ``path`` in order, the line numbers of torn lines). A
    line is torn when it is not one JSON object with a "step", or when it is the last
    line and has no newline yet (a write in progress or cut short)."""
    raw = Path(path).read_bytes().decode("utf-8", errors="replace")
    lines = raw.split("\n")  # the last item is "" when the file ends with a newline
    records, torn = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = number == len(lines)  # no newline after it
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if last or not isinstance(record, dict) or not isinstance(record.get("step"), int):
            torn.append(number)
            continue
        records.append(record)
    return records, torn


class MetricsLog:
    """Appends records to ``path`` (one JSON line each, with the wall time)."""

    def __init__(self, path: Path, resume_step: int = 0):
        """Repair an existing ``path`` for a run that continues from ``resume_step`` (0
        for a fresh start): torn lines and records past that step are dropped, and one
        line says so."""
        self.path = Path(path)
        if self.path.is_file():
            self._cut_back(resume_step)

    def _cut_back(self, resume_step: int) -> None:
        records, torn = read_records(self.path)
        kept = [r for r in records if r["step"] <= resume_step]
        dropped = len(records) - len(kept)
        if not torn and not dropped:
            return
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        said = []
        if torn:
            said.append(f"dropped {len(torn)} torn line(s) (line {', '.join(map(str, torn))})")
        if dropped:
            said.append(f"dropped {dropped} record(s) past step {resume_step}, where this "
                        "run continues")
        log.warning("%s: %s; %d complete records kept", self.path, " and ".join(said),
                    len(kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")


class UnitCounter:
    """Counts units every step on the device (no sync), and settles the total across
    processes into ``state.units_seen`` at logs and checkpoints."""

    def __init__(self, state: TrainState, accelerator):
        self.state, self.accelerator = state, accelerator
        self.pending = torch.zeros((), device=accelerator.device)

    def add(self, units: torch.Tensor) -> None:
        self.pending += units

    def settle(self) -> None:
        self.state.units_seen += int(self.accelerator.reduce(self.pending.clone(), "sum"))
        self.pending.zero_()


class Interval:
    """Accumulates step statistics between two log records; ``snapshot`` / ``restored``
    carry them through a checkpoint."""

    def __init__(self, objective, accelerator, restored: dict | None = None):
        self.objective, self.accelerator = objective, accelerator
        self.totals: dict[str, torch.Tensor] = {}
        self.started = time.perf_counter()
        if restored:  # sums over all processes: kept by the main process alone
            main = accelerator.is_main_process
            self.totals = {k: torch.tensor(v if main else 0.0, device=accelerator.device)
                           for k, v in restored["totals"].items()}
            self.started -= restored["seconds"]

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for key, value in stats.items():
            self.totals[key] = self.totals.get(key, 0) + value

    def _stacked(self, keys: list[str]) -> torch.Tensor:
        """The totals of ``keys`` as one tensor on the device (some are host floats)."""
        device = self.accelerator.device
        return torch.stack([torch.as_tensor(self.totals[k], device=device).float()
                            for k in keys])

    def snapshot(self) -> dict | None:
        """The sums so far, reduced over processes (every process must call this)."""
        if not self.totals:
            return None
        keys = sorted(self.totals)
        values = self.accelerator.reduce(self._stacked(keys), "sum")
        return {"totals": dict(zip(keys, values.tolist())),
                "seconds": time.perf_counter() - self.started}

    def train_loss(self) -> float | None:
        """The mean training loss of the steps added since the last call (every head's,
        summed as the train records' ``loss``), reduced over processes; then cleared.
        None when no step was added (every process must call this)."""
        keys = sorted(self.totals)
        if not keys:
            return None
        t = dict(zip(keys, self.accelerator.reduce(self._stacked(keys), "sum").tolist()))
        heads = self.objective.heads
        self.totals, self.started = {}, time.perf_counter()
        return self.objective.summarize(t, {h: t[f"{h}_count"] for h in heads}).get("loss")

    def flush(self, state: TrainState, lrs: dict[str, float], peak_tflops: float | None,
              phase: Phase) -> dict[str, float]:
        keys = sorted(self.totals)
        values = self.accelerator.reduce(self._stacked(keys), "sum")
        t = dict(zip(keys, values.tolist()))
        heads = self.objective.heads
        metrics = self.objective.summarize(t, {h: t[f"{h}_count"] for h in heads})
        unit = self.objective.unit
        seconds = time.perf_counter() - self.started
        per_s = t["units"] / seconds
        tflops = self.objective.flops_per_unit(phase) * per_s / 1e12
        # waits summed over processes: their mean share of the wall time
        waiting = t.get("data_seconds", 0.0) / self.accelerator.num_processes / seconds
        # "lr" is the first update's; with several, each is logged as lr_<update name>
        lr = next(iter(lrs.values()))
        per_update = {f"lr_{name}": value for name, value in lrs.items()} if len(lrs) > 1 else {}
        record = {"split": "train", "step": state.step, **metrics, "lr": lr, **per_update,
                  f"{unit}_per_s": per_s, "tflops": tflops, f"{unit}_seen": state.units_seen,
                  "data_wait_fraction": min(waiting, 1.0),
                  **({"seq_len": phase.max_seq_len} if phase.max_seq_len else {}),
                  "nonfinite_steps": state.nonfinite_steps,
                  "scaler_skipped_steps": state.scaler_skipped_steps}
        if peak_tflops:
            record["mfu"] = tflops / (peak_tflops * self.accelerator.num_processes)
        self.totals, self.started = {}, time.perf_counter()
        return record


def log_record(record: dict, metrics_log: MetricsLog | None, accelerator, step: int) -> None:
    if not record or len(record) <= 2:
        return
    if metrics_log is not None:
        metrics_log.write(record)
    prefix = record.get("split", "train")
    accelerator.log({f"{prefix}/{k}": v for k, v in record.items()
                     if isinstance(v, (int, float)) and k != "step"}, step=step)
