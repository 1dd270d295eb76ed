"""Every file under recipes/ (recursively) validates and documents itself."""

from __future__ import annotations

import pytest
import yaml

from launcher.assets import data_path
from launcher.recipe import load_recipe
from launcher.recipe.schema import Recipe

RECIPES = data_path("recipes")
ALL = sorted(p for p in RECIPES.rglob("*.yaml"))
FULL = [p for p in ALL if "base" not in p.relative_to(RECIPES).parts]
PARTS = [p for p in ALL if p not in FULL]


def test_there_are_recipes():
    assert len(FULL) >= 4 and (RECIPES / "quickstart.yaml") in FULL


@pytest.mark.parametrize("path", FULL, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_validates(path):
    load_recipe(path)


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_opens_with_a_header(path):
    head = path.read_text().split("\n\n")[0]
    assert head.startswith("#")
    if path in FULL:
        assert f"ftl train recipes/{path.relative_to(RECIPES)}" in head or "ftl launch" in head
        assert " -o " in head  # an override example


def _unknown_keys(data: dict, model: type, prefix: str = "") -> list[str]:
    bad = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            bad.append(prefix + key)
            continue
        sub = next(
            (
                a
                for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                if isinstance(a, type) and hasattr(a, "model_fields")
            ),
            None,
        )
        if sub is not None and isinstance(value, dict):
            bad += _unknown_keys(value, sub, prefix + key + ".")
    return bad


@pytest.mark.parametrize("path", PARTS, ids=lambda p: str(p.relative_to(RECIPES)))
def test_base_pieces_use_known_keys_and_are_used(path):
    data = yaml.safe_load(path.read_text())
    data.pop("extends", None)
    assert _unknown_keys(data, Recipe) == []
    users = [p for p in FULL if path.name in p.read_text()]
    assert users, f"{path} is not extended by any recipe"


WITH_SLURM = [p for p in FULL if "slurm" in (yaml.safe_load(p.read_text()) or {})]


def test_some_recipes_carry_slurm_defaults():
    assert len(WITH_SLURM) >= 2


@pytest.mark.parametrize("path", WITH_SLURM, ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_renders_a_valid_batch_script(path, tmp_path, capsys):
    import subprocess

    from launcher.cli.main import main

    rc = main(["slurm", str(path), "--dry-run", "-o", f"output.dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    script = tmp_path / "job.sbatch"
    script.write_text(out.split("\n", 1)[1])  # after the "# ftl slurm --dry-run" line
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --gpus-per-node=8" in out and "#SBATCH --exclusive" in out
    assert f"ftl slurm recipes/{path.relative_to(RECIPES)}" in path.read_text()
