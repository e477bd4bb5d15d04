"""Pretraining objectives, by the name a recipe gives in ``objective.name``."""

from __future__ import annotations

from overture.config import Recipe

from .text.bert import BertObjective

OBJECTIVES = {"bert": BertObjective}


def build_objective(recipe: Recipe):
    """The objective object for ``recipe.objective.name``."""
    return OBJECTIVES[recipe.objective.name](recipe)
