"""Where am I? Machine count, rank and main address from the scheduler's environment.

Command-line arguments always win. Otherwise, inside a SLURM allocation the facts come
from SLURM's variables (one `ftl launch` per node, e.g. `srun --ntasks-per-node=1`); else
from torchrun-style variables (MASTER_ADDR, MASTER_PORT, NODE_RANK, NNODES, or the PET_*
names Kubeflow's PyTorchJob uses). Pure functions of the mapping they are given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Found:
    source: str  # "slurm", "torchrun" or "" (nothing found)
    num_machines: int | None = None
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    problem: str | None = None  # why these facts cannot be used as they are


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _int(environ: Mapping[str, str], *names: str) -> int | None:
    for n in names:
        v = environ.get(n, "").strip()
        if v.isdigit():
            return int(v)
    return None


def from_environment(environ: Mapping[str, str]) -> Found:
    """Cluster facts from SLURM or torchrun-style variables (nothing if neither is set)."""
    if "SLURM_JOB_ID" in environ and "SLURM_NODEID" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        main = environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
        nodes = _int(environ, "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
        problem = None
        per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0]
        if "SLURM_STEP_ID" not in environ and (nodes or 1) > 1:
            problem = (
                f"this is the batch script of a {nodes}-node SLURM job, outside any job step: "
                "only this node would start, and wait for the others forever"
            )
        elif per_node.isdigit() and int(per_node) > 1:
            problem = (
                f"SLURM started {per_node} tasks per node, so {per_node} launchers per node "
                "would claim the same machine rank"
            )
        return Found(
            "slurm",
            num_machines=nodes,
            machine_rank=_int(environ, "SLURM_NODEID"),
            main_process_ip=main,
            main_process_port=_int(environ, "MASTER_PORT"),
            problem=problem,
        )
    addr = environ.get("MASTER_ADDR") or environ.get("PET_MASTER_ADDR")
    node_keys = ("NODE_RANK", "NNODES", "PET_NODE_RANK", "PET_NNODES")
    if addr and any(k in environ for k in node_keys):
        return Found(
            "torchrun",
            num_machines=_int(environ, "NNODES", "PET_NNODES"),
            machine_rank=_int(environ, "NODE_RANK", "PET_NODE_RANK"),
            main_process_ip=addr,
            main_process_port=_int(environ, "MASTER_PORT", "PET_MASTER_PORT"),
        )
    return Found("")


def inside_launched_process(environ: Mapping[str, str]) -> bool:
    """True inside a process a launcher already started (torchrun sets LOCAL_RANK)."""
    return "LOCAL_RANK" in environ and "TORCHELASTIC_RUN_ID" in environ
