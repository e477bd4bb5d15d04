"""`overture finetune --checkpoint DIR --images DIR`: transfer an image checkpoint to a
new labelled image set (a new classifier; optionally the backbone frozen for the first
epochs), as one more run of the "image" family on the engine."""

from __future__ import annotations

import json
from pathlib import Path

from overture.atomic import write_text_atomic
from overture.config import ConfigError, Recipe, load_recipe, parse_overrides

BASE_RECIPE = "image-finetune"


def image_finetune_recipe(checkpoint: str, images: str, eval_images: str | None = None,
                          seed: int | None = None, random_init: bool = False,
                          overrides: list[str] | None = None) -> Recipe:
    """image-finetune's defaults, the checkpoint's input size and normalisation, then the
    user's KEY=VALUE overrides (which win). ``checkpoint`` is an image final/ folder (or
    a run folder holding one), or a weights file for ``model.name`` given in overrides."""
    from overture.pretrain.image import models as image_models

    path = image_models.final_folder(Path(checkpoint))
    # paths as JSON strings, which YAML reads whole (commas and spaces included)
    base = [f"data.source=[{json.dumps(images)}]"]  # the options given
    # what the checkpoint and the command choose, which the user's overrides may replace
    defaults = ["name=finetune-images",
                f"output_dir=runs/finetune/{Path(images).name or 'images'}"]
    if eval_images:
        base.append(f"data.eval_source=[{json.dumps(eval_images)}]")
    if seed is not None:
        base.append(f"train.seed={seed}")
    if path.is_dir():
        if not image_models.is_image_checkpoint(path):
            raise ConfigError(f"--checkpoint {checkpoint}: not an image checkpoint (no "
                              "config.json of a timm / torchvision model here or in final/)")
        config = json.loads((path / "config.json").read_text())
        cfg = config.get("pretrained_cfg", {})
        if "input_size" in cfg:
            defaults.append(f"data.image_size={int(cfg['input_size'][-1])}")
        for key in ("mean", "std"):
            if key in cfg:
                defaults.append(f"objective.{key}={json.dumps(list(cfg[key]))}")
        if "crop_pct" in cfg:
            defaults.append(f"objective.crop_pct={cfg['crop_pct']}")
        if cfg.get("interpolation") in ("bilinear", "bicubic", "nearest"):
            defaults.append(f"objective.interpolation={cfg['interpolation']}")
        if random_init:  # the architecture alone: the from-scratch baseline
            name, args = image_models.checkpoint_architecture(path)
            base += [f"model.name={name}", f"model.args={json.dumps(args)}"]
        else:
            base.append(f"model.init_from={json.dumps(str(path))}")
    elif path.is_file():
        if not random_init:
            base.append(f"model.init_from={json.dumps(str(path))}")
    else:
        raise ConfigError(f"--checkpoint {checkpoint}: no such folder or weights file")
    # --images / --seed / --checkpoint and a KEY=VALUE for the same key: refused
    parse_overrides([*base, *(overrides or [])], unique=True)
    return load_recipe(BASE_RECIPE, [*base, *(overrides or [])], defaults=defaults)


def finetune_images(recipe: Recipe, progress: bool = True) -> dict:
    """Train (or resume) ``recipe``; writes and returns ``metrics.json``: the held-out
    top-1 / top-5 of final/ (the best evaluation when train.best_metric is set)."""
    from overture.engine import train

    from overture.checkpoint import TRAIN_STATE, latest_checkpoint

    final = train(recipe, progress=progress)
    run_dir = Path(recipe.output_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, lines) if r["split"] == "eval"]
    if not evals:
        raise ConfigError(f"{run_dir}: no evaluation was recorded (data.eval_fraction=0 "
                          "and no data.eval_source?)")
    # final/ is the evaluation the engine kept (train.best_metric), else the last one
    state = json.loads((latest_checkpoint(run_dir) / TRAIN_STATE).read_text())
    kept = state.get("best_step", -1) if recipe.train.best_metric else -1
    best = next((r for r in reversed(evals) if r["step"] == kept), evals[-1])
    metrics = {"checkpoint": recipe.model.init_from or f"{recipe.model.name} (random init)",
               "images": recipe.data.source, "step": best["step"],
               **{k: best[k] for k in ("top1", "top5", "loss") if k in best},
               "final": str(final)}
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
