"""Checkpoints: atomic full-state saves, resume discovery, Hugging Face export.

A checkpoint is written to ``step-NNNNNN.tmp``, completed with a ``COMPLETE`` marker, then
published as ``step-NNNNNN`` (overture.atomic): a folder without its marker (a crash
mid-save) is never used.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from .atomic import COMPLETE, fresh_tmp_dir, publish_dir
from .config import ConfigError, Recipe

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
RECIPE_FILE = "recipe.yaml"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoints_dir(run_dir)
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / COMPLETE).is_file():
                found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def find_resume_point(recipe: Recipe) -> Path | None:
    """Where this run continues from, per ``train.resume``; refuses to silently start
    over a run that exists."""
    run_dir = Path(recipe.output_dir)
    resume = recipe.train.resume
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise ConfigError(f"train.resume={resume!r}: not a complete checkpoint "
                              f"(no {COMPLETE} marker)")
        _check_compatible(recipe, path)
        return path
    latest = latest_checkpoint(run_dir)
    if resume == "auto" and latest is not None:
        _check_compatible(recipe, latest)
        return latest
    if latest is not None or (run_dir / "final").exists():
        raise ConfigError(f"output_dir={str(run_dir)!r} already holds a run; continue it with "
                          "train.resume=auto, or choose another output_dir")
    return None


def _check_compatible(recipe: Recipe, checkpoint: Path) -> None:
    import yaml

    saved = yaml.safe_load((checkpoint / RECIPE_FILE).read_text())
    current = recipe.to_dict()
    for section, key in (("objective", "name"), ("model", None)):
        before, now = saved.get(section) or {}, current[section]
        if key:
            before, now = before.get(key, "bert"), now[key]
        if before != now:
            raise ConfigError(
                f"{checkpoint}: was trained with a different {section} "
                f"{'section' if key is None else key} than this recipe's; resume needs the "
                "same (set train.resume=never and a new output_dir to start afresh)")


def save_checkpoint(accelerator, recipe: Recipe, step: int, train_state: dict) -> Path:
    """Save the full training state (model, optimizer, scheduler, scaler, RNG, data
    position) atomically, then keep only the newest ``train.keep_last``."""
    folder = checkpoints_dir(Path(recipe.output_dir)) / f"step-{step:06d}"
    tmp = folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        # made before the barrier: every rank writes its RNG state into it, and
        # Accelerate creates it on the main process only (a race otherwise)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=2))
        (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
        (tmp / COMPLETE).write_text("")
        publish_dir(tmp, folder)  # a re-save of the same step replaces it once whole
        for old in complete_checkpoints(Path(recipe.output_dir))[:-recipe.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(accelerator, folder: Path) -> dict:
    """Restore the full training state; returns the saved train state (step, data position)."""
    accelerator.load_state(str(folder))
    return json.loads((Path(folder) / TRAIN_STATE).read_text())


def export_final(accelerator, recipe: Recipe, objective, models: dict,
                 name: str = "final") -> Path:
    """Write ``OUTPUT_DIR/final`` (or ``name``) in the family's native format
    (``objective.export``) plus the resolved recipe, replacing an older one only once the
    new one is whole."""
    final = Path(recipe.output_dir) / name
    # get_state_dict gathers FSDP / DeepSpeed shards: every rank takes part
    state_dicts = {name: accelerator.get_state_dict(m) for name, m in models.items()}
    if accelerator.is_main_process:
        tmp = fresh_tmp_dir(final)
        unwrapped = {name: accelerator.unwrap_model(m) for name, m in models.items()}
        objective.export(unwrapped, state_dicts, tmp)
        (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
        publish_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def publish_best_as_final(accelerator, recipe: Recipe) -> Path:
    """final/ becomes a copy of best/ (the best evaluation's export), published whole."""
    run_dir = Path(recipe.output_dir)
    final = run_dir / "final"
    if accelerator.is_main_process:
        tmp = fresh_tmp_dir(final)
        shutil.copytree(run_dir / "best", tmp, dirs_exist_ok=True)
        publish_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final
