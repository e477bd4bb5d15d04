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
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import (export_final, find_resume_point, flatten, is_finished,
                         load_checkpoint, publish_best_as_final, save_checkpoint)
from .config import ConfigError, Phase, Recipe, TrainConfig
from .errors import Interrupted
from .evaluation import Evaluator
from .launch import configure_accelerator, world_size
from .loaders import check_one_batch, micro_batches, train_loader
from .metrics_log import Interval, MetricsLog, UnitCounter, log_record
from .objective import Objective, Update, due_groups
from .optim import build_optimizer, build_scheduler
from .peak import run_peak
from .registry import build_objective, get_family
from .rundir import claim_run_dir
from .state import TrainState
from .stopping import StopSignals, agree_to_stop, count_skips

log = logging.getLogger(__name__)

@dataclass
class Trainer:
    """What the loop steps: the objective, its prepared models and one optimizer and
    scheduler per ``Update`` (all keyed by name)."""

    objective: Objective
    models: dict
    updates: list[Update]
    optimizers: dict
    schedulers: dict

    def lrs(self) -> dict[str, float]:
        """The current learning rate of every update, by name."""
        return {u.name: self.schedulers[u.name].get_last_lr()[0] for u in self.updates}

    def settings(self, cfg: TrainConfig) -> dict[str, TrainConfig]:
        return update_settings(cfg, self.updates)


def update_settings(cfg: TrainConfig, updates: list[Update]) -> dict[str, TrainConfig]:
    """Each update's optimizer settings: train's, the family's ``Update.options``, then
    the recipe's ``train.updates.NAME``."""
    return {u.name: cfg.for_update(u.name, u.options) for u in updates}


def setup_trainer(recipe: Recipe, objective: Objective, accelerator) -> Trainer:
    """Models, optimizers and schedulers, prepared by Accelerate (DDP, mixed precision)."""
    from accelerate.utils import set_seed

    cfg = recipe.train
    if cfg.compile:
        check_compiler(accelerator.device)
    set_seed(cfg.seed)  # the initial weights depend on the seed, not on what preparing drew
    models = objective.build_models()  # same initial weights on every rank
    for module in models.values():  # from_pretrained gives eval mode: no dropout
        module.train()
        if cfg.compile:  # in place: parameter names, state dicts and hooks stay as they are
            module.compile()
    set_seed(cfg.seed, device_specific=True)  # but different dropout masks per rank
    for module in objective.frozen_models().values():  # never wrapped, never stepped
        module.requires_grad_(False).eval().to(accelerator.device)
    updates = objective.updates()  # train.updates' names were checked by build_objective
    settings = update_settings(cfg, updates)
    optimizers = {u.name: build_optimizer([models[m] for m in u.models], settings[u.name],
                                          accelerator.device) for u in updates}
    # an update that runs every k-th step takes ceil(total / k) scheduler steps
    schedulers = {u.name: build_scheduler(optimizers[u.name], settings[u.name],
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


def check_compiler(device: torch.device) -> None:
    """``train.compile`` on a CPU: Inductor writes C++ and needs a compiler; refused in
    one line before any work when it has none (not a traceback at the first step)."""
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as err:  # torch's InvalidCxxCompiler, or the search failing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"train.compile=true: torch.compile builds C++ for the CPU and "
                          f"found no compiler ({first}); install g++ (or point env CXX at "
                          "one), or set train.compile=false") from None


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
                              project_dir=str(run_dir), step_scheduler_with_optimizer=False,
                              kwargs_handlers=ddp_kwargs(get_family(recipe.objective.name)))
    configure_accelerator(accelerator, recipe)  # DeepSpeed: refuse accumulation
    # one run per folder; half-written saves of a crashed run are cleared first
    with claim_run_dir(run_dir, accelerator.is_main_process):
        return _train(recipe, accelerator, progress)


def ddp_kwargs(family: type) -> list:
    """The family's DistributedDataParallel options (``ddp_options``) as Accelerate's
    kwargs handler; none when it declares none."""
    from accelerate.utils import DistributedDataParallelKwargs

    options = getattr(family, "ddp_options", None) or {}
    return [DistributedDataParallelKwargs(**options)] if options else []


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
    # before the models are built and the bar is drawn: the error is the only line
    check_one_batch(len(first.train), phases[0], accelerator.num_processes)
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
        _apply_lr(trainer, cfg)  # a changed train.lr (or an update's) takes effect
        log.info("resumed from %s at step %d", resume_from, state.step)
    # an existing log is cut back to its complete records up to the step resumed from
    # (a fresh start keeps none: a run that died before its first checkpoint starts over)
    metrics_log = (MetricsLog(run_dir / "metrics.jsonl",
                              state.step if resume_from is not None else -1)
                   if is_main else None)
    if cfg.report_to:
        # trackers take scalars only
        accelerator.init_trackers(recipe.name, config={
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in flatten(recipe.to_dict()).items()})
    peak = None
    if is_main:  # only the main process writes records; the others would time GEMMs beside it
        peak, source = run_peak(cfg.peak_tflops, accelerator.device, cfg.mixed_precision)
        if peak is None:
            log.warning("%s", source)
        else:
            log.info("mfu is measured against %.3g TFLOP/s per process (%s)", peak, source)
    deadline = time.monotonic() + cfg.max_time * 60 if cfg.max_time else None
    units = UnitCounter(state, accelerator)
    # the training loss since the last evaluation: its record's train_loss
    since_eval = Interval(objective, accelerator, state.since_eval)
    state.since_eval = None
    evaluator = Evaluator(trainer, accelerator, metrics_log, run_dir)

    # ------------------------------------------------------------------ loop
    bar = _progress_bar(total_steps, state.step, progress and is_main)
    logs_above_bar = _logs_above(bar)
    saved_step = state.step if resume_from is not None else -1
    evaluated_step = -1  # the finish does not evaluate a step the loop just evaluated
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
            loader, epochs = train_loader(data.train, objective.collator(phase), phase,
                                          recipe, accelerator)
            batches = micro_batches(loader, epochs, state)
            evaluator.set_phase(data.eval, objective.collator(phase), phase, recipe)
            if not evaluator.enabled and is_main:  # said once; nothing to evaluate
                where = f" in phase {phase_index}" if len(phases) > 1 else ""
                log.warning("0 held-out examples%s (data.eval_fraction=%s): no evaluation "
                            "is run, the final one included", where,
                            getattr(recipe.data, "eval_fraction", None))
            if state.step == 0 and cfg.eval_every:  # the untrained baseline
                evaluator.run(0)
            stop_early = False
            interval = Interval(objective, accelerator, state.interval)
            state.interval = None
            while state.step < phase_end:
                step_stats = train_step(trainer, batches, accelerator, cfg, state.step)
                state.step += 1
                units.add(step_stats["units"])
                count_skips(step_stats, state, cfg, run_dir)
                interval.add(step_stats)
                since_eval.add(step_stats)
                bar.update(1)
                out_of_time, signalled = agree_to_stop(deadline, stop, accelerator)
                out_of_time = out_of_time or signalled
                # a signalled stop saves the open interval with the checkpoint instead
                if (state.step % cfg.log_every == 0 or state.step == phase_end
                        or (out_of_time and not signalled)):
                    units.settle()
                    record = interval.flush(state, trainer.lrs(), peak, phase)
                    unit = objective.unit
                    bar.set_postfix({"loss": f"{record['loss']:.3f}",
                                     f"{unit}/s": f"{record[f'{unit}_per_s']:,.0f}"})
                    log_record(record, metrics_log, accelerator, state.step)
                eval_due = cfg.eval_every and state.step % cfg.eval_every == 0
                if eval_due and state.step < total_steps and evaluator.enabled:
                    metrics = evaluator.run(state.step, since_eval.train_loss())
                    evaluated_step = state.step
                    stop_early = _track_best(metrics, state, cfg, accelerator, recipe, trainer)
                out_of_time = out_of_time or stop_early
                # the last step is saved below, once the run is marked finished
                save_due = cfg.save_every and state.step % cfg.save_every == 0
                if (save_due and state.step < total_steps) or out_of_time:
                    units.settle()
                    state.interval, state.since_eval = interval.snapshot(), since_eval.snapshot()
                    save_checkpoint(accelerator, recipe, state.step, asdict(state))
                    state.interval = state.since_eval = None
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
        logs_above_bar.close()

    # ------------------------------------------------------------------ finish
    units.settle()
    finishing_eval = evaluator.enabled and evaluated_step != state.step
    if finishing_eval:  # forked RNG: no effect below
        metrics = evaluator.run(state.step, since_eval.train_loss())
        _track_best(metrics, state, cfg, accelerator, recipe, trainer)
    # a run stopped by max_time is not finished: the same command continues it
    state.finished = not (out_of_time and not stop_early and state.step < total_steps)
    # saved again when the last evaluation changed the best-model record, and always for
    # a finished run: a run signalled during its last step saved that step unfinished, and
    # its relaunch must mark it so that a third launch changes nothing
    # saved again after a finishing evaluation too: it reported the training loss since the
    # last one, which the step's in-loop checkpoint still holds (a resume would count twice)
    if saved_step != state.step or state.finished or finishing_eval or (
            cfg.best_metric and evaluator.enabled):
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


def _apply_lr(trainer: Trainer, cfg: TrainConfig) -> None:
    """Loading a checkpoint restores each update's saved peak learning rate; a resume
    with another ``train.lr`` (or ``train.updates.NAME.lr``) rescales that update's
    schedule to its new peak from the current step on."""
    for name, settings in trainer.settings(cfg).items():
        lr = settings.lr
        inner = getattr(trainer.schedulers[name], "scheduler", trainer.schedulers[name])
        if all(base == lr for base in inner.base_lrs):  # Accelerate's wrapper unwrapped
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
    # a head's count enters the statistics once per update that ran on it this step, as
    # its loss sum does: a head stepped every k-th step is not divided by k steps' counts
    ran = {h: 0 for h in heads}
    nonfinite = scaler_skipped = False
    for group in due_groups(trainer.updates, step):
        update = group[0]  # the others step on its backward (Update.with_previous)
        for h in update.heads:
            ran[h] += 1
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
        # a NaN / infinite loss on any process is never applied to the weights; checked
        # before clipping, which would unscale fp16 gradients for a step never taken
        local = torch.stack([sums[f"{h}_loss_sum"] for h in update.heads]).sum()
        bad = torch.logical_not(torch.isfinite(local)).float().reshape(1)
        if accelerator.reduce(bad, "max").item():
            nonfinite = True
            for member in group:
                trainer.optimizers[member.name].zero_grad(set_to_none=True)
            continue
        if hasattr(objective, "held_parameters"):  # frozen this step: not updated at all
            for param in objective.held_parameters(models, step):
                param.grad = None
        for member in group:
            optimizer = trainer.optimizers[member.name]
            params = [p for name in member.models for p in models[name].parameters()]
            if cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            # this optimizer's own flag: Accelerate's optimizer_step_was_skipped ORs every
            # optimizer's, so a generator overflow would count on discriminator-only steps
            scaler_skipped = scaler_skipped or getattr(optimizer, "step_was_skipped", False)
            trainer.schedulers[member.name].step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(objective, "after_update"):
                objective.after_update(member, step)
    units = torch.stack([torch.as_tensor(objective.count_units(b)) for b in batches]).sum()
    return {**sums, **{f"{h}_count": counts[h].float() * ran[h] for h in heads},
            "units": units.float().to(accelerator.device),
            "data_seconds": waited,  # a host float: no device copy per step
            "nonfinite": nonfinite, "scaler_skipped": scaler_skipped}


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step",
                disable=not enabled, dynamic_ncols=True)


def _logs_above(bar) -> contextlib.ExitStack:
    """While the bar is shown, console log lines (a signal's warning, a skipped step) are
    written above it with tqdm.write, not glued onto its line; closed with the bar."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    stack = contextlib.ExitStack()
    console = any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                  for h in logging.getLogger().handlers)
    if not bar.disable and console:
        stack.enter_context(logging_redirect_tqdm())
    return stack
