"""Atomic checkpoints: write to a temporary folder, mark COMPLETE, rename into place.

A checkpoint is `checkpoints/step-00000050/` holding accelerate's state (model,
optimizer, scheduler, RNG of every rank) plus `trainer_state.json` (step, epoch, tokens,
early-stopping state). Only folders with the COMPLETE marker are ever resumed from, so a
run killed while saving loses nothing but that save.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from launcher import atomic
from launcher.errors import Problem, UserError
from launcher.recipe import runfolder
from launcher.recipe.runfolder import (  # noqa: F401  (the names callers read here)
    COMPLETE,
    PREFIX,
    STATE,
    complete_checkpoints,
    step_of,
)


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / runfolder.CHECKPOINTS


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """`auto` -> newest complete checkpoint of `run_dir` (or None); else a checkpoint or run path."""
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if runfolder.is_complete(path):
        return path
    found = complete_checkpoints(path)
    if found:
        return found[-1]
    raise UserError(
        Problem(
            f"no complete checkpoint at {path}",
            key="--resume",
            hint="pass a checkpoints/step-N folder, a run folder, or 'auto'",
        )
    )


def save(accelerator: Any, run_dir: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Save a complete checkpoint for optimizer step `step` (call on every rank)."""
    root = checkpoints_dir(run_dir)
    final = root / runfolder.checkpoint_name(step)
    tmp = atomic.temp_for(final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        (tmp / COMPLETE).write_text("")
        atomic.publish(tmp, final)  # the old step-N (a re-save) stays until the new one is in
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def saved_state(path: Path) -> dict[str, Any]:
    """The trainer state of the checkpoint `path` (train.state.TrainState.to_json)."""
    return json.loads((path / STATE).read_text())


def load(accelerator: Any, path: Path) -> dict[str, Any]:
    """Restore accelerate's state from `path`; return the trainer state."""
    accelerator.load_state(str(path))
    return saved_state(path)


def save_model(
    accelerator: Any, model: Any, tokenizer: Any, out: Path, extra: dict[str, Any] | None = None
) -> None:
    """Write the model (or adapter) with its tokenizer as the folder `out`, whole or not
    at all (`launcher.atomic`); `extra`: JSON files to add ({name: content}). Every rank
    calls: under ZeRO-3/FSDP the state dict is gathered from all of them."""
    from launcher.models.build import save_model as write

    tmp, main = atomic.temp_for(out), accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    write(
        accelerator.unwrap_model(model),
        tokenizer,
        tmp,
        is_main=main,
        save_fn=accelerator.save,
        state_dict=state_dict,
    )
    accelerator.wait_for_everyone()
    if main:
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        atomic.publish(tmp, out)
    accelerator.wait_for_everyone()
