"""Families by name: ``objective.name`` in a recipe -> the class that implements it.

Imports are lazy (a family's module loads only when used). A new family is one module
plus one line here; the contract tests (tests/test_contract.py) run over every entry.
"""

from __future__ import annotations

import difflib
import importlib

from .config import ConfigError

FAMILIES = {
    "bert": "overture.pretrain.text.bert:Bert",
    "roberta": "overture.pretrain.text.roberta:Roberta",
    "albert": "overture.pretrain.text.albert:Albert",
    "gpt": "overture.pretrain.text.gpt:Gpt",
    "longformer": "overture.pretrain.text.longformer:Longformer",
    "classify": "overture.finetune.classify:Classify",
    "image": "overture.pretrain.image.supervised:ClassifyImages",
    "simclr": "overture.pretrain.image.simclr:SimCLR",
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


def build_objective(recipe):
    """The objective object for ``recipe.objective.name``."""
    return get_family(recipe.objective.name)(recipe)
