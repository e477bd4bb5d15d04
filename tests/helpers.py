"""Test helpers shared by several test files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from overture.config import load_recipe
from overture.registry import build_objective


def prepare(recipe, progress: bool = False, phase: int = 0) -> SimpleNamespace:
    """The family's objective and its prepared examples for ``phase``, in one namespace:
    objective, tokenizer, train, eval, stats, folder."""
    objective = build_objective(recipe)
    data = objective.prepare(recipe.resolved_phases()[phase], progress=progress)
    return SimpleNamespace(objective=objective, tokenizer=objective.tokenizer,
                           train=data.train, eval=data.eval, stats=data.stats,
                           folder=data.folder, data=data)


def records(run_dir: Path, split: str = "train") -> dict[int, dict]:
    """metrics.jsonl records of one split, by step."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == split}


def tiny(family: str, run_dir, cache_dir, corpus, *overrides: str):
    """The family's tiny recipe on ``corpus``, with a shared cache and a small vocabulary."""
    return load_recipe(f"{family}-tiny", [
        f"data.corpus=[{corpus}]", f"data.cache_dir={cache_dir}", f"output_dir={run_dir}",
        "data.num_proc=1", "tokenizer.vocab_size=1024", "tokenizer.min_frequency=1",
        *overrides])


def sgd_step(recipe, objective, batches: list[dict], accelerator):
    """Parameters after one ``train_step`` over ``batches`` (accumulated), from the
    seed-0 initial models, flattened into one vector.

    Plain SGD at lr 1 (new = old - gradient) and no dropout, so any error in the loss
    normalisation (a factor, a double division, local instead of global counts) shows
    in the parameters. Models go through ``accelerator.prepare``: DDP when launched on
    several processes.
    """
    import torch

    from overture.engine import Trainer, train_step

    torch.manual_seed(0)
    models = objective.build_models()
    for module in models.values():
        module.eval()
    updates = objective.updates()
    optimizers = {u.name: torch.optim.SGD(
        [p for m in u.models for p in models[m].parameters()], lr=1.0) for u in updates}
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
                  for name, opt in optimizers.items()}
    models = {name: accelerator.prepare_model(m) for name, m in models.items()}
    cfg = recipe.train
    cfg.gradient_accumulation_steps, cfg.max_grad_norm = len(batches), None
    train_step(Trainer(objective, models, updates, optimizers, schedulers), iter(batches),
               accelerator, cfg, step=0)
    return torch.cat([p.detach().flatten() for m in models.values()
                      for p in accelerator.unwrap_model(m).parameters()])
