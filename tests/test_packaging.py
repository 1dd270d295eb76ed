"""Packaging facts the README and CI rely on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def readme_command(tag: str) -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    return next(lines[i + 1] for i, line in enumerate(lines) if line.startswith(f"# {tag}:"))


def test_readme_setup_installs_the_demo_extra_exactly():
    demo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "demo"
    ]
    no_deps = readme_command("setup").split("--no-deps", 1)[1].split("&&")[0].split()
    assert sorted(no_deps) == sorted(demo)


def test_readme_setup_installs_cpu_torch_first_and_dev_extra():
    setup = readme_command("setup")
    assert setup.index("torch==2.13.0") < setup.index("-e '.[dev]'")


def test_torch_is_not_pinned_in_package_metadata():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(d for d in deps if re.match(r"torch\b", d))
    assert "==" not in torch


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "# setup:" in ci and "# test:" in ci
    assert readme_command("test") and readme_command("quickstart").endswith(
        "ftl train recipes/quickstart.yaml"
    )


def test_every_strategy_config_ships_in_the_wheel():
    from launcher.assets import data_path
    from launcher.dist.strategies import STRATEGIES

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = meta["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert shipped["ds_configs"] == "launcher/_data/ds_configs"
    for s in STRATEGIES.values():
        if s.ds_config:
            json.loads(data_path("ds_configs", s.ds_config).read_text())


def test_the_batch_script_template_ships_in_the_wheel():
    from launcher.assets import data_path
    from launcher.dist.slurm import TEMPLATE

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = meta["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert shipped["slurm"] == "launcher/_data/slurm"
    assert "@@DIRECTIVES@@" in data_path("slurm", TEMPLATE).read_text()
