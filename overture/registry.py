"""Families by name: ``objective.name`` in a recipe -> the class that implements it; and
the family of a checkpoint, for the commands that read one (``checkpoint_family``).

Imports are lazy (a family's module loads only when used). A new family is one module
plus one line here; the contract tests (tests/test_contract.py) run over every entry.
"""

from __future__ import annotations

import difflib
import importlib

from .errors import ConfigError

FAMILIES = {
    "bert": "overture.pretrain.text.bert:Bert",
    "roberta": "overture.pretrain.text.roberta:Roberta",
    "albert": "overture.pretrain.text.albert:Albert",
    "gpt": "overture.pretrain.text.gpt:Gpt",
    "longformer": "overture.pretrain.text.longformer:Longformer",
    "classify": "overture.finetune.classify:Classify",
    "image": "overture.pretrain.image.supervised:ClassifyImages",
    "simclr": "overture.pretrain.image.simclr:SimCLR",
    "gan-int-cls": "overture.pretrain.gan.family:GanIntCls",
    "dfgan": "overture.pretrain.gan.family:DFGan",
}


def list_families() -> list[str]:
    """Registered family names, in registry order."""
    return list(FAMILIES)


def get_family(name: str) -> type:
    """The objective class registered as ``name``; unknown names suggest the nearest."""
    if name not in FAMILIES:
        close = difflib.get_close_matches(str(name), list(FAMILIES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"objective.name={name!r} is not a registered family{hint}; "
                          f"known: {', '.join(FAMILIES)}")
    module, _, attr = FAMILIES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def family_name(family: type) -> str:
    """The registered name of a family class ("bert")."""
    where = f"{family.__module__}:{family.__name__}"
    return next((name for name, path in FAMILIES.items() if path == where), family.__name__)


def build_objective(recipe):
    """The objective object for ``recipe.objective.name``; ``train.updates`` may only
    name its updates, and fp16 is refused for updates that share a backward (checked
    here, before any data is prepared)."""
    recipe.check_requires()
    objective = get_family(recipe.objective.name)(recipe)
    updates = objective.updates()
    names = [u.name for u in updates]
    shared = [u.name for u in updates if u.with_previous]
    if shared and recipe.train.mixed_precision == "fp16":
        # one loss scaler for two optimizers on one backward: the first one's step may
        # rescale before the second unscales its gradients
        raise ConfigError(f"train.mixed_precision=fp16: update {shared[0]!r} of objective "
                          f"{recipe.objective.name!r} steps on another update's backward, "
                          "which fp16's loss scaling does not support; use bf16 or no")
    for name in recipe.train.updates:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            raise ConfigError(f"train.updates.{name}: objective {recipe.objective.name!r} has "
                              f"the updates {', '.join(names)}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
    return objective


# --------------------------------------------------------------------------- checkpoints


def checkpoint_family(checkpoint: str) -> type | None:
    """The family that made ``checkpoint``, for the commands that read one (generate,
    features, probe): the ``objective.name`` of its final/recipe.yaml; otherwise the
    family whose ``model_types`` holds its config's model_type ("image" for a timm /
    torchvision folder). None for another transformers model (any encoder still embeds).
    A Hub name is read through its config (one small download, or the cache)."""
    import json
    from pathlib import Path

    import yaml

    path = Path(str(checkpoint)).expanduser()
    folder = path / "final" if (path / "final" / "config.json").is_file() else path
    recipe = folder / "recipe.yaml"
    if recipe.is_file():
        try:
            name = ((yaml.safe_load(recipe.read_text(encoding="utf-8")) or {})
                    .get("objective") or {}).get("name", "bert")
        except (yaml.YAMLError, AttributeError) as err:
            raise ConfigError(f"--checkpoint {checkpoint}: {recipe} is not a recipe "
                              f"({type(err).__name__})") from None
        return get_family(name)
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except ValueError:
            raise ConfigError(f"--checkpoint {checkpoint}: {folder / 'config.json'} is not "
                              "JSON") from None
        if "architecture" in config and "model_type" not in config:  # timm / torchvision
            return get_family("image")
        model_type = config.get("model_type")
    elif path.exists():
        return None  # the command names what is missing
    else:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(str(checkpoint)).model_type
        except (OSError, ValueError):
            return None
    for name in FAMILIES:
        family = get_family(name)
        if model_type in getattr(family, "model_types", ()):
            return family
    return None
