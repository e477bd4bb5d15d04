"""The training loop, one for every recipe, on Hugging Face Accelerate.

It reads top to bottom: setup (objective, data, model, optimizer, resume) -> loop over
phases and steps -> step (micro-batches, normalised loss, clip, update) -> finish
(checkpoint, evaluation, Hugging Face export).

An objective (see overture.pretrain) supplies: ``prepare(phase)`` (cached examples),
``build_model()`` (a module that takes a collated batch and returns per-head loss sums
``<head>_loss_sum`` and ``<head>_correct``, holding its Hugging Face model at ``.model``),
``collator(phase)``, ``target_counts(batch)``, ``loss_heads()``, ``summarize()`` and
``flops_per_token()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import export_final, find_resume_point, load_checkpoint, save_checkpoint
from .config import Phase, Recipe
from .optim import build_optimizer, build_scheduler

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
    tokens_seen: int = 0


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch, a pure function of (seed, epoch): every process
    agrees on it and a resumed run sees the same order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def train(recipe: Recipe, progress: bool = True) -> Path:
    """Run (or resume) a pretraining recipe; returns the ``final/`` folder."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from overture.pretrain import build_objective

    # ------------------------------------------------------------------ setup
    cfg = recipe.train
    run_dir = Path(recipe.output_dir)
    # step_scheduler_with_optimizer=False: Accelerate would otherwise step the schedule
    # once per process at every optimizer step; ours counts optimizer steps.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              log_with=cfg.report_to or None, project_dir=str(run_dir),
                              step_scheduler_with_optimizer=False)
    is_main = accelerator.is_main_process
    resume_from = find_resume_point(recipe)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    objective = build_objective(recipe)
    phases = recipe.resolved_phases()
    total_steps = recipe.total_steps
    with accelerator.main_process_first():  # rank 0 builds the cache, the others reuse it
        objective.prepare(phases[0], progress=progress and is_main)
    model = objective.build_model()  # same initial weights on every rank
    set_seed(cfg.seed, device_specific=True)  # but different dropout masks per rank
    optimizer = build_optimizer(model, cfg, accelerator.device)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state = TrainState()
    if resume_from is not None:
        state = TrainState(**load_checkpoint(accelerator, resume_from))
        log.info("resumed from %s at step %d", resume_from, state.step)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl") if is_main else None
    if cfg.report_to:
        accelerator.init_trackers(recipe.name, config=_flatten(recipe.to_dict()))
    peak = _peak_tflops(cfg.peak_tflops, accelerator.device)
    deadline = time.monotonic() + cfg.max_time * 60 if cfg.max_time else None

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
        interval = Interval(objective, accelerator)
        while state.step < phase_end:
            step_stats = train_step(model, optimizer, scheduler, micro_batches, objective,
                                    accelerator, cfg)
            state.step += 1
            interval.add(step_stats)
            bar.update(1)
            out_of_time = deadline is not None and _all_agree_time_is_up(deadline, accelerator)
            if state.step % cfg.log_every == 0 or state.step == total_steps or out_of_time:
                record = interval.flush(state, scheduler, peak, phase)
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                tok_s=f"{record['tokens_per_s']:,.0f}")
                _log(record, metrics_log, accelerator, state.step)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < total_steps:
                _log({"split": "eval", "step": state.step,
                      **evaluate(model, eval_loader, objective, accelerator, cfg.eval_batches)},
                     metrics_log, accelerator, state.step)
            if (cfg.save_every and state.step % cfg.save_every == 0) or out_of_time:
                save_checkpoint(accelerator, recipe, state.step, asdict(state))
                saved_step = state.step
            if out_of_time:
                log.info("train.max_time reached at step %d", state.step)
                break
        if out_of_time:
            break
    bar.close()

    # ------------------------------------------------------------------ finish
    if saved_step != state.step:
        save_checkpoint(accelerator, recipe, state.step, asdict(state))
    if eval_loader is not None:
        _log({"split": "eval", "step": state.step,
              **evaluate(model, eval_loader, objective, accelerator, cfg.eval_batches)},
             metrics_log, accelerator, state.step)
    final = export_final(accelerator, recipe, model, objective.tokenizer)
    accelerator.end_training()
    return final


def train_step(model, optimizer, scheduler, micro_batches: Iterator[dict], objective,
               accelerator, cfg) -> dict[str, torch.Tensor]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

    Each head's loss is its summed per-target loss divided by the number of targets in
    all micro-batches of all processes, times the process count (DDP averages gradients
    over processes): the gradient equals that of one batch holding everything.
    """
    batches = [next(micro_batches) for _ in range(cfg.gradient_accumulation_steps)]
    heads = objective.loss_heads()
    counts = {h: torch.stack([objective.target_counts(b)[h] for b in batches]).sum()
              for h in objective.heads}
    local = torch.stack([counts[h] for h in objective.heads]).float().to(accelerator.device)
    global_counts = dict(zip(objective.heads, accelerator.reduce(local, "sum")))
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # Gradients are all-reduced once, on the last micro-batch.
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            out = model(**batch)
            # A head that is off (objective.nsp=false) enters with weight 0: DDP needs a
            # gradient, even a zero one, for every parameter.
            loss = sum(out[f"{h}_loss_sum"] / global_counts[h].clamp(min=1)
                       * (1.0 if h in heads else 0.0) for h in objective.heads)
            accelerator.backward(loss * accelerator.num_processes)
        for key, value in out.items():
            sums[key] = sums.get(key, 0) + value.detach().float()
    if cfg.max_grad_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b["attention_mask"].sum() for b in batches)
    return {**sums, **{f"{h}_count": counts[h].float() for h in objective.heads},
            "tokens": tokens.float().to(accelerator.device)}


@torch.no_grad()
def evaluate(model, loader, objective, accelerator, max_batches: int) -> dict[str, float]:
    """Held-out metrics (MLM / NSP loss and accuracy, perplexity) over ``max_batches``."""
    model.eval()
    keys = [f"{h}_{k}" for h in objective.heads for k in ("loss_sum", "correct")]
    totals = torch.zeros(len(keys) + len(objective.heads), device=accelerator.device)
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        out = model(**batch)
        counts = objective.target_counts(batch)
        totals += torch.stack([out[k].float() for k in keys]
                              + [counts[h].float().to(accelerator.device)
                                 for h in objective.heads])
    model.train()
    totals = accelerator.reduce(totals, "sum").tolist()
    sums = dict(zip(keys, totals))
    counts = dict(zip(objective.heads, totals[len(keys):]))
    if not counts.get(objective.heads[0]):
        return {}
    return objective.summarize(sums, counts)


class Interval:
    """Accumulates step statistics between two log records."""

    def __init__(self, objective, accelerator):
        self.objective, self.accelerator = objective, accelerator
        self.totals: dict[str, torch.Tensor] = {}
        self.started = time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for key, value in stats.items():
            self.totals[key] = self.totals.get(key, 0) + value

    def flush(self, state: TrainState, scheduler, peak_tflops: float | None,
              phase: Phase) -> dict[str, float]:
        keys = sorted(self.totals)
        values = self.accelerator.reduce(torch.stack([self.totals[k] for k in keys]), "sum")
        t = dict(zip(keys, values.tolist()))
        heads = self.objective.heads
        metrics = self.objective.summarize(t, {h: t[f"{h}_count"] for h in heads})
        elapsed = time.perf_counter() - self.started
        state.tokens_seen += int(t["tokens"])
        tokens_per_s = t["tokens"] / elapsed
        tflops = self.objective.flops_per_token(phase.max_seq_len) * tokens_per_s / 1e12
        record = {"split": "train", "step": state.step,
                  "loss": sum(metrics[f"{h}_loss"] for h in self.objective.loss_heads()),
                  **metrics, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s,
                  "tflops": tflops, "tokens_seen": state.tokens_seen,
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
    from overture.pretrain.text.bert import IndexedDataset

    per_step = phase.batch_size * accelerator.num_processes
    if len(dataset) < per_step:
        from .config import ConfigError

        raise ConfigError(f"only {len(dataset)} training examples, fewer than one batch "
                          f"(train.batch_size={phase.batch_size} x {accelerator.num_processes} "
                          "processes): use a larger corpus or a smaller batch")
    sampler = EpochSampler(len(dataset), recipe.train.seed)
    loader = torch.utils.data.DataLoader(
        IndexedDataset(dataset), batch_size=phase.batch_size,
        sampler=sampler, collate_fn=collator,
        drop_last=True, num_workers=recipe.train.num_workers,
        # its own generator, so creating an iterator never draws from the global RNG
        # (which drives dropout and must match between a straight and a resumed run)
        generator=torch.Generator().manual_seed(recipe.train.seed))
    return accelerator.prepare(loader), sampler


def _eval_loader(dataset, collator, phase: Phase, recipe: Recipe, accelerator):
    from overture.pretrain.text.bert import IndexedDataset

    collator.epoch = -1  # fixed masks: evaluations are comparable across steps
    loader = torch.utils.data.DataLoader(
        IndexedDataset(dataset), batch_size=phase.batch_size, shuffle=False,
        collate_fn=collator, generator=torch.Generator().manual_seed(0))
    return accelerator.prepare(loader)


def _micro_batches(loader, sampler: EpochSampler, collator, state: TrainState,
                   accelerator) -> Iterator[dict]:
    """Endless stream of micro-batches that keeps ``state`` at the data position."""
    while True:
        collator.epoch = state.epoch
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

