"""Recipes by name: ``get_recipe(cfg.recipe)`` is everything the service does differently per recipe
(``recipes.base.Recipe``: requests, stage-1 examples, rollout kind, default rewards, evaluation,
architecture limits). ``clear``, ``uae`` and ``gvu`` are one module each; a new recipe is a module with a
``Recipe`` and one ``register_recipe`` line here.

Imports point one way: ``services`` -> ``recipes`` -> {``rollout``, ``reward``, ``learner``, ``tasks``};
nothing here imports ``services``.
"""

from __future__ import annotations

from recipes.base import ConfigProblem, Evaluation, Recipe
from recipes.clear import CLEAR
from recipes.gvu import GVU
from recipes.uae import UAE

RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe, overwrite: bool = False) -> Recipe:
    """Make ``get_recipe(recipe.name)`` return ``recipe``."""
    if recipe.name in RECIPES and not overwrite and RECIPES[recipe.name] is not recipe:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name``; ValueError naming the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


register_recipe(CLEAR)
register_recipe(UAE)
register_recipe(GVU)

__all__ = ["RECIPES", "ConfigProblem", "Evaluation", "Recipe", "get_recipe", "register_recipe"]
