"""The training loop, one for every family, on Hugging Face Accelerate.

It reads top to bottom: setup (objective, data, models, optimizers, resume) -> loop over
phases and steps -> step (micro-batches, normalised loss, clip, update) -> finish
(checkpoint, evaluation, export). It owns *when*; what is computed belongs to the
objective (overture/objective.py), found by name in overture/registry.py. This module
imports no family.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import (export_final, find_resume_point, flatten, is_finished,
                         latest_checkpoint, load_checkpoint, publish_best_as_final,
                         save_checkpoint)
from .config import ConfigError, Phase, Recipe
from .data.prepare import IndexedDataset
from .errors import Interrupted, NonFiniteLoss
from .launch import configure_accelerator, world_size
from .metrics_log import MetricsLog
from .objective import Objective, Update
from .optim import build_optimizer, build_scheduler
from .registry import build_objective
from .rundir import claim_run_dir

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
    if hasattr(objective, "stateful"):  # e.g. an EMA: saved and restored with the models
        extra = objective.stateful({n: accelerator.unwrap_model(m) for n, m in models.items()})
        if extra:
            accelerator.register_for_checkpointing(*extra)
    if getattr(objective, "batch_coupled", False) and cfg.gradient_accumulation_steps > 1:
        log.warning("objective %s compares the examples of a micro-batch with each other: "
                    "with train.gradient_accumulation_steps=%d they are compared within "
                    "each micro-batch (of every process), not across the whole step",
                    recipe.objective.name, cfg.gradient_accumulation_steps)
    return Trainer(objective, models, updates, optimizers, schedulers)


def train(recipe: Recipe, progress: bool = True) -> Path:
    """Run (or resume) a pretraining recipe; returns the ``final/`` folder.

    Raises ``ConfigError`` for bad input, ``Interrupted`` after SIGINT / SIGTERM (a
    checkpoint was saved), ``NonFiniteLoss`` when the loss diverges (overture.errors)."""
    from accelerate import Accelerator

    run_dir = Path(recipe.output_dir)
    # step_scheduler_with_optimizer=False: Accelerate would otherwise step the schedule
    # once per process at every optimizer step; ours counts optimizer steps.
    # Several processes and no GPU (torchrun on CPUs): Accelerate forms the gloo process
    # group only when told the run is on the CPU, as `accelerate launch --cpu` does.
    cpu = world_size() > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=recipe.train.mixed_precision,
                              log_with=recipe.train.report_to or None,
                              project_dir=str(run_dir), step_scheduler_with_optimizer=False)
    configure_accelerator(accelerator, recipe)  # DeepSpeed: refuse accumulation
    # one run per folder; half-written saves of a crashed run are cleared first
    with claim_run_dir(run_dir, accelerator.is_main_process):
        return _train(recipe, accelerator, progress)


def _train(recipe: Recipe, accelerator, progress: bool) -> Path:
    from accelerate.utils import set_seed

    # ------------------------------------------------------------------ setup
    run_dir = Path(recipe.output_dir)
    is_main = accelerator.is_main_process
    resume_from = find_resume_point(recipe)
    if resume_from is not None and is_finished(recipe, resume_from):
        if is_main:
            log.info("%s already holds this finished run; final/ is left as it is (raise "
                     "train.max_steps to train further)", run_dir)
        return run_dir / "final"
    objective = build_objective(recipe)  # bad inputs fail here, before any work
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
        if state.step > total_steps:
            raise ConfigError(f"{resume_from} is at step {state.step}, past this recipe's "
                              f"{total_steps} steps: raise train.max_steps (or the phases' "
                              "steps), or give a new output_dir to start another run")
        _resume_layout(state, recipe, phases, accelerator)
        _apply_lr(trainer, cfg.lr)  # a changed train.lr is allowed and takes effect
        log.info("resumed from %s at step %d", resume_from, state.step)
    # an existing log is cut back to its complete records up to the step resumed from
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", state.step) if is_main else None
    if cfg.report_to:
        # trackers take scalars only
        accelerator.init_trackers(recipe.name, config={
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in flatten(recipe.to_dict()).items()})
    peak = _peak_tflops(cfg.peak_tflops, accelerator.device)
    deadline = time.monotonic() + cfg.max_time * 60 if cfg.max_time else None
    units = UnitCounter(state, accelerator)

    # ------------------------------------------------------------------ loop
    bar = _progress_bar(total_steps, state.step, progress and is_main)
    saved_step = state.step if resume_from is not None else -1
    eval_loader = None
    out_of_time = stop_early = False
    stop = StopSignals()
    try:
        for phase_index in range(state.phase, len(phases)):
            phase = phases[phase_index]
            phase_end = sum(p.steps for p in phases[:phase_index + 1])
            if state.step >= phase_end:
                continue
            if state.phase != phase_index:  # entering a new phase: its data from the start
                state.phase, state.epoch, state.batch_in_epoch = phase_index, 0, 0
            state.world_size, state.batch_size = accelerator.num_processes, phase.batch_size
            with accelerator.main_process_first():
                data = objective.prepare(phase, progress=progress and is_main)
            collator = objective.collator(phase)
            train_loader, sampler = _train_loader(data.train, collator, phase, recipe, accelerator)
            eval_loader = _eval_loader(data.eval, objective.collator(phase), phase, recipe,
                                       accelerator)
            if len(data.eval) == 0:  # said once; evaluate() would return nothing
                eval_loader = None
                if is_main:
                    where = f" in phase {phase_index}" if len(phases) > 1 else ""
                    log.warning("0 held-out examples%s (data.eval_fraction=%s): no "
                                "evaluation is run, the final one included", where,
                                getattr(recipe.data, "eval_fraction", None))
            micro_batches = _micro_batches(train_loader, sampler, state, accelerator)
            if state.step == 0 and cfg.eval_every and eval_loader is not None:
                # the untrained baseline (no RNG drawn)
                _log({"split": "eval", "step": 0,
                      **evaluate(trainer, eval_loader, accelerator)},
                     metrics_log, accelerator, 0)
            stop_early = False
            interval = Interval(objective, accelerator, state.interval)
            state.interval = None
            while state.step < phase_end:
                step_stats = train_step(trainer, micro_batches, accelerator, cfg, state.step)
                state.step += 1
                units.add(step_stats["units"])
                _count_skips(step_stats, state, cfg, run_dir)
                interval.add(step_stats)
                bar.update(1)
                out_of_time, signalled = _agree_to_stop(deadline, stop, accelerator)
                out_of_time = out_of_time or signalled
                # a signalled stop saves the open interval with the checkpoint instead
                if (state.step % cfg.log_every == 0 or state.step == phase_end
                        or (out_of_time and not signalled)):
                    units.settle()
                    record = interval.flush(state, trainer.lr(), peak, phase)
                    unit = objective.unit
                    bar.set_postfix({"loss": f"{record['loss']:.3f}",
                                     f"{unit}/s": f"{record[f'{unit}_per_s']:,.0f}"})
                    _log(record, metrics_log, accelerator, state.step)
                eval_due = (cfg.eval_every and state.step % cfg.eval_every == 0
                            and eval_loader is not None)
                if eval_due and state.step < total_steps:
                    metrics = evaluate(trainer, eval_loader, accelerator)
                    _log({"split": "eval", "step": state.step, **metrics},
                         metrics_log, accelerator, state.step)
                    stop_early = _track_best(metrics, state, cfg, accelerator, recipe, trainer)
                out_of_time = out_of_time or stop_early
                # the last step is saved below, once the run is marked finished
                save_due = cfg.save_every and state.step % cfg.save_every == 0
                if (save_due and state.step < total_steps) or out_of_time:
                    units.settle()
                    state.interval = interval.snapshot()
                    save_checkpoint(accelerator, recipe, state.step, asdict(state))
                    state.interval = None
                    saved_step = state.step
                if signalled:
                    raise Interrupted(stop.signum, f"stopped by {signal.Signals(stop.signum).name} "
                                      f"at step {state.step}; checkpoint saved in "
                                      f"{run_dir / 'checkpoints'}; run the same command again "
                                      "to continue")
                if out_of_time:
                    log.info("%s at step %d", "early stopping" if stop_early else
                             "train.max_time reached", state.step)
                    break
            if out_of_time:
                break
    finally:  # also when the loop raises: the bar is closed before the error is printed
        stop.restore()
        bar.close()

    # ------------------------------------------------------------------ finish
    units.settle()
    if eval_loader is not None:  # draws no RNG: the checkpoint below is unaffected
        metrics = evaluate(trainer, eval_loader, accelerator)
        _log({"split": "eval", "step": state.step, **metrics}, metrics_log, accelerator,
             state.step)
        _track_best(metrics, state, cfg, accelerator, recipe, trainer)
    # a run stopped by max_time is not finished: the same command continues it
    state.finished = not (out_of_time and not stop_early and state.step < total_steps)
    # saved again when the last evaluation changed the best-model record
    if saved_step != state.step or (cfg.best_metric and eval_loader is not None):
        save_checkpoint(accelerator, recipe, state.step, asdict(state))
    if cfg.best_metric and state.best_step >= 0:
        final = publish_best_as_final(accelerator, recipe)
        if is_main:
            log.info("final/ is the model of step %d (%s %.4f)", state.best_step,
                     cfg.best_metric, state.best_value)
    else:
        final = export_final(accelerator, recipe, objective, trainer.models)
    accelerator.end_training()
    return final


def _resume_layout(state: TrainState, recipe: Recipe, phases: list[Phase],
                   accelerator) -> None:
    """Re-express a resumed data position for this run's processes and batch size."""
    if state.phase >= len(phases):
        return
    world, batch = accelerator.num_processes, phases[state.phase].batch_size
    if (state.batch_size and (world, batch) != (state.world_size, state.batch_size)
            and recipe.train.group_by_length):
        raise ConfigError(f"train.group_by_length: the length groups depend on processes x "
                          f"batch size, which changed ({state.world_size} x {state.batch_size} "
                          f"-> {world} x {batch}); resume with the original layout")
    state.reshard(world, batch)


def _apply_lr(trainer: Trainer, lr: float) -> None:
    """Loading a checkpoint restores the saved peak learning rate; a resume with another
    ``train.lr`` rescales the schedule to the new peak from the current step on."""
    for scheduler in trainer.schedulers.values():
        inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper
        if all(base == lr for base in inner.base_lrs):
            continue
        inner.base_lrs = [lr] * len(inner.base_lrs)
        for group, fn in zip(inner.optimizer.param_groups, inner.lr_lambdas):
            group["initial_lr"], group["lr"] = lr, lr * fn(inner.last_epoch)
        inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]


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

    An update whose loss is not finite on some process is skipped on all of them (no
    optimizer or scheduler step); the result's ``nonfinite`` says so.
    """
    objective, models = trainer.objective, trainer.models
    waited = time.perf_counter()  # time blocked on the data loader (data_wait_fraction)
    batches = [next(micro_batches) for _ in range(cfg.gradient_accumulation_steps)]
    waited = time.perf_counter() - waited
    heads = objective.heads
    per_batch = [objective.target_counts(b) for b in batches]
    counts = {h: torch.stack([c[h] for c in per_batch]).sum() for h in heads}
    local = torch.stack([counts[h] for h in heads]).float().to(accelerator.device)
    global_counts = dict(zip(heads, accelerator.reduce(local, "sum")))
    sums: dict[str, torch.Tensor] = {}
    nonfinite = scaler_skipped = False
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
        optimizer = trainer.optimizers[update.name]
        # a NaN / infinite loss on any process is never applied to the weights; checked
        # before clipping, which would unscale fp16 gradients for a step never taken
        local = torch.stack([sums[f"{h}_loss_sum"] for h in update.heads]).sum()
        bad = torch.logical_not(torch.isfinite(local)).float().reshape(1)
        if accelerator.reduce(bad, "max").item():
            nonfinite = True
            optimizer.zero_grad(set_to_none=True)
            continue
        if hasattr(objective, "held_parameters"):  # frozen this step: not updated at all
            for param in objective.held_parameters(models, step):
                param.grad = None
        params = [p for name in update.models for p in models[name].parameters()]
        if cfg.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scaler_skipped = scaler_skipped or accelerator.optimizer_step_was_skipped
        trainer.schedulers[update.name].step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(objective, "after_update"):
            objective.after_update(update, step)
    units = torch.stack([torch.as_tensor(objective.count_units(b)) for b in batches]).sum()
    return {**sums, **{f"{h}_count": counts[h].float() for h in heads},
            "units": units.float().to(accelerator.device),
            "data_seconds": waited,  # a host float: no device copy per step
            "nonfinite": nonfinite, "scaler_skipped": scaler_skipped}


@torch.no_grad()
def evaluate(trainer: Trainer, loader, accelerator) -> dict[str, float]:
    """Held-out metrics of every head (and the objective's summary) over the evaluation
    loader (``_eval_loader``), each example counted once whatever the number of
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
            out = _per_example_sums(objective, models, batch, accelerator)
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


def _per_example_sums(objective, models, batch: dict, accelerator) -> dict[str, torch.Tensor]:
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

    def flush(self, state: TrainState, lr: float, peak_tflops: float | None,
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
        record = {"split": "train", "step": state.step, **metrics, "lr": lr,
                  f"{unit}_per_s": per_s, "tflops": tflops, f"{unit}_seen": state.units_seen,
                  "data_wait_fraction": min(waiting, 1.0),
                  **({"seq_len": phase.max_seq_len} if phase.max_seq_len else {}),
                  "nonfinite_steps": state.nonfinite_steps,
                  "scaler_skipped_steps": state.scaler_skipped_steps}
        if peak_tflops:
            record["mfu"] = tflops / (peak_tflops * self.accelerator.num_processes)
        self.totals, self.started = {}, time.perf_counter()
        return record


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
                          "processes): use more data or a smaller batch")
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


def _eval_loader(dataset, collator, phase: Phase, recipe: Recipe, accelerator):
    collator.set_epoch(-1)  # fixed masks: evaluations are comparable across steps
    # the same examples whatever the number of processes: the first eval_batches batches
    dataset = dataset.select(range(min(len(dataset), recipe.train.eval_batches * phase.batch_size)))
    loader = torch.utils.data.DataLoader(
        IndexedDataset(dataset), batch_size=phase.batch_size, shuffle=False,
        collate_fn=collator, generator=torch.Generator().manual_seed(0))
    return accelerator.prepare(loader)


def _micro_batches(loader, sampler: EpochSampler, state: TrainState,
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


def _agree_to_stop(deadline: float | None, stop: StopSignals, accelerator) -> tuple[bool, bool]:
    """(out of time, signalled), the same on every process: true everywhere once any
    process passed the deadline or got a signal (processes must stop on the same step,
    or their collectives would not match)."""
    flags = torch.tensor([float(deadline is not None and time.monotonic() >= deadline),
                          float(stop.signum is not None)], device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")
        if flags[1] and stop.signum is None:  # another process was signalled
            stop.signum = signal.SIGTERM
    return bool(flags[0]), bool(flags[1])


def _count_skips(stats: dict, state: TrainState, cfg, run_dir: Path) -> None:
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

