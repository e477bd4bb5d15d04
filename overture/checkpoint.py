"""Checkpoints: atomic full-state saves, resume discovery, Hugging Face export.

A checkpoint is written to ``step-NNNNNN.tmp``, completed with a ``COMPLETE`` marker, then
published as ``step-NNNNNN`` (overture.atomic): a folder without its marker (a crash
mid-save) is never used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from .atomic import COMPLETE, building_dir, fresh_tmp_dir, publish_dir
from .config import ConfigError, Recipe
from .errors import SaveFailed
from .hub import quiet_transformers

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
RECIPE_FILE = "recipe.yaml"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Settings a run may be resumed with after a change: when, how long and how fast it
# trains, not what it trains on. A changed batch size or process count re-shards the data
# position (engine.TrainState.reshard). Everything else must match the checkpoint.
RESUMABLE = {"name", "description", "output_dir", "data.cache_dir", "data.num_proc",
             "model.unpadded",
             *(f"train.{key}" for key in (
                 "max_steps", "epochs", "max_time", "lr", "warmup_steps", "warmup_ratio",
                 "lr_schedule", "max_grad_norm", "batch_size", "gradient_accumulation_steps",
                 "eval_every", "eval_batches", "log_every", "save_every", "interval_unit",
                 "keep_last", "resume", "report_to", "num_workers", "peak_tflops", "compile",
                 "max_nonfinite_steps", "best_metric", "best_mode",
                 "early_stopping_patience"))}
RESUMABLE_PHASE = {"steps", "batch_size"}
RESUMABLE_UPDATE = {"lr", "warmup_steps", "lr_schedule"}
"""An update's own settings (train.updates.NAME.KEY) that a resume may change."""
LENGTH = ("train.max_steps", "train.epochs", "phases")


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


def _saved_recipe(checkpoint: Path) -> dict:
    import yaml

    return yaml.safe_load((Path(checkpoint) / RECIPE_FILE).read_text()) or {}


def flatten(tree, prefix: str = "") -> dict:
    """A recipe dict as {dotted key: value}; a list of sections becomes
    ``phases[0].steps``-style keys."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items()
                for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        return {k: v for i, value in enumerate(tree)
                for k, v in flatten(value, f"{prefix[:-1]}[{i}].").items()}
    return {prefix[:-1]: tree}


def changed_settings(recipe: Recipe, checkpoint: Path) -> dict[str, tuple]:
    """Settings of ``recipe`` that differ from the checkpoint's: {key: (saved, now)}.
    A key the checkpoint does not know (added in a later version) counts as unchanged."""
    saved_tree = _saved_recipe(checkpoint)
    saved, now = flatten(saved_tree), flatten(recipe.to_dict())
    changes = {key: (saved[key], now[key]) for key in sorted(saved)
               if key in now and saved[key] != now[key]}
    # an update's own settings (train.updates.NAME.KEY) exist only where given: one added
    # or removed since the checkpoint is a change too (null = train's value)
    for key in sorted(set(saved) ^ set(now)):
        if key.startswith("train.updates.") and (saved.get(key), now.get(key)) != (None, None):
            changes[key] = (saved.get(key), now.get(key))
    before, after = len(saved_tree.get("phases") or []), len(recipe.phases)
    if before != after:
        changes["phases"] = (f"{before} phases", f"{after} phases")
    return changes


def _check_compatible(recipe: Recipe, checkpoint: Path) -> None:
    """Refuse a resume whose recipe changed what the checkpoint means (model, vocabulary,
    data, masking, sequence length, seed...), naming every changed key."""
    refused = {key: change for key, change in changed_settings(recipe, checkpoint).items()
               if key not in RESUMABLE
               and not re.fullmatch(rf"phases\[\d+\]\.({'|'.join(RESUMABLE_PHASE)})", key)
               and not re.fullmatch(rf"train\.updates\.[^.]+\.({'|'.join(RESUMABLE_UPDATE)})",
                                    key)}
    if refused:
        shown = "; ".join(f"{key}: {before!r} -> {after!r}"
                          for key, (before, after) in refused.items())
        raise ConfigError(f"{checkpoint} was saved with other settings, and resuming would "
                          f"train on something else: {shown}. Undo the change to continue "
                          "this run, or give a new output_dir to start another")


def is_finished(recipe: Recipe, checkpoint: Path) -> bool:
    """True when ``checkpoint`` ends a run that reached its end, final/ was exported and
    ``recipe`` asks for no more steps: running it again would only overwrite final/."""
    state = json.loads((Path(checkpoint) / TRAIN_STATE).read_text())
    final = Path(recipe.output_dir) / "final"
    length_changed = any(key == name or key.startswith(name + "[")
                         for key in changed_settings(recipe, checkpoint) for name in LENGTH)
    return bool(state.get("finished")) and final.is_dir() and not length_changed


def save_checkpoint(accelerator, recipe: Recipe, step: int, train_state: dict) -> Path:
    """Save the full training state (model, optimizer, scheduler, scaler, RNG, data
    position) atomically, then keep only the newest ``train.keep_last``."""
    folder = checkpoints_dir(Path(recipe.output_dir)) / f"step-{step:06d}"
    tmp = folder.with_name(folder.name + ".tmp")
    with _save_errors(folder, tmp, recipe):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            # made before the barrier: every rank writes its RNG state into it, and
            # Accelerate creates it on the main process only (a race otherwise)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with _tied_weights_saved_once():
            accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAIN_STATE).write_text(json.dumps(train_state, indent=2))
            (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
            (tmp / COMPLETE).write_text("")
            publish_dir(tmp, folder)  # a re-save of the same step replaces it once whole
            _prune(Path(recipe.output_dir), step, recipe.train.keep_last)
    accelerator.wait_for_everyone()
    return folder


def _prune(run_dir: Path, step: int, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints up to ``step``, the one just saved
    included. Later ones belong to a history abandoned by a resume from an earlier
    checkpoint (``train.resume=PATH``): left there, a crash would resume from them."""
    found = complete_checkpoints(run_dir)
    later = [p for p in found if int(_STEP_DIR.match(p.name).group(1)) > step]
    if later:
        log.info("removing %s: saved before the resume from an earlier step",
                 ", ".join(p.name for p in later))
    earlier = [p for p in found if p not in later]
    for old in later + earlier[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


class _DropSharedTensorNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextlib.contextmanager
def _tied_weights_saved_once():
    """Without Accelerate's "Removed shared tensor {...decoder.weight...} while saving.
    This should be OK, but check..." at every save: tied weights (a masked-LM decoder and
    the word embeddings, GPT's LM head) are one tensor, stored once in safetensors, and
    tied again when the checkpoint loads (the resume tests check the round trip)."""
    logger, note = logging.getLogger("accelerate.utils.other"), _DropSharedTensorNote()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


@contextlib.contextmanager
def _save_errors(folder: Path, tmp: Path, recipe: Recipe):
    """A save that fails (disk full, permissions) removes its partial folder and says so
    in one line; the checkpoints saved before stay whole."""
    try:
        yield
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(Path(recipe.output_dir))
        kept = f"the previous checkpoint, {previous}, is intact" if previous else \
            "no earlier checkpoint exists"
        raise SaveFailed(f"could not write {folder} ({err.strerror or err}); {kept}. Free "
                         "space or fix permissions, then run the same command to continue "
                         "from it") from None


def load_checkpoint(accelerator, folder: Path) -> dict:
    """Restore the full training state; returns the saved train state (step, data position)."""
    try:
        accelerator.load_state(str(folder))
    except RuntimeError as err:  # e.g. "size mismatch": another vocabulary or model
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line),
                      first[0] if first else "")
        raise ConfigError(f"{folder} does not fit this run's model ({detail}); it was "
                          "trained with another vocabulary or model size: resume with the "
                          "same corpus and settings, or give a new output_dir") from None
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
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        with _save_errors(final, tmp, recipe):
            tmp = fresh_tmp_dir(final)
            unwrapped = {name: accelerator.unwrap_model(m) for name, m in models.items()}
            with quiet_transformers(progress_bars=False):  # no "Writing model shards" bar
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
        with building_dir(final) as tmp:
            shutil.copytree(run_dir / "best", tmp, dirs_exist_ok=True)
            publish_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final
