"""The run folder: refuse to clobber a run, find what to resume, check it still fits.

Decisions are taken on the main process and broadcast, so every rank agrees even when
the output folder is not on a shared filesystem.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from launcher.errors import Problem, UserError
from launcher.recipe.redact import redact
from launcher.recipe.resolve import Schedule
from launcher.recipe.schema import Recipe, dump
from launcher.train import checkpoint, report

RUN_FILES = (
    "recipe.yaml",
    "distributed.json",
    report.METRICS,
    report.SUMMARY,
    report.PLOT,
    "checkpoints",
    "model",
    "best",
    ".best-tmp",
    "trackers",
)
# what only training leaves: recipe.yaml alone (written by `ftl slurm` before the job
# starts, or by a run that failed its checks) is not a run yet
TRAINED = (report.METRICS, report.SUMMARY, report.PLOT, "checkpoints", "model", "trackers")
T = TypeVar("T")


def on_main(acc: Any, fn: Callable[[], T]) -> T:
    """Run `fn` on the main process only; every rank gets its result, or its UserError."""
    result: Any = None
    problems: list[Problem] | None = None
    if acc.is_main_process:
        try:
            result = fn()
        except UserError as e:
            problems = e.problems
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = broadcast_object_list([result, problems])
        result, problems = box
    if problems:
        raise UserError(problems)
    return result


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / name).exists() for name in TRAINED)


def find_start(run_dir: Path, resume: str | None, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (or None: a fresh start). Writes nothing.

    `--resume auto --overwrite` continues from the newest complete checkpoint and starts
    over when there is none: what a requeued batch job needs.
    """
    if resume and overwrite and resume != "auto":
        raise UserError(
            Problem(
                "--resume PATH and --overwrite exclude each other",
                key="--overwrite",
                hint="--resume continues a run, --overwrite starts it over "
                "(--resume auto --overwrite: continue if there is a checkpoint, else start over)",
            )
        )
    if resume == "auto" and overwrite:
        return checkpoint.find_resume(run_dir, "auto")
    if resume:
        found = checkpoint.find_resume(run_dir, resume)
        if found is None and holds_run(run_dir):
            # `auto` on a folder whose run left no checkpoint: never wipe it silently
            raise UserError(
                Problem(
                    f"{run_dir} holds a run but no complete checkpoint to resume from",
                    key="--resume",
                    hint="--overwrite starts it over; set train.save_every to get checkpoints",
                )
            )
        if (
            found is not None
            and found.resolve().parent.parent != run_dir.resolve()
            and holds_run(run_dir)
        ):
            raise UserError(
                Problem(
                    f"{run_dir} already holds a run, and {found} belongs to another one",
                    key="output.dir",
                    hint="continue another run's checkpoint in a new folder: -o output.dir=...",
                )
            )
        return found
    if holds_run(run_dir) and not overwrite:
        raise UserError(
            Problem(
                f"{run_dir} already holds a run",
                key="output.dir",
                hint="add --resume auto to continue it, --overwrite to start over, "
                "or pick another folder with -o output.dir=...",
            )
        )
    return None


def run_identity(recipe: Recipe, sched: Schedule, n_train: int) -> dict[str, Any]:
    """What must not change between a checkpoint and the run that resumes it."""
    t = recipe.train
    return {
        "world_size": sched.world_size,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum": sched.grad_accum,
        "seed": t.seed,
        "train_examples": n_train,
        "total_steps": sched.total_steps,
    }


def check_resume(saved: dict[str, Any], now: dict[str, Any], ckpt: Path) -> None:
    """UserError if the resumed run would not continue the checkpointed one exactly."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v
    ]
    if diffs:
        raise UserError(
            Problem(
                f"checkpoint {ckpt} was made by a different run ({'; '.join(diffs)})",
                key="--resume",
                hint="resume with the recipe, data and process count the run started with, "
                "or start a new run with -o output.dir=...",
            )
        )


def prepare(run_dir: Path, recipe: Recipe, *, clear: bool, resumed_at: int | None) -> None:
    """Main process, once every check passed: clear, drop abandoned checkpoints, save recipe."""
    if clear:
        for name in RUN_FILES:
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if resumed_at is not None:
        # checkpoints past the resumed step belong to an abandoned timeline: `auto` must
        # never jump back to them
        for ckpt in checkpoint.complete_checkpoints(run_dir):
            if checkpoint.step_of(ckpt) > resumed_at:
                shutil.rmtree(ckpt, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(redact(dump(recipe)), sort_keys=False))
