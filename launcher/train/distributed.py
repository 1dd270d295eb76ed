"""The training process's side of a distributed launch.

`process_group_kwargs` runs before the Accelerator exists and picks the backend (gloo on
CPU-only hosts, where accelerate would otherwise leave DeepSpeed and FSDP single-process);
`check_world` runs right after and refuses a world that differs from the launch plan's,
which is how every silent single-process trap shows up (docs/distributed.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from launcher import compat
from launcher.dist.contract import ENV_STRATEGY, ENV_WORLD
from launcher.dist.strategies import Strategy
from launcher.errors import Problem, UserError
from launcher.recipe.resolve import Schedule

RECORD = "distributed.json"


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def process_group_kwargs(strategy: Strategy, timeout_minutes: float) -> list[Any]:
    """kwargs_handlers for the Accelerator; prepares CPU-only FSDP (see below).

    Every collective waits at most `distributed.timeout_minutes` for the other ranks: a
    rank that died or hangs ends the run with an error instead of a silent hang.
    """
    from datetime import timedelta

    import torch
    from accelerate.utils import InitProcessGroupKwargs

    timeout = timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        return [InitProcessGroupKwargs(timeout=timeout)]
    if strategy.kind == "deepspeed" and "LOCAL_RANK" in os.environ:
        # without CUDA accelerate picks no backend for DeepSpeed and every rank believes
        # it is alone (world 1, rank 0), while torch runs a world of N
        return [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    if _launched_world() == 1:
        return []

    if strategy.kind == "fsdp":
        from launcher import compat

        compat.fsdp_on_cpu(timeout)  # accelerate would silently train unsharded on CPU
        return []
    return [InitProcessGroupKwargs(timeout=timeout)]


# -- preflight: every rank says who it is; ranks that differ stop before the model loads --
PREFLIGHT_PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "peft", "ftl")


def rank_facts(recipe_hash: str) -> dict[str, str]:
    """What must match on every rank, plus where this rank runs."""
    import platform
    import socket
    from importlib.metadata import PackageNotFoundError, version

    facts = {
        "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        "python": platform.python_version(),
    }
    for name in PREFLIGHT_PACKAGES:
        try:
            facts[name] = version(name)
        except PackageNotFoundError:
            facts[name] = "absent"
    facts["recipe"] = recipe_hash
    return facts


def compare_ranks(facts: list[dict[str, str]]) -> list[str]:
    """One line per fact that differs between ranks, naming each rank's value and host."""
    lines = []
    for key in ("python", *PREFLIGHT_PACKAGES, "recipe"):
        values = [f.get(key) for f in facts]
        if len(set(values)) > 1:
            by_value: dict[str | None, list[str]] = {}
            for rank, (f, v) in enumerate(zip(facts, values, strict=True)):
                by_value.setdefault(v, []).append(f"{rank} ({f.get('host')})")
            seen = "; ".join(f"{v} on rank {', '.join(r)}" for v, r in by_value.items())
            what = "the recipe (hash)" if key == "recipe" else key
            lines.append(f"{what} differs between ranks: {seen}")
    return lines


def preflight(acc: Any, recipe_hash: str, run_dir: Path) -> dict[str, Any]:
    """Log this rank's facts; UserError on every rank when the ranks do not match or do
    not share the run folder. Returns what distributed.json records about it."""
    import sys

    facts = rank_facts(recipe_hash)
    shown = " ".join(f"{k} {v}" for k, v in facts.items())
    print(
        f"[preflight] rank {acc.process_index}/{acc.num_processes} pid {os.getpid()} {shown}",
        file=sys.stderr,
        flush=True,
    )
    if acc.num_processes == 1:
        return {}
    import torch.distributed as td

    gathered: list[Any] = [None] * acc.num_processes
    td.all_gather_object(gathered, facts)
    problems = compare_ranks(gathered)
    if problems:
        raise UserError(
            [Problem(p, key="preflight") for p in problems]
            + [
                Problem(
                    "every node must run the same software on the same recipe",
                    hint="install one environment on a shared filesystem (or the same "
                    "versions everywhere), and start every node from one recipe file",
                )
            ],
            title="the ranks of this run do not match, so it stops before loading the model:",
        )
    _check_shared_folder(acc, run_dir, gathered)
    return {"allreduce_bus_gbps": _allreduce_bandwidth(acc)}


def _check_shared_folder(acc: Any, run_dir: Path, facts: list[dict[str, str]]) -> None:
    """Every rank must see the run folder rank 0 sees: checkpoints are written by every
    rank and read back by every rank after a requeue, possibly on other nodes."""
    import contextlib
    import secrets

    import torch.distributed as td

    probe: list[Any] = [None]
    if acc.is_main_process:
        anchor = run_dir.resolve()
        while not anchor.exists() and anchor != anchor.parent:
            anchor = anchor.parent
        path = anchor / f".ftl-shared-{secrets.token_hex(6)}"
        with contextlib.suppress(OSError):  # unwritable: the run folder check says so later
            path.write_text("")
            probe[0] = str(path)
    td.broadcast_object_list(probe, src=0)
    seen: list[Any] = [None] * acc.num_processes
    td.all_gather_object(seen, probe[0] is None or Path(probe[0]).is_file())
    if acc.is_main_process and probe[0]:
        Path(probe[0]).unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        who = ", ".join(f"rank {r} ({facts[r].get('host')})" for r in blind)
        raise UserError(
            Problem(
                f"{who} cannot see the run folder {run_dir} as rank 0 "
                f"({facts[0].get('host')}) writes it: it is not on a filesystem every node "
                "shares, so checkpoints would be split across machines and never resume",
                key="output.dir",
                hint="put output.dir on the shared filesystem (the one holding your "
                "home or scratch folder on the cluster)",
            )
        )


def _allreduce_bandwidth(acc: Any, mib: int = 8, rounds: int = 3) -> float:
    """Bus bandwidth of an all-reduce of `mib` MiB, GB/s (logged by rank 0): a slow
    interconnect (NCCL fallen back to sockets, the wrong NIC) shows before training."""
    import sys
    import time

    import torch
    import torch.distributed as td

    x = torch.ones(mib * 2**18, dtype=torch.float32, device=acc.device)
    td.all_reduce(x)  # warm-up: connections, buffers
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        td.all_reduce(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / rounds
    n = acc.num_processes
    gbps = 2 * (n - 1) / n * x.numel() * 4 / seconds / 1e9
    if acc.is_main_process:
        print(
            f"[preflight] all-reduce of {mib} MiB over {n} ranks ({td.get_backend()}): "
            f"{seconds * 1e3:.1f} ms, bus bandwidth {gbps:.2f} GB/s",
            file=sys.stderr,
            flush=True,
        )
    return round(gbps, 3)


_EXPECTED_TYPES = {
    "ddp": ("MULTI_CPU", "MULTI_GPU"),
    "deepspeed": ("DEEPSPEED",),
    "fsdp": ("FSDP",),
}


def check_world(acc: Any, strategy: Strategy) -> None:
    """UserError unless accelerate's world is the planned one and runs `strategy`."""
    planned = os.environ.get(ENV_WORLD)
    seen = acc.num_processes
    dist_type = getattr(acc.distributed_type, "value", str(acc.distributed_type))
    problems = []
    if planned is not None and int(planned) != seen:
        problems.append(
            f"the launch planned a world of {planned} processes but accelerate sees {seen} "
            f"(distributed type {dist_type})"
        )
    import torch.distributed as td

    if td.is_available() and td.is_initialized() and td.get_world_size() != seen:
        problems.append(
            f"torch.distributed has {td.get_world_size()} processes but accelerate counts "
            f"{seen}: ranks would train unsynchronised"
        )
    wanted = _EXPECTED_TYPES.get(strategy.kind)
    if wanted and seen > 1 and dist_type not in wanted:
        problems.append(
            f"distributed.strategy {strategy.name} needs accelerate distributed type "
            f"{' or '.join(wanted)}, but this process runs {dist_type}"
        )
    planned_strategy = os.environ.get(ENV_STRATEGY)
    if planned_strategy is not None and planned_strategy != strategy.name:
        problems.append(
            f"the launch planned strategy {planned_strategy} but the recipe says {strategy.name}"
        )
    if problems:
        raise UserError(
            [Problem(p, key="distributed.strategy") for p in problems]
            + [
                Problem(
                    "start multi-process runs with `ftl launch RECIPE`; it writes the "
                    "accelerate and DeepSpeed configs that make every rank join one world"
                )
            ],
            title="this process is not in the world the run needs:",
        )


def numel(p: Any) -> int:
    """Elements of a parameter, also when ZeRO-3 holds only a slice of it here."""
    return int(getattr(p, "ds_numel", 0) or p.numel())


def weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of parameter storage: the whole model's, and what this rank holds.

    ZeRO-3 keeps this rank's slice in `ds_tensor`, FSDP2 in a DTensor's local shard;
    quantized weights count their packed bytes. Sharding shows as this_rank < whole.
    """
    whole = here = 0
    for p in model.parameters():
        size = p.element_size()
        if hasattr(p, "ds_tensor"):
            whole += p.ds_numel * size
            here += p.ds_tensor.numel() * size
        elif hasattr(p, "to_local"):
            whole += p.numel() * size
            here += p.to_local().numel() * size
        else:
            whole += p.numel() * size
            here += p.numel() * size
    return {"whole": whole, "this_rank": here}


def torch_optimizer(prepared: Any) -> Any:
    """The torch optimizer whose param_groups really drive the update.

    accelerate wraps it once; DeepSpeed's ZeRO optimizer (not a torch Optimizer) wraps
    the client one, or the one its config built (DeepSpeedCPUAdam for ZeRO-Offload).
    """
    import torch

    opt = prepared.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


# ZeRO-3 sizes DeepSpeed counts in parameters; its default 1e9 is tuned for models of 7B
# and more (~14% of a 7B model) but is 10x a 100M model, which then keeps every gathered
# weight from forward to backward and steps the optimizer over the whole partition at once.
ZERO3_WINDOWS = (
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "sub_group_size",
)
ZERO3_WINDOW_MAX = 1_000_000_000
ZERO3_WINDOW_MIN = 1_000_000


def size_zero3_windows(acc: Any, n_params: int) -> dict[str, int]:
    """Fill the ZeRO-3 windows left "auto": DeepSpeed's 1e9 from 7B parameters up, the same
    share (1/7) of smaller models. Call before `prepare` (the engine reads them there)."""
    cfg = compat.deepspeed_config(acc)
    zero = (cfg or {}).get("zero_optimization", {})
    if zero.get("stage") != 3:
        return {}
    size = max(ZERO3_WINDOW_MIN, min(ZERO3_WINDOW_MAX, n_params // 7))
    filled = {k: size for k in ZERO3_WINDOWS if zero.get(k, "auto") == "auto"}
    zero.update(filled)
    return filled


def fill_hidden_size_autos(acc: Any, model: Any) -> dict[str, int]:
    """Accelerate sizes DeepSpeed's "auto" buckets from `model.config.hidden_size`, which a
    composite config (a vision-language model's) does not have: fill them from the
    language model's hidden size, as accelerate would (h*h, 0.9*h*h, 10*h). Call before
    `prepare`."""
    zero = (compat.deepspeed_config(acc) or {}).get("zero_optimization", {})
    config = getattr(model, "config", None)
    if not zero or config is None or getattr(config, "hidden_size", None) is not None:
        return {}
    if getattr(config, "hidden_sizes", None) is not None:
        return {}
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    h = getattr(text, "hidden_size", None)
    if not isinstance(h, int):
        return {}
    sizes = {
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
    }
    if zero.get("stage") != 3:
        sizes = {"reduce_bucket_size": h * h}
    filled = {k: v for k, v in sizes.items() if zero.get(k, "auto") == "auto"}
    zero.update(filled)
    return filled


def deepspeed_builds_optimizer(acc: Any) -> bool:
    cfg = compat.deepspeed_config(acc)
    return cfg is not None and "optimizer" in cfg


def memory_per_rank(acc: Any, rss_mb: dict[str, float]) -> list[dict[str, float]]:
    """Every rank's memory (call on all ranks): peak RSS, RSS at each setup phase
    (`rss_before_model_mb`: imports and data, the same for every strategy), and the GPU
    peak when there is a GPU."""
    from launcher.train.report import peak_memory_mb

    mine = {k: round(v, 1) for k, v in peak_memory_mb().items()}
    mine.update({f"rss_{phase}_mb": round(v, 1) for phase, v in rss_mb.items()})
    if acc.num_processes == 1:
        return [mine]
    from accelerate.utils import gather_object

    return list(gather_object([mine]))


def fsdp_units(model: Any) -> list[str]:
    """Classes that FSDP2 made into units (fully_shard renames them FSDP<Class>)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)})


def write_record(
    run_dir: Path,
    acc: Any,
    strategy: Strategy,
    sched: Schedule,
    model: Any,
    preflight: dict[str, Any] | None = None,
) -> None:
    """`distributed.json` in the run folder: how the world and the batch were made."""
    record = {
        "strategy": strategy.name,
        "distributed_type": getattr(acc.distributed_type, "value", str(acc.distributed_type)),
        "world_size": acc.num_processes,
        "micro_batch_size": sched.micro_batch_size,
        "grad_accum": sched.grad_accum,
        "global_batch": sched.global_batch,
        "accounting": sched.accounting(),
        "mixed_precision": acc.mixed_precision,
        "deepspeed_config": compat.deepspeed_config(acc),
        "fsdp_units": fsdp_units(model) if strategy.kind == "fsdp" else None,
        "weight_bytes": weight_bytes(model),
        "collective_timeout_s": compat.collective_timeout_s(),
        "preflight": preflight or {},
    }
    (run_dir / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
