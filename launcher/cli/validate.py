"""`ftl validate RECIPE [-o key=value ...]`: check a recipe, print it resolved."""

from __future__ import annotations

import argparse

import yaml

from launcher.recipe import load_recipe
from launcher.recipe.redact import redact
from launcher.recipe.schema import dump


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to the recipe YAML")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. -o train.lr=1e-4 (repeatable)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.override)
    print(f"# {args.recipe}: valid", flush=True)
    print(yaml.safe_dump(redact(dump(recipe)), sort_keys=False), end="")
    return 0
