"""Recipes: YAML files describing a stage graph. (Lazy exports: stage modules import recipe.model.)"""


def __getattr__(name: str):
    if name in ("BASE", "LoadedRecipe", "ResolvedStage", "load_recipe"):
        from posttrain.recipe import load

        return getattr(load, name)
    if name in ("ModelSpec", "Recipe"):
        from posttrain.recipe import model

        return getattr(model, name)
    raise AttributeError(name)
