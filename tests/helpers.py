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
