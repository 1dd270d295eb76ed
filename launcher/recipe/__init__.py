"""Recipes: the typed schema, loading (extends, overrides, errors) and resolution.

Nothing here imports torch, so `ftl validate` answers at once.
"""

from launcher.recipe.load import load_recipe
from launcher.recipe.schema import Recipe

__all__ = ["Recipe", "load_recipe"]
