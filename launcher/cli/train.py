"""`ftl train RECIPE [-o key=value ...] [--resume auto|PATH] [--overwrite]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from launcher.cli.validate import add_recipe_arguments
from launcher.recipe import load_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from the newest complete checkpoint of output.dir (auto), "
        "or from a checkpoint / run folder",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output.dir that already holds a run",
    )


# Deprecations raised inside DeepSpeed and PEFT, once per call site and step: nothing a
# recipe can change, and under ZeRO-3 they buried the progress bar.
_LIBRARY_DEPRECATIONS = (
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated",
)


def _quiet_library_deprecations() -> None:
    for message in _LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def run(args: argparse.Namespace) -> int:
    from launcher.train.signals import STOP

    STOP.install()  # before the heavy imports: a stop signal is never lost
    try:
        return _run(args)
    finally:
        STOP.uninstall()


def _run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.override)
    if recipe.distributed.strategy != "none" and "WORLD_SIZE" not in os.environ:
        print(
            f"ftl train: note: distributed.strategy={recipe.distributed.strategy} needs several "
            f"processes; this is one. Start them with: ftl launch {args.recipe} --num-processes N",
            file=sys.stderr,
        )
    _quiet_library_deprecations()
    from launcher.dist.contract import EXIT_STOPPED
    from launcher.train.loop import train

    summary = train(recipe, resume=args.resume, overwrite=args.overwrite)
    code = {"completed": 0, "early_stopped": 0, "stopped": EXIT_STOPPED}.get(summary["status"], 1)
    if os.environ.get("RANK", "0") != "0":
        return code  # the main rank reports
    shown = {
        k: summary[k]
        for k in (
            "status",
            "steps",
            "final_train_loss",
            "final_eval",
            "wall_time_s",
            "tokens_per_s",
        )
    }
    print(json.dumps(shown, indent=2))
    print(f"run folder: {recipe.output.dir}")
    return code
