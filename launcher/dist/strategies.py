"""The distributed strategies a recipe can name: a plain registry (no heavy imports).

`kind` says which machinery runs it: "none" (one process), "ddp" (torch DDP through
accelerate), "deepspeed" (ZeRO through accelerate, config from `ds_configs/`) or "fsdp"
(FSDP2 through accelerate). `shards_params` is true when each rank holds only a slice
of the weights, which rules out what needs the whole tensor (bitsandbytes weights,
L2-SP's distance to the pretrained weights).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str  # none | ddp | deepspeed | fsdp
    zero_stage: int | None = None
    offload: bool = False
    ds_config: str | None = None  # file in ds_configs/
    shards_params: bool = False
    shards_grads: bool = False
    shards_optimizer: bool = False
    summary: str = ""


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("none", "none", summary="one process, no distribution"),
        Strategy("ddp", "ddp", summary="data parallel: every rank holds a full replica"),
        Strategy(
            "zero1",
            "deepspeed",
            zero_stage=1,
            ds_config="zero1.json",
            shards_optimizer=True,
            summary="DeepSpeed ZeRO-1: optimizer states sharded",
        ),
        Strategy(
            "zero2",
            "deepspeed",
            zero_stage=2,
            ds_config="zero2.json",
            shards_optimizer=True,
            shards_grads=True,
            summary="DeepSpeed ZeRO-2: optimizer states and gradients sharded",
        ),
        Strategy(
            "zero3",
            "deepspeed",
            zero_stage=3,
            ds_config="zero3.json",
            shards_optimizer=True,
            shards_grads=True,
            shards_params=True,
            summary="DeepSpeed ZeRO-3: optimizer states, gradients and parameters sharded",
        ),
        Strategy(
            "zero3_offload",
            "deepspeed",
            zero_stage=3,
            offload=True,
            ds_config="zero3_offload.json",
            shards_optimizer=True,
            shards_grads=True,
            shards_params=True,
            summary="ZeRO-3 with parameters and optimizer states offloaded to CPU memory",
        ),
        Strategy(
            "fsdp",
            "fsdp",
            shards_optimizer=True,
            shards_grads=True,
            shards_params=True,
            summary="PyTorch FSDP2 (fully_shard) through accelerate, one unit per decoder layer",
        ),
    ]
}
