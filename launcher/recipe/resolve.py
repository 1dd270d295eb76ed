"""Derived values: pure functions of the recipe and facts known at run time."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from launcher.errors import Problem, UserError
from launcher.recipe.schema import TrainCfg


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps a run takes, and how its batches add up."""

    world_size: int
    micro_batch_size: int  # samples per process per forward pass
    grad_accum: int  # micro-batches per optimizer step, per process
    global_batch: int  # samples per optimizer step across all processes
    micro_batches_per_epoch: int  # per process
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def accounting(self) -> str:
        return accounting(self.micro_batch_size, self.grad_accum, self.world_size)


def accounting(micro: int, accum: int, world: int) -> str:
    """One line a user can check: how the global batch is made."""
    return (
        f"global batch {micro * accum * world} = micro batch {micro} "
        f"x grad accumulation {accum} x world {world}"
    )


def accumulation(train: TrainCfg, world_size: int) -> int:
    """Micro-batches per optimizer step on each process.

    `train.global_batch_size`, when set, fixes the samples per optimizer step whatever the
    world size: accumulation = global / (micro x world), which must divide exactly.
    """
    if train.global_batch_size is None:
        return train.grad_accum
    per_pass = train.micro_batch_size * world_size
    if train.global_batch_size % per_pass:
        lower = max(per_pass, train.global_batch_size // per_pass * per_pass)
        raise UserError(
            Problem(
                f"global batch {train.global_batch_size} is not a multiple of micro batch "
                f"{train.micro_batch_size} x world {world_size} = {per_pass}",
                key="train.global_batch_size",
                hint=f"use {lower} or {lower + per_pass}, or change train.micro_batch_size "
                "or the number of processes",
            )
        )
    return train.global_batch_size // per_pass


def schedule(train: TrainCfg, n_examples: int, world_size: int = 1) -> Schedule:
    """Steps per epoch, total steps and warmup for `n_examples` training examples.

    A trailing partial batch is kept (as HF Trainer does), and a trailing partial
    accumulation group still makes an optimizer step.
    """
    accum = accumulation(train, world_size)
    micro = math.ceil(n_examples / (train.micro_batch_size * world_size))
    per_epoch = math.ceil(micro / accum)
    total = train.max_steps or max(1, math.ceil(per_epoch * train.epochs))
    warmup = train.warmup_steps or math.ceil(train.warmup_ratio * total)
    return Schedule(
        world_size=world_size,
        micro_batch_size=train.micro_batch_size,
        grad_accum=accum,
        global_batch=train.micro_batch_size * accum * world_size,
        micro_batches_per_epoch=micro,
        steps_per_epoch=per_epoch,
        total_steps=total,
        warmup_steps=min(warmup, total),
    )
