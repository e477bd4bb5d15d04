"""The training loop, one for every family, on Hugging Face Accelerate.

It reads top to bottom: setup (objective, data, models, optimizers, resume) -> loop over
phases and steps -> step (micro-batches, normalised loss, clip, update) -> finish
(checkpoint, evaluation, export). It owns *when*; what is computed belongs to the
objective (overture/objective.py), found by name in overture/registry.py. This module
imports no family.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import (export_final, find_resume_point, load_checkpoint,
                         publish_best_as_final, save_checkpoint)
from .config import ConfigError, Phase, Recipe
from .data.prepare import IndexedDataset
from .objective import Objective, Update
from .optim import build_optimizer, build_scheduler
from .registry import build_objective

log = logging.getLogger(__name__)

# Dense bf16/fp16 peak TFLOP/s of known accelerators, for the MFU estimate.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
               "L4": 121.0, "V100": 125.0, "RTX 4090": 165.0, "A6000": 155.0, "T4": 65.0}


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


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch, a pure function of (seed, epoch): every process
    agrees on it and a resumed run sees the same order.

    With ``lengths`` (group by length), the permutation is cut into groups of
    ``group`` examples and each group is sorted by length, longest first: batches hold
    similar lengths (less padding) and their order stays random.
    """

    def __init__(self, size: int, seed: int, lengths: list[int] | None = None,
                 group: int = 0):
        self.size, self.seed, self.epoch = size, seed, 0
        self.lengths, self.group = lengths, group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is not None:
            order = [i for start in range(0, self.size, self.group)
                     for i in sorted(order[start:start + self.group],
                                     key=lambda i: -self.lengths[i])]
        return iter(order)

    def __len__(self) -> int:
        return self.size


@dataclass
class Trainer:
    """What the loop steps: the objective, its prepared models and one optimizer and
    scheduler per ``Update`` (all keyed by name)."""

    objective: Objective
    models: dict
    updates: list[Update]
    optimizers: dict
    schedulers: dict

    def lr(self) -> float:
        return self.schedulers[self.updates[0].name].get_last_lr()[0]


def setup_trainer(recipe: Recipe, objective: Objective, accelerator) -> Trainer:
    """Models, optimizers and schedulers, prepared by Accelerate (DDP, mixed precision)."""
    from accelerate.utils import set_seed

    cfg = recipe.train
    models = objective.build_models()  # same initial weights on every rank
    set_seed(cfg.seed, device_specific=True)  # but different dropout masks per rank
    for module in objective.frozen_models().values():  # never wrapped, never stepped
        module.requires_grad_(False).eval().to(accelerator.device)
    updates = objective.updates()
    optimizers = {u.name: build_optimizer([models[m] for m in u.models], cfg,
                                          accelerator.device) for u in updates}
    # an update that runs every k-th step takes ceil(total / k) scheduler steps
    schedulers = {u.name: build_scheduler(optimizers[u.name], cfg,
                                          math.ceil(recipe.total_steps / u.every))
                  for u in updates}
    names = list(models)
    prepared = accelerator.prepare(*models.values(), *optimizers.values(),
                                   *schedulers.values())
    if len(names) + 2 * len(updates) == 1:
        prepared = [prepared]
    models = dict(zip(names, prepared[:len(names)]))
    optimizers = dict(zip(optimizers, prepared[len(names):len(names) + len(updates)]))
    schedulers = dict(zip(schedulers, prepared[len(names) + len(updates):]))
    return Trainer(objective, models, updates, optimizers, schedulers)


def train(recipe: Recipe, progress: bool = True) -> Path:
    """Run (or resume) a pretraining recipe; returns the ``final/`` folder."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # ------------------------------------------------------------------ setup
    run_dir = Path(recipe.output_dir)
    # step_scheduler_with_optimizer=False: Accelerate would otherwise step the schedule
    # once per process at every optimizer step; ours counts optimizer steps.
    # Several processes and no GPU (torchrun on CPUs): Accelerate forms the gloo process
    # group only when told the run is on the CPU, as `accelerate launch --cpu` does.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=recipe.train.mixed_precision,
                              log_with=recipe.train.report_to or None,
                              project_dir=str(run_dir), step_scheduler_with_optimizer=False)
    is_main = accelerator.is_main_process
    resume_from = find_resume_point(recipe)
    objective = build_objective(recipe)  # bad inputs fail here, before any folder is made
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(recipe.train.seed)
    with accelerator.main_process_first():  # rank 0 builds the cache, the others reuse it
        first = objective.prepare(recipe.resolved_phases()[0], progress=progress and is_main)
    # epochs and epoch intervals become steps, now that the examples are counted
    recipe = recipe.for_dataset(len(first.train), accelerator.num_processes)
    cfg = recipe.train
    phases = recipe.resolved_phases()
    total_steps = recipe.total_steps
    trainer = setup_trainer(recipe, objective, accelerator)

    state = TrainState()
    if resume_from is not None:
        state = TrainState(**load_checkpoint(accelerator, resume_from))
        log.info("resumed from %s at step %d", resume_from, state.step)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl") if is_main else None
    if cfg.report_to:
        accelerator.init_trackers(recipe.name, config=_flatten(recipe.to_dict()))
    peak = _peak_tflops(cfg.peak_tflops, accelerator.device)
    deadline = time.monotonic() + cfg.max_time * 60 if cfg.max_time else None
    units = UnitCounter(state, accelerator)

    # ------------------------------------------------------------------ loop
    bar = _progress_bar(total_steps, state.step, progress and is_main)
    saved_step = state.step if resume_from is not None else -1
    eval_loader = None
    out_of_time = False
    for phase_index in range(state.phase, len(phases)):
        phase = phases[phase_index]
        phase_end = sum(p.steps for p in phases[:phase_index + 1])
        if state.step >= phase_end:
            continue
        if state.phase != phase_index:  # entering a new phase: its data from the start
            state.phase, state.epoch, state.batch_in_epoch = phase_index, 0, 0
        with accelerator.main_process_first():
            data = objective.prepare(phase, progress=progress and is_main)
        collator = objective.collator(phase)
        train_loader, sampler = _train_loader(data.train, collator, phase, recipe, accelerator)
        eval_loader = _eval_loader(data.eval, objective.collator(phase), phase, recipe,
                                   accelerator)
        micro_batches = _micro_batches(train_loader, sampler, collator, state, accelerator)
        if state.step == 0 and cfg.eval_every:  # the untrained baseline (no RNG drawn)
            _log({"split": "eval", "step": 0,
                  **evaluate(trainer, eval_loader, accelerator, cfg.eval_batches)},
                 metrics_log, accelerator, 0)
        stop_early = False
        interval = Interval(objective, accelerator)
        while state.step < phase_end:
            step_stats = train_step(trainer, micro_batches, accelerator, cfg, state.step)
            state.step += 1
            units.add(step_stats["units"])
            interval.add(step_stats)
            bar.update(1)
            out_of_time = deadline is not None and _all_agree_time_is_up(deadline, accelerator)
            if state.step % cfg.log_every == 0 or state.step == total_steps or out_of_time:
                units.settle()
                record = interval.flush(state, trainer.lr(), peak, phase)
                unit = objective.unit
                bar.set_postfix({"loss": f"{record['loss']:.3f}",
                                 f"{unit}/s": f"{record[f'{unit}_per_s']:,.0f}"})
                _log(record, metrics_log, accelerator, state.step)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps:
                metrics = evaluate(trainer, eval_loader, accelerator, cfg.eval_batches)
                _log({"split": "eval", "step": state.step, **metrics},
                     metrics_log, accelerator, state.step)
                stop_early = _track_best(metrics, state, cfg, accelerator, recipe, trainer)
            out_of_time = out_of_time or stop_early
            if (cfg.save_every and state.step % cfg.save_every == 0) or out_of_time:
                units.settle()
                save_checkpoint(accelerator, recipe, state.step, asdict(state))
                saved_step = state.step
            if out_of_time:
                log.info("%s at step %d", "early stopping" if stop_early else
                         "train.max_time reached", state.step)
                break
        if out_of_time:
            break
    bar.close()

    # ------------------------------------------------------------------ finish
    units.settle()
    if eval_loader is not None:  # draws no RNG: the checkpoint below is unaffected
        metrics = evaluate(trainer, eval_loader, accelerator, cfg.eval_batches)
        _log({"split": "eval", "step": state.step, **metrics}, metrics_log, accelerator,
             state.step)
        _track_best(metrics, state, cfg, accelerator, recipe, trainer)
    # saved again when the last evaluation changed the best-model record
    if saved_step != state.step or (cfg.best_metric and eval_loader is not None):
        save_checkpoint(accelerator, recipe, state.step, asdict(state))
    if cfg.best_metric and state.best_step >= 0:
        final = publish_best_as_final(accelerator, recipe)
        log.info("final/ is the model of step %d (%s %.4f)", state.best_step,
                 cfg.best_metric, state.best_value)
    else:
        final = export_final(accelerator, recipe, objective, trainer.models)
    accelerator.end_training()
    return final


def _track_best(metrics: dict, state: TrainState, cfg, accelerator, recipe,
                trainer: Trainer) -> bool:
    """Keep best/ at the best evaluation so far; True when early stopping is due."""
    if not cfg.best_metric or not metrics:
        return False
    if cfg.best_metric not in metrics:
        raise ConfigError(f"train.best_metric={cfg.best_metric!r} is not an evaluation "
                          f"metric; this objective reports {', '.join(sorted(metrics))}")
    value = metrics[cfg.best_metric]
    better = (state.best_value is None or
              (value > state.best_value if cfg.best_mode == "max" else value < state.best_value))
    if better:
        state.best_value, state.best_step, state.evals_since_best = value, state.step, 0
        export_final(accelerator, recipe, trainer.objective, trainer.models, name="best")
    else:
        state.evals_since_best += 1
    return bool(cfg.early_stopping_patience
                and state.evals_since_best >= cfg.early_stopping_patience)


def train_step(trainer: Trainer, micro_batches: Iterator[dict], accelerator, cfg,
               step: int) -> dict[str, torch.Tensor]:
    """One optimizer step of every due update over ``gradient_accumulation_steps``
    micro-batches.

    Each head's loss is its summed per-target loss divided by the number of targets in
    all micro-batches of all processes, times the process count (DDP averages gradients
    over processes): the gradient equals that of one batch holding everything.
    """
    objective, models = trainer.objective, trainer.models
    batches = [next(micro_batches) for _ in range(cfg.gradient_accumulation_steps)]
    heads = objective.heads
    per_batch = [objective.target_counts(b) for b in batches]
    counts = {h: torch.stack([c[h] for c in per_batch]).sum() for h in heads}
    local = torch.stack([counts[h] for h in heads]).float().to(accelerator.device)
    global_counts = dict(zip(heads, accelerator.reduce(local, "sum")))
    sums: dict[str, torch.Tensor] = {}
    for update in trainer.updates:
        if step % update.every:
            continue
        for module in models.values():  # another update's backward may have left grads
            module.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches):
            with contextlib.ExitStack() as stack:
                if i < len(batches) - 1:  # gradients are all-reduced on the last only
                    for module in models.values():
                        stack.enter_context(accelerator.no_sync(module))
                out = objective.forward(models, batch, update)
                loss = sum(out[f"{h}_loss_sum"] / global_counts[h].clamp(min=1)
                           for h in update.heads)
                accelerator.backward(loss * accelerator.num_processes)
            for key, value in out.items():
                sums[key] = sums.get(key, 0) + value.detach().float()
        params = [p for name in update.models for p in models[name].parameters()]
        if cfg.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        trainer.optimizers[update.name].step()
        trainer.schedulers[update.name].step()
        trainer.optimizers[update.name].zero_grad(set_to_none=True)
    units = torch.stack([torch.as_tensor(objective.count_units(b)) for b in batches]).sum()
    return {**sums, **{f"{h}_count": counts[h].float() for h in heads},
            "units": units.float().to(accelerator.device)}


@torch.no_grad()
def evaluate(trainer: Trainer, loader, accelerator, max_batches: int) -> dict[str, float]:
    """Held-out metrics of every head (and the objective's summary) over
    ``max_batches`` batches."""
    objective, models = trainer.objective, trainer.models
    per_example = getattr(objective, "example_outputs", ())
    for module in models.values():
        module.eval()
    totals: dict[str, torch.Tensor] = {}
    examples: dict[str, list[torch.Tensor]] = {k: [] for k in per_example}
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        out = objective.forward(models, batch, None)
        for key in per_example:  # gathered in order; the shards' padding dropped
            examples[key].append(accelerator.gather_for_metrics(out.pop(key)).cpu())
        counts = {f"{h}_count": c for h, c in objective.target_counts(batch).items()}
        for key, value in {**out, **counts}.items():
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
    """Accumulates step statistics between two log records."""

    def __init__(self, objective, accelerator):
        self.objective, self.accelerator = objective, accelerator
        self.totals: dict[str, torch.Tensor] = {}
        self.started = time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for key, value in stats.items():
            self.totals[key] = self.totals.get(key, 0) + value

    def flush(self, state: TrainState, lr: float, peak_tflops: float | None,
              phase: Phase) -> dict[str, float]:
        keys = sorted(self.totals)
        values = self.accelerator.reduce(torch.stack([self.totals[k] for k in keys]), "sum")
        t = dict(zip(keys, values.tolist()))
        heads = self.objective.heads
        metrics = self.objective.summarize(t, {h: t[f"{h}_count"] for h in heads})
        unit = self.objective.unit
        per_s = t["units"] / (time.perf_counter() - self.started)
        tflops = self.objective.flops_per_unit(phase) * per_s / 1e12
        record = {"split": "train", "step": state.step, **metrics, "lr": lr,
                  f"{unit}_per_s": per_s, "tflops": tflops, f"{unit}_seen": state.units_seen,
                  "seq_len": phase.max_seq_len}
        if peak_tflops:
            record["mfu"] = tflops / (peak_tflops * self.accelerator.num_processes)
        self.totals, self.started = {}, time.perf_counter()
        return record


class MetricsLog:
    """Append-only JSONL metrics file in the run folder (one record per line, flushed)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")


def _log(record: dict, metrics_log: MetricsLog | None, accelerator, step: int) -> None:
    if not record or len(record) <= 2:
        return
    if metrics_log is not None:
        metrics_log.write(record)
    prefix = record.get("split", "train")
    accelerator.log({f"{prefix}/{k}": v for k, v in record.items()
                     if isinstance(v, (int, float)) and k != "step"}, step=step)


def _train_loader(dataset, collator, phase: Phase, recipe: Recipe, accelerator):
    per_step = phase.batch_size * accelerator.num_processes
    if len(dataset) < per_step:
        raise ConfigError(f"only {len(dataset)} training examples, fewer than one batch "
                          f"(train.batch_size={phase.batch_size} x {accelerator.num_processes} "
                          "processes): use a larger corpus or a smaller batch")
    lengths = None
    if recipe.train.group_by_length:
        if "length" not in dataset.column_names:
            raise ConfigError(f"train.group_by_length: objective {recipe.objective.name!r} "
                              "gives its examples no length column; set it to false")
        lengths = dataset["length"]
    sampler = EpochSampler(len(dataset), recipe.train.seed, lengths,
                           group=50 * phase.batch_size * accelerator.num_processes)
    loader = torch.utils.data.DataLoader(
        IndexedDataset(dataset), batch_size=phase.batch_size,
        sampler=sampler, collate_fn=collator,
        drop_last=True, num_workers=recipe.train.num_workers,
        # its own generator, so creating an iterator never draws from the global RNG
        # (which drives dropout and must match between a straight and a resumed run)
        generator=torch.Generator().manual_seed(recipe.train.seed))
    return accelerator.prepare(loader), sampler


def _eval_loader(dataset, collator, phase: Phase, recipe: Recipe, accelerator):
    collator.set_epoch(-1)  # fixed masks: evaluations are comparable across steps
    loader = torch.utils.data.DataLoader(
        IndexedDataset(dataset), batch_size=phase.batch_size, shuffle=False,
        collate_fn=collator, generator=torch.Generator().manual_seed(0))
    return accelerator.prepare(loader)


def _micro_batches(loader, sampler: EpochSampler, collator, state: TrainState,
                   accelerator) -> Iterator[dict]:
    """Endless stream of micro-batches that keeps ``state`` at the data position."""
    while True:
        collator.set_epoch(state.epoch)
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


def _all_agree_time_is_up(deadline: float, accelerator) -> bool:
    """True on every rank once any rank's clock passed the deadline (ranks must stop on
    the same step, or their collectives would not match)."""
    late = torch.tensor(float(time.monotonic() >= deadline), device=accelerator.device)
    return bool(accelerator.reduce(late, "max").item())


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step",
                disable=not enabled, dynamic_ncols=True)


def _peak_tflops(configured: float | None, device: torch.device) -> float | None:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out

