"""Where one training step's time goes (run by hand, not a test).

Builds a recipe's objective, data and models exactly as ``overture pretrain`` does (the
engine's own setup and ``train_step``), runs --warmup steps, then --steps steps under
torch.profiler, and prints the units per second and ms per step, the top operators by
self CPU time and the host syncs (aten::item) per step.

    .venv/bin/python -m benchmarks.profile_step gpt-tiny train.batch_size=32
    .venv/bin/python -m benchmarks.profile_step bert-tiny data.max_seq_len=128 --rows 30
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

from benchmarks.common import cli, quiet


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    quiet()

    from accelerate import Accelerator

    from overture.config import load_recipe
    from overture.engine import setup_trainer, train_step
    from overture.loaders import micro_batches, train_loader
    from overture.registry import build_objective
    from overture.state import TrainState

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(args.recipe, [f"output_dir={tmp}/run", *args.overrides])
        accelerator = Accelerator(step_scheduler_with_optimizer=False,
                                  mixed_precision=recipe.train.mixed_precision)
        objective = build_objective(recipe)
        phase = recipe.resolved_phases()[0]
        data = objective.prepare(phase, progress=False)
        recipe = recipe.for_dataset(len(data.train), 1)
        trainer = setup_trainer(recipe, objective, accelerator)
        state = TrainState()
        loader, sampler = train_loader(data.train, objective.collator(phase), phase, recipe,
                                       accelerator)
        batches = micro_batches(loader, sampler, state)
        cfg = recipe.train
        for step in range(args.warmup):
            train_step(trainer, batches, accelerator, cfg, step)
        started = time.perf_counter()
        units = 0.0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for step in range(args.warmup, args.warmup + args.steps):
                stats = train_step(trainer, batches, accelerator, cfg, step)
                units += float(stats["units"])
        seconds = time.perf_counter() - started
    print(f"{args.recipe} {' '.join(args.overrides)}: {units / seconds:,.0f} "
          f"{objective.unit}/s under the profiler, {seconds / args.steps * 1e3:.0f} ms/step, "
          f"{torch.get_num_threads()} threads")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    syncs = [e for e in prof.key_averages() if e.key in ("aten::item",
                                                         "aten::_local_scalar_dense")]
    for e in syncs:
        print(f"host syncs {e.key}: {e.count / args.steps:.1f} per step")
    return {"per_s": units / seconds, "ms_per_step": seconds / args.steps * 1e3,
            "syncs_per_step": {e.key: e.count / args.steps for e in syncs}}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    cli(main)
