"""Atomic checkpoints: write to a temporary folder, mark COMPLETE, rename into place.

A checkpoint is `checkpoints/step-00000050/` holding accelerate's state (model,
optimizer, scheduler, RNG of every rank) plus `trainer_state.json` (step, epoch, tokens,
early-stopping state). Only folders with the COMPLETE marker are ever resumed from, so a
run killed while saving loses nothing but that save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from launcher.errors import Problem, UserError

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
PREFIX = "step-"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.name.startswith(PREFIX) and (p / COMPLETE).is_file() and (p / STATE).is_file()
    ]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """`auto` -> newest complete checkpoint of `run_dir` (or None); else a checkpoint or run path."""
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if (path / COMPLETE).is_file() and (path / STATE).is_file():
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
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        _fsync_dir(tmp)
        (tmp / COMPLETE).write_text("")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Any, path: Path) -> dict[str, Any]:
    """Restore accelerate's state from `path`; return the trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE).read_text())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
