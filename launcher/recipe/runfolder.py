"""The run folder's layout, in one place: `ftl train` writes it, `ftl status`, `ftl slurm`
and the offline tools (merge, convert, export) read it.

```
RUN/recipe.yaml            the fully resolved recipe (secrets redacted)
RUN/metrics.jsonl          one JSON line per log step, eval, start and stop
RUN/summary.json           how the run ended
RUN/model/                 the final model or adapter
RUN/best/                  the best evaluated model so far (early_stopping.restore_best)
RUN/checkpoints/step-N/    resumable; complete once COMPLETE and trainer_state.json exist
RUN/distributed.json       the world the run trained in; RUN/slurm.json: its SLURM job
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECIPE = "recipe.yaml"
MODEL = "model"
BEST = "best"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def is_complete(ckpt: Path) -> bool:
    """A checkpoint folder that was written to the end (only those are ever read)."""
    return (ckpt / COMPLETE).is_file() and (ckpt / STATE).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=step_of)


def read_recipe(run_dir: Path) -> Any:
    """The run's recipe as the typed `Recipe` (every default the schema's), or None when
    the folder holds no recipe.yaml (not an ftl run)."""
    import yaml

    from launcher.recipe.schema import Recipe

    path = run_dir / RECIPE
    if not path.is_file():
        return None
    return Recipe.model_validate(yaml.safe_load(path.read_text()) or {})
