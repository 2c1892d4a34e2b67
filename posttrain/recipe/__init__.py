"""Recipes: YAML files describing a stage graph."""
from posttrain.recipe.load import BASE, LoadedRecipe, ResolvedStage, load_recipe
from posttrain.recipe.model import ModelSpec, Recipe

__all__ = ["BASE", "LoadedRecipe", "ModelSpec", "Recipe", "ResolvedStage", "load_recipe"]
