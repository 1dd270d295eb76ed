"""Derived values: pure functions of the recipe and facts known at run time."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from launcher.recipe.schema import TrainCfg


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps a run takes, and how its batches add up."""

    world_size: int
    global_batch: int  # samples per optimizer step across all processes
    micro_batches_per_epoch: int  # per process
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def schedule(train: TrainCfg, n_examples: int, world_size: int = 1) -> Schedule:
    """Steps per epoch, total steps and warmup for `n_examples` training examples.

    A trailing partial batch is kept (as HF Trainer does), and a trailing partial
    accumulation group still makes an optimizer step.
    """
    micro = math.ceil(n_examples / (train.micro_batch_size * world_size))
    per_epoch = math.ceil(micro / train.grad_accum)
    total = train.max_steps or max(1, math.ceil(per_epoch * train.epochs))
    warmup = train.warmup_steps or math.ceil(train.warmup_ratio * total)
    return Schedule(
        world_size=world_size,
        global_batch=train.micro_batch_size * train.grad_accum * world_size,
        micro_batches_per_epoch=micro,
        steps_per_epoch=per_epoch,
        total_steps=total,
        warmup_steps=min(warmup, total),
    )
